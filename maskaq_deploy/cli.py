"""The maskaq-deploy command line: thin commands over maskaq_deploy.pipeline.

This module is the only place that prints to the terminal or exits. Every typed error of the library becomes one
line on stderr and an exit code (see maskaq_deploy.errors); heavy imports happen inside the commands so that
``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import click

from maskaq_deploy import rundir
from maskaq_deploy.errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Bf16BuildError, MaskAQDeployError,
                                  UsageError)
from maskaq_deploy.runtimes.targets import FLAVOURS, ONNXRUNTIME, RUNTIMES, TARGETS, TENSORRT, TORCH, names

log = logging.getLogger("maskaq_deploy")
POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(0, 2 ** 63 - 1)


# Keys in library messages (see maskaq_deploy.errors) whose flag is not "--" + the field's name with dashes, which
# is click's naming of every other option; a key may name its config table too (`model.checkpoint`).
OPTION_FLAGS = {"config_file": "--config", "flavour": "--for", "model.name": "--model",
                "model.kwargs": "--model-kwargs"}
OPTION_KEY = re.compile(r"`([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)`")


# what the CLI adds to an error's line: the command that does what the library's message can only describe
COMMAND_HINTS = {Bf16BuildError: " with 'maskaq-deploy export RUN --for tensorrt --float-dtype bf16'"}


def with_flags(message: str) -> str:
    """A library message as the CLI says it: each option key in backquotes (`keep_fp`) becomes its flag."""
    def flag(key: str) -> str:
        return OPTION_FLAGS.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))

    return OPTION_KEY.sub(lambda m: flag(m[1]), message)


def cli_line(e: Exception, line: str) -> str:
    """The one line the CLI prints for the typed error ``e`` whose own line is ``line``."""
    return with_flags(line) + COMMAND_HINTS.get(type(e), "")


def abort(message: str, code: int = EXIT_FAILURE):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the job's size under torchrun (0, 1 for a plain run)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)
    except ValueError:
        return 0, 1


def _error_line(e: Exception) -> str | None:
    """The one line for ``e``. In a multi-process job it names the rank, unless every rank raised the same error
    (``mirrored``): then rank 0 alone reports it and the others print nothing (None)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    rank, world = _rank_world()
    if world > 1:
        if getattr(e, "mirrored", False):
            return msg if rank == 0 else None
        if not msg.startswith("distributed calibration failed on rank"):
            msg = f"distributed calibration failed on rank {rank}: {msg}"
    return msg


def _os_error_line(e: OSError) -> tuple[str, int]:
    """One line naming the problem and the fix for an OSError, and its exit code: 2 where the path the user
    chose is the problem (read-only, not a folder, missing), 1 where the machine is (full disk, I/O)."""
    where = e.filename or "a file"
    usage = {
        errno.EROFS: "{w} is on a read-only file system; choose another --out",
        errno.EACCES: "permission denied on {w}; choose a folder you can write",
        errno.EPERM: "operation not permitted on {w}; choose a folder you can write",
        errno.ENOTDIR: "{w}: a part of the path is a file, not a folder; choose another path",
        errno.EISDIR: "{w} is a folder where a file was expected; give a file path",
        errno.ENOENT: "{w} does not exist; check the path",
        errno.ENAMETOOLONG: "{w}: the path is too long; choose a shorter one",
    }
    failure = {
        errno.ENOSPC: "no space left on the device writing {w}; free space or choose another --out",
        errno.EDQUOT: "disk quota exceeded writing {w}; free space or choose another --out",
    }
    if e.errno in usage:
        return usage[e.errno].format(w=where), EXIT_USAGE
    text = failure.get(e.errno, f"{{w}}: {e.strerror or type(e).__name__}; check the path and the disk")
    return text.format(w=where), EXIT_FAILURE


