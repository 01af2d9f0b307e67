"""The half-precision float path of the TensorRT flavour, and the rule checker's dtype rules, on hand-built
marker graphs (tests/unit/test_registry.py's Linear layer)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.export.errors import ExportError
from maskaq_deploy.export.precision import check_float_dtype, to_float_dtype
from maskaq_deploy.export.qdq import insert_qdq
from maskaq_deploy.export.rules import check_tensorrt, tensor_types
from maskaq_deploy.runtimes.compare import sqnr_db
from tests.unit.test_registry import _act, _weight, linear_graph, ops, run

F, H, BF = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture
def x():
    return (np.random.default_rng(7).standard_normal((2, 5, 32)) * 2).astype(np.float32)


def qdq_linear(dtype: str, scale=0.05):
    m = linear_graph()
    a, w = _act(scale=scale), _weight()
    insert_qdq(m, {a.name: a, w.name: w}, "tensorrt")
    return to_float_dtype(m, dtype)


@pytest.mark.parametrize("dtype, half", [("fp16", H), ("bf16", BF)])
def test_every_tensor_but_the_io_is_half(dtype, half):
    m = qdq_linear(dtype)
    types = tensor_types(m)
    assert m.graph.input[0].type.tensor_type.elem_type == F and m.graph.output[0].type.tensor_type.elem_type == F
    assert ops(m)["Cast"] == 2 and m.graph.node[0].op_type == "Cast" and m.graph.node[-1].op_type == "Cast"
    produced = [o for n in m.graph.node[:-1] for o in n.output]
    floats = {o: types[o] for o in produced if types[o] in (F, H, BF)}
    assert floats and set(floats.values()) == {half}, floats
    scales = [t for t in m.graph.initializer if t.name.endswith(".scale")]
    assert len(scales) == 2 and {t.data_type for t in scales} == {half}  # the DQ outputs follow their scales
    assert check_tensorrt(m) == []


def test_fp16_graph_tracks_the_float32_one(x):
    ref = run(qdq_linear("fp32"), x)
    out = run(qdq_linear("fp16"), x)
    assert out.dtype == np.float32
    assert sqnr_db(ref, out) > 40  # half-precision rounding of scales, bias and the output only


def test_layernorm_keeps_a_float32_reduction():
    io = [helper.make_tensor_value_info(name, F, [2, 4]) for name in ("x", "y")]
    g = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)], "ln",
                          io[:1], io[1:],
                          [numpy_helper.from_array(np.ones(4, np.float32), "g"),
                           numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    to_float_dtype(m, "fp16")
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    assert helper.get_attribute_value(next(a for a in ln.attribute if a.name == "stash_type")) == 1
    assert tensor_types(m)[ln.output[0]] == H


def test_a_scale_below_fp16_range_stays_positive():
    m = qdq_linear("fp16", scale=1e-9)
    s = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "fc.input_quantizer.scale")
    assert s.dtype == np.float16 and float(s) == 2.0 ** -24
    assert not [v for v in check_tensorrt(m) if v.rule == "trt-scale"]


def test_unknown_float_dtype_is_refused():
    with pytest.raises(ExportError, match="choose one of fp32, fp16, bf16"):
        check_float_dtype("fp8")


def test_float32_island_in_an_fp16_graph_is_a_finding():
    m = qdq_linear("fp16")
    add = next(n for n in m.graph.node if n.op_type == "Add")
    i = add.input[0]
    up = helper.make_node("Cast", [i], [f"{i}.f32"], to=F, name="to_fp32")
    add.input[0] = f"{i}.f32"
    bias = next(t for t in m.graph.initializer if t.name == add.input[1])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float32), bias.name))
    down = helper.make_node("Cast", [add.output[0]], [add.output[0] + ".h"], to=H, name="to_fp16")
    for n in m.graph.node:
        n.input[:] = [add.output[0] + ".h" if v == add.output[0] else v for v in n.input]
    nodes = list(m.graph.node)
    nodes.insert(nodes.index(add), up)
    nodes.insert(nodes.index(add) + 1, down)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    found = {(v.rule, v.node) for v in check_tensorrt(m)}
    assert ("trt-float32-tensor", "to_fp32") in found and ("trt-float32-tensor", "fc/bias") in found


def test_float32_scale_in_an_fp16_graph_is_a_finding():
    m = qdq_linear("fp16")
    s = next(t for t in m.graph.initializer if t.name == "fc.weight_quantizer.scale")
    s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s).astype(np.float32), s.name))
    del m.graph.value_info[:]
    rules = {v.rule for v in check_tensorrt(m)}
    assert "trt-scale-dtype" in rules


def test_float32_graph_has_no_dtype_findings():
    m = qdq_linear("fp32")
    assert check_tensorrt(m) == [] and onnx.checker.check_model(m) is None


def test_bf16_conv_needs_opset_22():
    def conv_model(opset):
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])], "c",
                              [helper.make_tensor_value_info("x", F, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", F, [1, 2, 3, 3])],
                              [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)

    with pytest.raises(ExportError, match="bf16 Conv needs opset 22"):
        to_float_dtype(conv_model(20), "bf16")
    assert tensor_types(to_float_dtype(conv_model(22), "bf16"))["w"] == BF
