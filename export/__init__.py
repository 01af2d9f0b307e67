"""Export: torch -> QDQ ONNX (TensorRT and onnxruntime flavours), INT4 packing, conformance checks, inspection.

Public names are resolved lazily, so ``import maskaq_deploy.export.rules`` (or the CLI's ``--help``) does not
pull in torch.
"""

import importlib

_LAZY = {
    # errors
    "ExportError": "maskaq_deploy.export.errors",
    "ExportInputError": "maskaq_deploy.export.errors",
    "UnsupportedOpError": "maskaq_deploy.export.errors",
    "UnsupportedModelError": "maskaq_deploy.export.errors",
    "TargetError": "maskaq_deploy.export.errors",
    "OnnxFileError": "maskaq_deploy.export.errors",
    "NoQDQError": "maskaq_deploy.export.errors",
    # torch -> ONNX
    "export_fp_onnx": "maskaq_deploy.export.onnx_export",
    "ExportOptions": "maskaq_deploy.export.onnx_export",
    "DEFAULT_OPSET": "maskaq_deploy.export.onnx_export",
    "INT4_OPSET": "maskaq_deploy.export.onnx_export",
    "export_qdq_onnx": "maskaq_deploy.export.qdq",
    "build_qdq_model": "maskaq_deploy.export.qdq",
    "QDQExport": "maskaq_deploy.export.qdq",
    "FLAVOURS": "maskaq_deploy.export.registry",
    # per-op rules, conformance, inspection
    "REGISTRY": "maskaq_deploy.export.registry",
    "OpRule": "maskaq_deploy.export.registry",
    "InputKind": "maskaq_deploy.export.registry",
    "Violation": "maskaq_deploy.export.rules",
    "check": "maskaq_deploy.export.rules",
    "check_tensorrt": "maskaq_deploy.export.rules",
    "check_onnxruntime": "maskaq_deploy.export.rules",
    "inspect_onnx": "maskaq_deploy.export.inspect",
    "InspectReport": "maskaq_deploy.export.inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'maskaq_deploy.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