class App(click.Group):
    """Turns every error into one line and an exit code, never a traceback (MASKAQ_TRACEBACK=1 shows it)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.exceptions.ClickException as e:  # click's own option checks: one line, not the usage text
            where = (getattr(e, "ctx", None) or ctx).command_path
            abort(f"{e.format_message()} (see '{where} --help')".replace("\n", " "), EXIT_USAGE)
        except KeyboardInterrupt:
            abort("interrupted; the previous run is unchanged (a calibration's finished batches are kept: rerun "
                  "it with --resume to continue)", EXIT_INTERRUPTED)
        except Exception as e:
            if os.environ.get("MASKAQ_TRACEBACK"):
                raise
            if isinstance(e, MaskAQDeployError):  # the exit code is the error class's own
                line = _error_line(e)
                if line is None:
                    sys.exit(e.exit_code)
                abort(cli_line(e, line), e.exit_code)
            if isinstance(e, OSError):
                abort(*_os_error_line(e))
            first = (str(e).splitlines() or [""])[0][:200]
            abort(f"unexpected {type(e).__name__}: {first}; please report it (MASKAQ_TRACEBACK=1 shows where)",
                  EXIT_FAILURE)


def _floats(value: str | None, what: str):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{what} takes comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _ints(value: str | None, what: str):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{what} takes C,H,W, e.g. 3,224,224") from None
    return out


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


FLOAT_DTYPE_OPTION = click.option(
    "--float-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
    help="tensorrt: dtype of everything not quantized (default fp16; model I/O stay float32).")


def _option_group(*opts):
    """A decorator applying click options in the order they are listed (so --help lists them that way)."""
    def apply(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


model_options = _option_group(
    click.option("--model", "model", default=None,
                 help="'embedded' (the shipped MNIST ViT, default) or a timm model name."),
    click.option("--model-kwargs", default=None, help="JSON object of timm.create_model kwargs."),
    click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
                 help="Local .safetensors or .pth/.pt state dict (loaded weights-only)."),
    click.option("--pretrained", is_flag=True, default=None,
                 help="Load timm's pretrained weights (offline: from the hub cache)."),
    click.option("--mean", default=None, help="Override the normalization mean, e.g. 0.5,0.5,0.5."),
    click.option("--std", default=None, help="Override the normalization std."),
    click.option("--input-size", default=None, help="Override the input size C,H,W."),
)


calib_options = _option_group(
    click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                 help="TOML file with [model] and [calibrate] tables; options override it."),
    click.option("--method", default=None,
                 help="maskaq (default, data-free), psaq, noise (data-free baselines) or real (user images)."),
    click.option("--preset", default=None, help="fast (default) or paper; standard is another name for fast."),
    click.option("--save-images", is_flag=True, default=None, help="Write a PNG grid of the synthetic images."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run in OUT from its last checkpoint."),
    click.option("--recipe", default=None,
                 help="w8a8, fp8, w4a16, w4a8, w5a5, w4a4, w3a3, or a recipe .toml file."),
    click.option("--attention-qdq", type=click.Choice(["on", "off"]), default=None,
                 help="Quantize the attention matmuls (default: the recipe's, on)."),
    click.option("--keep-fp", multiple=True, help="Keep modules matching this fnmatch pattern in float."),
    click.option("--calib-data", default=None, help="Calibration images: .npz or ImageFolder directory."),
    click.option("--num-images", type=POSITIVE, default=None,
                 help="Calibration images (synthetic or real); default: the preset's."),
    click.option("--batch-size", type=POSITIVE, default=None,
                 help="Batch size of synthesis (peak memory grows with it: docs/real-size.md), real images and "
                      "evaluation."),
    click.option("--seed", type=SEED, default=None, help="Random seed, 0 to 2^63 - 1."),
    click.option("--device", default=None, help="cpu or cuda."),
    click.option("--force", is_flag=True,
                 help="Replace the run in OUT (kept until the new one succeeds); never deletes other files."),
    click.option("--quiet", is_flag=True, help="No progress bars; logs only."),
)


gate_options = _option_group(
    click.option("--max-drop", type=float, default=None,
                 help="Fail (exit 4) when top-1 drops more than this many points vs full precision."),
    click.option("--baseline", default=None, type=click.Path(dir_okay=False),
                 help="A previous report.json of the same model and recipe to compare against."),
    click.option("--max-regression", type=float, default=None,
                 help="Fail (exit 4) when top-1 is this many points below the --baseline's."),
)


def _command_line() -> str:
    return shlex.join(["maskaq-deploy", *sys.argv[1:]])


def _finish(done, limits) -> int:
    """Prints where the reports are and the gate's lines; returns the exit code (4 on a breach)."""
    from maskaq_deploy.errors import EXIT_GATE, EXIT_OK

    click.echo(f"reports: {done.md_path}, {done.html_path}")
    if limits is not None and limits.active:
        for line in done.gate.lines():
            click.echo(line, err=not done.gate.passed)
        if not done.gate.passed:
            click.echo(f"gate breached: {len(done.gate.breached)} check(s) failed", err=True)
            return EXIT_GATE
        click.echo(f"gate passed: {len(done.gate.checks)} check(s)")
    return EXIT_OK


