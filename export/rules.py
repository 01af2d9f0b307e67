"""Conformance checks of a QDQ ONNX graph: TensorRT explicit-quantization rules, and onnxruntime loading.

``check_tensorrt`` lists every violation of the rules TensorRT 10/11 puts on explicitly quantized graphs
(DESIGN.md "TensorRT explicit-quantization rules"):

    trt-zero-point       a Q/DQ zero point is not all zeros (TensorRT Q/DQ are symmetric)
    trt-scale            a scale is not a constant, or has a value <= 0 / not finite
    trt-act-per-channel  a per-channel or block-wise scale on an activation (non-constant input)
    trt-dtype            a Q/DQ type TensorRT lacks (uint8, uint4, int16, ...); it has INT8, INT4, FP8
    trt-int4-activation  INT4 on an activation (TensorRT INT4 is weight-only)
    trt-int4-block       INT4 weights not block-wise on one of the last two axes
    trt-int4-consumer    an INT4 weight DQ feeding something other than MatMul/Gemm
    trt-float-op-int8    a DequantizeLinear feeding LayerNormalization / Gelu / Erf (TensorRT would fuse it and
                         run the op in INT8)
    trt-fused-attention  a fused Attention / MultiHeadAttention op (no Q/DQ can be placed inside it)
    trt-custom-op        a node from a non-ONNX domain (e.g. com.microsoft MatMulNBits), no TensorRT importer
    trt-opset            default-domain opset outside 13..22
    trt-float32-tensor   a float32 tensor (other than the model's I/O) in a half-precision (fp16/bf16) graph: a
                         strongly typed TensorRT network runs it, and the layer that makes it, in FP32
    trt-scale-dtype      a Q/DQ scale whose type is not the float type the pair works in (QuantizeLinear: its
                         input's; DequantizeLinear in a half graph: the half type), so the DQ output, and
                         the GEMM behind it, would be float32

A graph is half precision when its ``maskaq.float_dtype`` metadata says so, or (graphs from elsewhere) when
most of its computed float tensors are fp16 or bf16; tensor types come from the graph's value_info, completed
by ONNX shape inference. Why the scales follow the half type: export/precision.py.

Opset bound: onnx-tensorrt (the parser inside TensorRT 10.x) documents ONNX opsets 9 to 22 in its
docs/operators.md; NVIDIA's ONNX Opset Guide gives 25 as the maximum for TensorRT 11.x. 22 is the bound both
parse; 13 is the first opset with per-axis Q/DQ, which explicit quantization needs.

``check_onnxruntime`` tries to create an onnxruntime CPU session at the default optimization level
(``ort-load``) and warns (``ort-int4-accuracy``) where INT4 DQ -> MatMul needs the session option
``session.qdq_matmulnbits_accuracy_level = "0"`` to keep float activations.

Which ops take INT4 and which must stay float comes from export/registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from maskaq_deploy.export.errors import OnnxFileError
from maskaq_deploy.export.graph import INT4_TYPES, QDQ_OPS, GraphView
from maskaq_deploy.export.precision import FLOAT_DTYPE_KEY, FLOAT_DTYPES
from maskaq_deploy.export.registry import int4_consumers, trt_float_only_ops
from maskaq_deploy.runtimes.targets import FLAVOURS, ONNXRUNTIME, TENSORRT, check_name

TRT_MIN_OPSET, TRT_MAX_OPSET = 13, 22
TRT_QDQ_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")

RULES = {
    "trt-zero-point": "Q/DQ zero points must be all zero",
    "trt-scale": "Q/DQ scales must be positive, finite constants",
    "trt-act-per-channel": "activations must be quantized per tensor",
    "trt-dtype": "Q/DQ types must be INT8, INT4 or FP8",
    "trt-int4-activation": "INT4 is for weights only",
    "trt-int4-block": "INT4 weights must be block-wise on one of the last two axes",
    "trt-int4-consumer": "INT4 weights may feed only MatMul/Gemm",
    "trt-float-op-int8": "no DequantizeLinear directly feeding LayerNormalization/Gelu/Erf",
    "trt-fused-attention": "attention must stay MatMul -> Softmax -> MatMul",
    "trt-custom-op": "only ONNX-domain ops (no onnxruntime contrib ops)",
    "trt-opset": f"opset {TRT_MIN_OPSET} to {TRT_MAX_OPSET}",
    "trt-float32-tensor": "no float32 tensor but the model I/O in an fp16/bf16 graph",
    "trt-scale-dtype": "Q/DQ scales have the float type the pair works in",
    "ort-load": "onnxruntime can create a CPU session at the default optimization level",
    "ort-int4-accuracy": "INT4 DQ -> MatMul needs session.qdq_matmulnbits_accuracy_level=0",
}


@dataclass(frozen=True)
class Violation:
    rule: str  # an id from RULES
    node: str  # the offending node's name (or "<model>")
    message: str
    target: str = TENSORRT
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


def load_model(model) -> onnx.ModelProto:
    """A ModelProto from a ModelProto or a path; raises OnnxFileError for a missing file or not-ONNX bytes."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist or is not a file; give the path of an .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, external-data OSError, ...
        raise OnnxFileError(f"{path} is not an ONNX model ({type(e).__name__}); export one with "
                            "'maskaq-deploy export'") from None
    # protobuf parses many byte strings "successfully" into an empty message: demand the ONNX essentials
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import or not proto.graph.node:
        raise OnnxFileError(f"{path} is not an ONNX model (no IR version, opset or graph); export one with "
                            "'maskaq-deploy export'")
    return proto


