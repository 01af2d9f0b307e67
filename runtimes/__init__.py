"""Runtimes: run any artifact the same way (torch fake-quant reference, onnxruntime, TensorRT)."""

from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError, BackendUnavailable
from maskaq_deploy.runtimes.compare import Energy, agreement, compare_logits, sqnr_db
from maskaq_deploy.runtimes.bench import benchmark, benchmark_interleaved, time_runs
from maskaq_deploy.runtimes.ort_backend import OrtBackend, available_providers
from maskaq_deploy.runtimes.torch_backend import TorchBackend
from maskaq_deploy.runtimes.tensorrt_backend import TensorRTBackend
from maskaq_deploy.runtimes.registry import BACKENDS, get_backend
from maskaq_deploy.runtimes.targets import FLAVOURS, ONNXRUNTIME, RUNTIMES, TARGETS, TENSORRT, TORCH, Runtime

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Energy",
    "agreement",
    "compare_logits",
    "sqnr_db",
    "benchmark",
    "benchmark_interleaved",
    "time_runs",
    "OrtBackend",
    "available_providers",
    "TorchBackend",
    "TensorRTBackend",
    "BACKENDS",
    "Runtime",
    "RUNTIMES",
    "FLAVOURS",
    "TARGETS",
    "TORCH",
    "ONNXRUNTIME",
    "TENSORRT",
    "get_backend",
]
