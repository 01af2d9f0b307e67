"""Summary of an ONNX file: what is quantized (op type x bit width), sizes, and conformance violations.

Bit widths come from the exporter's metadata (``maskaq.bits``: the effective grid, e.g. 4 for a w4a4 graph
that simulates 4-bit activations in 8-bit Q/DQ) and, for graphs from elsewhere, from the integer types.
A quantized op is labelled ``w{W}a{A}`` (weight and activation quantized), ``w{W}afp`` (weight-only, float
activations) or ``a{A}a{B}`` (two quantized activations: the attention matmuls). W and A are bit widths of
integer grids held in int8/uint8, ``int4`` for weights stored as INT4, and ``fp8`` for FP8 E4M3 Q/DQ: an FP8
graph reads ``wfp8afp8``, a TensorRT weight-only INT4 GEMM ``wint4afp``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from maskaq_deploy.export.errors import NoQDQError
from maskaq_deploy.export.registry import quantized_op_types
from maskaq_deploy.export.graph import GraphView
from maskaq_deploy.export.rules import (
    Violation,
    check_onnxruntime,
    check_tensorrt,
    half_dtype,
    load_model,
    tensor_types,
)

BITS_METADATA_KEY = "maskaq.bits"
_TYPE_BITS = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4,
              TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.FLOAT8E4M3FN: 8}
_QUANT_INIT_TYPES = set(_TYPE_BITS)
# onnxruntime's fused / contrib quantized ops: (weight input, activation inputs)
_FUSED = {
    "MatMulIntegerToFloat": (None, (0, 1)),
    "MatMulNBits": (1, (0,)),
    "QLinearMatMul": (None, (0, 3)),
    "QLinearConv": (3, (0,)),
    "QGemm": (3, (0,)),
    "MatMulInteger": (None, (0, 1)),
    "ConvInteger": (1, (0,)),
    "DynamicQuantizeMatMul": (1, ()),
}


@dataclass
class InspectReport:
    path: str
    file_bytes: int
    initializer_bytes: int
    quantized_initializer_bytes: int
    float_initializer_bytes: int
    ir_version: int
    opset: int
    producer: str
    inputs: list
    outputs: list
    num_nodes: int
    op_counts: dict
    quantized_ops: dict  # op type -> {label: count}
    has_qdq: bool
    flavour: str | None
    float_dtype: str  # what the unquantized ops compute in: fp32, fp16 or bf16
    tensorrt_violations: list = field(default_factory=list)
    onnxruntime_violations: list = field(default_factory=list)

    @property
    def quantized_op_total(self) -> int:
        return sum(sum(v.values()) for v in self.quantized_ops.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensorrt_violations"] = [asdict(v) for v in self.tensorrt_violations]
        d["onnxruntime_violations"] = [asdict(v) for v in self.onnxruntime_violations]
        d["quantized_op_total"] = self.quantized_op_total
        return d


def _init_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        return len(t.raw_data)


def _io(values) -> list:
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append({"name": v.name, "dtype": TensorProto.DataType.Name(tt.elem_type), "shape": dims})
    return out


class _Bits:
    """Grid (bit width, or the INT4 / FP8 container) and kind (weight / activation) of a tensor feeding a
    quantized op."""

    def __init__(self, G: GraphView, meta: dict):
        self.G, self.meta = G, meta

    def _container(self, tensor: str) -> int | None:
        G = self.G
        p = G.producer.get(tensor)
        if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
            return G.qdq_dtype(p)
        return G.inits[tensor].data_type if tensor in G.inits else None

    def of(self, tensor: str) -> tuple[str | None, bool]:
        """(grid label or None when float, is_weight)."""
        G = self.G
        container = self._container(tensor)
        p = G.producer.get(tensor)
        if tensor in self.meta:
            bits, is_weight = int(self.meta[tensor]), G.is_constant(tensor)
        elif p is not None and p.op_type == "DequantizeLinear":
            bits, is_weight = _TYPE_BITS.get(container), G.is_constant(p.input[0])
        elif p is not None and p.op_type == "QuantizeLinear":
            bits, is_weight = _TYPE_BITS.get(container), False
        elif container in _QUANT_INIT_TYPES:
            bits, is_weight = _TYPE_BITS[container], True
        else:
            return None, G.is_constant(tensor)
        return _grid_label(bits, container), is_weight


def _grid_label(bits: int | None, container: int | None) -> str | None:
    if bits is None:
        return None
    if container == TensorProto.FLOAT8E4M3FN:
        return "fp8"
    if container in (TensorProto.INT4, TensorProto.UINT4) and bits == 4:
        return "int4"
    return str(bits)


def _label(weight: str | None, acts: list[str]) -> str | None:
    if weight is not None:
        return f"w{weight}a{acts[0]}" if acts else f"w{weight}afp"
    if len(acts) >= 2:
        return f"a{acts[0]}a{acts[1]}"
    if acts:
        return f"a{acts[0]}"
    return None


def quantized_ops(proto: onnx.ModelProto) -> dict:
    """{op type: {label: count}} over the graph's quantized compute ops."""
    G = GraphView(proto)
    meta = {}
    for p in proto.metadata_props:
        if p.key == BITS_METADATA_KEY:
            try:
                meta = json.loads(p.value)
            except ValueError:
                meta = {}
    bits = _Bits(G, meta)
    counts: dict[str, Counter] = {}
    compute = set(quantized_op_types())
    for node in G.nodes:
        weight, acts = None, []
        if node.op_type in compute and node.domain in ("", "ai.onnx"):
            for i in node.input[:2]:
                b, is_w = bits.of(i)
                if b is None:
                    continue
                if is_w:
                    weight = b
                else:
                    acts.append(b)
        elif node.op_type in _FUSED:
            w_idx, a_idx = _FUSED[node.op_type]
            if node.op_type == "MatMulNBits":
                nbits = int(G.attr(node, "bits", 4))
                weight = "int4" if nbits == 4 else str(nbits)
            elif node.op_type == "DynamicQuantizeMatMul":
                weight, acts = "8", ["8"]
            for i in ([w_idx] if w_idx is not None and weight is None else []) + list(a_idx):
                if i >= len(node.input) or not node.input[i]:
                    continue
                b, is_w = bits.of(node.input[i])
                if b is None and node.op_type.startswith("Q"):
                    b = "8"
                if b is None:
                    continue
                if is_w and weight is None:
                    weight = b
                else:
                    acts.append(b)
        else:
            continue
        label = _label(weight, acts)
        if label is not None:
            counts.setdefault(node.op_type, Counter())[label] += 1
    return {op: dict(c) for op, c in sorted(counts.items())}


