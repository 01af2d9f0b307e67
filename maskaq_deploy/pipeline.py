"""The stages, as functions of a Run, and the two commands that chain them (verify, build).

    from maskaq_deploy import CalibrateConfig, ModelConfig, calibrate, verify
    run = calibrate(ModelConfig(), CalibrateConfig(method="real", recipe="w8a8"), "runs/w8a8")
    outcome = verify(run)                   # outcome.report: a records.Report, also in RUN/report.json

Stages: ``calibrate`` (model -> quantized checkpoint -> Run), ``export(run, flavour)``, ``evaluate(run,
runtime)`` -> RuntimeResult, ``sensitivity(run)``, ``gate(report, limits)``, ``render(run, report)``.
``verify`` and ``build`` call them in order and write RUN/report.json once, at the end (``finish``): a
failure half-way leaves the previous report as it was.

``calibrate`` also runs as one job over several processes (``torchrun ... -m maskaq_deploy calibrate``; see
calib.dfq.distributed): every process loads the model and calibrates, rank 0 alone prepares and writes ``out``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from maskaq_deploy import checks, deploy, layout, provenance, rundir
from maskaq_deploy import gate as gate_mod
from maskaq_deploy.calib import attach_quantizers, get_recipe, save_quantized_checkpoint
from maskaq_deploy.calib.checkpoint import SCHEMA_VERSION, atomic_write_json, read_manifest
from maskaq_deploy.calib.dfq import distributed, run_calibration
from maskaq_deploy.config import BuildOptions, CalibrateConfig
from maskaq_deploy.data import ImageSet, load_image_set
from maskaq_deploy.deploy import export
from maskaq_deploy.errors import DataError, MaskAQError, UsageError
from maskaq_deploy.models import LoadedModel, ModelConfig, load_model
from maskaq_deploy.records import VS_TORCH_KEYS, Manifest, ProgressEvent, Report, RuntimeResult
from maskaq_deploy.render import write_reports
from maskaq_deploy.report import merge_report, read_latency
from maskaq_deploy.run import Run, default_data, top1
from maskaq_deploy.runtimes.bench import benchmark
from maskaq_deploy.runtimes.compare import agreement, compare_logits
from maskaq_deploy.runtimes.ort_backend import OrtBackend
from maskaq_deploy.sensitivity import METRIC, layer_sensitivity
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TENSORRT, TORCH

log = logging.getLogger(__name__)
export_run = export  # the name the package exports (maskaq_deploy.export is the exporter subpackage)

__all__ = ["calibrate", "export", "export_run", "evaluate", "sensitivity", "gate", "render", "finish", "verify",
           "build", "bench", "Outcome", "BuildResult", "BuildOptions", "Run"]


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import timm

    from maskaq_deploy import __version__

    return {"maskaq_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def _quantize(loaded: LoadedModel, cfg: CalibrateConfig):
    recipe = get_recipe(cfg.recipe)
    if cfg.attention_qdq is not None:
        recipe = dataclasses.replace(recipe, quantize_attention=cfg.attention_qdq)
    qmodel = copy.deepcopy(loaded.model)
    info = attach_quantizers(qmodel, recipe, keep_fp=cfg.keep_fp)
    checks.keep_fp_patterns(cfg.keep_fp, [n for n, _ in qmodel.named_modules() if n and "_quantizer" not in n])
    if not info.quantized:
        raise UsageError(f"recipe {recipe.name} with keep_fp {list(cfg.keep_fp)} leaves no module quantized; "
                         "narrow the `keep_fp` patterns")
    return qmodel, recipe, info


def calibrate(model_cfg: ModelConfig, cfg: CalibrateConfig, out, *, force: bool = False,
              progress=None, resume: bool = False) -> Run:
    """Quantize ``model_cfg``'s model by ``cfg``, write the quantized checkpoint into ``out``, return its Run.

    ``progress`` is called with a records.ProgressEvent as the calibration advances. Under torchrun every
    process calls this; the returned manifest is the same on every rank, the files are written by rank 0 only.
    """
    dist = distributed.setup(cfg.device)
    inputs = _inputs(model_cfg, cfg)  # every input is checked before the output folder is touched
    with contextlib.ExitStack() as stack:  # rank 0 writes a stage that replaces ``out`` only on success
        stage = dist.on_main(lambda: stack.enter_context(rundir.writing(out, force=force, resume=resume)),
                             "preparing the output directory")
        manifest = _calibrate(model_cfg, cfg, inputs, stage, dist, progress=progress, resume=resume)
    distributed.teardown()
    return Run(out, manifest=manifest, fp_model=inputs.loaded)


@dataclasses.dataclass
class CalibrationInputs:
    """What a calibration starts from, every part checked: the FP model (loaded once, under the seed), its
    quantized copy, the recipe, what was quantized, the real images (method real) and the seconds taken."""

    loaded: LoadedModel
    qmodel: torch.nn.Module
    recipe: object
    info: object
    real: ImageSet | None
    seconds: dict


def _load_fp(model_cfg: ModelConfig, seed: int) -> LoadedModel:
    """The FP model, built under ``seed``: a model without weights is drawn from it (reload_fp_model redraws it
    alike)."""
    torch.manual_seed(seed)
    return load_model(model_cfg)


def _inputs(model_cfg: ModelConfig, cfg: CalibrateConfig, loaded: LoadedModel | None = None) -> CalibrationInputs:
    """The checked inputs of a calibration; ``loaded``: the FP model already loaded by ``_load_fp``."""
    checks.device_available(cfg.device)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = _load_fp(model_cfg, cfg.seed)
    qmodel, recipe, info = _quantize(loaded, cfg)
    real = None
    if cfg.needs_real_data:
        spec = default_data(model_cfg.name, "calib", cfg.calib_data, "`calib_data`")
        real = load_image_set(spec, loaded.data_config, "`calib_data`").subset(
            cfg.dfq_config().num_images, cfg.seed)
        if len(real) == 0:
            raise DataError(f"`calib_data` {spec} holds no images")
        real.check_labels(checks.num_classes(loaded.model), "`calib_data`")
    seconds = {"load": round(time.perf_counter() - t0, 3)}
    return CalibrationInputs(loaded, qmodel, recipe, info, real, seconds)


def _calibrate(model_cfg: ModelConfig, cfg: CalibrateConfig, inputs: CalibrationInputs, stage: rundir.Stage,
               dist, *, progress, resume: bool) -> Manifest:
    """Calibrate into ``stage`` (opened by the caller: calibrate, or build for its whole run)."""
    loaded, qmodel, seconds, out = inputs.loaded, inputs.qmodel, dict(inputs.seconds), stage.path
    t0 = time.perf_counter()
    summary = _run_method(loaded.model, qmodel, cfg, loaded.data_config, out, inputs.real, resume=resume,
                          progress=progress, dist=dist)
    seconds["calibrate"] = round(time.perf_counter() - t0, 3)
    rundir.relative_paths(summary, out)
    real = inputs.real
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=loaded.manifest_entry(),
        # the checkpoint as the user named it (the recalibrate command repeats it); inputs.checkpoint identifies
        # the file and where it lies from the run folder, so verify finds it from any directory and a run folder
        # moved elsewhere finds it again (provenance.find_checkpoint); no absolute path of this machine is kept
        model_config=dataclasses.asdict(model_cfg),
        recipe=inputs.recipe.to_dict(),
        keep_fp=list(cfg.keep_fp),
        quantized_modules=len(inputs.info.quantized),
        kept_fp_modules=inputs.info.kept_fp,
        method=cfg.method,
        config=cfg.to_dict(),
        dfq_config=summary["config"],  # what ran: the source's stages, the recipe's TV weight
        seed=cfg.seed,
        inputs={"weights_sha256": loaded.weights_sha256,
                "checkpoint": provenance.checkpoint_record(model_cfg.checkpoint, loaded.weights_sha256, stage.out),
                "calib_data": None if real is None else {"source": real.source, "images": len(real),
                                                         "fingerprint": real.fingerprint()}},
        versions=library_versions(),
        seconds=seconds,
        calibration=summary,
    )
    if dist.is_main:
        save_quantized_checkpoint(out, qmodel, manifest.to_dict())
    dist.barrier("waiting for rank 0 to write the quantized checkpoint")  # no rank reports success before it
    return manifest


def _run_method(fp_model, qmodel, cfg: CalibrateConfig, data_config: dict, out: Path, real: ImageSet | None,
                *, resume: bool, progress, dist=None) -> dict:
    """Calibrate (and, when the method fine-tunes, train) ``qmodel`` in place; return a summary."""
    real_x = real_y = None
    if real is not None:
        batches = list(real.batches(cfg.batch_size))
        real_x = torch.cat([x for x, _ in batches])
        real_y = torch.cat([y for _, y in batches]) if batches and batches[0][1] is not None else None
    events = None if progress is None else (lambda event: progress(ProgressEvent.from_dict(event)))
    return run_calibration(fp_model, qmodel, method=cfg.method, config=cfg.dfq_config(),
                           data_config=data_config, run_dir=out, real_images=real_x, real_labels=real_y,
                           resume=resume, device=cfg.device, progress=events, save_images=cfg.save_images,
                           dist=dist)


# ------------------------------------------------------------------------------------------------ stages

def evaluate(run: Run, runtime: str = TORCH, *, artifact=None) -> RuntimeResult:
    """Run the checkpoint (torch fake-quant) or one of its exported artifacts on the backend called
    ``runtime`` over the run's validation images; compare with the full-precision model and, for an
    artifact, with torch fake-quant (evaluated first when it was not yet). The logits stay in ``run.logits``."""
    if runtime != TORCH and TORCH not in run.logits:
        evaluate(run, TORCH)
    what = deploy.artifact(run, runtime, artifact)
    t0 = time.perf_counter()
    logits = run.logits[runtime] = deploy.run_backend(runtime, what, run.val_images, run.batch_size)
    if runtime == TORCH:  # name the layer that went non-finite
        checks.finite_logits(logits, "the quantized model", run.quantized, run.val_images)
    else:
        checks.finite_logits(logits, f"the {runtime} artifact {Path(what).name}")
    run.seconds[f"eval_{runtime}"] = round(time.perf_counter() - t0, 3)
    result = _score(run, logits, vs_torch=runtime != TORCH)
    if runtime != TORCH:
        result.artifact = Path(what).name
    if runtime == ONNXRUNTIME:  # which QDQ flavour and float dtype ran
        result.extra.update(deploy.graph_facts(what))
    return result


def _score(run: Run, logits, *, vs_torch: bool) -> RuntimeResult:
    """top-1 and agreement with the full-precision model; with ``vs_torch``, the comparison with torch."""
    result = RuntimeResult(top1(logits, run.labels), round(agreement(run.fp_logits, logits), 6))
    if vs_torch:
        m = compare_logits(run.logits[TORCH], logits)
        result.agreement_vs_torch = round(m["top1_agreement"], 6)
        result.sqnr_db_vs_torch = round(m["sqnr_db"], 3) if m["sqnr_db"] != float("inf") else None
        result.max_abs_diff_vs_torch = round(m["max_abs_diff"], 6)
    return result


def sensitivity(run: Run, images: int = 64) -> dict:
    """The report's per-layer sensitivity section, on ``images`` of the run's validation images."""
    used = run.val_images.subset(images, seed=1)
    t0 = time.perf_counter()
    rows = layer_sensitivity(run.quantized, used)
    run.seconds["sensitivity"] = round(time.perf_counter() - t0, 3)
    return {"metric": METRIC, "images": len(used), "rows": rows}


def gate(report: Report, limits: gate_mod.Thresholds) -> gate_mod.GateResult:
    """The accuracy gate of ``limits`` on ``report`` (no thresholds: passed, no checks)."""
    return gate_mod.evaluate_thresholds(report, limits)


def render(run: Run, report: Report) -> tuple[Path, Path]:
    """RUN/report.md and RUN/report.html of ``report`` (its sensitivity and latency tables included)."""
    return write_reports(run.path, report, run.manifest)


def make_report(run: Run, results: dict[str, RuntimeResult], runtime: str) -> Report:
    """The report of ``results`` ({runtime: result}); ``runtime``'s figures are the headline ones."""
    m, main = run.manifest, results[runtime]
    fp_top1 = top1(run.fp_logits, run.labels)
    vs_torch = {k: getattr(main, k) for k in VS_TORCH_KEYS}
    return Report(model=m.name, timm_name=m.timm_name, recipe=m.recipe_name, method=m.method, runtime=runtime,
                  val_data=run.val_spec, fp_top1=fp_top1, quant_top1=main.top1,
                  top1_drop=round(fp_top1 - main.top1, 4), agreement=main.agreement_vs_fp,
                  num_eval_images=len(run.val_images), seconds={**m.seconds, **run.seconds}, runtimes=results,
                  val_fingerprint=run.val_images.fingerprint(), **vs_torch)