def resolve_configs(kw: dict):
    """ModelConfig and CalibrateConfig from --config plus explicit options."""
    from maskaq_deploy.config import CalibrateConfig, build, config_tables, with_dfq_preset
    from maskaq_deploy.models import ModelConfig

    file = config_tables(kw.get("config_file"))
    calibrate_table, dfq_table = with_dfq_preset(file.get("calibrate"), file.get("dfq"), kw.get("preset"))
    if kw.get("batch_size") is not None:  # --batch-size is the synthesis batch too: the memory / time trade
        dfq_table["batch_size"] = kw["batch_size"]
    try:
        model_kwargs = json.loads(kw["model_kwargs"]) if kw.get("model_kwargs") else None
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not valid JSON: {e}") from None
    model_cfg = build(ModelConfig, file.get("model"), {
        "name": kw.get("model"), "kwargs": model_kwargs, "checkpoint": kw.get("checkpoint"),
        "pretrained": kw.get("pretrained"), "mean": _floats(kw.get("mean"), "--mean"),
        "std": _floats(kw.get("std"), "--std"), "input_size": _ints(kw.get("input_size"), "--input-size")},
        table="model")
    calib_cfg = build(CalibrateConfig, calibrate_table, {
        "method": kw.get("method"), "preset": kw.get("preset"), "save_images": kw.get("save_images"),
        "dfq": dfq_table, "recipe": kw.get("recipe"),
        "keep_fp": tuple(kw["keep_fp"]) if kw.get("keep_fp") else None, "calib_data": kw.get("calib_data"),
        "num_images": kw.get("num_images"), "batch_size": kw.get("batch_size"), "seed": kw.get("seed"),
        "device": kw.get("device"), "attention_qdq": _on_off(kw.get("attention_qdq"))}, table="calibrate")
    return model_cfg, calib_cfg


