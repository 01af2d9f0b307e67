#!/usr/bin/env python3
"""Check model.engine against the golden outputs of the QDQ graph it was built from.

    python3 verify_engine.py [--engine model.engine] [--min-agreement 0.99] [--min-sqnr-db DB] [--max-abs-err X]

Runs the engine on golden_inputs.npz, compares its logits with golden_outputs.npz (onnxruntime on the same QDQ
graph, computed when the bundle was written) and prints top-1 agreement, max abs error, SQNR and cosine
similarity. Exit 0: every threshold holds; 1: one is breached; 2: the engine could not be run.

Self-contained (shipped in the deployment bundle): needs numpy and tensorrt 10.x/11.x, plus torch with CUDA or,
failing that, cuda-python for device memory. ``compare`` and ``failures`` are pure; ``run_engine`` is the only
call into TensorRT, and ``main(argv, runner=...)`` takes any other callable in its place.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


class EngineRunError(RuntimeError):
    """The engine could not be loaded or run here."""


def compare(reference, test) -> dict:
    """Top-1 agreement, max abs error, SQNR (dB) and mean row cosine of ``test`` logits against ``reference``."""
    ref, out = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if ref.shape != out.shape or ref.ndim != 2:
        raise ValueError(f"logits shapes differ or are not (N, classes): {ref.shape} vs {out.shape}")
    diff = ref - out
    noise, signal = float(np.linalg.norm(diff)), float(np.linalg.norm(ref))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = np.sum(ref * out, axis=1) / np.where(norms == 0, 1.0, norms)
    return {
        "count": int(ref.shape[0]),
        "agreement": float(np.mean(ref.argmax(1) == out.argmax(1))),
        "max_abs_err": float(np.abs(diff).max()),
        "sqnr_db": math.inf if noise == 0 else 20 * math.log10(max(signal, 1e-30) / noise),
        "cosine": float(np.mean(cosine)),
    }


def failures(metrics: dict, min_agreement: float, min_sqnr_db: float | None = None,
             max_abs_err: float | None = None) -> list[str]:
    """The thresholds ``metrics`` breach, as readable lines (empty when it passes)."""
    out = []
    if metrics["agreement"] < min_agreement:
        out.append(f"top-1 agreement {metrics['agreement']:.4f} < {min_agreement}")
    if min_sqnr_db is not None and metrics["sqnr_db"] < min_sqnr_db:
        out.append(f"SQNR {metrics['sqnr_db']:.2f} dB < {min_sqnr_db} dB")
    if max_abs_err is not None and metrics["max_abs_err"] > max_abs_err:
        out.append(f"max abs error {metrics['max_abs_err']:.6g} > {max_abs_err}")
    return out


def batch_runs(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(start, stop, run_size) runs covering n rows with lo <= run_size <= hi (short runs are zero-padded)."""
    return [(s, min(s + hi, n), max(min(s + hi, n) - s, lo)) for s in range(0, n, hi)]


def _cuda_python():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart
    return cudart


