"""Half-precision float path: every float tensor of a QDQ graph in fp16 or bf16, with float32 model I/O.

TensorRT builds strongly typed networks (the only mode in TensorRT 11): precision comes from the graph's
tensor types, so a float32 tensor runs in FP32 on the GPU ("Network tensor types, including types imported
from an ONNX model, determine precision",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-strongly-typed-networks.html).
``to_float_dtype`` rewrites a QDQ graph so that everything that is not a Q/DQ pair or a quantized GEMM input
computes in the chosen dtype:

* every float32 initializer and Constant (weights kept float, biases, LayerNorm gamma/beta, Q/DQ scales)
  becomes that dtype, and Cast nodes to float32 cast to it instead;
* Q/DQ scales take the half dtype too: ONNX's DequantizeLinear returns the type of its scale ("If
  output_dtype is not supplied then the output type is the same as x_scale",
  https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html) and QuantizeLinear (opset 19/20) requires the
  scale to have the input's type; TensorRT's parser turns them into IQuantizeLayer / IDequantizeLayer whose
  output type (``setToType``) is that type
  (https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_dequantize_layer.html). A
  float32 scale would make every DQ output, and so every GEMM behind it, float32 in a strongly typed network;
* bf16 graphs are exported at opset 22 (``BF16_OPSET``), the first whose Conv takes bfloat16; onnxruntime
  has no CPU kernel for bfloat16 QuantizeLinear, so a bf16 graph is checked here by ONNX's type checker and our
  rules only, not run;
* the model input gets a Cast to the dtype, the output a Cast back to float32, so golden files, the bundle's
  verify_engine.py and every runtime keep feeding and reading float32.

Numerically risky ops:

* LayerNormalization stays the one opset-17 op with ``stash_type = 1``. TensorRT's own builder warning for
  half-precision LayerNorm says what it wants: "Running layernorm after self-attention in FP16 may cause
  overflow. Exporting the model to the latest available ONNX opset (later than opset 17) to use the
  INormalizationLayer, or forcing layernorm layers to run in FP32 precision can help with preserving
  accuracy." The single op maps onto INormalizationLayer, which carries its own compute precision
  (``setComputePrecision``,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_normalization_layer.html),
  and ``stash_type = 1`` is ONNX's statement that mean and variance are computed in float32 and only the
  result is cast back (https://onnx.ai/onnx/operators/onnx__LayerNormalization.html). Its inputs and outputs
  are half tensors: no FP32 layer and no Cast pair around it.
* Softmax stays in the half dtype inside MatMul -> Softmax -> MatMul, the pattern TensorRT fuses into one
  attention kernel on FP16/BF16 inputs; the exporter already scales q before the first MatMul, which TensorRT
  "requires ... for numeric stability and performance reasons"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/transformers-fused-attention.html).
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.export.errors import ExportError

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOAT_DTYPE_KEY = "maskaq.float_dtype"
BF16_OPSET = 22  # the first opset whose Conv takes bfloat16 (MatMul, Gemm, LayerNorm, Softmax, Gelu already do)
_NUMPY = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}
_FP16_TINY = np.float16(2.0 ** -24)  # smallest positive (subnormal) fp16


def check_float_dtype(name: str) -> int:
    """The ONNX element type of ``name`` ("fp32" | "fp16" | "bf16"); raises ExportError otherwise."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ExportError(f"unknown float dtype {name!r}; choose one of {', '.join(FLOAT_DTYPES)}") from None


def _convert_tensor(t: TensorProto, to: int) -> TensorProto:
    arr = numpy_helper.to_array(t)
    half = arr.astype(_NUMPY[to])
    if to == TensorProto.FLOAT16:
        # a positive value below fp16's range (a dead channel's scale) must stay positive: TensorRT rejects
        # scales <= 0, and the codes it multiplies are zero or negligible anyway
        lost = (arr > 0) & (half == 0)
        if lost.any():
            log.warning("%s: %d value(s) below fp16's range raised to 2^-24", t.name, int(lost.sum()))
            half = np.where(lost, _FP16_TINY, half).astype(np.float16)
    if to == TensorProto.BFLOAT16:
        out = helper.make_tensor(t.name, to, list(arr.shape), half.tobytes(), raw=True)
    else:
        out = numpy_helper.from_array(half, t.name)
    return out


def _float_attr_tensors(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
            yield a


def to_float_dtype(proto: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """Rewrite ``proto`` in place so its float computation runs in ``dtype``; model I/O stays float32."""
    to = check_float_dtype(dtype)
    if to == TensorProto.FLOAT:
        return proto
    g = proto.graph
    inits = []
    for t in g.initializer:
        inits.append(_convert_tensor(t, to) if t.data_type == TensorProto.FLOAT else t)
    del g.initializer[:]
    g.initializer.extend(inits)
    for node in g.node:
        for a in _float_attr_tensors(node):  # Constant, ConstantOfShape
            a.t.CopyFrom(_convert_tensor(a.t, to))
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = to
        if node.op_type == "LayerNormalization":
            _set_int_attr(node, "stash_type", 1)  # mean/variance in float32 (the ONNX default, made explicit)
    head, tail = [], []
    for x in g.input:
        if x.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{x.name}.{dtype}"
        _rename_uses(g, x.name, half)
        head.append(helper.make_node("Cast", [x.name], [half], name=f"{x.name}/Cast_{dtype}", to=to))
    for y in g.output:
        if y.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{y.name}.{dtype}"
        for node in g.node:
            node.output[:] = [half if o == y.name else o for o in node.output]
        _rename_uses(g, y.name, half)
        tail.append(helper.make_node("Cast", [half], [y.name], name=f"{y.name}/Cast_fp32", to=TensorProto.FLOAT))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # stale float32 types; shape inference below derives the new ones
    try:
        onnx.checker.check_model(proto, full_check=True)  # every op's type constraints hold for the new dtype
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as e:  # InferenceError, ValidationError: a type the conversion got wrong
        hint = f" (bf16 Conv needs opset {BF16_OPSET})" if to == TensorProto.BFLOAT16 else ""
        raise ExportError(f"the {dtype} graph does not type-check{hint}: "
                          f"{str(e).strip().splitlines()[0][:300]}") from e
    proto.graph.value_info.extend(inferred.graph.value_info)
    return proto


def _rename_uses(g, old: str, new: str) -> None:
    for node in g.node:
        node.input[:] = [new if i == old else i for i in node.input]


def _set_int_attr(node, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))
