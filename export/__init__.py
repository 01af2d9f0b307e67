"""Export: torch -> QDQ ONNX (TensorRT and onnxruntime flavours), INT4 packing, conformance checks, inspection.

Public names are resolved lazily, so ``import export.rules`` (or the CLI's ``--help``) does not pull in torch.
"""

import importlib

_LAZY = {
    # errors
    "ExportError": "export.errors",
    "ExportInputError": "export.errors",
    "UnsupportedOpError": "export.errors",
    "UnsupportedModelError": "export.errors",
    "TargetError": "export.errors",
    "OnnxFileError": "export.errors",
    "NoQDQError": "export.errors",
    # torch -> ONNX
    "export_fp_onnx": "export.onnx_export",
    "ExportOptions": "export.onnx_export",
    "DEFAULT_OPSET": "export.onnx_export",
    "INT4_OPSET": "export.onnx_export",
    "export_qdq_onnx": "export.qdq",
    "build_qdq_model": "export.qdq",
    "QDQExport": "export.qdq",
    "FLAVOURS": "export.qdq",
    # per-op rules, conformance, inspection
    "REGISTRY": "export.registry",
    "OpRule": "export.registry",
    "InputKind": "export.registry",
    "Violation": "export.rules",
    "check": "export.rules",
    "check_tensorrt": "export.rules",
    "check_onnxruntime": "export.rules",
    "inspect_onnx": "export.inspect",
    "InspectReport": "export.inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
