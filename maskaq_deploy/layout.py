"""The run folder's layout: the name of every file and folder a stage reads or writes, asked for here.

    RUN/model.safetensors          the quantized checkpoint's weights        (calib.checkpoint)
    RUN/quant.safetensors          its quantizers                             (calib.checkpoint)
    RUN/manifest.json              what it is and how it was made             (calib.checkpoint)
    RUN/dfq/                       calibration state, for --resume            (calib.dfq.state; run.json inside)
    RUN/model.onnx                 the full-precision graph
    RUN/model.qdq.onnx             the QDQ graph, in the target's flavour
    RUN/model.qdq.<flavour>.onnx   the other flavour's graph (verify --runtime onnxruntime)
    RUN/model.qdq.dynamic.onnx     bench's dynamic-batch export
    RUN/bundle/                    the TensorRT deployment bundle             (export.bundle)
    RUN/model.engine               the TensorRT engine                        (export.tensorrt)
    RUN/model.engine.provenance.json   which checkpoint the engine's graph came from
    RUN/report.json, report.md, report.html, latency.json
    runs/.x.lock, .x.partial, .x.replaced   beside RUN: its lock, the run being written, the swap's old copy

calib/ and export/ write some of these files themselves and may not import the product layer, so those names
are defined there and read from there on first use (this module stays cheap to import: the CLI does for
--help). Every other name is defined here.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

FP_ONNX = "model.onnx"
QDQ_ONNX = "model.qdq.onnx"
DYNAMIC_QDQ_ONNX = "model.qdq.dynamic.onnx"
ENGINE_RECORD_SUFFIX = ".provenance.json"
REPORT_FILE = "report.json"
MD_FILE, HTML_FILE = "report.md", "report.html"
LATENCY_FILE = "latency.json"  # bench rows, kept apart so a bench before the first verify is not lost

# names the lower layers define: {name here: (module, name there)}
_LOWER = {
    "MODEL_FILE": ("maskaq_deploy.calib.checkpoint", "MODEL_FILE"),
    "QUANT_FILE": ("maskaq_deploy.calib.checkpoint", "QUANT_FILE"),
    "MANIFEST_FILE": ("maskaq_deploy.calib.checkpoint", "MANIFEST_FILE"),
    "DFQ_DIR": ("maskaq_deploy.calib.dfq.state", "STATE_DIR"),
    "DFQ_STATE_FILE": ("maskaq_deploy.calib.dfq.state", "STATE_FILE"),
    "BUNDLE_DIR": ("maskaq_deploy.export.bundle", "BUNDLE_DIR"),
    "ENGINE_FILE": ("maskaq_deploy.export.tensorrt", "ENGINE_FILE"),
}


def __getattr__(name: str):
    if name not in _LOWER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LOWER[name]
    value = globals()[name] = getattr(importlib.import_module(module), attr)
    return value


def flavour_qdq_onnx(flavour: str) -> str:
    """The QDQ graph of an export flavour other than the one RUN/model.qdq.onnx holds."""
    return f"model.qdq.{flavour}.onnx"


def engine_record(engine) -> Path:
    """The provenance record beside a TensorRT engine (an engine holds no metadata of ours)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ENGINE_RECORD_SUFFIX)


def _beside(run, suffix: str) -> Path:
    run = Path(os.path.abspath(run))  # absolute: "." and "runs/x/" name their folder too
    return run.parent / f".{run.name}.{suffix}"


def lock_path(run) -> Path:
    """runs/.x.lock: the advisory lock of runs/x."""
    return _beside(run, "lock")


def staging_path(run) -> Path:
    """runs/.x.partial: the run being written, renamed over runs/x when the command succeeds."""
    return _beside(run, "partial")


def replaced_path(run) -> Path:
    """runs/.x.replaced: the previous run during the swap."""
    return _beside(run, "replaced")


def locked_folder(lock: Path) -> Path:
    """The run folder a lock file (``lock_path``) locks."""
    return lock.parent / lock.name[1:-len(".lock")]