class _ProgressView:
    """Renders the calibration's progress events: rich bars with the current losses, or log lines (--quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.tasks: dict = {}

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[losses]}"),
                                     console=__import__("rich.console").console.Console(stderr=True))
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event) -> None:  # a records.ProgressEvent
        stage, key = str(event.stage), event.key
        losses = " ".join(f"{k} {v:.3g}" for k, v in (event.losses or {}).items() if isinstance(v, (int, float)))
        step, total = event.step, event.total or 1
        if self.progress is None:
            log.info("%s %s/%s %s", stage, step, total, losses)
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(stage, total=total, losses="")
        self.progress.update(self.tasks[key], completed=step, total=total, losses=losses)


def _setup_logging(quiet: bool = False, verbose: bool = False):
    level = logging.DEBUG if verbose else logging.INFO
    # our packages log at INFO; third-party libraries (the ONNX exporter is chatty) only at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("maskaq_deploy").setLevel(level)  # calib, export and runtimes are its subpackages


def _print_report(report) -> None:
    """The verify table of a typed ``records.Report``: FP, then one row per runtime and export flavour."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.model} | {report.recipe} | {report.method} | {report.num_eval_images} images")
    for col in ("runtime", "top-1 %", "drop (pts)", "agree vs FP", "agree vs torch", "SQNR vs torch dB"):
        table.add_column(col, justify="right")
    table.add_row("FP (float)", f"{report.fp_top1:.2f}", "-", "-", "-", "-")
    skipped: list[str] = []
    for name, runtime in report.runtimes.items():
        for label, r in _flavour_rows(name, runtime, skipped):
            table.add_row(label, f"{r.top1:.2f}", f"{report.fp_top1 - r.top1:.2f}",
                          f"{100 * r.agreement_vs_fp:.2f}%" if r.agreement_vs_fp is not None else "-",
                          f"{100 * r.agreement_vs_torch:.2f}%" if r.agreement_vs_torch is not None else "-",
                          f"{r.sqnr_db_vs_torch:.1f}" if r.sqnr_db_vs_torch is not None else "-")
    Console().print(table)
    for line in skipped:
        click.echo(line)


def _flavour_rows(name: str, r, skipped: list) -> list:
    """A runtime's row, then one per other export flavour verify ran on it (onnxruntime: both QDQ flavours)."""
    from maskaq_deploy.records import RuntimeResult

    def label(flavour, row):
        return f"{name} ({flavour}, {row.extra.get('float_dtype', 'fp32')})"

    main_flavour = r.extra.get("flavour")
    rows = [(label(main_flavour, r) if main_flavour else name, r)]
    for flavour, row in (r.extra.get("flavours") or {}).items():
        if "skipped" in row:
            skipped.append(f"{name} ({flavour} flavour) not evaluated: {with_flags(row['skipped'])}")
        elif flavour != main_flavour:
            rows.append((label(flavour, RuntimeResult.from_dict(row)), RuntimeResult.from_dict(row)))
    return rows


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskaq-deploy")
def cli():
    """Data-free quantization (MaskAQ) and deployment of timm Vision Transformers.

    Exit codes: 0 ok, 1 failure, 2 usage error (also: run folder locked by another command), 3 engine not built
    here (bundle written), 4 accuracy gate breached, 130 interrupted.
    """


@cli.command()
@model_options
@calib_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
def calibrate(out, force, quiet, resume, **kw):
    """Quantize a model (MaskAQ data-free by default) and write the quantized checkpoint into OUT.

    Runs as one job over several processes or machines under torchrun (docs/distributed.md)."""
    from maskaq_deploy.pipeline import calibrate as run_calibrate

    rank, world = _rank_world()
    _setup_logging(quiet)
    if rank != 0:  # under torchrun rank 0 alone shows progress and the result; the others only warn
        quiet = True
        logging.getLogger("maskaq_deploy").setLevel(logging.WARNING)
    model_cfg, calib_cfg = resolve_configs(kw)
    with _ProgressView(quiet) as view:
        manifest = run_calibrate(model_cfg, calib_cfg, out, force=force, resume=resume, progress=view).manifest
    if rank == 0:
        where = f" by {world} processes" if world > 1 else ""
        click.echo(f"quantized checkpoint written to {out}{where} ({manifest.recipe_name}, "
                   f"{manifest.quantized_modules} quantized modules, method {manifest.method})")


@cli.command()
@click.argument("run", type=click.Path(exists=False, file_okay=False))
@click.option("--val-data", default=None, help="Validation images: .npz or ImageFolder (default: embedded test set).")
@click.option("--runtime", default=TORCH.value, type=click.Choice(names(RUNTIMES)),
              help="torch (fake-quant reference), onnxruntime (RUN/model.qdq.onnx) or tensorrt (RUN/model.engine).")
@click.option("--artifact", default=None, type=click.Path(dir_okay=False),
              help="The .onnx or .engine to run instead of the one in RUN.")
