"""The maskaq-deploy command line: thin commands over maskaq_deploy.pipeline.

This module is the only place that prints to the terminal or exits. Every typed error of the library becomes one
line on stderr and an exit code (see maskaq_deploy.errors); heavy imports happen inside the commands so that
``--help`` is instant.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from maskaq_deploy.errors import EXIT_FAILURE, EXIT_USAGE, UsageError

log = logging.getLogger("maskaq_deploy")


def _typed_errors():
    """(exception classes, exit code) pairs, most specific first."""
    from calib.errors import CheckpointError, QuantError, RecipeError, UnsupportedModelError
    from maskaq_deploy.errors import MaskAQError
    from runtimes.errors import BackendError

    pairs = [(MaskAQError, None), (RecipeError, EXIT_USAGE), (UnsupportedModelError, EXIT_USAGE),
             (CheckpointError, EXIT_FAILURE), (QuantError, EXIT_FAILURE), (BackendError, EXIT_FAILURE)]
    try:
        from export.errors import ExportError, ExportInputError

        pairs[1:1] = [(ExportInputError, EXIT_USAGE), (ExportError, EXIT_FAILURE)]
    except ImportError:  # pragma: no cover - export package always ships
        pass
    return pairs


def abort(message: str, code: int = EXIT_FAILURE):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class App(click.Group):
    """Turns the library's typed errors into one line and an exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            abort("interrupted; completed checkpoints are kept (rerun with --resume where supported)", 130)
        except Exception as e:  # noqa: BLE001 - mapped below, re-raised when unknown
            for cls, code in _typed_errors():
                if isinstance(e, cls):
                    abort(str(e).splitlines()[0] if str(e) else type(e).__name__,
                          code if code is not None else e.exit_code)
            raise


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


def model_options(f):
    opts = [
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
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def calib_options(f):
    opts = [
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="TOML file with [model] and [calibrate] tables; options override it."),
        click.option("--method", default=None, help="Calibration method: real."),
        click.option("--recipe", default=None,
                     help="w8a8, w4a16, w4a8, w5a5, w4a4, w3a3, or a recipe .toml file."),
        click.option("--keep-fp", multiple=True, help="Keep modules matching this fnmatch pattern in float."),
        click.option("--calib-data", default=None, help="Calibration images: .npz or ImageFolder directory."),
        click.option("--num-images", type=int, default=None, help="Calibration images to use."),
        click.option("--batch-size", type=int, default=None, help="Calibration batch size."),
        click.option("--seed", type=int, default=None, help="Random seed."),
        click.option("--device", default=None, help="cpu or cuda."),
        click.option("--force", is_flag=True, help="Overwrite a non-empty output directory."),
        click.option("--quiet", is_flag=True, help="No progress bars; logs only."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def resolve_configs(kw: dict):
    """ModelConfig and CalibrateConfig from --config plus explicit options."""
    from maskaq_deploy.config import CalibrateConfig, build, read_toml
    from maskaq_deploy.models import ModelConfig

    file = read_toml(kw["config_file"]) if kw.get("config_file") else {}
    try:
        model_kwargs = json.loads(kw["model_kwargs"]) if kw.get("model_kwargs") else None
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-kwargs is not valid JSON: {e}") from None
    model_cfg = build(ModelConfig, file.get("model"), {
        "name": kw.get("model"), "kwargs": model_kwargs, "checkpoint": kw.get("checkpoint"),
        "pretrained": kw.get("pretrained"), "mean": _floats(kw.get("mean"), "--mean"),
        "std": _floats(kw.get("std"), "--std"), "input_size": _ints(kw.get("input_size"), "--input-size")})
    calib_cfg = build(CalibrateConfig, file.get("calibrate"), {
        "method": kw.get("method"), "recipe": kw.get("recipe"),
        "keep_fp": tuple(kw["keep_fp"]) if kw.get("keep_fp") else None, "calib_data": kw.get("calib_data"),
        "num_images": kw.get("num_images"), "batch_size": kw.get("batch_size"), "seed": kw.get("seed"),
        "device": kw.get("device")})
    return model_cfg, calib_cfg


def _setup_logging(quiet: bool = False, verbose: bool = False):
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} | {report['recipe']} | {report['method']} | "
                        f"{report['num_eval_images']} images")
    for col in ("runtime", "top-1 %", "drop (pts)", "agree vs FP", "agree vs torch", "SQNR vs torch dB"):
        table.add_column(col, justify="right")
    table.add_row("FP (float)", f"{report['fp_top1']:.2f}", "-", "-", "-", "-")
    for name, r in report["runtimes"].items():
        table.add_row(name, f"{r['top1']:.2f}", f"{report['fp_top1'] - r['top1']:.2f}",
                      f"{100 * r['agreement_vs_fp']:.2f}%",
                      f"{100 * r['agreement_vs_torch']:.2f}%" if "agreement_vs_torch" in r else "-",
                      f"{r['sqnr_db_vs_torch']:.1f}" if "sqnr_db_vs_torch" in r else "-")
    Console().print(table)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maskaq-deploy")
def cli():
    """Data-free quantization (MaskAQ) and deployment of timm Vision Transformers.

    Exit codes: 0 ok, 1 failure, 2 usage error, 3 engine not built here (bundle written), 4 accuracy gate
    breached.
    """


@cli.command()
@model_options
@calib_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
def calibrate(out, force, quiet, **kw):
    """Quantize a model and write the quantized checkpoint into OUT."""
    from maskaq_deploy.pipeline import calibrate as run_calibrate

    _setup_logging(quiet)
    model_cfg, calib_cfg = resolve_configs(kw)
    manifest = run_calibrate(model_cfg, calib_cfg, out, force=force)
    click.echo(f"quantized checkpoint written to {out} ({manifest['recipe']['name']}, "
               f"{manifest['quantized_modules']} quantized modules, method {manifest['method']})")


@cli.command()
@click.argument("run", type=click.Path(exists=False, file_okay=False))
@click.option("--val-data", default=None, help="Validation images: .npz or ImageFolder (default: embedded test set).")
@click.option("--runtime", default="torch", help="torch (fake-quant reference).")
@click.option("--limit", type=int, default=None, help="Evaluate on at most this many images.")
@click.option("--batch-size", type=int, default=256)
def verify(run, val_data, runtime, limit, batch_size):
    """Evaluate a quantized checkpoint RUN against its full-precision model; write RUN/report.json."""
    from maskaq_deploy.pipeline import verify as run_verify

    _setup_logging()
    report = run_verify(run, val_data, runtime=runtime, limit=limit, batch_size=batch_size)
    _print_report(report)


@cli.command()
@model_options
@calib_options
@click.option("--out", default="maskaq-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--val-data", default=None, help="Validation images (default: the embedded test set).")
@click.option("--limit", type=int, default=None, help="Evaluate on at most this many images.")
def build(out, force, quiet, val_data, limit, **kw):
    """Calibrate, then verify: the whole chain on one model (default: the embedded MNIST ViT, w8a8)."""
    from maskaq_deploy.pipeline import calibrate as run_calibrate
    from maskaq_deploy.pipeline import verify as run_verify

    _setup_logging(quiet)
    model_cfg, calib_cfg = resolve_configs(kw)
    run_calibrate(model_cfg, calib_cfg, out, force=force)
    report = run_verify(out, val_data, limit=limit)
    _print_report(report)
    click.echo(f"artifacts in {out}: model.safetensors, quant.safetensors, manifest.json, report.json")


def main():
    cli(prog_name="maskaq-deploy")


if __name__ == "__main__":  # pragma: no cover
    main()
