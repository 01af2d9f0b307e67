"""The torch reference backend: runs a (fake-quant or float) torch model on numpy batches."""

from __future__ import annotations

import numpy as np

from maskaq_deploy.runtimes.base import Backend
from maskaq_deploy.runtimes.errors import BackendError, BackendUnavailable
from maskaq_deploy.runtimes.targets import TORCH


class TorchBackend(Backend):
    """Run ``model`` in eval mode without gradients.

    ``threads`` sets torch's intra-op thread count while the backend is open (restored on close).
    ``max_batch`` splits large inputs into chunks, to bound memory.
    """

    name = TORCH

    def __init__(self, model, *, device: str = "cpu", threads: int | None = None, max_batch: int = 256):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.device = device
        self.threads = threads
        self.max_batch = max_batch
        self._saved_threads: int | None = None
        self._ready = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401
        except ImportError as e:  # pragma: no cover - torch is a hard dependency
            return False, f"torch is not importable ({e})"
        return True, ""

    def _load(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"torch backend: device {self.device!r} requested but CUDA is not available; "
                                     "use device='cpu'")
        if self.threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        self.model.eval().to(self.device)
        self._ready = True

    def close(self) -> None:
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        self._ready = False

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if not self._ready:
            raise BackendError("torch backend used outside its 'with' block")
        outs = []
        with torch.inference_mode():
            for i in range(0, batch.shape[0], self.max_batch):
                x = torch.from_numpy(batch[i:i + self.max_batch]).to(self.device)
                y = self.model(x)
                if isinstance(y, (tuple, list)):  # e.g. distilled DeiT in training mode returns two heads
                    y = y[0]
                outs.append(y.float().cpu().numpy())
        return np.concatenate(outs, axis=0)