@click.option("--limit", type=POSITIVE, default=None, help="Evaluate on at most this many images.")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@gate_options
def verify(run, val_data, runtime, artifact, limit, batch_size, max_drop, baseline, max_regression):
    """Evaluate a quantized checkpoint RUN (and an exported artifact of it) against its full-precision model;
    write RUN/report.json."""
    from maskaq_deploy.gate import precheck, thresholds
    from maskaq_deploy.run import Run
    from maskaq_deploy.pipeline import verify as run_verify

    _setup_logging()
    limits = thresholds(max_drop, baseline, max_regression)  # validated (and baseline read) before any work
    if artifact is not None and not Path(artifact).is_file():
        raise UsageError(f"--artifact {artifact} does not exist; give an exported .onnx or .engine, or leave it "
                         "out to use the run's own")
    handle = Run(run, val_data=val_data, limit=limit, batch_size=batch_size)
    precheck(limits, model=handle.manifest.name, recipe=handle.manifest.recipe_name)
    with _run_lock(run):
        done = run_verify(handle, runtime=runtime, artifact=artifact, limits=limits, command=_command_line())
        _print_report(done.report)
        code = _finish(done, limits)
    sys.exit(code)


@cli.command()
@model_options
@calib_options
@click.option("--out", default="maskaq-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--target", default=ONNXRUNTIME.value, show_default=True,
              type=click.Choice(names(TARGETS)),
              help="Where the model will run: QDQ ONNX for onnxruntime, TensorRT bundle + engine, or torch only.")
@click.option("--val-data", default=None, help="Validation images (default: the embedded test set).")
@click.option("--limit", type=POSITIVE, default=None, help="Evaluate on at most this many images.")
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch dimension.")
@click.option("--bundle-only", is_flag=True,
              help="tensorrt: write the bundle and exit 0 without trying to build the engine here.")
@FLOAT_DTYPE_OPTION
@gate_options
def build(out, force, quiet, resume, target, val_data, limit, dynamic_batch, bundle_only, float_dtype, max_drop,
          baseline, max_regression, **kw):
    """Calibrate -> export -> verify (-> TensorRT bundle and engine): the whole chain on one model.

    Default: the embedded MNIST ViT, method and recipe from the options, target onnxruntime."""
    from maskaq_deploy.calib import get_recipe

    from maskaq_deploy.config import BuildOptions, CalibrateOptions, ExportOptions, VerifyOptions
    from maskaq_deploy.deploy import check_build_float_dtype
    from maskaq_deploy.errors import EXIT_NO_ENGINE, EXIT_OK
    from maskaq_deploy.gate import precheck, thresholds
    from maskaq_deploy.pipeline import build as run_build

    _setup_logging(quiet)
    limits = thresholds(max_drop, baseline, max_regression)
    check_build_float_dtype(target, float_dtype)  # before any work
    model_cfg, calib_cfg = resolve_configs(kw)
    precheck(limits, model=model_cfg.name, recipe=get_recipe(calib_cfg.recipe).name)  # before any work
    # the whole build, reports included, goes into a stage that replaces OUT only when it is complete (see
    # rundir); a gate breach (4) or a missing engine (3) still installs it: the run is whole, its report says why
    options = BuildOptions(CalibrateOptions(force=force, resume=resume),
                           ExportOptions(target=target, dynamic_batch=dynamic_batch, bundle_only=bundle_only,
                                         float_dtype=float_dtype),
                           VerifyOptions(val_data=val_data, limit=limit, limits=limits), command=_command_line())
    with _ProgressView(quiet) as view:
        result = run_build(model_cfg, calib_cfg, out, options, progress=view)
    _print_report(result.report)
    click.echo(f"artifacts in {out}: {', '.join(result.artifacts)}")
    code = _finish(result.outcome, limits)
    if result.engine_missing_reason:
        click.echo(f"engine not built: {result.engine_missing_reason}", err=True)
        code = code if code != EXIT_OK else EXIT_NO_ENGINE
    sys.exit(code)


