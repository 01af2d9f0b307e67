"""Comparing two runtimes' outputs with named metrics: the one SQNR and agreement computation that verify,
sensitivity, the TensorRT bundle and the tests all use.

SQNR (signal-to-quantization-noise ratio) is ``10 * log10(sum(ref^2) / sum((ref - test)^2))`` in dB, summed in
float64 over every element given (``Energy`` keeps the two sums over many batches).
"""

from __future__ import annotations

import math

import numpy as np


def as_array(x) -> np.ndarray:
    """A float64 numpy array of ``x`` (numpy array, list, or a torch tensor on any device)."""
    if hasattr(x, "detach"):  # torch, without importing it here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class Energy:
    """Running sums of ``ref^2`` and ``(test - ref)^2`` for an SQNR over many batches."""

    def __init__(self):
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref, test) -> Energy:
        ref = as_array(ref)
        err = as_array(test) - ref
        self.signal += float((ref * ref).sum())
        self.noise += float((err * err).sum())
        return self

    def db(self) -> float:
        """The SQNR in dB: inf when test equals ref, -inf when ref is all zeros and test is not."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def sqnr_db(ref, test) -> float:
    """SQNR of ``test`` against ``ref`` in dB (inf if equal); see the module docstring."""
    return Energy().add(ref, test).db()


def agreement(ref, test) -> float:
    """Fraction of rows of two (N, classes) logit arrays with the same argmax."""
    return float((as_array(ref).argmax(axis=1) == as_array(test).argmax(axis=1)).mean())


def compare_logits(ref, test) -> dict:
    """Agreement metrics of ``test`` logits against ``ref`` logits, both (N, classes).

    Returns {"n", "top1_agreement" (fraction of rows with the same argmax), "sqnr_db", "max_abs_diff",
    "cosine" (mean over rows of the cosine similarity)}.
    """
    ref = as_array(ref)
    test = as_array(test)
    if ref.shape != test.shape or ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"compare_logits needs two non-empty (N, classes) arrays of one shape, "
                         f"got {ref.shape} and {test.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(test).all()):
        raise ValueError("compare_logits: the logits contain NaN or inf")
    num = (ref * test).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(test, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((ref == test).all(axis=1), 1.0, 0.0))
    return {
        "n": int(ref.shape[0]),
        "top1_agreement": agreement(ref, test),
        "sqnr_db": sqnr_db(ref, test),
        "max_abs_diff": float(np.abs(ref - test).max()),
        "cosine": float(cos.mean()),
    }
