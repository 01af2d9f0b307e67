"""The per-op Q/DQ registry, and the Q/DQ pass it drives, on small hand-built marker graphs.

The graphs stand in for what the exporter traces: ``maskaq.QMark`` nodes where torch applies a quantizer.
Numerics are checked against a numpy fake-quant reference in quantization steps / SQNR.
"""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.export.errors import TargetError, UnsupportedOpError
from maskaq_deploy.export.int4 import int4_initializer_to_array, make_int4_initializer, pack_matmulnbits, unpack_nibbles
from maskaq_deploy.export.onnx_export import MARKER_DOMAIN, MARKER_OP, register_marker_schema
from maskaq_deploy.export.qdq import ActParams, WeightParams, insert_qdq
from maskaq_deploy.export.registry import REGISTRY, InputKind, OpRule, quantized_op_types, register, rule_for
from maskaq_deploy.runtimes.compare import sqnr_db

F = TensorProto.FLOAT
B, T, K, N = 2, 5, 32, 8


# ---- the registry itself ---------------------------------------------------------------------------------

def test_matmul_gemm_conv_rules():
    mm = rule_for("MatMul")
    assert mm.kind_of(0) is InputKind.ACTIVATION and mm.kind_of(1) is InputKind.EITHER
    assert mm.kind_of(1).accepts(InputKind.WEIGHT) and mm.kind_of(1).accepts(InputKind.ACTIVATION)
    gemm = rule_for("Gemm")
    assert gemm.kind_of(1) is InputKind.WEIGHT and gemm.kind_of(2) is None  # bias stays float
    assert rule_for("Conv").kind_of(1) is InputKind.WEIGHT and not rule_for("Conv").int4_weights
    assert set(quantized_op_types()) == {"MatMul", "Gemm", "Conv"}


@pytest.mark.parametrize("op", ["Softmax", "LayerNormalization", "Gelu", "Add"])
def test_float_ops_take_no_qdq(op):
    rule = rule_for(op)
    assert rule is not None and not rule.quantizable and rule.kind_of(0) is None


def test_register_refuses_silent_overwrite():
    reg = dict(REGISTRY)
    with pytest.raises(ValueError, match="already has a Q/DQ rule"):
        register(OpRule("MatMul"), reg)
    register(OpRule("MatMul"), reg, replace=True)
    assert not reg["MatMul"].quantizable and REGISTRY["MatMul"].quantizable  # the global one is untouched
    with pytest.raises(ValueError, match="listed twice"):
        OpRule("X", ((0, "activation"), (0, "weight")))


# ---- marker graphs ---------------------------------------------------------------------------------------

def _marker(src, qname):
    node = helper.make_node(MARKER_OP, [src], [f"{qname}.out"], domain=MARKER_DOMAIN)
    node.attribute.append(helper.make_attribute("name", qname))
    node.name = f"mark/{qname}"
    return node


def _graph(nodes, inits, opset=20, x_shape=(B, T, K), out_shape=(B, T, N)):
    register_marker_schema()
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, list(x_shape))],
                          [helper.make_tensor_value_info("y", F, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MARKER_DOMAIN, 1)])
    m.ir_version = 10 if opset >= 21 else 9
    return m


def _act(name="fc.input_quantizer", bits=8, symmetric=True, scale=0.05, zp=0):
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    return ActParams(name, bits, symmetric, np.float32(scale), zp, qmin, qmax)


def _weight(name="fc.weight_quantizer", bits=8, block=0, seed=0, shape=(N, K)):
    rng = np.random.default_rng(seed)
    hi = (1 << (bits - 1)) - 1
    codes = rng.integers(-hi - 1, hi + 1, shape).astype(np.int8)
    if block:
        scale = rng.uniform(0.01, 0.02, (shape[0], -(-shape[1] // block))).astype(np.float32)
        return WeightParams(name, bits, "block", block, codes, scale)
    return WeightParams(name, bits, "channel", 0, codes, rng.uniform(0.01, 0.02, shape[0]).astype(np.float32))


def linear_graph(opset=20, act=True):
    """x -> [mark] -> MatMul(., Transpose(mark(W))) -> Add(bias) -> y: a traced Linear layer."""
    nodes = []
    x = "x"
    if act:
        nodes.append(_marker("x", "fc.input_quantizer"))
        x = "fc.input_quantizer.out"
    nodes += [_marker("W", "fc.weight_quantizer"),
              helper.make_node("Transpose", ["fc.weight_quantizer.out"], ["Wt"], perm=[1, 0], name="t"),
              helper.make_node("MatMul", [x, "Wt"], ["mm"], name="fc"),
              helper.make_node("Add", ["mm", "bias"], ["y"], name="fc/bias")]
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((N, K)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias")]
    return _graph(nodes, inits, opset)


def ops(model):
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def run(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def fake_quant(x, p: ActParams):
    q = np.clip(np.round(x / p.scale) + p.zero_point, p.qmin, p.qmax)
    return ((q - p.zero_point) * p.scale).astype(np.float32)


def reference(x, act: ActParams | None, w: WeightParams, bias):
    xq = fake_quant(x, act) if act is not None else x
    return xq @ w.dequantized().T + bias


@pytest.fixture(scope="module")
def x():
    return (np.random.default_rng(7).standard_normal((B, T, K)) * 2).astype(np.float32)


def _bias(model):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "bias")


def test_tensorrt_flavour_linear(x):
    m = linear_graph()
    bias = _bias(m)
    a, w = _act(), _weight()
    insert_qdq(m, {a.name: a, w.name: w}, "tensorrt")
    assert ops(m) == {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1, "Add": 1}
    wdq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".int8"))
    assert helper.get_attribute_value(wdq.attribute[0]) == 1  # per output channel = axis 1 of the [K, N] weight
    zps = [numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("zero_point")]
    assert all(z.dtype == np.int8 and not z.any() for z in zps)
    assert sqnr_db(reference(x, a, w, bias), run(m, x)) > 100


def test_onnxruntime_flavour_lowers_to_integer_matmul(x):
    m = linear_graph()
    bias = _bias(m)
    a, w = _act(), _weight()
    insert_qdq(m, {a.name: a, w.name: w}, "onnxruntime")
    assert ops(m) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}  # bias Add fused
    zp = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == f"{a.name}.zero_point")
    assert zp.dtype == np.uint8 and int(zp) == 128  # the signed grid, shifted: same values
    assert sqnr_db(reference(x, a, w, bias), run(m, x)) > 100