def run_engine(engine_path, inputs: np.ndarray) -> np.ndarray:
    """Logits of the serialized TensorRT engine on ``inputs`` (N, C, H, W)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineRunError(f"the tensorrt Python package is not importable ({e}); install TensorRT 10.x/11.x")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)  # kept referenced: the engine must not outlive its runtime
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineRunError(f"TensorRT {trt.__version__} cannot load {engine_path}; it was built by another "
                             "TensorRT version or for another GPU: rebuild it with build_engine.sh")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(ins) != 1 or len(outs) != 1:
        raise EngineRunError(f"engine has inputs {ins} and outputs {outs}; expected one of each")
    name_in, name_out = ins[0], outs[0]
    dt_in, dt_out = trt.nptype(engine.get_tensor_dtype(name_in)), trt.nptype(engine.get_tensor_dtype(name_out))
    shape = tuple(engine.get_tensor_shape(name_in))
    if shape[0] == -1:
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name_in, 0))
        lo, hi = lo[0], hi[0]
    else:
        lo = hi = shape[0]
    ctx = engine.create_execution_context()
    try:
        import torch

        use_torch = torch.cuda.is_available()
    except ImportError:
        use_torch = False
    results = []
    for start, stop, size in batch_runs(len(inputs), lo, hi):
        x = np.zeros((size, *inputs.shape[1:]), dt_in)
        x[: stop - start] = inputs[start:stop]
        if not ctx.set_input_shape(name_in, x.shape):
            raise EngineRunError(f"engine rejects input shape {x.shape} (batch {lo}..{hi})")
        y_shape = tuple(ctx.get_tensor_shape(name_out))
        y = _execute_torch(ctx, name_in, name_out, x, y_shape, dt_out) if use_torch \
            else _execute_cuda_python(ctx, name_in, name_out, x, y_shape, dt_out)
        results.append(y[: stop - start].astype(np.float32))
    return np.concatenate(results, axis=0)


def _execute_torch(ctx, name_in, name_out, x, y_shape, dt_out) -> np.ndarray:
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xd = torch.from_numpy(x).cuda()
        yd = torch.empty(y_shape, dtype=torch.from_numpy(np.empty(0, dt_out)).dtype, device="cuda")
        ctx.set_tensor_address(name_in, xd.data_ptr())
        ctx.set_tensor_address(name_out, yd.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineRunError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        stream.synchronize()
    return yd.cpu().numpy()


def _execute_cuda_python(ctx, name_in, name_out, x, y_shape, dt_out) -> np.ndarray:
    try:
        cudart = _cuda_python()
    except ImportError:
        raise EngineRunError("no device memory API: install torch with CUDA or cuda-python") from None

    def check(result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != cudart.cudaError_t.cudaSuccess:
            raise EngineRunError(f"CUDA runtime error {err}")
        return rest[0] if rest else None

    y = np.empty(y_shape, dt_out)
    stream = check(cudart.cudaStreamCreate())
    d_x, d_y = check(cudart.cudaMalloc(x.nbytes)), check(cudart.cudaMalloc(y.nbytes))
    try:
        check(cudart.cudaMemcpyAsync(d_x, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                     stream))
        ctx.set_tensor_address(name_in, int(d_x))
        ctx.set_tensor_address(name_out, int(d_y))
        if not ctx.execute_async_v3(int(stream)):
            raise EngineRunError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        check(cudart.cudaMemcpyAsync(y.ctypes.data, d_y, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     stream))
        check(cudart.cudaStreamSynchronize(stream))
    finally:
        cudart.cudaFree(d_x)
        cudart.cudaFree(d_y)
        cudart.cudaStreamDestroy(stream)
    return y


def main(argv=None, runner=None) -> int:
    """Parse ``argv``, run the engine (or ``runner(inputs) -> logits``), compare, print, return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=str(HERE / "model.engine"))
    p.add_argument("--inputs", default=str(HERE / "golden_inputs.npz"))
    p.add_argument("--outputs", default=str(HERE / "golden_outputs.npz"))
    p.add_argument("--min-agreement", type=float, default=0.99, help="minimum top-1 agreement (default 0.99)")
    p.add_argument("--min-sqnr-db", type=float, default=None, help="minimum SQNR in dB (default: not checked)")
    p.add_argument("--max-abs-err", type=float, default=None, help="maximum abs error (default: not checked)")
    args = p.parse_args(argv)
    with np.load(args.inputs) as f:
        inputs = f["inputs"]
    with np.load(args.outputs) as f:
        golden = f["logits"]
    try:
        logits = runner(inputs) if runner is not None else run_engine(args.engine, inputs)
    except (EngineRunError, OSError) as e:
        print(f"verify_engine: cannot run the engine: {e}", file=sys.stderr)
        return 2
    m = compare(golden, logits)
    print(f"images          {m['count']}")
    print(f"top-1 agreement {m['agreement']:.4f}")
    print(f"max abs error   {m['max_abs_err']:.6g}")
    print(f"SQNR            {m['sqnr_db']:.2f} dB")
    print(f"cosine          {m['cosine']:.6f}")
    bad = failures(m, args.min_agreement, args.min_sqnr_db, args.max_abs_err)
    for line in bad:
        print(f"FAIL: {line}")
    print("PASS" if not bad else "FAIL")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
