"""Which onnxruntime CPU kernel one linear layer takes in each integer layout, and how long it runs.

    .venv/bin/python benchmarks/ort_kernels.py                       # a DeiT-tiny fc1: [8 x 197, 192] x [192, 768]
    .venv/bin/python benchmarks/ort_kernels.py --m 1576 --k 384 --n 1536
    .venv/bin/python benchmarks/ort_kernels.py --dump model.qdq.onnx  # the optimized graph's integer matmuls

One layer, written each way an exporter could write it, timed round-robin at one intra-op thread as CPU time
of the calling thread (onnxruntime runs a one-thread session there), so load from other processes on a shared
machine does not inflate it:

    fp32               float MatMul
    mif-u8-weights     QuantizeLinear(u8) -> MatMulIntegerToFloat, uint8 weights, zero point 128 per column
    mif-s8-weights     the same with int8 weights and no zero point (same values)
    mif-s8-act         int8 activations (zero point 0) x int8 weights
    dynamic            DynamicQuantizeMatMul (what quantize_dynamic writes; its scale is computed per run)
    qlinear            QuantizeLinear -> QLinearMatMul (u8 x s8, u8 output) -> DequantizeLinear

``--dump`` saves onnxruntime's optimized graph (default optimization level) and lists each integer matmul
with the types of its weight and zero point: the shape that decides the kernel.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskaq_deploy.runtimes import cpu  # noqa: E402

INTEGER_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm",
                   "MatMulNBits")
LAYOUTS = ("fp32", "mif-u8-weights", "mif-s8-weights", "mif-s8-act", "dynamic", "qlinear")


def layer(kind: str, m: int, k: int, n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (k, n))
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("a_scale", np.float32(0.02))
    const("bias", rng.standard_normal(n).astype(np.float32))
    const("w_scale", rng.uniform(0.001, 0.01, n).astype(np.float32))
    if kind == "fp32":
        const("w", (w * 0.005).astype(np.float32))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    elif kind.startswith("mif"):
        signed_act = kind == "mif-s8-act"
        const("a_zp", np.int8(0) if signed_act else np.uint8(128))
        nodes.append(helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["q"]))
        if kind == "mif-u8-weights":
            const("w", (w + 128).astype(np.uint8))
            w_zp = const("w_zp", np.full(n, 128, np.uint8))
        else:
            const("w", w.astype(np.int8))
            w_zp = ""
        nodes.append(helper.make_node("MatMulIntegerToFloat", ["q", "w", "a_scale", "w_scale", "a_zp", w_zp, "bias"],
                                      ["y"], domain="com.microsoft"))
    elif kind == "dynamic":
        const("w", w.astype(np.int8))
        nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", "w", "w_scale", "", "bias"], ["y"],
                                      domain="com.microsoft"))
    elif kind == "qlinear":
        const("w", w.astype(np.int8))
        const("a_zp", np.uint8(128))
        const("w_zp", np.zeros(n, np.int8))
        const("y_scale", np.float32(0.05))
        const("y_zp", np.uint8(128))
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["q"]),
                  helper.make_node("QLinearMatMul", ["q", "a_scale", "a_zp", "w", "w_scale", "w_zp", "y_scale",
                                                     "y_zp"], ["qy"]),
                  helper.make_node("DequantizeLinear", ["qy", "y_scale", "y_zp"], ["y"])]
    else:
        raise ValueError(kind)
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def time_layouts(m: int, k: int, n: int, iterations: int) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sessions = {kind: ort.InferenceSession(layer(kind, m, k, n), so, providers=["CPUExecutionProvider"])
                for kind in LAYOUTS}
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    for s in sessions.values():
        s.run(None, {"x": x})
    times = {kind: [] for kind in LAYOUTS}
    for _ in range(iterations):
        for kind, s in sessions.items():
            t0 = time.thread_time()
            s.run(None, {"x": x})
            times[kind].append(1000 * (time.thread_time() - t0))
    return {kind: float(np.median(t)) for kind, t in times.items()}


def dump(path: str) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    counts = collections.Counter(node.op_type for node in opt.graph.node)
    print(f"{path}: optimized graph, {len(opt.graph.node)} nodes: " +
          ", ".join(f"{op} {c}" for op, c in counts.most_common()))
    inits = {t.name: t for t in opt.graph.initializer}

    def kind(name):
        t = inits.get(name)
        if not name:
            return "-"
        return f"{TensorProto.DataType.Name(t.data_type)}{list(t.dims)}" if t is not None else "activation"

    shapes = collections.Counter()
    for node in opt.graph.node:
        if node.op_type in INTEGER_MATMULS:
            ins = list(node.input) + [""] * 7
            if node.op_type == "QLinearMatMul":
                a, b, b_zp = ins[0], ins[3], ins[5]
            elif node.op_type == "MatMulIntegerToFloat":
                a, b, b_zp = ins[0], ins[1], ins[5]
            else:
                a, b, b_zp = ins[0], ins[1], ins[3]
            b_kind = kind(b).split("[")[0]
            shapes[(node.op_type, kind(a), b_kind, kind(b_zp).split("[")[0])] += 1
    for (op, a, b, zp), c in shapes.most_common():
        print(f"  {c:3d} x {op}: A {a}, B {b}, B zero point {zp}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8 * 197)
    p.add_argument("--k", type=int, default=192)
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--dump", default=None, help="list the integer matmuls of this model's optimized graph")
    args = p.parse_args(argv)
    if args.dump:
        dump(args.dump)
        return 0
    print(f"{cpu.describe()}, onnxruntime {ort.__version__}")
    print(f"[{args.m}, {args.k}] x [{args.k}, {args.n}], 1 thread, median CPU ms over {args.iterations} runs")
    res = time_layouts(args.m, args.k, args.n, args.iterations)
    for kind, ms in res.items():
        print(f"  {kind:<16} {ms:7.2f} ms  {res['fp32'] / ms:5.2f}x fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
