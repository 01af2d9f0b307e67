"""Comparing two runtimes' logits with named metrics (the numbers tests and `verify` assert on)."""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(ref, test) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum(ref^2) / sum((ref - test)^2)) in dB (inf if equal)."""
    ref = np.asarray(ref, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float((err * err).sum())
    signal = float((ref * ref).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def compare_logits(ref, test) -> dict:
    """Agreement metrics of ``test`` logits against ``ref`` logits, both (N, classes).

    Returns {"n", "top1_agreement" (fraction of rows with the same argmax), "sqnr_db", "max_abs_diff",
    "cosine" (mean over rows of the cosine similarity)}.
    """
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape or ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"compare_logits needs two non-empty (N, classes) arrays of one shape, "
                         f"got {ref.shape} and {test.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(test).all()):
        raise ValueError("compare_logits: the logits contain NaN or inf")
    agree = float((ref.argmax(axis=1) == test.argmax(axis=1)).mean())
    num = (ref * test).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(test, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((ref == test).all(axis=1), 1.0, 0.0))
    return {
        "n": int(ref.shape[0]),
        "top1_agreement": agree,
        "sqnr_db": sqnr_db(ref, test),
        "max_abs_diff": float(np.abs(ref - test).max()),
        "cosine": float(cos.mean()),
    }
