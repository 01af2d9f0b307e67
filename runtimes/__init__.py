"""Runtimes: run any artifact the same way (torch fake-quant reference, onnxruntime, TensorRT)."""

from runtimes.base import Backend
from runtimes.errors import BackendError, BackendUnavailable

__all__ = ["Backend", "BackendError", "BackendUnavailable"]
