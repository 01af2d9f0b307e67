"""How a quantized weight is written into the graph: the lowerings the registry's entries choose from.

Each lowering is a small object with ``applies(site)`` and ``emit(site)``; an op's registry entry
(export/registry.py) lists, per flavour, the lowerings to try in order, and the first that applies writes the
weight. Adding a kernel form is adding a lowering here and naming it in the op's entry, not an if-chain in the
Q/DQ pass.

    FoldDequantized   weight-only op that should stay float: the fake-quant values as a float initializer
    MatMulNBits       INT4 block weights, float activations -> com.microsoft MatMulNBits (onnxruntime)
    Int4BlockDQ       INT4 block weights -> INT4 initializer + blocked DequantizeLinear (opset 21)
    BlockDQ           other block-wise weights -> int8 initializer + blocked DequantizeLinear (opset 21)
    RefuseBlock       block-wise weights the flavour cannot run -> TargetError
    IntegerMatMul     8-bit weights with a quantized activation -> com.microsoft MatMulIntegerToFloat (int8 or
                      uint8 weights, by the CPU family: export/ortcpu.py)
    ChannelDQ         per-channel int8 or FP8 E4M3 initializer + DequantizeLinear (the general form)

Every lowering writes float32 scales; the half-precision pass (export/precision.py) converts the whole graph's
float tensors, scales included, when the export asks for fp16/bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import NodeProto, TensorProto, helper

from maskaq_deploy.export import int4, ortcpu
from maskaq_deploy.export.errors import ExportError, TargetError
from maskaq_deploy.export.graph import GraphEdit
from maskaq_deploy.export.qparams import WeightParams


@dataclass
class WeightSite:
    """One quantized weight where it meets its op, in the graph's layout (after the exporter's Transposes)."""

    G: GraphEdit
    node: NodeProto  # the op that reads the weight
    index: int  # which input of ``node``
    params: WeightParams
    codes: np.ndarray  # the codes transposed like the graph's weight
    scale: np.ndarray  # channel scales [out], or block scales transposed like ``codes``
    dims: list  # dims[j] = the torch dim now at position j
    consumed: str  # the tensor name ``node`` reads the weight as
    act_inputs: list  # the op's other inputs that carry activation Q/DQ
    flavour: str
    opset: int
    cpu: str | None = None  # the onnxruntime flavour's CPU family (export/ortcpu.py)

    @property
    def weight_only(self) -> bool:
        return not self.act_inputs

    @property
    def int4_block(self) -> bool:
        return self.params.granularity == "block" and self.params.bits <= 4 and not self.params.float8

    @property
    def is_rhs(self) -> bool:
        return _weight_is_rhs(self.node, self.index, self.dims)


class FoldDequantized:
    """Weight-only quantized op that stays float (e.g. a Conv): the exact fake-quant values, no Q/DQ."""

    def applies(self, site: WeightSite) -> bool:
        return site.weight_only

    def emit(self, site: WeightSite) -> None:
        p = site.params
        site.node.input[site.index] = site.G.const(f"{p.name}.dequantized", np.transpose(p.dequantized(), site.dims))


class MatMulNBits:
    """INT4 block weights with float activations -> onnxruntime's MatMulNBits (+ Add for a Gemm bias)."""

    def applies(self, site: WeightSite) -> bool:
        return site.int4_block and site.weight_only and site.is_rhs and site.params.block_size >= 16

    def emit(self, site: WeightSite) -> None:
        _lower_matmulnbits(site.G, site.node, site.params)


@dataclass(frozen=True)
class Int4BlockDQ:
    """INT4 block weights -> INT4 initializer + blocked DequantizeLinear. ``with_act_quant``: the flavour has a
    kernel for INT4 weights next to quantized activations (W4A8); otherwise that is a TargetError."""

    with_act_quant: bool

    def applies(self, site: WeightSite) -> bool:
        return site.int4_block

    def emit(self, site: WeightSite) -> None:
        p, G = site.params, site.G
        if not site.weight_only and not self.with_act_quant:
            raise TargetError(f"weight quantizer {p.name}: INT4 weights with quantized activations (W4A8) have no "
                              f"{site.flavour} kernel; use w4a16 or w8a8, or flavour 'onnxruntime'")
        _check_opset(site.opset, 21, p.name, "INT4 weights")
        init = int4.make_int4_initializer(G.unique(f"{p.name}.int4"), site.codes, signed=True)
        G.new_inits.append(init)
        G.bits[init.name] = p.bits
        _emit_weight_dq(G, site.node, init.name, site.scale, site.consumed, p, block_axis=site.dims.index(1))


