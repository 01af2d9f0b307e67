"""One interface to execute any artifact: torch fake-quant, onnxruntime session, TensorRT engine.

A backend is built lazily (nothing heavy happens in ``__init__``), is used as a context manager, and runs
batches of normalized images (N, C, H, W float32) to logits (N, classes) as numpy arrays.

    with OrtBackend("model.qdq.onnx") as rt:
        logits = rt.run(images)
"""

from __future__ import annotations

import abc

import numpy as np

from maskaq_deploy.runtimes.errors import BackendUnavailable


class Backend(abc.ABC):
    name: str = "backend"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this backend can run here, else (False, the reason)."""
        return True, ""

    def __enter__(self):
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"{self.name} backend is not available: {why}")
        self._load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        """Build the session / engine (called once, on enter)."""

    def close(self) -> None:
        """Release the session / engine."""

    def run(self, batch) -> np.ndarray:
        """Logits for a batch of normalized images; validates, then calls ``_run``."""
        arr = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        if arr.ndim != 4:
            raise ValueError(f"{self.name}: expected a batch of images (N, C, H, W), got shape {arr.shape}")
        return self._run(arr)

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray: ...