@dataclasses.dataclass
class Outcome:
    """What a verify or build ends with: the report written, the gate's verdict, the human-readable files."""

    report: Report
    gate: gate_mod.GateResult
    md_path: Path
    html_path: Path


def finish(run: Run, report: Report, *, limits: gate_mod.Thresholds | None = None, sensitivity_images: int = 64,
           command: str | None = None) -> Outcome:
    """End a verify/build: keep an earlier verify's runtimes of the same images, add the sensitivity table
    (``sensitivity_images`` 0: none) and bench's latency table, apply the gate, write RUN/report.json (the one
    write of the command), report.md and report.html. Never raises on a breach: the caller reads
    ``.gate.passed`` (the CLI exits 4). A baseline refused here (other images) raises its UsageError after the
    files are written, with ``gate`` null."""
    report = merge_report(run.report_path, report)
    if sensitivity_images > 0:
        report.sensitivity = sensitivity(run, sensitivity_images)
    report.latency = read_latency(run.path) or report.latency
    report.seconds = {**report.seconds, **run.seconds}
    report.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report.command = command
    limits = limits if limits is not None else gate_mod.Thresholds()
    refused = None
    try:
        result = gate(report, limits)
    except UsageError as e:  # e.g. a baseline of other images: still leave json, md and html consistent
        refused, result = e, gate_mod.GateResult(True, [])
    report.gate = gate_mod.gate_entry(result, limits) if limits.active and refused is None else None
    atomic_write_json(run.report_path, report.to_dict())
    md, html = render(run, report)
    if refused is not None:
        raise refused
    return Outcome(report, result, md, html)