def _dtype_name(t: int | None) -> str:
    return TensorProto.DataType.Name(t) if t else "unknown"


def check_tensorrt(model) -> list[Violation]:
    """Every violation of TensorRT's explicit-quantization rules in ``model`` (a ModelProto or a path)."""
    proto = load_model(model)
    G = GraphView(proto)
    out: list[Violation] = []

    def add(rule, node, msg):
        out.append(Violation(rule, node if isinstance(node, str) else G.name(node), msg, TENSORRT))

    if not TRT_MIN_OPSET <= G.opset <= TRT_MAX_OPSET:
        add("trt-opset", "<model>", f"opset {G.opset} is outside {TRT_MIN_OPSET}..{TRT_MAX_OPSET}, which the "
            "TensorRT 10 ONNX parser reads; re-export with opset 20 (21 for INT4)")
    float_only = set(trt_float_only_ops())
    int4_ok = set(int4_consumers())
    for node in G.nodes:
        if node.op_type in FUSED_ATTENTION:
            add("trt-fused-attention", node, f"{node.op_type} is a fused attention op: Q/DQ cannot reach its "
                "matmuls; export with fused attention off and opset < 23")
            continue
        if node.domain not in ("", "ai.onnx"):
            add("trt-custom-op", node, f"{node.domain}::{node.op_type} is not an ONNX op and TensorRT has no "
                "importer for it; export with flavour 'tensorrt'")
            continue
        if node.op_type in float_only:
            for i in node.input:
                p = G.producer.get(i)
                if p is not None and p.op_type == "DequantizeLinear":
                    add("trt-float-op-int8", node, f"{node.op_type} reads DequantizeLinear {G.name(p)} directly; "
                        "TensorRT would run it in INT8. Quantize the inputs of the following MatMul instead")
                    break
        if node.op_type not in QDQ_OPS:
            continue
        _check_qdq(G, node, add, int4_ok)
    _check_float_types(proto, add)
    return out


_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def half_dtype(proto: onnx.ModelProto, types: dict) -> int | None:
    """The half type (FLOAT16 / BFLOAT16) a graph computes in, or None for a float32 graph."""
    meta = {p.key: p.value for p in proto.metadata_props}.get(FLOAT_DTYPE_KEY)
    if meta in FLOAT_DTYPES:
        return FLOAT_DTYPES[meta] if FLOAT_DTYPES[meta] in _HALF else None
    produced = [types.get(o) for n in proto.graph.node for o in n.output]
    floats = [t for t in produced if t in _HALF | {TensorProto.FLOAT}]
    half = [t for t in floats if t in _HALF]
    return max(set(half), key=half.count) if floats and 2 * len(half) > len(floats) else None


