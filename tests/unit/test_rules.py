"""The conformance checker on small hand-built graphs: one failing example per rule, and a clean graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.export.errors import NoQDQError, OnnxFileError
from maskaq_deploy.export.inspect import inspect_onnx
from maskaq_deploy.export.int4 import make_int4_initializer
from maskaq_deploy.export.rules import RULES, check_onnxruntime, check_tensorrt, load_model

F = TensorProto.FLOAT
K, N = 16, 8


def _const(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(nodes, inits, opset=20, inputs=None, outputs=("y",), extra_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", F, [2, 4, K])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, F, None) for o in outputs],
                              inits)
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=ops)
    m.ir_version = 10 if opset >= 21 else 9
    return m


def _act_qdq(x="x", out="x_dq", scale=0.05, zp=0, zp_dtype=np.int8, prefix="a"):
    nodes = [helper.make_node("QuantizeLinear", [x, f"{prefix}_s", f"{prefix}_zp"], [f"{prefix}_q"],
                              name=f"{prefix}/Q"),
             helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_zp"], [out],
                              name=f"{prefix}/DQ")]
    return nodes, [_const(f"{prefix}_s", scale, np.float32), _const(f"{prefix}_zp", zp, zp_dtype)]


def _weight_dq(out="w_dq", scale=None):
    w = np.random.default_rng(0).integers(-127, 128, (K, N)).astype(np.int8)
    scale = np.full(N, 0.01, np.float32) if scale is None else scale
    return ([helper.make_node("DequantizeLinear", ["w", "w_s", "w_zp"], [out], name="w/DQ", axis=1)],
            [_const("w", w), _const("w_s", scale), _const("w_zp", np.zeros(N, np.int8))])


def clean_graph(**kw):
    """x -> Q/DQ (int8, zp 0) -> MatMul(int8 per-channel weight) -> LayerNorm -> Gelu -> y."""
    an, ai = _act_qdq(**kw)
    wn, wi = _weight_dq()
    nodes = an + wn + [helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="fc"),
                       helper.make_node("LayerNormalization", ["mm", "g", "b"], ["ln"], name="ln", axis=-1),
                       helper.make_node("Gelu", ["ln"], ["y"], name="gelu")]
    return _model(nodes, ai + wi + [_const("g", np.ones(N, np.float32)), _const("b", np.zeros(N, np.float32))])


def rules_of(model):
    return {v.rule for v in check_tensorrt(model)}


def test_clean_graph_has_no_violations_and_loads_in_onnxruntime():
    m = clean_graph()
    assert check_tensorrt(m) == []
    assert check_onnxruntime(m) == []


def test_nonzero_zero_point():
    assert rules_of(clean_graph(zp=3)) == {"trt-zero-point"}


@pytest.mark.parametrize("scale", [0.0, -0.1])
def test_non_positive_scale(scale):
    assert "trt-scale" in rules_of(clean_graph(scale=scale))


def test_non_constant_scale():
    an, ai = _act_qdq()
    an[0].input[1] = "s_in"  # the Q's scale comes from a graph input
    wn, wi = _weight_dq()
    m = _model(an + wn + [helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc")], ai + wi,
               inputs=[helper.make_tensor_value_info("x", F, [2, 4, K]), helper.make_tensor_value_info("s_in", F, [])])
    assert "trt-scale" in rules_of(m)


def test_per_channel_scale_on_activation():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="act/Q", axis=2),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="act/DQ", axis=2)]
    m = _model(nodes, [_const("s", np.full(K, 0.05, np.float32)), _const("zp", np.zeros(K, np.int8))])
    found = check_tensorrt(m)
    assert {v.rule for v in found} == {"trt-act-per-channel"}
    assert {v.node for v in found} == {"act/Q", "act/DQ"}


def test_uint8_activation_type():
    assert "trt-dtype" in rules_of(clean_graph(zp=0, zp_dtype=np.uint8))


def test_int4_on_activation():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="act/Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="act/DQ")]
    zp = make_int4_initializer("zp", np.zeros((), np.int8))
    m = _model(nodes, [_const("s", 0.1, np.float32), zp], opset=21)
    assert "trt-int4-activation" in rules_of(m)


def _int4_weight(block_size=None, axis=0, consumer="MatMul"):
    codes = np.random.default_rng(1).integers(-8, 8, (K, N)).astype(np.int8)
    w = make_int4_initializer("w4", codes)
    if block_size:
        s = _const("w4_s", np.full((K // block_size, N), 0.02, np.float32))
        dq = helper.make_node("DequantizeLinear", ["w4", "w4_s"], ["w_dq"], name="w4/DQ", axis=axis,
                              block_size=block_size)
    else:
        s = _const("w4_s", np.full(N, 0.02, np.float32))
        dq = helper.make_node("DequantizeLinear", ["w4", "w4_s"], ["w_dq"], name="w4/DQ", axis=1)
    if consumer == "MatMul":
        use = helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="fc")
    else:  # an elementwise use of the weight
        use = helper.make_node("Add", ["x", "w_dq_row"], ["y"], name="add")
        return _model([dq, helper.make_node("ReduceMean", ["w_dq"], ["w_dq_row"], name="rm", keepdims=0,
                                            axes=[1]), use], [w, s], opset=21)
    return _model([dq, use], [w, s], opset=21)


def test_int4_weight_block_wise_feeding_matmul_is_clean():
    assert rules_of(_int4_weight(block_size=8)) == set()


def test_int4_weight_not_block_wise():
    assert rules_of(_int4_weight(block_size=None)) == {"trt-int4-block"}


def test_int4_weight_feeding_non_matmul():
    # ReduceMean is the consumer: INT4 may only feed MatMul/Gemm (opset 21's ReduceMean takes axes as input,
    # which does not matter for the checker)
    assert "trt-int4-consumer" in rules_of(_int4_weight(block_size=8, consumer="Add"))


@pytest.mark.parametrize("op", ["LayerNormalization", "Gelu"])
def test_dq_feeding_layernorm_or_gelu(op):
    an, ai = _act_qdq()
    if op == "LayerNormalization":
        use = helper.make_node(op, ["x_dq", "g", "b"], ["y"], name="norm", axis=-1)
        extra = [_const("g", np.ones(K, np.float32)), _const("b", np.zeros(K, np.float32))]
    else:
        use, extra = helper.make_node(op, ["x_dq"], ["y"], name="norm"), []
    found = check_tensorrt(_model(an + [use], ai + extra))
    assert [(v.rule, v.node) for v in found] == [("trt-float-op-int8", "norm")]


def test_fused_attention_op():
    q = helper.make_tensor_value_info("x", F, [2, 4, K])
    node = helper.make_node("Attention", ["x", "x", "x"], ["y"], name="attn", q_num_heads=2, kv_num_heads=2)
    m = _model([node], [], opset=23, inputs=[q])
    m.ir_version = 11
    assert {"trt-fused-attention", "trt-opset"} <= rules_of(m)


def test_custom_domain_op():
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], name="nbits", domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=16)
    m = _model([node], [_const("b", np.zeros((N, 1, 8), np.uint8)), _const("s", np.ones(N, np.float32))],
               extra_opsets=[("com.microsoft", 1)])
    assert rules_of(m) == {"trt-custom-op"}


def test_opset_too_new():
    m = clean_graph()
    m.opset_import[0].version = 23
    assert "trt-opset" in rules_of(m)


def test_onnxruntime_load_failure_is_reported():
    m = clean_graph()
    m.graph.node[-1].op_type = "NoSuchOp"
    found = check_onnxruntime(m)
    assert [v.rule for v in found] == ["ort-load"]
    assert "\n" not in found[0].message


def test_int4_dq_matmul_warns_about_the_accuracy_level():
    found = check_onnxruntime(_int4_weight(block_size=8))
    assert [(v.rule, v.severity) for v in found] == [("ort-int4-accuracy", "warning")]


def test_every_rule_is_documented():
    assert all(RULES[r] for r in RULES)
    assert {r.split("-")[0] for r in RULES} == {"trt", "ort"}


# ---- loading and inspecting files ------------------------------------------------------------------------

def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(OnnxFileError, match="not an ONNX model"):
        load_model(p)
    with pytest.raises(OnnxFileError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(OnnxFileError):
        inspect_onnx(p)


def test_inspect_counts_quantized_ops_and_sizes(tmp_path):
    p = tmp_path / "clean.onnx"
    onnx.save(clean_graph(), p)
    r = inspect_onnx(p)
    assert r.has_qdq and r.tensorrt_violations == [] and r.onnxruntime_violations == []
    assert r.quantized_ops == {"MatMul": {"w8a8": 1}}
    assert r.quantized_initializer_bytes == K * N + N + 1  # int8 weight and zero points
    assert r.file_bytes == p.stat().st_size and r.initializer_bytes > r.quantized_initializer_bytes


def test_graph_without_qdq_is_flagged(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    p = tmp_path / "float.onnx"
    onnx.save(_model(nodes, [_const("w", np.ones((K, N), np.float32))]), p)
    r = inspect_onnx(p)
    assert not r.has_qdq and r.quantized_ops == {} and r.tensorrt_violations == []
    with pytest.raises(NoQDQError, match="float model"):
        inspect_onnx(p, require_qdq=True)