@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
def test_ort_backend_runs_either_flavour_exactly_on_any_cpu(tmp_path, x, flavour):
    # Full-range int8 codes on both sides: onnxruntime's uint8 x int8 kernels saturate 16-bit pair sums on
    # x86 CPUs without VNNI (21 dB there with int8 weights). The onnxruntime flavour is laid out for the
    # machine it is exported on (uint8 weights without VNNI, int8 with it: test_ort_layout.py), and the
    # tensorrt flavour is run with its Q/DQ MatMuls in float.
    import onnx

    from maskaq_deploy.runtimes.ort_backend import OrtBackend, exported_flavour

    m = linear_graph()
    bias = _bias(m)
    a, w = _act(), _weight()
    insert_qdq(m, {a.name: a, w.name: w}, flavour)
    path = tmp_path / f"{flavour}.onnx"
    onnx.save(m, str(path))
    assert exported_flavour(path) == flavour
    rt = OrtBackend(path)
    exact = "1" if flavour == "tensorrt" else None
    so = rt.session_options()
    got = so.get_session_config_entry("session.disable_quant_qdq") if exact else None
    assert got == exact
    with rt:  # the session OrtBackend makes (its run() takes image batches; this graph takes [B, T, K])
        y = rt.session.run(None, {rt.input_name: x})[0]
    assert sqnr_db(reference(x, a, w, bias), y) > 100


@pytest.mark.parametrize("bits,zp", [(4, 3), (3, 1), (5, 20)])
def test_sub_8_bit_asymmetric_activation_is_clipped_to_its_grid(x, bits, zp):
    """Q/DQ simulation of an n-bit grid: codes identical to torch's clamp(round(x/s) + zp, 0, 2^n - 1)."""
    ident = np.eye(K, dtype=np.float32)
    nodes = [_marker("x", "a.input_quantizer"), helper.make_node("MatMul", ["a.input_quantizer.out", "I"], ["y"])]
    m = _graph(nodes, [numpy_helper.from_array(ident, "I")], out_shape=(B, T, K))
    p = _act("a.input_quantizer", bits=bits, symmetric=False, scale=0.3, zp=zp)
    insert_qdq(m, {p.name: p}, "onnxruntime")
    assert ops(m) == {"Clip": 1, "QuantizeLinear": 1, "DequantizeLinear": 1, "MatMul": 1}
    out, ref = run(m, x), fake_quant(x, p)
    steps = np.abs(out - ref) / p.scale
    assert steps.max() <= 1e-3  # every element on the same grid point
    with pytest.raises(TargetError, match="symmetric 8-bit"):
        insert_qdq(_graph(nodes, [numpy_helper.from_array(ident, "I")], out_shape=(B, T, K)), {p.name: p},
                   "tensorrt")


def test_int4_block_weights(x):
    w = _weight(bits=4, block=16)
    for flavour, expected in (("tensorrt", {"DequantizeLinear": 1, "MatMul": 1, "Add": 1}),
                              ("onnxruntime", {"MatMulNBits": 1, "Add": 1})):
        m = linear_graph(opset=21, act=False)
        bias = _bias(m)
        insert_qdq(m, {w.name: w}, flavour)
        assert ops(m) == expected, flavour
        assert sqnr_db(reference(x, None, w, bias), run(m, x)) > 100, flavour


def test_int4_packing_round_trip():
    codes = np.random.default_rng(0).integers(-8, 8, (5, 7)).astype(np.int8)
    t = make_int4_initializer("w", codes)
    assert t.data_type == TensorProto.INT4 and len(t.raw_data) == (codes.size + 1) // 2
    assert np.array_equal(int4_initializer_to_array(t), codes)
    blob, scales = pack_matmulnbits(codes, np.ones((5, 1), np.float32), 16)
    assert blob.shape == (5, 1, 8)
    assert np.array_equal(unpack_nibbles(blob[0].tobytes(), 7, signed=False) - 8, codes[0])


