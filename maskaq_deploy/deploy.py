"""Deployment stages on a Run: ONNX export, running an artifact on a backend, TensorRT bundle and engine.

    RUN/model.onnx          the full-precision graph (reference, and what onnxruntime's own quantizers start from)
    RUN/model.qdq.onnx      the QDQ graph of the checkpoint, in the flavour of the target
    RUN/bundle/             TensorRT deployment bundle (target tensorrt)
    RUN/model.engine        TensorRT engine (target tensorrt, where TensorRT and a GPU are present)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskaq_deploy import layout, provenance
from maskaq_deploy.calib import get_recipe
from maskaq_deploy.calib.recipes import Recipe
from maskaq_deploy.errors import Bf16BuildError, UsageError
from maskaq_deploy.export.targets import check_recipe_for_target
from maskaq_deploy.run import Run
from maskaq_deploy.runtimes.registry import get_backend
from maskaq_deploy.runtimes.targets import FLAVOURS, ONNXRUNTIME, TENSORRT, TORCH, check_name

log = logging.getLogger(__name__)


GOLDEN_IMAGES = 64


@dataclass
class ExportResult:
    fp_path: Path | None
    qdq_path: Path
    flavour: str
    opset: int
    dynamic_batch: bool
    batch_size: int
    op_counts: dict
    float_dtype: str = "fp32"
    cpu: str | None = None  # onnxruntime: the CPU family the integer layout is for (also in the graph metadata)


def check_target(recipe_name: str, target: str, float_dtype: str | None = None) -> None:
    """Refuse, before any work, a recipe the target cannot execute (or a target that does not exist), and a
    float dtype the build cannot use (check_build_float_dtype)."""
    check_build_float_dtype(target, float_dtype)
    check_recipe_for_target(get_recipe(recipe_name), target)


def check_float_dtype(float_dtype: str | None, runtime: str, option: str = "flavour") -> None:
    """Refuse half precision for anything but TensorRT: onnxruntime and torch compute in fp32. ``option``: the
    setting that named ``runtime`` (``flavour`` for an export, ``target`` for a build), which the message names."""
    if float_dtype not in (None, "fp32") and runtime != TENSORRT:
        raise UsageError(f"`float_dtype` {float_dtype} is for `{option}` {TENSORRT}; {runtime} computes in fp32")


def check_build_float_dtype(target: str, float_dtype: str | None) -> None:
    """A build's float dtype: half precision only for TensorRT, and not bf16, because the build checks the graph
    in onnxruntime, which has no CPU kernel for bf16 Q/DQ (an export alone writes a bf16 graph)."""
    check_float_dtype(float_dtype, target, "target")
    if float_dtype == "bf16":
        raise Bf16BuildError("build checks the graph in onnxruntime, which has no CPU kernel for bf16 Q/DQ; build "
                             "with fp16, or export bf16")


def export(run: Run, flavour: str = ONNXRUNTIME, *, out: str | Path | None = None, fp_too: bool = True,
           batch_size: int = 1, dynamic_batch: bool = False, opset: int | None = None,
           float_dtype: str | None = None, attention_qdq: bool | None = None,
           cpu: str | None = None) -> ExportResult:
    """Export the run's checkpoint to QDQ ONNX (and its float graph to RUN/model.onnx).
    ``float_dtype`` / ``attention_qdq`` / ``cpu``: see export.qdq.export_qdq_onnx."""
    from maskaq_deploy.export import export_fp_onnx, export_qdq_onnx  # onnx: only when exporting

    check_name(flavour, FLAVOURS, "export flavour", UsageError)
    check_float_dtype(float_dtype, flavour)
    manifest = run.manifest
    if flavour == TENSORRT:  # the checkpoint's own recipe (built-in or custom)
        check_recipe_for_target(Recipe.from_dict(manifest.recipe), TENSORRT)
    qdq_path = Path(out) if out else run.path / layout.QDQ_ONNX
    meta = {"maskaq.recipe": manifest.recipe_name, "maskaq.method": manifest.method,
            "maskaq.model": manifest.name, "maskaq.flavour": flavour,
            **provenance.artifact_metadata(run.path, manifest.to_dict())}
    res = export_qdq_onnx(run.quantized, qdq_path, flavour=flavour, batch_size=batch_size,
                          dynamic_batch=dynamic_batch, opset=opset, metadata=meta, float_dtype=float_dtype,
                          attention_qdq=attention_qdq, cpu=cpu if flavour == ONNXRUNTIME else None)
    fp_path = None
    if fp_too:
        fp_path = run.path / layout.FP_ONNX
        export_fp_onnx(run.fp_model.model, fp_path, batch_size=batch_size, dynamic_batch=dynamic_batch)
    return ExportResult(fp_path, Path(res.path), flavour, res.opset, res.dynamic_batch, res.batch_size,
                        dict(res.op_counts), res.float_dtype, res.cpu)


def artifact_file(runtime: str) -> str:
    """The file of a run that ``runtime`` executes (onnxruntime or tensorrt)."""
    return {ONNXRUNTIME: layout.QDQ_ONNX, TENSORRT: layout.ENGINE_FILE}[runtime]


def conformance(qdq_path) -> list:
    """TensorRT explicit-quantization violations of a QDQ graph (empty list: conformant)."""
    from maskaq_deploy.export.rules import check_tensorrt

    return [v for v in check_tensorrt(str(qdq_path)) if getattr(v, "severity", "error") == "error"]


def artifact(run: Run, runtime: str, given=None):
    """What ``runtime`` executes for this run: the fake-quant model for torch, else ``given`` or the run's file
    (for onnxruntime, exported first when it is missing)."""
    get_backend(runtime)  # an unknown name fails here, with the list
    if runtime == TORCH:
        return run.quantized
    path = Path(given) if given else run.path / artifact_file(runtime)
    if given is not None and not path.is_file():
        raise UsageError(f"`artifact` {given} does not exist; give an exported .onnx or .engine, or leave it out "
                         "to use the run's own")
    if runtime == ONNXRUNTIME and not path.is_file():
        log.info("%s not found: exporting the onnxruntime flavour first", path)
        path = export(run, ONNXRUNTIME, fp_too=False, dynamic_batch=True).qdq_path
    if path.is_file():  # a missing engine is the backend's one-line error
        provenance.check_artifact(path, run.path, run.manifest.to_dict())
    return path


def run_backend(runtime: str, what, images, batch_size: int):
    """Logits (a float32 torch tensor) of ``what`` on the backend called ``runtime`` over ``images``."""
    import torch

    outs = []
    with get_backend(runtime)(what) as rt:
        for x, _ in images.batches(batch_size):
            outs.append(torch.from_numpy(np.asarray(rt.run(x.numpy()), dtype=np.float32)))
    return torch.cat(outs)


def other_flavour_graphs(run: Run, done: str | None) -> dict:
    """{flavour: QDQ graph path, or the reason there is none} for the export flavours other than ``done``
    (the one RUN/model.qdq.onnx holds), exported with a dynamic batch to RUN/model.qdq.<flavour>.onnx."""
    from maskaq_deploy.export.errors import ExportError

    out = {}
    for flavour in FLAVOURS:
        if flavour == done:
            continue
        path = run.path / layout.flavour_qdq_onnx(flavour)
        try:
            if not path.is_file():
                export(run, flavour, out=path, fp_too=False, dynamic_batch=True)
            out[flavour] = path
        except ExportError as e:  # e.g. a recipe TensorRT cannot run
            out[flavour] = str(e).splitlines()[0]
    return out


def graph_facts(path) -> dict:
    """The export flavour and float dtype a QDQ graph records (report.json names what was evaluated)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {k: meta[f"maskaq.{k}"] for k in ("flavour", "float_dtype") if f"maskaq.{k}" in meta}


