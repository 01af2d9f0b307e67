"""Latency / throughput measurement of any backend, at given batch sizes and thread counts.

Timing is wall-clock around ``backend.run`` (input already in memory as float32), after warm-up runs; rows
report the median and 90th percentile latency in ms and throughput in images/s (batch / median).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from maskaq_deploy.runtimes.base import Backend


def time_runs(backend: Backend, batch: np.ndarray, *, warmup: int = 5, iterations: int = 30) -> list[float]:
    """Latencies in ms of ``iterations`` runs of ``batch`` on an open backend, after ``warmup`` runs."""
    if warmup < 0 or iterations < 1:
        raise ValueError(f"need warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")
    for _ in range(warmup):
        backend.run(batch)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        backend.run(batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def summarize(times_ms, batch_size: int) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    median = float(np.median(t))
    return {"median_ms": median, "p90_ms": float(np.percentile(t, 90)),
            "throughput_ips": batch_size * 1000.0 / median if median > 0 else float("inf"),
            "iterations": int(t.size)}


def benchmark(make_backend: Callable[[int, int], Backend], input_shape, *, batch_sizes=(1, 8), threads=(1,),
              warmup: int = 5, iterations: int = 30, seed: int = 0, label: str = "") -> list[dict]:
    """Time a backend at every (batch size, thread count).

    ``make_backend(batch_size, threads)`` returns an unopened Backend (a fixed-batch model may need one file
    per batch size). ``input_shape`` is (C, H, W). Returns one row per combination: {"label", "batch",
    "threads", "median_ms", "p90_ms", "throughput_ips", "iterations"}.
    """
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    rng = np.random.default_rng(seed)
    rows = []
    for t in threads:
        for b in batch_sizes:
            x = rng.standard_normal((b, *input_shape)).astype(np.float32)
            with make_backend(b, t) as backend:
                times = time_runs(backend, x, warmup=warmup, iterations=iterations)
            rows.append({"label": label, "batch": b, "threads": t, **summarize(times, b)})
    return rows


def benchmark_interleaved(make_backends: dict, input_shape, *, batch_sizes=(1, 8), threads=(1,), warmup: int = 5,
                          iterations: int = 30, seed: int = 0) -> list[dict]:
    """Like ``benchmark`` for several backends at once, timing them round-robin (one run of each in turn).

    On a shared machine whose load drifts, every variant then sees the same conditions, so their ratios stay
    meaningful even when the absolute numbers do not. ``make_backends``: {label: make_backend(batch, threads)}.
    """
    input_shape = tuple(int(v) for v in input_shape)
    rng = np.random.default_rng(seed)
    rows = []
    for t in threads:
        for b in batch_sizes:
            x = rng.standard_normal((b, *input_shape)).astype(np.float32)
            opened = {}
            try:
                for label, make in make_backends.items():
                    opened[label] = make(b, t).__enter__()
                    for _ in range(warmup):
                        opened[label].run(x)
                times = {label: [] for label in opened}
                for _ in range(iterations):
                    for label, backend in opened.items():
                        t0 = time.perf_counter()
                        backend.run(x)
                        times[label].append((time.perf_counter() - t0) * 1000.0)
            finally:
                for backend in opened.values():
                    backend.__exit__(None, None, None)
            rows += [{"label": label, "batch": b, "threads": t, **summarize(ts, b)} for label, ts in times.items()]
    return rows
