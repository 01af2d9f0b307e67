"""Runtimes: run any artifact the same way (torch fake-quant reference, onnxruntime, TensorRT)."""

from runtimes.base import Backend
from runtimes.errors import BackendError, BackendUnavailable
from runtimes.compare import compare_logits, sqnr_db
from runtimes.bench import benchmark, benchmark_interleaved, time_runs
from runtimes.ort_backend import OrtBackend, available_providers
from runtimes.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "compare_logits",
    "sqnr_db",
    "benchmark",
    "benchmark_interleaved",
    "time_runs",
    "OrtBackend",
    "available_providers",
    "TorchBackend",
]
