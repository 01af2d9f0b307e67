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


def profile_ops(path, input_shape, *, batch: int = 1, threads: int | None = None, runs: int = 10, warmup: int = 2,
                provider: str = "cpu", seed: int = 0) -> list[tuple[str, float]]:
    """Where onnxruntime spends a run of the graph at ``path``: [(op type, median ms per run)], largest first.

    From onnxruntime's profiler, over ``runs`` runs after ``warmup`` unprofiled ones (the first run allocates).
    The op types are those of the optimized graph, so they name the kernel path onnxruntime took, e.g.
    MatMulIntegerToFloat (integer GEMM, float output), MatMulNBits, or a float MatMul / Gemm.
    """
    import json
    import tempfile
    from collections import defaultdict
    from pathlib import Path

    from maskaq_deploy.runtimes.ort_backend import OrtBackend

    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got {runs} and {warmup}")
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="maskaq_profile_") as tmp:
        with OrtBackend(path, provider=provider, threads=threads, profile_prefix=str(Path(tmp) / "ort")) as rt:
            for _ in range(warmup):
                rt.run(x)
            for _ in range(runs):
                rt.run(x)
            trace = json.loads(Path(rt.end_profiling()).read_text())
    # the profile covers every run; keep the kernels of the last ``runs`` ones, and take each op type's median
    # over them: a run that other processes preempted does not decide the shares
    starts = sorted(ev["ts"] for ev in trace if ev.get("cat") == "Session" and ev.get("name") == "model_run")
    starts = starts[-runs:]
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in starts]
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= starts[0]:
            i = int(np.searchsorted(starts, ev["ts"], side="right")) - 1
            per_run[i][ev.get("args", {}).get("op_name", "?")] += ev["dur"] / 1000.0
    op_types = {op for r in per_run for op in r}
    by_op = {op: float(np.median([r.get(op, 0.0) for r in per_run])) for op in op_types}
    return sorted(by_op.items(), key=lambda kv: -kv[1])


def kernel_summary(ops: list[tuple[str, float]], top: int = 4) -> str:
    """``ops`` from ``profile_ops`` as one line: the top op types with their share of kernel time."""
    total = sum(ms for _, ms in ops) or 1.0
    return ", ".join(f"{op} {100 * ms / total:.0f}%" for op, ms in ops[:top])


def graph_kernel_line(path, *, batch: int = 1, threads: int | None = None, provider: str = "cpu",
                      runs: int = 5) -> str:
    """One line for a latency table: the kernel path of the graph at ``path`` (top op types of a profiled
    run) and, for an onnxruntime-flavour export, the CPU family it is laid out for against this machine's."""
    from maskaq_deploy.runtimes import cpu
    from maskaq_deploy.runtimes.ort_backend import OrtBackend, exported_metadata

    with OrtBackend(path, provider=provider, threads=threads) as rt:
        dims = rt.input_shape
    if isinstance(dims[0], int) and dims[0] > 0:
        batch = dims[0]
    ops = profile_ops(path, dims[1:], batch=batch, threads=threads, runs=runs, provider=provider)
    made_for = exported_metadata(path, cpu.CPU_METADATA_KEY)
    layout = f"; graph laid out for {made_for}" if made_for else ""
    return (f"kernel path (batch {batch}, {threads or 'default'} threads): {kernel_summary(ops)}{layout}; "
            f"this CPU: {cpu.describe()}")