class BlockDQ:
    """Block-wise weights wider than 4 bits -> int8 initializer + blocked DequantizeLinear."""

    def applies(self, site: WeightSite) -> bool:
        return site.params.granularity == "block"

    def emit(self, site: WeightSite) -> None:
        p, G = site.params, site.G
        _check_opset(site.opset, 21, p.name, "block-wise weights")
        q_init = G.const(f"{p.name}.int8", site.codes.astype(np.int8))
        G.bits[q_init] = p.bits
        _emit_weight_dq(G, site.node, q_init, site.scale, site.consumed, p, block_axis=site.dims.index(1))


class RefuseBlock:
    """Block-wise weights this op cannot take in this flavour."""

    def applies(self, site: WeightSite) -> bool:
        return site.params.granularity == "block"

    def emit(self, site: WeightSite) -> None:
        raise TargetError(f"weight quantizer {site.params.name}: {site.flavour} takes block-wise weights only as "
                          "INT4 feeding MatMul/Gemm; use per-channel weights or 4-bit blocks")


class IntegerMatMul:
    """A @ W^T with int8 W and a quantized activation A -> onnxruntime's MatMulIntegerToFloat (bias fused)."""

    def applies(self, site: WeightSite) -> bool:
        return not site.params.float8 and site.act_inputs == [0] and site.is_rhs

    def emit(self, site: WeightSite) -> None:
        _lower_integer_matmul(site.G, site.node, site.params, signed=ortcpu.resolve(site.cpu) != ortcpu.X86_AVX2)


class ChannelDQ:
    """Per-channel codes in their container (int8, or float8e4m3fn for FP8) + DequantizeLinear."""

    def applies(self, site: WeightSite) -> bool:
        return site.params.granularity == "channel"

    def emit(self, site: WeightSite) -> None:
        p, G = site.params, site.G
        if p.float8:
            q_init = G.unique(f"{p.name}.fp8")
            G.new_inits.append(float8_initializer(q_init, site.codes))
        else:
            q_init = G.const(f"{p.name}.int8", site.codes.astype(np.int8))
        G.bits[q_init] = p.bits
        _emit_weight_dq(G, site.node, q_init, site.scale, site.consumed, p, channel_axis=site.dims.index(0))