# ---------------------------------------------------------------------------------------------- commands

def verify(run, val_data: str | None = None, *, runtime: str = TORCH, limit: int | None = None,
           batch_size: int = 256, artifact=None, limits: gate_mod.Thresholds | None = None,
           sensitivity_images: int = 64, command: str | None = None) -> Outcome:
    """Evaluate the quantized checkpoint of ``run`` (a Run or its directory; torch fake-quant, and an exported
    artifact on another runtime) against its full-precision model on ``val_data``; write RUN/report.json."""
    run = Run.of(run, val_data=val_data, limit=limit, batch_size=batch_size)
    results = {TORCH: evaluate(run, TORCH)}
    if runtime != TORCH:
        results[runtime] = evaluate(run, runtime, artifact=artifact)
        if runtime == ONNXRUNTIME and artifact is None:
            _other_flavours(run, results[runtime])
    return finish(run, make_report(run, results, runtime), limits=limits, sensitivity_images=sensitivity_images,
                  command=command)


def _other_flavours(run: Run, main: RuntimeResult) -> None:
    """verify --runtime onnxruntime: the other export flavour's QDQ graph too (the run's model.qdq.onnx holds
    one), each flavour's figures in ``main.extra["flavours"]``."""
    done = main.extra.get("flavour")
    flavours = {done or "?": {k: v for k, v in main.to_dict().items() if k != "artifact"}}
    for flavour, graph in deploy.other_flavour_graphs(run, done).items():
        if isinstance(graph, str):  # why this flavour has no graph (a recipe TensorRT cannot run)
            flavours[flavour] = {"skipped": graph}
            continue
        logits = deploy.run_backend(ONNXRUNTIME, graph, run.val_images, run.batch_size)
        flavours[flavour] = {**_score(run, logits, vs_torch=True).to_dict(), "artifact": graph.name,
                             **deploy.graph_facts(graph)}
    main.extra["flavours"] = flavours


