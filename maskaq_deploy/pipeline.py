"""The stages behind the CLI: calibrate -> (export) -> verify, each usable on its own from Python.

    from maskaq_deploy.pipeline import calibrate, verify
    from maskaq_deploy.config import CalibrateConfig
    from maskaq_deploy.models import ModelConfig
    manifest = calibrate(ModelConfig(), CalibrateConfig(method="real", recipe="w8a8"), "runs/w8a8")
    report = verify("runs/w8a8", "embedded:test")

``calibrate`` also runs as one job over several processes (``torchrun ... -m maskaq_deploy calibrate``; see
calib.dfq.distributed): every process loads the model and calibrates, rank 0 alone prepares and writes ``out``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from maskaq_deploy.config import CalibrateConfig
from maskaq_deploy.data import ImageSet, load_image_set
from maskaq_deploy.errors import DataError, MaskAQError, OutputExistsError, UsageError
from maskaq_deploy.models import EMBEDDED, LoadedModel, ModelConfig, load_model

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import timm

    from maskaq_deploy import __version__

    return {"maskaq_deploy": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless ``force``; create it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"output directory {out} is not empty; choose another --out or pass --force")
        for child in out.iterdir():  # --force: start clean so no stale artifact survives
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def default_data(model_cfg: ModelConfig, part: str, given: str | None, what: str) -> str:
    if given:
        return given
    if model_cfg.name == EMBEDDED:
        return f"embedded:{part}"
    raise DataError(f"{what} is required for model {model_cfg.name} (only the embedded model ships data)")


def _quantize(loaded: LoadedModel, cfg: CalibrateConfig):
    import copy

    from maskaq_deploy.calib import attach_quantizers, get_recipe

    recipe = get_recipe(cfg.recipe)
    if cfg.attention_qdq is not None:
        recipe = dataclasses.replace(recipe, quantize_attention=cfg.attention_qdq)
    qmodel = copy.deepcopy(loaded.model)
    info = attach_quantizers(qmodel, recipe, keep_fp=cfg.keep_fp)
    return qmodel, recipe, info


def calibrate(model_cfg: ModelConfig, cfg: CalibrateConfig, out, *, force: bool = False,
              progress=None, resume: bool = False) -> dict:
    """Quantize ``model_cfg``'s model by ``cfg`` and write the quantized checkpoint into ``out``.

    Under torchrun every process calls this; the returned manifest is the same on every rank, the files are
    written by rank 0 only.
    """
    from maskaq_deploy.calib import save_quantized_checkpoint
    from maskaq_deploy.calib.dfq import distributed

    dist = distributed.setup(cfg.device)
    out = Path(out)
    if not resume:
        dist.on_main(lambda: prepare_out_dir(out, force), "preparing the output directory")
    else:
        dist.on_main(lambda: out.mkdir(parents=True, exist_ok=True), "preparing the output directory")
    torch.manual_seed(cfg.seed)
    seconds = {}
    t0 = time.perf_counter()
    loaded = load_model(model_cfg)
    qmodel, recipe, info = _quantize(loaded, cfg)
    real = None
    if cfg.needs_real_data:
        spec = default_data(model_cfg, "calib", cfg.calib_data, "--calib-data")
        real = load_image_set(spec, loaded.data_config, "--calib-data").subset(
            cfg.dfq_config().num_images, cfg.seed)
        if len(real) == 0:
            raise DataError(f"--calib-data {spec} holds no images")
    seconds["load"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    summary = _run_method(loaded.model, qmodel, cfg, loaded.data_config, out, real, resume=resume,
                          progress=progress, dist=dist)
    seconds["calibrate"] = round(time.perf_counter() - t0, 3)
    manifest = {
        "model": loaded.manifest_entry(),
        # the checkpoint path is stored resolved so verify can reload the FP model from any directory
        "model_config": {**dataclasses.asdict(model_cfg),
                         "checkpoint": str(Path(model_cfg.checkpoint).resolve()) if model_cfg.checkpoint else None},
        "recipe": recipe.to_dict(),
        "keep_fp": list(cfg.keep_fp),
        "quantized_modules": len(info.quantized),
        "kept_fp_modules": info.kept_fp,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "dfq_config": _effective_dfq(cfg),
        "seed": cfg.seed,
        "inputs": {"weights_sha256": loaded.weights_sha256,
                   "calib_data": None if real is None else {"source": real.source, "images": len(real),
                                                            "fingerprint": real.fingerprint()}},
        "versions": library_versions(),
        "seconds": seconds,
        "calibration": summary,
    }
    if dist.is_main:
        save_quantized_checkpoint(out, qmodel, manifest)
    dist.barrier("waiting for rank 0 to write the quantized checkpoint")  # no rank reports success before it
    distributed.teardown()
    return manifest


def _effective_dfq(cfg: CalibrateConfig) -> dict:
    from maskaq_deploy.calib.dfq import effective_config

    return effective_config(cfg.method, cfg.dfq_config()).to_dict()


def _run_method(fp_model, qmodel, cfg: CalibrateConfig, data_config: dict, out: Path, real: ImageSet | None,
                *, resume: bool, progress, dist=None) -> dict:
    """Calibrate (and, when the method fine-tunes, train) ``qmodel`` in place; return a summary."""
    from maskaq_deploy.calib.dfq import run_calibration

    real_x = real_y = None
    if real is not None:
        batches = list(real.batches(cfg.batch_size))
        real_x = torch.cat([x for x, _ in batches])
        real_y = torch.cat([y for _, y in batches]) if batches and batches[0][1] is not None else None
    return run_calibration(fp_model, qmodel, method=cfg.method, config=cfg.dfq_config(),
                           data_config=data_config, run_dir=out, real_images=real_x, real_labels=real_y,
                           resume=resume, device=cfg.device, progress=progress, save_images=cfg.save_images,
                           dist=dist)


@torch.no_grad()
def _logits(model, images: ImageSet, batch_size: int, device: str = "cpu"):
    outs, labels = [], []
    for x, y in images.batches(batch_size):
        outs.append(model(x.to(device)).float().cpu())
        if y is not None:
            labels.append(y)
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100.0 * (logits.argmax(1) == labels).float().mean().item(), 4)


def reload_fp_model(manifest: dict) -> LoadedModel:
    """The full-precision model a quantized checkpoint was made from (for the accuracy comparison)."""
    cfg_dict = dict(manifest.get("model_config") or {})
    for key in ("mean", "std", "input_size"):
        if cfg_dict.get(key) is not None:
            cfg_dict[key] = tuple(cfg_dict[key])
    try:
        return load_model(ModelConfig(**cfg_dict))
    except MaskAQError as e:
        raise UsageError(f"cannot reload the full-precision model of this checkpoint: {e}") from None


def evaluate_fp(manifest: dict, images: ImageSet, batch_size: int = 256):
    fp = reload_fp_model(manifest)
    return _logits(fp.model, images, batch_size)


def verify(run_dir, val_data: str | None = None, *, runtime: str = "torch", limit: int | None = None,
           batch_size: int = 256, artifact=None) -> dict:
    """Evaluate the quantized checkpoint (torch fake-quant, or an exported artifact on another runtime)
    against the full-precision model on ``val_data``; write and return RUN/report.json."""
    from maskaq_deploy.calib import load_quantized_checkpoint
    from maskaq_deploy.calib.checkpoint import atomic_write_json
    from maskaq_deploy.report import merge_report

    run_dir = Path(run_dir)
    seconds = {}
    t0 = time.perf_counter()
    qmodel, manifest = load_quantized_checkpoint(run_dir)
    model_cfg = ModelConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in (manifest.get("model_config") or {}).items()})
    spec = default_data(model_cfg, "test", val_data, "--val-data")
    images = load_image_set(spec, manifest["model"]["data_config"], "--val-data").subset(limit)
    if images.labels is None or len(images) == 0:
        raise DataError(f"--val-data {spec} holds no labelled images")
    seconds["verify_load"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    fp_logits, labels = evaluate_fp(manifest, images, batch_size)
    seconds["eval_fp"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    torch_logits, _ = _logits(qmodel, images, batch_size)
    seconds["eval_torch"] = round(time.perf_counter() - t0, 3)

    results = {"torch": _runtime_result(torch_logits, labels, fp_logits)}
    if runtime != "torch":
        from maskaq_deploy.deploy import run_artifact

        t0 = time.perf_counter()
        art_logits, art_info = run_artifact(runtime, run_dir, artifact, images, batch_size, manifest)
        seconds[f"eval_{runtime}"] = round(time.perf_counter() - t0, 3)
        res = _runtime_result(art_logits, labels, fp_logits)
        res.update(_vs_torch(art_logits, torch_logits))
        res.update(art_info)
        results[runtime] = res
        if runtime == "onnxruntime" and artifact is None:  # the other export flavour's graph too
            from maskaq_deploy.deploy import other_flavour_graphs

            res["flavours"] = {res.get("flavour", "?"): {k: res[k] for k in res if k != "artifact"}}
            for flavour, graph in other_flavour_graphs(run_dir, res.get("flavour")).items():
                if isinstance(graph, str):  # why this flavour has no graph
                    res["flavours"][flavour] = {"skipped": graph}
                    continue
                logits, info = run_artifact(runtime, run_dir, graph, images, batch_size, manifest)
                res["flavours"][flavour] = {**_runtime_result(logits, labels, fp_logits),
                                            **_vs_torch(logits, torch_logits), **info}

    main = results[runtime]
    report = {
        "model": manifest["model"]["name"],
        "timm_name": manifest["model"]["timm_name"],
        "recipe": manifest["recipe"]["name"],
        "method": manifest["method"],
        "runtime": runtime,
        "val_data": spec,
        "fp_top1": top1(fp_logits, labels),
        "quant_top1": main["top1"],
        "top1_drop": round(top1(fp_logits, labels) - main["top1"], 4),
        "agreement": main["agreement_vs_fp"],
        "num_eval_images": len(images),
        "seconds": {**manifest.get("seconds", {}), **seconds},
        "runtimes": results,
    }
    for key in ("agreement_vs_torch", "sqnr_db_vs_torch", "max_abs_diff_vs_torch"):
        if key in main:
            report[key] = main[key]
    report = merge_report(run_dir / REPORT_FILE, report)
    atomic_write_json(run_dir / REPORT_FILE, report)
    return report


def _runtime_result(logits: torch.Tensor, labels: torch.Tensor, fp_logits: torch.Tensor) -> dict:
    return {"top1": top1(logits, labels),
            "agreement_vs_fp": round((logits.argmax(1) == fp_logits.argmax(1)).float().mean().item(), 6)}


def _vs_torch(logits: torch.Tensor, torch_logits: torch.Tensor) -> dict:
    err = (logits - torch_logits).double()
    ref = torch_logits.double()
    sqnr = 10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum().clamp_min(1e-30))
    return {"agreement_vs_torch": round((logits.argmax(1) == torch_logits.argmax(1)).float().mean().item(), 6),
            "sqnr_db_vs_torch": round(float(sqnr), 3),
            "max_abs_diff_vs_torch": round(float(err.abs().max()), 6)}


@dataclasses.dataclass
class BuildResult:
    report: dict
    artifacts: list[str]
    engine_missing_reason: str | None = None


def build(model_cfg: ModelConfig, cfg: CalibrateConfig, out, *, target: str = "onnxruntime", force: bool = False,
          val_data: str | None = None, limit: int | None = None, dynamic_batch: bool = False,
          bundle_only: bool = False, progress=None, resume: bool = False,
          float_dtype: str | None = None) -> BuildResult:
    """calibrate -> export (QDQ in the target's flavour) -> verify on the target's runtime -> TensorRT bundle
    and engine. ``engine_missing_reason`` is set when the target is tensorrt and no engine could be built here."""
    from maskaq_deploy.calib.dfq.distributed import env_world
    from maskaq_deploy import deploy

    if env_world()[1] > 1:
        err = UsageError("build runs in one process; for several processes launch 'torchrun ... -m maskaq_deploy "
                         "calibrate --out RUN', then run 'maskaq-deploy export RUN' and 'maskaq-deploy verify RUN'")
        err.mirrored = True  # every rank refuses alike: reported once
        raise err
    out = Path(out)
    deploy.check_target(cfg.recipe, target)  # refuse before any work
    t0 = time.perf_counter()
    calibrate(model_cfg, cfg, out, force=force, progress=progress, resume=resume)
    if target == "torch":
        report = verify(out, val_data, limit=limit)
        return BuildResult(report, _listing(out))
    t1 = time.perf_counter()
    exp = deploy.export_run(out, flavour=target, dynamic_batch=dynamic_batch, float_dtype=float_dtype)
    export_s = round(time.perf_counter() - t1, 3)
    if target == "tensorrt":
        bad = deploy.conformance(exp.qdq_path)
        if bad:
            raise MaskAQError(f"the TensorRT-flavour graph breaks {len(bad)} explicit-quantization rule(s), first: "
                              f"{bad[0]}; run 'maskaq-deploy inspect {exp.qdq_path}' for all")
    report = verify(out, val_data, runtime="onnxruntime", limit=limit)
    engine_reason = None
    if target == "tensorrt":
        from maskaq_deploy.calib import load_quantized_checkpoint

        _, manifest = load_quantized_checkpoint(out)
        images = load_image_set(report["val_data"], manifest["model"]["data_config"], "--val-data")
        deploy.write_tensorrt_bundle(out, exp.qdq_path, images, manifest)
        if not bundle_only:
            engine, engine_reason = deploy.try_build_engine(out, exp.qdq_path)
            if engine is not None:
                report = verify(out, val_data, runtime="tensorrt", limit=limit)
    report["seconds"]["export"] = export_s
    report["seconds"]["build_total"] = round(time.perf_counter() - t0, 3)
    report["target"] = target
    from maskaq_deploy.calib.checkpoint import atomic_write_json

    atomic_write_json(out / REPORT_FILE, report)
    return BuildResult(report, _listing(out), engine_reason)


def _listing(out: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(out).iterdir() if not p.name.startswith("."))


def bench(artifact, *, batch_sizes=(1, 8), threads=(1, 2), warmup: int = 5, iterations: int = 30,
          provider: str = "cpu") -> list[dict]:
    """Latency of an ONNX artifact on onnxruntime; a run directory means its model.qdq.onnx (exported with a
    dynamic batch when needed). Rows: batch, threads, median_ms, p90_ms, throughput (images/s)."""
    import onnx

    from maskaq_deploy import deploy
    from maskaq_deploy.runtimes.bench import benchmark
    from maskaq_deploy.runtimes.ort_backend import OrtBackend

    path = Path(artifact)
    if path.is_dir():
        dyn = path / "model.qdq.dynamic.onnx"
        if not dyn.is_file():
            deploy.export_run(path, flavour="onnxruntime", out=dyn, fp_too=False, dynamic_batch=True)
        path = dyn
    if not path.is_file():
        raise UsageError(f"{artifact} is neither an .onnx file nor a run directory")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"{artifact} is not an ONNX file ({type(e).__name__})") from None
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