@cli.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--for", "flavour", default=ONNXRUNTIME.value, show_default=True,
              type=click.Choice(names(FLAVOURS)), help="Which runtime the QDQ graph is shaped for.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="QDQ file (default RUN/model.qdq.onnx).")
@click.option("--batch-size", type=POSITIVE, default=1, show_default=True, help="Fixed batch size of the graph.")
@click.option("--dynamic-batch", is_flag=True, help="Dynamic batch dimension instead of a fixed one.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20; 21 for INT4 weights).")
@FLOAT_DTYPE_OPTION
@click.option("--attention-qdq", type=click.Choice(["on", "off"]), default=None,
              help="Q/DQ on the attention matmuls (default: as calibrated); off keeps them in the float dtype.")
@click.option("--cpu", "cpu", default="auto", show_default=True,
              type=click.Choice(["auto", "x86-vnni", "x86-avx2", "arm"]),
              help="--for onnxruntime: the CPU family the integer layout is for (auto: this machine's).")
def export_cmd(run, flavour, out, batch_size, dynamic_batch, opset, float_dtype, attention_qdq, cpu):
    """Export the quantized checkpoint RUN to a QDQ ONNX graph (and its float graph to RUN/model.onnx)."""
    from maskaq_deploy.deploy import check_float_dtype, conformance, export
    from maskaq_deploy.export.onnx_export import MAX_OPSET, MIN_OPSET
    from maskaq_deploy.run import Run

    _setup_logging()
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET}")
    check_float_dtype(float_dtype, flavour)
    if cpu != "auto" and flavour != ONNXRUNTIME:
        raise UsageError(f"--cpu {cpu} is for --for onnxruntime; {flavour} has one integer layout")
    with _run_lock(run):
        res = export(Run(run), flavour, out=out, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset,
                     float_dtype=float_dtype, attention_qdq=_on_off(attention_qdq), cpu=cpu)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(res.op_counts.items()) if k in (
        "QuantizeLinear", "DequantizeLinear", "MatMul", "MatMulNBits", "MatMulIntegerToFloat", "Gemm", "Conv"))
    layout = f", for {res.cpu} CPUs" if res.cpu else ""
    click.echo(f"wrote {res.qdq_path} ({flavour}{layout}, {res.float_dtype}, opset {res.opset}; {counts})")
    if flavour == ONNXRUNTIME and res.op_counts.get("MatMulNBits"):
        click.echo("note: INT4 weight-only graphs buy size, not CPU speed: onnxruntime runs MatMulNBits with float "
                   "activations at about FP32 latency (docs/onnxruntime.md); w8a8 is the fastest recipe on CPU")
    if flavour == TENSORRT:
        bad = conformance(res.qdq_path)
        click.echo(f"TensorRT conformance: {len(bad)} violation(s)")
        for v in bad:
            click.echo(f"  {v}")
        if bad:
            sys.exit(EXIT_FAILURE)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit 1 when the graph breaks a TensorRT rule (a CI gate).")
def inspect_cmd(model, strict):
    """Print TensorRT conformance violations, quantized ops by type and bit width, and the size of MODEL.onnx."""
    from rich.console import Console
    from rich.table import Table

    from maskaq_deploy.export.inspect import inspect_onnx

    rep = inspect_onnx(model)
    console = Console()
    console.print(f"{rep.path}: opset {rep.opset}, IR {rep.ir_version}, {rep.num_nodes} nodes, {rep.float_dtype}, "
                  f"{rep.file_bytes / 1e6:.2f} MB on disk ({rep.quantized_initializer_bytes / 1e6:.2f} MB quantized "
                  f"weights, {rep.float_initializer_bytes / 1e6:.2f} MB float)")
    if not rep.has_qdq:
        console.print("no Q/DQ nodes: a float graph (export a quantized checkpoint with 'maskaq-deploy export')")
    table = Table(title="quantized ops")
    table.add_column("op")
    table.add_column("bit widths")
    table.add_column("count", justify="right")
    for op, labels in sorted(rep.quantized_ops.items()):
        for label, n in sorted(labels.items()):
            table.add_row(op, str(label), str(n))
    console.print(table)
    for title, viol in (("TensorRT", rep.tensorrt_violations), ("onnxruntime", rep.onnxruntime_violations)):
        console.print(f"{title}: {len(viol)} violation(s)")
        for v in viol:
            console.print(f"  {v}")
    if strict and any(v.severity == "error" for v in rep.tensorrt_violations):
        sys.exit(EXIT_FAILURE)