@dataclasses.dataclass
class BuildResult:
    outcome: Outcome
    artifacts: list[str]
    engine_missing_reason: str | None = None

    @property
    def report(self) -> Report:
        return self.outcome.report


def build(model_cfg: ModelConfig, cfg: CalibrateConfig, out, options: BuildOptions | None = None, *,
          progress=None, **keywords) -> BuildResult:
    """calibrate -> export (QDQ in the target's flavour) -> evaluate on torch and the target's runtime ->
    TensorRT bundle and engine -> sensitivity, gate, report (written once). ``options``: a BuildOptions, or
    its fields as flat keywords (``target="tensorrt", limit=64, float_dtype="fp16", ...``; see
    BuildOptions.KEYWORDS). ``engine_missing_reason`` is set when the target is tensorrt and no engine could be
    built here."""
    if options is None:
        options = BuildOptions.from_keywords(**keywords)
    elif keywords:
        raise TypeError(f"build takes options or keywords, not both (got {sorted(keywords)} with options)")
    if distributed.env_world()[1] > 1:
        err = UsageError("build runs in one process; for several processes launch 'torchrun ... -m maskaq_deploy "
                         "calibrate --out RUN', then run 'maskaq-deploy export RUN' and 'maskaq-deploy verify RUN'")
        err.mirrored = True  # every rank refuses alike: reported once
        raise err
    deploy.check_target(cfg.recipe, options.export.target, options.export.float_dtype)  # refuse before any work
    # one stage for the whole build (checkpoint, exports, reports): it replaces ``out`` only on success
    with rundir.writing(out, force=options.calibrate.force, resume=options.calibrate.resume,
                        command=options.command) as stage:
        result = _build_into(model_cfg, cfg, stage, options, progress)
    out = Path(out)
    result.outcome.md_path, result.outcome.html_path = (out / result.outcome.md_path.name,
                                                         out / result.outcome.html_path.name)
    return result