def float8_initializer(name: str, values: np.ndarray) -> TensorProto:
    """A FLOAT8E4M3FN initializer holding ``values`` (already on the E4M3 grid, so the cast is exact)."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn))
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(arr.shape), arr.tobytes(), raw=True)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_is_rhs(node, idx: int, dims: list[int]) -> bool:
    """True when ``node`` computes A @ W^T with W the torch [out, in] weight (a Linear layer)."""
    if idx != 1 or dims not in ([1, 0], [0, 1]):
        return False
    if node.op_type == "MatMul":
        return dims == [1, 0]
    if node.op_type == "Gemm":
        return (not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0
                and _attr(node, "beta", 1.0) == 1.0 and dims == ([0, 1] if _attr(node, "transB", 0) else [1, 0]))
    return False


def _check_opset(opset: int, need: int, qname: str, what: str) -> None:
    if opset < need:
        raise ExportError(f"weight quantizer {qname}: {what} need opset {need} or later, export uses {opset}")


def _emit_weight_dq(G: GraphEdit, node, q_init: str, scale: np.ndarray, out: str, p: WeightParams, *,
                    channel_axis: int | None = None, block_axis: int | None = None) -> None:
    s = G.const(f"{p.name}.scale", scale.astype(np.float32))
    inputs = [q_init, s]
    if block_axis is not None:
        attrs = {"axis": block_axis, "block_size": p.block_size}
    elif p.float8:
        attrs = {"axis": channel_axis}
        zp = G.unique(f"{p.name}.zero_point")
        G.new_inits.append(float8_initializer(zp, np.zeros(scale.shape, np.float32)))
        inputs.append(zp)
    else:
        attrs = {"axis": channel_axis}
        inputs.append(G.const(f"{p.name}.zero_point", np.zeros(scale.shape, dtype=np.int8)))
    dq = helper.make_node("DequantizeLinear", inputs, [out], name=G.unique(f"{p.name}/DequantizeLinear"), **attrs)
    G.emit_before(node, [dq])


def _bias_add(G: GraphEdit, node, n_out: int):
    """The Add of a constant [N] bias right after ``node`` (fused into the integer kernel), or None."""
    out = node.output[0]
    cons = G.consumers.get(out, [])
    if node.op_type == "Gemm":
        return None
    if len(cons) != 1 or out in G.outputs or cons[0][0].op_type != "Add":
        return None
    add, i = cons[0]
    other = add.input[1 - i]
    t = G.inits.get(other)
    if t is None or t.data_type != TensorProto.FLOAT or list(t.dims) != [n_out]:
        return None
    return add, other


def _lower_integer_matmul(G: GraphEdit, node, p: WeightParams, *, signed: bool) -> None:
    """A @ W^T (+ bias) with a quantized activation A -> com.microsoft MatMulIntegerToFloat.

    onnxruntime's own QDQ fusion would not get here: its MatMulAddFusion first turns MatMul + Add on 3-D
    inputs into Reshape + float Gemm, which then stays float (measured 4-5x slower on a DeiT-S-sized layer).

    ``signed``: the weights stay int8 with no zero point (x86 with VNNI, ARM): onnxruntime's VNNI kernel adds
    uint8 x int8 products in 32 bits, exact, about twice as fast as uint8 weights, which onnxruntime 1.32 runs
    on a u8 x u8 kernel that widens to 16 bits first. Otherwise (x86 without VNNI: AVX2, plain AVX-512) the
    weights go in a uint8 container (codes + 128, zero point 128: the same values): the u8 x s8 kernel there
    sums pairs of products in 16 bits and saturates (255 * 127 * 2 > 32767; a linear layer came out at 21 dB
    SQNR), while u8 x u8 widens first and is exact.
    """
    a = node.input[0]
    q, a_scale, a_zp, _ = G.act_q[a]
    n, k = p.codes.shape
    w_scale = G.const(f"{p.name}.scale", p.scale.astype(np.float32))
    if signed:
        w = G.const(f"{p.name}.int8", np.ascontiguousarray(p.codes.T).astype(np.int8))  # [K, N]
        w_zp = ""  # symmetric: zero point 0, and the kernel skips the column-offset correction
    else:
        codes = np.ascontiguousarray(p.codes.T).astype(np.int16) + 128  # [K, N], signed grid moved up by 128
        w = G.const(f"{p.name}.uint8", codes.astype(np.uint8))
        w_zp = G.const(f"{p.name}.zero_point", np.full(n, 128, dtype=np.uint8))
    G.bits[w] = p.bits
    inputs = [q, w, a_scale, w_scale, a_zp, w_zp]
    out = node.output[0]
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            inputs.append(node.input[2])
    else:
        fused = _bias_add(G, node, n)
        if fused is not None:
            add, bias = fused
            inputs.append(bias)
            out = add.output[0]
            G.drop(add)
    while not inputs[-1]:  # no trailing empty optional inputs
        inputs.pop()
    new = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=G.unique(f"{p.name}/MatMulIntegerToFloat"),
                           domain=int4.MS_DOMAIN)
    G.substitute(node, [new])


def _lower_matmulnbits(G: GraphEdit, node, p: WeightParams) -> None:
    """MatMul(A, W^T) / Gemm(A, W, C) with INT4 block weights and float A -> MatMulNBits (+ Add)."""
    a = node.input[0]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    n, k = p.codes.shape
    blob, scales = int4.pack_matmulnbits(p.codes, p.scale, p.block_size)
    b = G.const(f"{p.name}.nbits", blob)
    G.bits[b] = p.bits
    s = G.const(f"{p.name}.scale", scales)
    out = node.output[0] if bias is None else G.unique(f"{p.name}.matmul")
    new = [int4.make_matmulnbits(G.unique(f"{p.name}/MatMulNBits"), a, b, s, out, k=k, n=n,
                                 block_size=p.block_size, accuracy_level=0)]
    if bias is not None:
        new.append(helper.make_node("Add", [out, bias], [node.output[0]], name=G.unique(f"{node.name}/bias")))
    G.substitute(node, new)
