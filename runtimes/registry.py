"""The backends by name: the one place the runtime names are spelled.

    backend = get_backend("onnxruntime")(artifact)     # artifact: .onnx path, .engine path, or a torch model

Every backend class takes its artifact as its first argument, so a caller picks one by name alone.
"""

from __future__ import annotations

from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError
from maskaq_deploy.runtimes.ort_backend import OrtBackend
from maskaq_deploy.runtimes.tensorrt_backend import TensorRTBackend
from maskaq_deploy.runtimes.torch_backend import TorchBackend

TORCH, ONNXRUNTIME, TENSORRT = TorchBackend.name, OrtBackend.name, TensorRTBackend.name
BACKENDS: dict[str, type[Backend]] = {TORCH: TorchBackend, ONNXRUNTIME: OrtBackend, TENSORRT: TensorRTBackend}
RUNTIMES = tuple(BACKENDS)


class UnknownBackendError(BackendError, ValueError):
    """No backend of that name."""


def get_backend(name: str) -> type[Backend]:
    """The backend class called ``name``; an unknown name raises one line listing the available ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(f"unknown runtime {name!r}; available: {', '.join(BACKENDS)}") from None