def _build_into(model_cfg: ModelConfig, cfg: CalibrateConfig, stage: rundir.Stage, options: BuildOptions,
                progress) -> BuildResult:
    t0 = time.perf_counter()
    exp_opts, ver = options.export, options.verify
    target = exp_opts.target
    loaded = _load_fp(model_cfg, cfg.seed)  # the one FP model of the build: calibration's teacher, the reference
    _check_val_data(loaded, model_cfg.name, ver.val_data, ver.limit)  # bad images fail now, not after calibrating
    inputs = _inputs(model_cfg, cfg, loaded)
    inputs.seconds["load"] = round(time.perf_counter() - t0, 3)
    manifest = _calibrate(model_cfg, cfg, inputs, stage, distributed.SINGLE, progress=progress,
                          resume=options.calibrate.resume)
    run = Run(stage.path, val_data=ver.val_data, limit=ver.limit, batch_size=ver.batch_size, manifest=manifest,
              fp_model=loaded)
    results, runtime, engine_reason = {TORCH: evaluate(run, TORCH)}, TORCH, None
    if target != TORCH:
        t1 = time.perf_counter()
        exp = export(run, target, dynamic_batch=exp_opts.dynamic_batch, float_dtype=exp_opts.float_dtype)
        run.seconds["export"] = round(time.perf_counter() - t1, 3)
        if target == TENSORRT:
            bad = deploy.conformance(exp.qdq_path)
            if bad:
                raise MaskAQError(f"the TensorRT-flavour graph breaks {len(bad)} explicit-quantization rule(s), "
                                  f"first: {bad[0]}; run 'maskaq-deploy inspect {exp.qdq_path}' for all")
        results[ONNXRUNTIME] = evaluate(run, ONNXRUNTIME)
        runtime = ONNXRUNTIME
    if target == TENSORRT:
        deploy.write_tensorrt_bundle(run, exp.qdq_path)
        if not exp_opts.bundle_only:
            engine, engine_reason = deploy.try_build_engine(run.path, exp.qdq_path)
            if engine is not None:
                results[TENSORRT] = evaluate(run, TENSORRT)
                runtime = TENSORRT
    report = make_report(run, results, runtime)
    report.target = target
    run.seconds["build_total"] = round(time.perf_counter() - t0, 3)
    outcome = finish(run, report, limits=ver.limits, sensitivity_images=ver.sensitivity_images,
                     command=options.command)
    return BuildResult(outcome, run.listing(), engine_reason)


