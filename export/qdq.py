"""QDQ ONNX export: the float graph with each quantizer marker replaced by what its quantizer calls for.

No re-calibration happens here: every scale, zero point and integer code comes from the torch quantizers, with
the *same float32 scale values* torch's fake-quant uses (LSQ's gradient-scaling trick perturbs the scale by
up to an ulp in the forward pass; ``act_params`` / ``weight_params`` reproduce that, and check it against the
quantizer's own output). So the ONNX graph and the torch model compute the same grid.

Two flavours from one code path (``FLAVOURS``):

* ``tensorrt``: symmetric int8 per-tensor activations (zero point 0), per-channel int8 weights (a < 8-bit
  per-channel weight is stored in an int8 initializer: same values, TensorRT runs it as INT8), INT4 only as
  block-wise weight DequantizeLinear feeding MatMul/Gemm with float activations. Anything else is a TargetError.
* ``onnxruntime``: what onnxruntime's CPU kernels run fastest with the same numerics. Activations are uint8:
  a symmetric signed grid [-128, 127] becomes [0, 255] with zero point 128 (identical values); onnxruntime
  only runs QDQ MatMuls on its integer kernels for uint8 activations. Linear layers with quantized inputs are
  written as QuantizeLinear -> com.microsoft MatMulIntegerToFloat (bias fused): the form onnxruntime's own
  QDQ fusion aims for, but which its MatMulAddFusion pre-empts on 3-D inputs (the layer then runs in float).
  Sub-8-bit or asymmetric grids are simulated: a Clip to the n-bit range, then the 8-bit Q/DQ. INT4
  block-wise weights with float activations become com.microsoft MatMulNBits (accuracy_level 0: float
  activations, so the numerics stay those of the torch model).

Opset: 20 by default, 21 when the model has block-wise (INT4) weights, which need opset 21's INT4 type and
blocked DequantizeLinear. Not 21 everywhere: onnxruntime (1.32) fails to load int8-activation QDQ MatMul
graphs at opset 21 (its MatMulAddFusion builds a QuantizeLinear-21 whose output_dtype contradicts the zero
point once QDQS8ToU8 has run), at the default optimization level.

Per-op decisions (which input of which op takes which kind of Q/DQ) come from export/registry.py only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from maskaq_deploy.export import int4
from maskaq_deploy.export.errors import ExportError, TargetError, UnsupportedModelError, UnsupportedOpError
# BITS_METADATA_KEY: JSON {tensor: bit width} of Q/DQ outputs and quantized weights
from maskaq_deploy.export.inspect import BITS_METADATA_KEY
from maskaq_deploy.export.onnx_export import (
    DEFAULT_OPSET,
    INT4_OPSET,
    MARKER_DOMAIN,
    MARKER_OP,
    ExportOptions,
    input_shape_of,
    ir_version_for,
    markers_in_place_of_quantizers,
    save_onnx,
    set_metadata,
    trace_to_onnx,
)
from maskaq_deploy.export.registry import REGISTRY, InputKind, OpRule
from maskaq_deploy.export.rules import GraphView

log = logging.getLogger(__name__)

LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


@dataclass(frozen=True)
class Flavour:
    name: str
    act_dtype: int  # TensorProto element type of activation Q/DQ
    simulate_subbyte_acts: bool  # Clip + 8-bit Q/DQ for < 8-bit or asymmetric activation grids
    int4_lowering: str  # "dq": INT4 block DequantizeLinear; "matmulnbits": com.microsoft MatMulNBits
    int4_with_act_quant: bool  # INT4 block weights next to quantized activations
    block_int8: bool  # block-wise DQ of > 4-bit weights
    int8_lowering: str  # "dq": weight DQ -> MatMul; "matmulintegertofloat": com.microsoft integer kernel


FLAVOURS: dict[str, Flavour] = {
    "tensorrt": Flavour("tensorrt", TensorProto.INT8, False, "dq", False, False, "dq"),
    "onnxruntime": Flavour("onnxruntime", TensorProto.UINT8, True, "matmulnbits", True, True,
                           "matmulintegertofloat"),
}


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ExportError(f"unknown export flavour {name!r}; choose one of {', '.join(FLAVOURS)}") from None


# ---- quantizer parameters, as torch computes them ------------------------------------------------------------

@dataclass(frozen=True)
class ActParams:
    name: str
    bits: int
    symmetric: bool
    scale: np.float32
    zero_point: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class WeightParams:
    name: str
    bits: int
    granularity: str  # "channel" | "block"
    block_size: int
    codes: np.ndarray = field(repr=False)  # int8, the torch weight's layout
    scale: np.ndarray = field(repr=False)  # float32, [out] or [out, ceil(in / block_size)]

    def dequantized(self) -> np.ndarray:
        """codes * scale in float32, the torch layout (bit-identical to the quantizer's output)."""
        out = self.codes.shape[0]
        c = self.codes.reshape(out, -1).astype(np.float32)
        if self.granularity == "channel":
            return (c * self.scale[:, None]).reshape(self.codes.shape)
        k = c.shape[1]
        s = np.repeat(self.scale, self.block_size, axis=1)[:, :k]
        return (c * s).reshape(self.codes.shape)


@torch.no_grad()
def act_params(name: str, q, sample_numel: int) -> ActParams:
    """The activation grid torch applies to a tensor of ``sample_numel`` elements per sample."""
    if not bool(q.initialized) or q.calibrating:
        raise ExportError(f"activation quantizer {name} is not calibrated; run calibrate_observers first")
    # ActQuantizer.forward uses scale.clamp_min(1e-8) as the step
    s = q.scale.detach().float().cpu().clamp_min(1e-8)
    zp = float(q.zero_point)
    if zp != round(zp):
        raise ExportError(f"activation quantizer {name} has a non-integer zero point {zp}")
    p = ActParams(name, q.bits, bool(q.symmetric), np.float32(s.item()), int(round(zp)), q.qmin, q.qmax)
    _check_act(q, p, sample_numel)
    return p


def _check_act(q, p: ActParams, sample_numel: int) -> None:
    """Guard against calib's formula drifting from the one mirrored above: compare on a probe tensor."""
    gen = torch.Generator().manual_seed(0)
    span = float(p.scale) * (p.qmax - p.qmin)
    probe = (torch.rand((1, sample_numel), generator=gen) * 1.4 - 0.7) * span
    ref = q(probe.to(q.scale.device)).cpu()
    s = torch.tensor(p.scale)
    ours = (torch.clamp(torch.round(probe / s) + p.zero_point, p.qmin, p.qmax) - p.zero_point) * s
    bad = int((ref != ours).sum())
    if bad:
        log.warning("activation quantizer %s: %d of %d probe values differ from torch fake-quant", p.name, bad,
                    sample_numel)


@torch.no_grad()
def weight_params(name: str, q, weight: torch.Tensor) -> WeightParams:
    """Integer codes and the scale torch's forward pass uses for ``weight``."""
    if not bool(q.initialized):
        q.init_from(weight)
    w = weight.detach().float().cpu()
    out = w.shape[0]
    w2 = w.reshape(out, -1)
    k = w2.shape[1]
    if q.granularity == "channel":
        wb, pad = w2.unsqueeze(1), 0
    else:
        pad = (-k) % q.block_size
        wb = torch.nn.functional.pad(w2, (0, pad)).reshape(out, -1, q.block_size)
    # WeightQuantizer.forward uses the scale viewed [out, groups, 1] as the step
    s = q.scale.detach().float().cpu().reshape(out, -1, 1)
    codes = torch.clamp(torch.round(wb / s), q.qmin, q.qmax).reshape(out, -1)
    if pad:
        codes = codes[:, :-pad]
    p = WeightParams(name, q.bits, q.granularity, q.block_size, codes.reshape(w.shape).to(torch.int8).numpy(),
                     s.reshape(out, -1).squeeze(1).numpy().astype(np.float32)
                     if q.granularity == "channel" else s.reshape(out, -1).numpy().astype(np.float32))
    ref = q(weight.detach()).float().cpu().numpy()
    bad = int((ref != p.dequantized()).sum())
    if bad:
        log.warning("weight quantizer %s: %d of %d dequantized values differ from torch fake-quant", name, bad,
                    ref.size)
    return p


def collect_quantizers(model: nn.Module) -> dict:
    """{name: quantizer} of every enabled quantizer; raises if the model has none."""
    from maskaq_deploy.calib.quantize import iter_quantizers

    found = {n: q for n, q in iter_quantizers(model) if q.enabled}
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no enabled quantizers: attach_quantizers and "
                                    "calibrate_observers first, or export the float model with export_fp_onnx")
    return found


