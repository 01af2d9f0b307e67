"""Typed errors of the exporter, the conformance checker and the ONNX inspector.

Each carries a one-line message naming the problem and, where there is one, the fix, and its exit code (see
maskaq_deploy.errors, the root). Library code raises them; the CLI turns them into messages and exit codes.
"""

from maskaq_deploy.calib.errors import UnsupportedModelError
from maskaq_deploy.errors import EXIT_USAGE, MaskAQDeployError

__all__ = ["ExportError", "ExportInputError", "UnsupportedOpError", "UnsupportedModelError", "TargetError",
           "OnnxFileError", "NoQDQError"]


class ExportError(MaskAQDeployError):
    """The model cannot be exported as asked (the exporter failed, or the result would be wrong)."""


class ExportInputError(ExportError):
    """What was given cannot be exported or read as asked (a usage error, not a failure of the tool)."""

    exit_code = EXIT_USAGE


class UnsupportedOpError(ExportInputError):
    """A quantized tensor feeds an ONNX op (or an input of it) that has no Q/DQ rule in export/registry.py."""


class TargetError(ExportInputError, ValueError):
    """The recipe cannot be expressed for the requested flavour/target (e.g. W4A8 for TensorRT)."""


class OnnxFileError(ExportInputError):
    """A file given as an ONNX model is missing, or is not an ONNX model."""


class NoQDQError(ExportInputError):
    """The ONNX graph has no QuantizeLinear / DequantizeLinear (or packed INT4) nodes: it is a float model."""
