"""Range observers for activation quantizers, and the one list of observer names (activations and weights).

An observer has three verbs: ``collect(x)`` on each calibration batch, ``reset()``, and ``compute(...)`` which
returns the (low, high) clipping range the quantizer's scale and zero point are derived from. They hold small,
bounded state (running extremes or a capped random sample), so calibrating on many batches costs no memory.
"""

from __future__ import annotations

import torch

# Cap on the values kept per batch and in total by the sampling observers: enough for a stable range estimate,
# small enough that a ViT-B with ~100 quantizers stays under a few hundred MB.
_SAMPLE_PER_BATCH = 1 << 15
_SAMPLE_TOTAL = 1 << 18


class Observer:
    """Base observer: tracks the global min and max of everything it has seen."""

    name = "minmax"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def compute(self, quant_range) -> tuple[float, float]:
        """Return the clipping range (low, high). ``quant_range`` maps a range to its fake-quant error, for
        observers that search (MSE)."""
        if not self.has_data:
            raise RuntimeError("observer has seen no data; run calibration batches first")
        return float(self.min_val), float(self.max_val)


class _SamplingObserver(Observer):
    """Keeps a capped uniform sample of the values as well as the extremes."""

    def reset(self) -> None:
        super().reset()
        self._samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        super().collect(x)
        flat = x.detach().float().reshape(-1).cpu()
        if flat.numel() > _SAMPLE_PER_BATCH:
            idx = torch.randint(0, flat.numel(), (_SAMPLE_PER_BATCH,), generator=self._gen)
            flat = flat[idx]
        self._samples.append(flat)
        self._kept += flat.numel()
        if self._kept > _SAMPLE_TOTAL:  # thin the reservoir by half, keeping it representative of all batches
            allv = torch.cat(self._samples)
            idx = torch.randperm(allv.numel(), generator=self._gen)[: _SAMPLE_TOTAL // 2]
            self._samples = [allv[idx]]
            self._kept = idx.numel()

    def sample(self) -> torch.Tensor:
        return torch.cat(self._samples)


class PercentileObserver(_SamplingObserver):
    """Clips to the [1-p, p] quantiles of the observed values (p = 99.99% by default)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__()

    def compute(self, quant_range) -> tuple[float, float]:
        super().compute(quant_range)
        s = self.sample()
        q = torch.quantile(s, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        return float(torch.minimum(q[0], torch.zeros(()))), float(torch.maximum(q[1], torch.zeros(())))


class MSEObserver(_SamplingObserver):
    """Searches the clipping range that minimizes the fake-quantization MSE on the sampled values."""

    name = "mse"

    def __init__(self, num_candidates: int = 80, min_fraction: float = 0.2) -> None:
        self.num_candidates = num_candidates
        self.min_fraction = min_fraction
        super().__init__()

    def compute(self, quant_range) -> tuple[float, float]:
        lo, hi = super().compute(quant_range)
        s = self.sample()
        best, best_err = (lo, hi), float("inf")
        for frac in torch.linspace(self.min_fraction, 1.0, self.num_candidates).tolist():
            cand = (lo * frac, hi * frac)
            err = float(quant_range(s, *cand))
            if err < best_err:
                best, best_err = cand, err
        return best


OBSERVERS = {"minmax": Observer, "percentile": PercentileObserver, "mse": MSEObserver}
ACTIVATION_OBSERVERS = tuple(OBSERVERS)
# A weight is seen whole, so its range is either its min-max or the MSE search over clipping ratios that
# WeightQuantizer runs on it (per channel or block); percentile sampling has no meaning there.
WEIGHT_OBSERVERS = ("minmax", "mse")


def one_of(names: tuple[str, ...]) -> str:
    """``names`` as a message lists them: 'minmax', 'percentile' or 'mse'."""
    quoted = [repr(n) for n in names]
    return " or ".join(quoted) if len(quoted) < 3 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def make_observer(name: str) -> Observer:
    try:
        return OBSERVERS[name]()
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}") from None