# ---- the graph pass ------------------------------------------------------------------------------------------

class _Graph(GraphView):
    """The rules' indexes of one graph (initializers, producer, consumers), and the edits the pass
    accumulates."""

    def __init__(self, proto: onnx.ModelProto):
        super().__init__(proto)
        self.model = proto
        self.g = proto.graph
        self.outputs = {o.name for o in self.g.output}
        self.replace: dict[int, list] = {}  # id(node) -> nodes emitted in its place
        self.new_inits: list = []
        self.bits: dict[str, int] = {}  # tensor name -> bit width (Q/DQ outputs, quantized initializers)
        self.act_q: dict[str, tuple] = {}  # activation DQ output -> (Q output, scale, zero point, ActParams)
        self._names = {n.name for n in self.g.node} | set(self.inits) | set(self.producer)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def drop(self, node) -> None:
        self.replace[id(node)] = []

    def emit_before(self, node, nodes) -> None:
        """Put ``nodes`` before ``node`` (keeping whatever already replaces it)."""
        current = self.replace.get(id(node))
        self.replace[id(node)] = list(nodes) + (current if current is not None else [node])

    def substitute(self, node, nodes) -> None:
        """Replace ``node`` by ``nodes``, keeping anything already emitted before it."""
        current = [n for n in self.replace.get(id(node), []) if n is not node]
        self.replace[id(node)] = current + list(nodes)

    def finish(self) -> None:
        nodes = []
        for n in self.g.node:
            nodes.extend(self.replace.get(id(n), [n]))
        # a fused integer MatMul reads the Q output directly: its activation DQ may now be dead
        while True:
            used = {i for n in nodes for i in n.input} | self.outputs
            live = [n for n in nodes if n.op_type not in ("DequantizeLinear", "QuantizeLinear", "Clip")
                    or any(o in used for o in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.g.initializer.extend(self.new_inits)
        used = {i for n in self.g.node for i in n.input} | self.outputs
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        produced = {o for n in self.g.node for o in n.output} | {i.name for i in self.g.input}
        vi = [v for v in self.g.value_info if v.name in produced]
        del self.g.value_info[:]
        self.g.value_info.extend(vi)
        self.bits = {t: b for t, b in self.bits.items() if t in used or t in produced}


def _marker_name(node) -> str:
    for a in node.attribute:
        if a.name == "name":
            return a.s.decode()
    raise ExportError(f"marker node {node.name} has no quantizer name")


def _final_consumers(G: _Graph, tensor: str):
    """Consumers of ``tensor``, looking through pure layout ops (per-tensor Q/DQ commutes with them)."""
    out = []
    for node, idx in G.consumers.get(tensor, []):
        if node.op_type in LAYOUT_OPS and idx == 0:
            out.extend(_final_consumers(G, node.output[0]))
        else:
            out.append((node, idx))
    return out


def _rule_check(registry, node, idx: int, kind: InputKind, qname: str) -> OpRule:
    rule = registry.get(node.op_type)
    allowed = rule.kind_of(idx) if rule is not None else None
    if allowed is None or not allowed.accepts(kind):
        what = "has no Q/DQ rule" if rule is None else f"takes no {kind.value} Q/DQ on input {idx}"
        raise UnsupportedOpError(f"quantizer {qname} feeds {node.op_type} node {node.name!r}, which {what}; keep "
                                 "that module float (keep_fp) or add a rule in export/registry.py")
    return rule


def _insert_act(G: _Graph, marker, p: ActParams, flavour: Flavour, registry) -> None:
    for node, idx in _final_consumers(G, marker.output[0]):
        _rule_check(registry, node, idx, InputKind.ACTIVATION, p.name)
    if flavour.act_dtype == TensorProto.INT8:
        if not p.symmetric or p.bits != 8:
            grid = f"{p.bits}-bit {'symmetric' if p.symmetric else 'asymmetric'}"
            raise TargetError(f"activation quantizer {p.name} is {grid}; flavour {flavour.name} takes only "
                              "symmetric 8-bit activations: use an int8 recipe, or flavour 'onnxruntime'")
        zp_dtype, offset, lo_c, hi_c = np.int8, 0, -128, 127
    else:
        # uint8 container: a signed grid moves up by 128 (same values, zero point 128)
        zp_dtype, lo_c, hi_c = np.uint8, 0, 255
        offset = 128 if p.qmin < 0 else 0
        if not flavour.simulate_subbyte_acts and (p.bits != 8 or not p.symmetric):
            raise TargetError(f"activation quantizer {p.name}: flavour {flavour.name} cannot hold a "
                              f"{p.bits}-bit grid")
    zp_c = p.zero_point + offset
    if not lo_c <= zp_c <= hi_c or p.qmin + offset < lo_c or p.qmax + offset > hi_c:
        raise ExportError(f"activation quantizer {p.name}: grid [{p.qmin}, {p.qmax}] with zero point "
                          f"{p.zero_point} does not fit an 8-bit container")
    x = marker.input[0]
    nodes = []
    if (p.qmin + offset, p.qmax + offset) != (lo_c, hi_c):
        # the n-bit grid is narrower than the 8-bit container: clip to its float range first, so Q lands on
        # exactly the codes torch's clamp gives
        lo = np.float32(np.float32(p.qmin - p.zero_point) * p.scale)
        hi = np.float32(np.float32(p.qmax - p.zero_point) * p.scale)
        clipped = G.unique(f"{p.name}.clipped")
        nodes.append(helper.make_node("Clip", [x, G.const(f"{p.name}.clip_min", lo),
                                               G.const(f"{p.name}.clip_max", hi)],
                                      [clipped], name=G.unique(f"{p.name}/Clip")))
        x = clipped
    s = G.const(f"{p.name}.scale", np.float32(p.scale))
    zp = G.const(f"{p.name}.zero_point", np.array(zp_c, dtype=zp_dtype))
    q = G.unique(f"{p.name}.q")
    nodes += [helper.make_node("QuantizeLinear", [x, s, zp], [q], name=G.unique(f"{p.name}/QuantizeLinear")),
              helper.make_node("DequantizeLinear", [q, s, zp], [marker.output[0]],
                               name=G.unique(f"{p.name}/DequantizeLinear"))]
    G.bits[q] = G.bits[marker.output[0]] = p.bits
    G.act_q[marker.output[0]] = (q, s, zp, p)
    G.replace[id(marker)] = nodes


def _weight_chain(G: _Graph, marker, qname: str):
    """Follow the marker's output through Transposes to the op that uses the weight."""
    chain, cur = [], marker.output[0]
    while True:
        cons = G.consumers.get(cur, [])
        if len(cons) != 1 or cur in G.outputs:
            raise ExportError(f"weight quantizer {qname}: its weight feeds {len(cons)} ops; expected exactly one")
        node, idx = cons[0]
        if node.op_type != "Transpose":
            return chain, node, idx
        chain.append(node)
        cur = node.output[0]


def _perm_of(node) -> list[int]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return []


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


def _insert_weight(G: _Graph, marker, p: WeightParams, flavour: Flavour, registry, opset: int) -> None:
    if marker.input[0] not in G.inits:
        raise ExportError(f"weight quantizer {p.name} does not act on a constant weight; cannot store it quantized")
    if p.granularity == "block" and p.codes.ndim != 2:
        raise ExportError(f"weight quantizer {p.name}: block-wise weights must be 2-D, got {p.codes.shape}")
    chain, node, idx = _weight_chain(G, marker, p.name)
    rule = _rule_check(registry, node, idx, InputKind.WEIGHT, p.name)
    codes, rank, scale = p.codes, p.codes.ndim, p.scale
    dims = list(range(rank))  # dims[j] = the torch dim now at position j
    for t in chain:
        perm = _perm_of(t) or list(reversed(range(rank)))
        codes = codes.transpose(perm)
        if p.granularity == "block":
            scale = scale.transpose(perm)
        dims = [dims[i] for i in perm]
    act_inputs = [i for i in range(len(node.input)) if i != idx and node.input[i] in G.act_q]
    weight_only = not act_inputs
    consumed = chain[-1].output[0] if chain else marker.output[0]
    for n in [marker, *chain]:
        G.drop(n)
    G.bits[consumed] = p.bits

    if weight_only and not rule.weight_only_dq:
        # e.g. a weight-only quantized Conv: keep the op float with the exact fake-quant values
        node.input[idx] = G.const(f"{p.name}.dequantized", np.transpose(p.dequantized(), dims))
        return

    if p.granularity == "block" and p.bits <= 4 and rule.int4_weights:
        if not weight_only and not flavour.int4_with_act_quant:
            raise TargetError(f"weight quantizer {p.name}: INT4 weights with quantized activations (W4A8) have no "
                              f"{flavour.name} kernel; use w4a16 or w8a8, or flavour 'onnxruntime'")
        if flavour.int4_lowering == "matmulnbits" and rule.matmulnbits and weight_only \
                and _weight_is_rhs(node, idx, dims) and p.block_size >= 16:
            _lower_matmulnbits(G, node, p)
            return
        _check_opset(opset, 21, p.name, "INT4 weights")
        init = int4.make_int4_initializer(G.unique(f"{p.name}.int4"), codes, signed=True)
        G.new_inits.append(init)
        G.bits[init.name] = p.bits
        _emit_weight_dq(G, node, init.name, scale, consumed, p, block_axis=dims.index(1))
        return
    if p.granularity == "block":
        if not flavour.block_int8:
            raise TargetError(f"weight quantizer {p.name}: {flavour.name} takes block-wise weights only as INT4 "
                              f"feeding MatMul/Gemm; use per-channel weights or 4-bit blocks")
        _check_opset(opset, 21, p.name, "block-wise weights")
        q_init = G.const(f"{p.name}.int8", codes.astype(np.int8))
        G.bits[q_init] = p.bits
        _emit_weight_dq(G, node, q_init, scale, consumed, p, block_axis=dims.index(1))
        return
    if flavour.int8_lowering == "matmulintegertofloat" and act_inputs == [0] and _weight_is_rhs(node, idx, dims):
        _lower_integer_matmul(G, node, p)
        return
    q_init = G.const(f"{p.name}.int8", codes.astype(np.int8))
    G.bits[q_init] = p.bits
    _emit_weight_dq(G, node, q_init, scale, consumed, p, channel_axis=dims.index(0))


def _check_opset(opset: int, need: int, qname: str, what: str) -> None:
    if opset < need:
        raise ExportError(f"weight quantizer {qname}: {what} need opset {need} or later, export uses {opset}")


def _emit_weight_dq(G: _Graph, node, q_init: str, scale: np.ndarray, out: str, p: WeightParams, *,
                    channel_axis: int | None = None, block_axis: int | None = None) -> None:
    s = G.const(f"{p.name}.scale", scale.astype(np.float32))
    inputs = [q_init, s]
    if block_axis is not None:
        attrs = {"axis": block_axis, "block_size": p.block_size}
    else:
        attrs = {"axis": channel_axis}
        inputs.append(G.const(f"{p.name}.zero_point", np.zeros(scale.shape, dtype=np.int8)))
    dq = helper.make_node("DequantizeLinear", inputs, [out], name=G.unique(f"{p.name}/DequantizeLinear"), **attrs)
    G.emit_before(node, [dq])


def _bias_add(G: _Graph, node, n_out: int):
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


def _lower_integer_matmul(G: _Graph, node, p: WeightParams) -> None:
    """A @ W^T (+ bias) with a quantized activation A -> com.microsoft MatMulIntegerToFloat.

    onnxruntime's own QDQ fusion would not get here: its MatMulAddFusion first turns MatMul + Add on 3-D
    inputs into Reshape + float Gemm, which then stays float (measured 4-5x slower on a DeiT-S-sized layer).
    """
    a = node.input[0]
    q, a_scale, a_zp, _ = G.act_q[a]
    n, k = p.codes.shape
    w = G.const(f"{p.name}.int8", np.ascontiguousarray(p.codes.T).astype(np.int8))  # [K, N]
    G.bits[w] = p.bits
    w_scale = G.const(f"{p.name}.scale", p.scale.astype(np.float32))
    w_zp = G.const(f"{p.name}.zero_point", np.zeros(n, dtype=np.int8))
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
    new = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=G.unique(f"{p.name}/MatMulIntegerToFloat"),
                           domain=int4.MS_DOMAIN)
    G.substitute(node, [new])


def _lower_matmulnbits(G: _Graph, node, p: WeightParams) -> None:
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


def insert_qdq(proto: onnx.ModelProto, params: dict, flavour: str | Flavour = "onnxruntime", *,
               registry: dict[str, OpRule] | None = None) -> onnx.ModelProto:
    """Replace every marker in ``proto`` (in place) by Q/DQ / quantized weights from ``params``; returns it.

    ``params``: {quantizer name: ActParams | WeightParams}. Raises UnsupportedOpError when a quantizer feeds an
    op input the registry does not allow, TargetError when the flavour cannot express a quantizer.
    """
    fl = get_flavour(flavour) if isinstance(flavour, str) else flavour
    registry = REGISTRY if registry is None else registry
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), INT4_OPSET)
    G = _Graph(proto)
    markers = [n for n in proto.graph.node if n.op_type == MARKER_OP and n.domain == MARKER_DOMAIN]
    names = [_marker_name(m) for m in markers]
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ExportError(f"the graph has markers for quantizer(s) {unknown[:3]}, which have no parameters")
    missing = sorted(set(params) - set(names))
    if missing:
        raise ExportError(f"quantizer(s) {missing[:3]} never reached the exported graph")
    # activations first: a weight's lowering depends on whether its op's other input is quantized
    for m, name in zip(markers, names):
        if isinstance(params[name], ActParams):
            _insert_act(G, m, params[name], fl, registry)
    for m, name in zip(markers, names):
        if isinstance(params[name], WeightParams):
            _insert_weight(G, m, params[name], fl, registry, opset)
    G.finish()
    domains = [o for o in proto.opset_import if o.domain != MARKER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(domains)
    if any(n.domain == int4.MS_DOMAIN for n in proto.graph.node) and \
            not any(o.domain == int4.MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(int4.MS_DOMAIN, 1))
    proto.ir_version = ir_version_for(opset)
    set_metadata(proto, {BITS_METADATA_KEY: json.dumps(G.bits, sort_keys=True), "maskaq.flavour": fl.name})
    return proto


# ---- entry points --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QDQExport:
    """What ``export_qdq_onnx`` wrote."""

    path: Path
    flavour: str
    opset: int
    dynamic_batch: bool
    batch_size: int
    input_shape: tuple[int, int, int]
    num_quantizers: int
    op_counts: dict = field(default_factory=dict)


def needs_int4_opset(model: nn.Module) -> bool:
    """True when some enabled weight quantizer is block-wise (INT4 / blocked DQ need opset 21)."""
    return any(getattr(q, "granularity", None) == "block" for q in collect_quantizers(model).values())


@dataclass
class MarkedGraph:
    """The traced float graph with quantizer markers, and every quantizer's parameters: the input of
    ``insert_qdq``. One trace serves both flavours (``insert_qdq`` works on a copy)."""

    proto: onnx.ModelProto
    params: dict  # quantizer name -> ActParams | WeightParams
    options: ExportOptions

    def to_qdq(self, flavour: str = "onnxruntime", *, registry: dict[str, OpRule] | None = None) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        insert_qdq(proto, self.params, flavour, registry=registry)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the QDQ graph fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
        return proto


def trace_quantized(model: nn.Module, options: ExportOptions) -> MarkedGraph:
    """Trace a calibrated quantized model with markers and read its quantizers' parameters."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    from maskaq_deploy.calib.quantizers import WeightQuantizer

    quantizers = collect_quantizers(model)
    params = {}
    for name, q in quantizers.items():
        if isinstance(q, WeightQuantizer):
            owner = model.get_submodule(name.rpartition(".")[0])
            params[name] = weight_params(name, q, owner.weight)
    with markers_in_place_of_quantizers(model, list(quantizers)) as markers:
        proto = trace_to_onnx(model, options, with_markers=True)
        numels = {n: m.sample_numel for n, m in markers.items()}
    for name, q in quantizers.items():
        if name in params:
            continue
        if numels[name] is None:
            raise ExportError(f"activation quantizer {name} never ran in the forward pass; disable it or keep "
                              "its module float")
        params[name] = act_params(name, q, numels[name])
    return MarkedGraph(proto, params, options)


def build_qdq_model(model: nn.Module, options: ExportOptions, flavour: str = "onnxruntime", *,
                    registry: dict[str, OpRule] | None = None) -> onnx.ModelProto:
    """The QDQ ModelProto of a calibrated quantized model (nothing written). ``options.opset`` must be set."""
    get_flavour(flavour)  # fail before the (slow) trace
    return trace_quantized(model, options).to_qdq(flavour, registry=registry)


def default_options(model: nn.Module, *, input_shape=None, batch_size: int = 1, dynamic_batch: bool = False,
                    opset: int | None = None) -> ExportOptions:
    """ExportOptions with the model's input shape and the opset its weights need (20, or 21 for INT4)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    if opset is None:
        opset = INT4_OPSET if needs_int4_opset(model) else DEFAULT_OPSET
    return ExportOptions(input_shape or input_shape_of(model), batch_size, dynamic_batch, opset)


def write_qdq(marked: MarkedGraph, path, flavour: str = "onnxruntime", *, registry: dict[str, OpRule] | None = None,
              metadata: dict | None = None) -> QDQExport:
    """Write the ``flavour`` QDQ graph of an already traced model (trace once, write both flavours)."""
    proto = marked.to_qdq(flavour, registry=registry)
    o = marked.options
    meta = {"maskaq.kind": "qdq", "maskaq.input_size": ",".join(map(str, o.input_shape))}
    meta.update({k if str(k).startswith("maskaq.") else f"maskaq.{k}": v for k, v in (metadata or {}).items()})
    set_metadata(proto, meta)
    out = save_onnx(proto, path)
    counts = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
    log.info("wrote %s (%s flavour, %d quantizers)", out, flavour, len(marked.params))
    return QDQExport(out, flavour, o.opset, o.dynamic_batch, o.batch_size, o.input_shape, len(marked.params), counts)


def export_qdq_onnx(model: nn.Module, path, *, flavour: str = "onnxruntime", input_shape=None,
                    batch_size: int = 1, dynamic_batch: bool = False, opset: int | None = None,
                    registry: dict[str, OpRule] | None = None, metadata: dict | None = None) -> QDQExport:
    """Export a calibrated quantized model as a QDQ ONNX file for ``flavour`` ("tensorrt" | "onnxruntime").

    ``input_shape`` (C, H, W) defaults to the model's; the batch is fixed to ``batch_size`` unless
    ``dynamic_batch``. ``metadata`` goes into the model's metadata_props (e.g. the recipe name). ``opset``
    None: 20, or 21 when the model has block-wise (INT4) weights.
    """
    get_flavour(flavour)  # fail before the (slow) trace
    options = default_options(model, input_shape=input_shape, batch_size=batch_size, dynamic_batch=dynamic_batch,
                              opset=opset)
    return write_qdq(trace_quantized(model, options), path, flavour, registry=registry, metadata=metadata)