def _check_val_data(loaded: LoadedModel, model_name: str, val_data: str | None, limit: int | None) -> None:
    spec = default_data(model_name, "test", val_data, "`val_data`")
    images = load_image_set(spec, loaded.data_config, "`val_data`").subset(limit)
    images.check_labels(checks.num_classes(loaded.model), "`val_data`")
    images.check_readable()  # a file that is no image fails now, not after calibrating


def bench(artifact, *, batch_sizes=(1, 8), threads=(1, 2), warmup: int = 5, iterations: int = 30,
          provider: str = "cpu") -> list[dict]:
    """Latency of an ONNX artifact on onnxruntime; a run directory means its model.qdq.onnx (exported with a
    dynamic batch when needed). Rows: batch, threads, median_ms, p90_ms, throughput (images/s)."""
    import onnx

    path = Path(artifact)
    if path.is_dir():
        provenance.check_checkpoint(path, read_manifest(path))
        dyn = path / layout.DYNAMIC_QDQ_ONNX
        if not dyn.is_file() or not provenance.belongs(dyn, path):  # bench's own export, redone when stale
            export(Run(path), ONNXRUNTIME, out=dyn, fp_too=False, dynamic_batch=True)
        path = dyn
    if not path.is_file():
        raise UsageError(f"{artifact} is neither an .onnx file nor a run directory")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"{artifact} is not an ONNX file ({type(e).__name__})") from None
    if not proto.graph.input:
        raise UsageError(f"{artifact} has no graph inputs; give a model exported by 'maskaq-deploy export'")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if shape[0] is not None:  # a fixed batch: only that batch size is meaningful
        if any(b != shape[0] for b in batch_sizes):
            log.warning("%s has a fixed batch of %d; timing that batch only (export with --dynamic-batch for "
                        "others)", path.name, shape[0])
        batch_sizes = [shape[0]]
    rows = benchmark(lambda b, t: OrtBackend(path, provider=provider, threads=t), shape[1:],
                     batch_sizes=batch_sizes, threads=threads, warmup=warmup, iterations=iterations)
    for r in rows:
        r["throughput"] = r.pop("throughput_ips")
    return rows