def tensor_types(proto: onnx.ModelProto) -> dict:
    """{tensor name: element type} of every typed tensor: I/O, value_info, initializers, plus inferred ones."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # a graph shape inference cannot read: use what the file declares
        inferred = proto
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def _check_float_types(proto: onnx.ModelProto, add) -> None:
    types = tensor_types(proto)
    half = half_dtype(proto, types)
    io = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    inits = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in QDQ_OPS and len(node.input) > 1:
            scale_t = types.get(node.input[1])
            want = types.get(node.input[0]) if node.op_type == "QuantizeLinear" else half
            if want is not None and scale_t is not None and scale_t != want:
                add("trt-scale-dtype", node, f"scale is {_dtype_name(scale_t)} but the pair works in "
                    f"{_dtype_name(want)}; store the scale as {_dtype_name(want)} (DequantizeLinear returns its "
                    "scale's type)")
        if half is None:
            continue
        bad = [o for o in node.output if o and o not in io and types.get(o) == TensorProto.FLOAT]
        bad += [i for i in node.input if i in inits and node.op_type not in QDQ_OPS
                and types.get(i) == TensorProto.FLOAT]
        if bad:
            add("trt-float32-tensor", node, f"{node.op_type} makes or reads float32 tensor {bad[0]!r} in a "
                f"{_dtype_name(half)} graph; TensorRT would run it in FP32. Re-export with --float-dtype "
                f"{'fp16' if half == TensorProto.FLOAT16 else 'bf16'}")


def _check_qdq(G: GraphView, node, add, int4_ok: set) -> None:
    data = node.input[0]
    # a DQ's data is a weight when it is constant (an initializer or Q(constant)); a Q's when its input is
    is_weight = G.is_constant(data)
    dtype = G.qdq_dtype(node)
    scale = G.const_array(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        add("trt-scale", node, "the scale is not a constant; TensorRT needs build-time scales")
    else:
        s = np.asarray(scale, dtype=np.float64)
        if s.size == 0 or not np.isfinite(s).all() or (s <= 0).any():
            add("trt-scale", node, f"scale has non-positive or non-finite values (min {s.min() if s.size else '-'});"
                " recalibrate")
        if s.size > 1 and not is_weight:
            add("trt-act-per-channel", node, f"{s.size} scales on an activation; TensorRT quantizes activations "
                "per tensor")
    if len(node.input) > 2 and node.input[2]:
        zp = G.const_array(node.input[2])
        if zp is None:
            add("trt-zero-point", node, "the zero point is not a constant")
        elif np.any(np.asarray(zp) != 0):
            add("trt-zero-point", node, "non-zero zero point; TensorRT Q/DQ are symmetric (use symmetric "
                "activations, or export flavour 'tensorrt')")
    if dtype is not None and dtype not in TRT_QDQ_TYPES:
        add("trt-dtype", node, f"{_dtype_name(dtype)} Q/DQ; TensorRT takes INT8 (activations and weights), INT4 "
            "(weights) or FP8")
    if dtype in INT4_TYPES:
        if not is_weight:
            add("trt-int4-activation", node, "INT4 on an activation; TensorRT INT4 is weight-only (use int8 "
                "activations or w4a16)")
            return
        if node.op_type == "DequantizeLinear":
            block = int(G.attr(node, "block_size", 0) or 0)
            rank = len(G.inits[data].dims) if data in G.inits else None
            axis = int(G.attr(node, "axis", 1))
            if rank is not None and axis < 0:
                axis += rank
            if block <= 0 or (rank is not None and axis < rank - 2):
                add("trt-int4-block", node, "INT4 weights must be dequantized block-wise along one of the last two "
                    "axes (DequantizeLinear block_size, opset 21)")
            for consumer, _ in G.consumers.get(node.output[0], []):
                if consumer.op_type not in int4_ok:
                    add("trt-int4-consumer", node, f"INT4 weights feed {consumer.op_type} "
                        f"{G.name(consumer)}; TensorRT takes INT4 only into MatMul/Gemm")


def check_onnxruntime(model, *, providers=("CPUExecutionProvider",)) -> list[Violation]:
    """Whether onnxruntime loads ``model`` at its default optimization level, plus INT4 session advice."""
    import onnxruntime as ort

    proto = load_model(model)
    G = GraphView(proto)
    out: list[Violation] = []
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out.append(Violation("ort-load", "<model>", f"onnxruntime cannot load the graph at ORT_ENABLE_ALL: "
                             f"{first[:300]}", ONNXRUNTIME))
    for node in G.nodes:
        if node.op_type == "DequantizeLinear" and G.qdq_dtype(node) in INT4_TYPES and any(
                c.op_type in ("MatMul", "Gemm") for c, _ in G.consumers.get(node.output[0], [])):
            out.append(Violation("ort-int4-accuracy", G.name(node), "INT4 DQ -> MatMul: create the session with "
                                 "session.qdq_matmulnbits_accuracy_level=0 (OrtBackend does), or onnxruntime "
                                 "quantizes its activations to int8", ONNXRUNTIME, "warning"))
    return out


def check(model, targets=(TENSORRT, ONNXRUNTIME)) -> list[Violation]:
    """Violations for each of ``targets`` (export flavours: "tensorrt", "onnxruntime")."""
    wanted = {check_name(t, FLAVOURS, "conformance target") for t in targets}  # ValueError for an unknown one
    proto = load_model(model)
    out = []
    if TENSORRT in wanted:
        out += check_tensorrt(proto)
    if ONNXRUNTIME in wanted:
        out += check_onnxruntime(proto)
    return out