@cli.command("bench")
@click.argument("artifact", type=click.Path())
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default="1,2", show_default=True,
              help="Comma-separated intra-op thread counts, each 1 to 4x the CPU cores.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--iterations", type=POSITIVE, default=30, show_default=True)
@click.option("--provider", default="cpu", show_default=True, help="onnxruntime provider: cpu or cuda.")
def bench_cmd(artifact, batch_sizes, threads, warmup, iterations, provider):
    """Latency (median, p90) and throughput of ARTIFACT (.onnx, or a run directory's model.qdq.onnx)."""
    from maskaq_deploy.pipeline import bench

    _setup_logging()
    max_threads = 4 * (os.cpu_count() or 1)
    thread_counts = _ints_list(threads, "--threads")
    if max(thread_counts) > max_threads:
        raise UsageError(f"--threads {max(thread_counts)} is more than 4x this machine's {os.cpu_count()} CPU "
                         f"cores; use 1 to {max_threads}")
    with _run_lock(artifact):
        rows = bench(artifact, batch_sizes=_ints_list(batch_sizes, "--batch-sizes"), threads=thread_counts,
                     warmup=warmup, iterations=iterations, provider=provider)
        if Path(artifact).is_dir():  # a run directory: the next report shows this latency table
            from maskaq_deploy.report import record_latency

            record_latency(artifact, rows)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"latency of {artifact}")
    for col in ("batch", "threads", "median ms", "p90 ms", "images/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), str(r["threads"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['throughput']:.1f}")
    Console().print(table)
    from maskaq_deploy.runtimes.bench import graph_kernel_line

    click.echo(graph_kernel_line(Path(artifact) if Path(artifact).is_file() else Path(artifact) /
                                 "model.qdq.dynamic.onnx", batch=max(r["batch"] for r in rows),
                                 threads=max(r["threads"] for r in rows), provider=provider))


@cli.command("sensitivity")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--val-data", default=None, help="Validation images (default: the embedded test set).")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Top-1 budget (points vs FP) the suggested --keep-fp list should meet.")
@click.option("--limit", type=POSITIVE, default=None, help="Use at most this many validation images.")
def sensitivity_cmd(run, val_data, max_drop, limit):
    """Per-layer sensitivity of RUN (output SQNR vs FP, worst first) and a --keep-fp list meeting --max-drop."""
    from rich.console import Console
    from rich.table import Table

    from maskaq_deploy.sensitivity import TABLE_COLUMNS, analyze, summary_lines, table_rows

    _setup_logging()
    with _run_lock(run):
        result = analyze(run, val_data, max_drop=max_drop, limit=limit)
    table = Table(title=f"per-layer sensitivity of {run} ({result['recipe']})")
    for col in TABLE_COLUMNS:
        table.add_column(col)
    for row in table_rows(result["rows"]):
        table.add_row(*row)
    Console().print(table)
    for line in summary_lines(result):
        click.echo(line)


def _run_lock(run):
    """The advisory lock of run folder ``run`` for a command that writes into it (nothing for a file or a
    missing folder: the command then refuses it itself)."""
    return rundir.locked(run, _command_line()) if Path(run).is_dir() else contextlib.nullcontext()


def _ints_list(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} takes comma-separated integers, e.g. 1,8") from None
    if not out or any(v < 1 for v in out):
        raise UsageError(f"{what} needs positive integers")
    return out


def main():
    cli(prog_name="maskaq-deploy")


if __name__ == "__main__":  # pragma: no cover
    main()