def _float_dtype(proto: onnx.ModelProto) -> str:
    half = half_dtype(proto, tensor_types(proto))
    return {None: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[half]


def has_qdq(proto: onnx.ModelProto) -> bool:
    """True when the graph holds Q/DQ nodes or onnxruntime's quantized ops."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") or n.op_type in _FUSED
               for n in proto.graph.node)


def inspect_onnx(path, *, check_ort: bool = True, require_qdq: bool = False) -> InspectReport:
    """Summarize the ONNX file at ``path``.

    Raises OnnxFileError when it is not an ONNX model, and NoQDQError when ``require_qdq`` and the graph has
    no Q/DQ (otherwise ``report.has_qdq`` is False). ``check_ort`` also tries to load it in onnxruntime.
    """
    path = Path(path)
    proto = load_model(path)
    qdq = has_qdq(proto)
    if require_qdq and not qdq:
        raise NoQDQError(f"{path.name} has no QuantizeLinear/DequantizeLinear nodes: it is a float model; "
                         "export a quantized one with 'maskaq-deploy export --recipe ...'")
    G = GraphView(proto)
    sizes = [(_init_bytes(t), t) for t in proto.graph.initializer]
    quant_names = {n.input[1] for n in proto.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 1}
    q_bytes = sum(b for b, t in sizes if t.data_type in _QUANT_INIT_TYPES or t.name in quant_names)
    f_bytes = sum(b for b, t in sizes if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                          TensorProto.BFLOAT16, TensorProto.DOUBLE))
    meta = {p.key: p.value for p in proto.metadata_props}
    trt: list[Violation] = check_tensorrt(proto) if qdq else []
    ort_v: list[Violation] = check_onnxruntime(proto) if check_ort else []
    return InspectReport(
        path=str(path),
        file_bytes=path.stat().st_size,
        initializer_bytes=sum(b for b, _ in sizes),
        quantized_initializer_bytes=q_bytes,
        float_initializer_bytes=f_bytes,
        ir_version=int(proto.ir_version),
        opset=G.opset,
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        inputs=_io(proto.graph.input),
        outputs=_io(proto.graph.output),
        num_nodes=len(proto.graph.node),
        op_counts=dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        quantized_ops=quantized_ops(proto),
        has_qdq=qdq,
        flavour=meta.get("maskaq.flavour"),
        float_dtype=_float_dtype(proto),
        tensorrt_violations=trt,
        onnxruntime_violations=ort_v,
    )