def test_weight_only_conv_is_folded_to_its_fake_quant_values():
    nodes = [_marker("Wc", "conv.weight_quantizer"),
             helper.make_node("Conv", ["x", "conv.weight_quantizer.out"], ["y"], kernel_shape=[1, 1], name="conv")]
    w = _weight("conv.weight_quantizer", bits=4, shape=(4, 3, 1, 1))
    m = _graph(nodes, [numpy_helper.from_array(np.zeros((4, 3, 1, 1), np.float32), "Wc")], x_shape=(1, 3, 4, 4),
               out_shape=(1, 4, 4, 4))
    insert_qdq(m, {w.name: w}, "tensorrt")
    assert ops(m) == {"Conv": 1}
    folded = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == m.graph.node[0].input[1])
    assert np.array_equal(folded, w.dequantized())


def test_attention_matmul_takes_two_activations(x):
    nodes = [_marker("x", "attn.qk_matmul.a_quantizer"), _marker("xt", "attn.qk_matmul.b_quantizer"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["attn.qk_matmul.a_quantizer.out", "attn.qk_matmul.b_quantizer.out"], ["y"])]
    nodes = [nodes[2], nodes[0], nodes[1], nodes[3]]
    m = _graph(nodes, [], out_shape=(B, T, T))
    a, b = _act("attn.qk_matmul.a_quantizer"), _act("attn.qk_matmul.b_quantizer", scale=0.04)
    insert_qdq(m, {a.name: a, b.name: b}, "tensorrt")
    assert ops(m) == {"Transpose": 1, "QuantizeLinear": 2, "DequantizeLinear": 2, "MatMul": 1}
    ref = fake_quant(x, a) @ fake_quant(x.transpose(0, 2, 1), b)
    assert sqnr_db(ref, run(m, x)) > 100


def test_quantizer_feeding_an_op_without_rule_is_refused():
    nodes = [_marker("x", "s.input_quantizer"), helper.make_node("Softmax", ["s.input_quantizer.out"], ["y"],
                                                                 name="softmax")]
    m = _graph(nodes, [], out_shape=(B, T, K))
    with pytest.raises(UnsupportedOpError, match="Softmax node 'softmax'"):
        insert_qdq(m, {"s.input_quantizer": _act("s.input_quantizer")}, "tensorrt")


def test_registry_decides_the_pass():
    """A registry without MatMul makes the same graph unexportable: the pass has no op knowledge of its own."""
    reg = {k: v for k, v in REGISTRY.items() if k != "MatMul"}
    a, w = _act(), _weight()
    with pytest.raises(UnsupportedOpError, match="has no Q/DQ rule"):
        insert_qdq(linear_graph(), {a.name: a, w.name: w}, "tensorrt", registry=reg)
    only_weights = dict(REGISTRY)
    register(OpRule("MatMul", ((1, "weight"),)), only_weights, replace=True)
    with pytest.raises(UnsupportedOpError, match="takes no activation Q/DQ on input 0"):
        insert_qdq(linear_graph(), {a.name: a, w.name: w}, "tensorrt", registry=only_weights)


# ---- lowerings: per-op, per-flavour behaviour of the registry entries --------------------------------------

def test_every_quantizable_op_has_a_lowering_per_flavour():
    from maskaq_deploy.export.registry import FLAVOURS
    from maskaq_deploy.runtimes import targets

    assert set(FLAVOURS) == set(targets.FLAVOURS)
    for op in quantized_op_types():
        assert set(REGISTRY[op].lowerings) == set(FLAVOURS), op
    assert REGISTRY["MatMul"].int4_weights and not REGISTRY["Conv"].int4_weights


def test_an_entry_s_lowerings_decide_the_kernel(x):
    from maskaq_deploy.export.lowering import ChannelDQ

    reg = dict(REGISTRY)
    mm = REGISTRY["MatMul"]
    register(OpRule("MatMul", mm.inputs, {"onnxruntime": (ChannelDQ(),), "tensorrt": (ChannelDQ(),)}), reg,
             replace=True)
    m = linear_graph()
    bias = _bias(m)
    a, w = _act(), _weight()
    insert_qdq(m, {a.name: a, w.name: w}, "onnxruntime", registry=reg)
    assert "MatMulIntegerToFloat" not in ops(m) and ops(m)["DequantizeLinear"] == 2  # plain Q/DQ, not the kernel
    assert sqnr_db(reference(x, a, w, bias), run(m, x)) > 100
    register(OpRule("MatMul", mm.inputs, {"tensorrt": (ChannelDQ(),)}), reg, replace=True)
    with pytest.raises(TargetError, match="MatMul has no onnxruntime form"):
        insert_qdq(linear_graph(), {a.name: a, w.name: w}, "onnxruntime", registry=reg)
    with pytest.raises(ValueError, match="unknown flavour"):
        OpRule("MatMul", mm.inputs, {"tflite": (ChannelDQ(),)})