def golden_inputs(images, n: int = GOLDEN_IMAGES) -> np.ndarray:
    """A fixed sample (the first ``n`` of a seeded permutation) of validation images for the bundle."""
    sub = images.subset(n, seed=1234)
    return np.concatenate([x.numpy() for x, _ in sub.batches(n)]).astype(np.float32)


def write_tensorrt_bundle(run: Run, qdq_path, *, max_batch: int = 32) -> Path:
    from maskaq_deploy.export.bundle import write_bundle

    m = run.manifest
    bundle_manifest = {"model": m.model, "recipe": m.recipe, "method": m.method, "versions": m.versions}
    return write_bundle(run.path, qdq_path, golden_inputs(run.val_images), manifest=bundle_manifest,
                        max_batch=max_batch)


def try_build_engine(run_dir, qdq_path, *, max_batch: int = 32, workspace_mib: int | None = None,
                     timing_cache=None):
    """Build RUN/model.engine; returns (EngineInfo, None) or (None, reason) when TensorRT/GPU is missing."""
    from maskaq_deploy.export.tensorrt import EngineUnavailable, build_engine

    try:
        info = build_engine(qdq_path, run_dir, max_batch=max_batch, workspace_mib=workspace_mib,
                            timing_cache=timing_cache)
    except EngineUnavailable as e:
        return None, str(e).splitlines()[0]
    provenance.record_engine(info.path, qdq_path)
    return info, None

