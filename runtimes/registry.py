"""The backends by name (the names themselves are defined in runtimes/targets.py).

    backend = get_backend("onnxruntime")(artifact)     # artifact: .onnx path, .engine path, or a torch model

Every backend class takes its artifact as its first argument, so a caller picks one by name alone.
"""

from __future__ import annotations

from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError
from maskaq_deploy.runtimes.ort_backend import OrtBackend
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, RUNTIMES, TENSORRT, TORCH, check_name
from maskaq_deploy.runtimes.tensorrt_backend import TensorRTBackend
from maskaq_deploy.runtimes.torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchBackend, OrtBackend, TensorRTBackend)}
assert tuple(BACKENDS) == RUNTIMES, "one backend per runtime name, in the names' order"

__all__ = ["BACKENDS", "RUNTIMES", "TORCH", "ONNXRUNTIME", "TENSORRT", "UnknownBackendError", "get_backend"]


class UnknownBackendError(BackendError, ValueError):
    """No backend of that name."""


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name``; an unknown name raises one line listing the available ones."""
    return BACKENDS[check_name(name, RUNTIMES, "runtime", UnknownBackendError)]
