"""QDQ ONNX export: the float graph with each quantizer marker replaced by what its quantizer calls for.

No re-calibration happens here: every scale, zero point and integer code comes from the torch quantizers, with
the *same float32 scale values* torch's fake-quant uses (LSQ's gradient-scaling trick perturbs the scale by
up to an ulp in the forward pass; ``act_params`` / ``weight_params`` reproduce that, and check it against the
quantizer's own output). So the ONNX graph and the torch model compute the same grid.

Two flavours from one code path (``registry.FLAVOURS``):

* ``tensorrt``: symmetric int8 per-tensor activations (zero point 0), per-channel int8 weights (a < 8-bit
  per-channel weight is stored in an int8 initializer: same values, TensorRT runs it as INT8), INT4 only as
  block-wise weight DequantizeLinear feeding MatMul/Gemm with float activations. Anything else is a TargetError.
  Everything unquantized computes in fp16 by default (``float_dtype``; export/precision.py says why).
* ``onnxruntime``: what onnxruntime's CPU kernels run fastest with the same numerics. Activations are uint8:
  a symmetric signed grid [-128, 127] becomes [0, 255] with zero point 128 (identical values); onnxruntime
  only runs QDQ MatMuls on its integer kernels for uint8 activations. Linear layers with quantized inputs are
  written as QuantizeLinear -> com.microsoft MatMulIntegerToFloat (bias fused): the form onnxruntime's own
  QDQ fusion aims for, but which its MatMulAddFusion pre-empts on 3-D inputs (the layer then runs in float).
  Sub-8-bit or asymmetric grids are simulated: a Clip to the n-bit range, then the 8-bit Q/DQ. INT4
  block-wise weights with float activations become com.microsoft MatMulNBits (accuracy_level 0: float
  activations, so the numerics stay those of the torch model).

FP8 (the ``fp8`` recipe) is the same in both flavours: float8e4m3fn Q/DQ with a float8 zero point 0 for
activations, float8e4m3fn per-channel weight initializers + DequantizeLinear.

Opset: 20 by default, 21 when the model has block-wise (INT4) weights, which need opset 21's INT4 type and
blocked DequantizeLinear. Not 21 everywhere: onnxruntime (1.32) fails to load int8-activation QDQ MatMul
graphs at opset 21 (its MatMulAddFusion builds a QuantizeLinear-21 whose output_dtype contradicts the zero
point once QDQS8ToU8 has run), at the default optimization level.

Per-op decisions (which input of which op takes which kind of Q/DQ, and how a quantized weight is written in
each flavour) come from export/registry.py only: the pass asks the op's entry to lower each weight.
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
from onnx import helper
from torch import nn

from maskaq_deploy.export import int4
from maskaq_deploy.export.errors import ExportError, TargetError, UnsupportedModelError, UnsupportedOpError
from maskaq_deploy.export.graph import GraphEdit
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
from maskaq_deploy.export.lowering import WeightSite, float8_initializer
from maskaq_deploy.export.ortcpu import CPU_METADATA_KEY
from maskaq_deploy.export.precision import BF16_OPSET, FLOAT_DTYPE_KEY, to_float_dtype
from maskaq_deploy.export.qparams import ActParams, WeightParams
from maskaq_deploy.export.registry import REGISTRY, Flavour, InputKind, OpRule, get_flavour
from maskaq_deploy.runtimes.targets import ONNXRUNTIME

log = logging.getLogger(__name__)

LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


# ---- quantizer parameters, as torch computes them ------------------------------------------------------------

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
    float8 = bool(getattr(q, "float8", False))
    p = ActParams(name, q.bits, bool(q.symmetric), np.float32(s.item()), int(round(zp)), q.qmin, q.qmax, float8)
    _check_act(q, p, sample_numel)
    return p


def _on_grid(y: torch.Tensor, qmin, qmax, float8: bool) -> torch.Tensor:
    """Round ``y`` (x / scale + zero point) onto the grid: the nearest integer in [qmin, qmax], or the
    nearest E4M3 value of y saturated to +-448."""
    if float8:
        return torch.clamp(y, qmin, qmax).to(torch.float8_e4m3fn).float()
    return torch.clamp(torch.round(y), qmin, qmax)


def _check_act(q, p: ActParams, sample_numel: int) -> None:
    """Guard against calib's formula drifting from the one mirrored above: compare on a probe tensor."""
    gen = torch.Generator().manual_seed(0)
    span = float(p.scale) * (p.qmax - p.qmin)
    probe = (torch.rand((1, sample_numel), generator=gen) * 1.4 - 0.7) * span
    ref = q(probe.to(q.scale.device)).cpu()
    s = torch.tensor(p.scale)
    ours = (_on_grid(probe / s + p.zero_point, p.qmin, p.qmax, p.float8) - p.zero_point) * s
    bad = int((ref != ours).sum())
    if bad:
        log.warning("activation quantizer %s: %d of %d probe values differ from torch fake-quant", p.name, bad,
                    sample_numel)


@torch.no_grad()
def weight_params(name: str, q, weight: torch.Tensor) -> WeightParams:
    """Codes (integer, or E4M3 values) and the scale torch's forward pass uses for ``weight``."""
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
    float8 = bool(getattr(q, "float8", False))
    codes = _on_grid(wb / s, q.qmin, q.qmax, float8).reshape(out, -1)
    if pad:
        codes = codes[:, :-pad]
    codes = codes.reshape(w.shape)
    p = WeightParams(name, q.bits, q.granularity, q.block_size,
                     codes.numpy().astype(np.float32) if float8 else codes.to(torch.int8).numpy(),
                     s.reshape(out, -1).squeeze(1).numpy().astype(np.float32)
                     if q.granularity == "channel" else s.reshape(out, -1).numpy().astype(np.float32), float8)
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

def _marker_name(node) -> str:
    for a in node.attribute:
        if a.name == "name":
            return a.s.decode()
    raise ExportError(f"marker node {node.name} has no quantizer name")


def _final_consumers(G: GraphEdit, tensor: str):
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


def _insert_act(G: GraphEdit, marker, p: ActParams, flavour: Flavour, registry) -> None:
    for node, idx in _final_consumers(G, marker.output[0]):
        _rule_check(registry, node, idx, InputKind.ACTIVATION, p.name)
    if p.float8:  # E4M3 in both flavours: symmetric, zero point 0, no container offset
        zp = G.unique(f"{p.name}.zero_point")
        G.new_inits.append(float8_initializer(zp, np.zeros((), np.float32)))
        _emit_act_qdq(G, marker, p, [], marker.input[0], zp)
        return
    if not flavour.simulate_grids and (p.bits != 8 or not p.symmetric):
        grid = f"{p.bits}-bit {'symmetric' if p.symmetric else 'asymmetric'}"
        raise TargetError(f"activation quantizer {p.name} is {grid}; flavour {flavour.name} takes only "
                          "symmetric 8-bit activations: use an int8 recipe, or flavour 'onnxruntime'")
    if flavour.unsigned_acts:
        # uint8 container: a signed grid moves up by 128 (same values, zero point 128)
        zp_dtype, lo_c, hi_c = np.uint8, 0, 255
        offset = 128 if p.qmin < 0 else 0
    elif p.qmin < 0 or not flavour.simulate_grids:
        zp_dtype, offset, lo_c, hi_c = np.int8, 0, -128, 127
    else:  # an unsigned grid (e.g. softmax probabilities) where signed ones stay int8: uint8 as it is
        zp_dtype, offset, lo_c, hi_c = np.uint8, 0, 0, 255
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
    _emit_act_qdq(G, marker, p, nodes, x, G.const(f"{p.name}.zero_point", np.array(zp_c, dtype=zp_dtype)))


def _emit_act_qdq(G: GraphEdit, marker, p: ActParams, nodes: list, x: str, zp: str) -> None:
    """Replace ``marker`` by ``nodes`` then Q -> DQ of ``x`` with zero point ``zp``."""
    s = G.const(f"{p.name}.scale", np.float32(p.scale))
    q = G.unique(f"{p.name}.q")
    nodes += [helper.make_node("QuantizeLinear", [x, s, zp], [q], name=G.unique(f"{p.name}/QuantizeLinear")),
              helper.make_node("DequantizeLinear", [q, s, zp], [marker.output[0]],
                               name=G.unique(f"{p.name}/DequantizeLinear"))]
    G.bits[q] = G.bits[marker.output[0]] = p.bits
    G.act_q[marker.output[0]] = (q, s, zp, p)
    G.replace[id(marker)] = nodes


def _weight_chain(G: GraphEdit, marker, qname: str):
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


def _insert_weight(G: GraphEdit, marker, p: WeightParams, flavour: Flavour, registry, opset: int) -> None:
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
    consumed = chain[-1].output[0] if chain else marker.output[0]
    for n in [marker, *chain]:
        G.drop(n)
    G.bits[consumed] = p.bits
    rule.lower_weight(WeightSite(G, node, idx, p, codes, scale, dims, consumed, act_inputs, flavour.name, opset,
                                       flavour.cpu))


def insert_qdq(proto: onnx.ModelProto, params: dict, flavour: str | Flavour = ONNXRUNTIME, *,
               registry: dict[str, OpRule] | None = None, cpu: str | None = None) -> onnx.ModelProto:
    """Replace every marker in ``proto`` (in place) by Q/DQ / quantized weights from ``params``; returns it.

    ``params``: {quantizer name: ActParams | WeightParams}. ``cpu``: the CPU family an onnxruntime graph is
    laid out for (export/ortcpu.py; None: this machine's). Raises UnsupportedOpError when a quantizer feeds an
    op input the registry does not allow, TargetError when the flavour cannot express a quantizer.
    """
    fl = get_flavour(flavour, cpu)
    registry = REGISTRY if registry is None else registry
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), INT4_OPSET)
    G = GraphEdit(proto)
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
    meta = {BITS_METADATA_KEY: json.dumps(G.bits, sort_keys=True), "maskaq.flavour": fl.name}
    if fl.cpu is not None:
        meta[CPU_METADATA_KEY] = fl.cpu
    set_metadata(proto, meta)
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
    float_dtype: str = "fp32"
    cpu: str | None = None  # onnxruntime flavour: the CPU family it is laid out for (export/ortcpu.py)


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
    attention_qdq: bool = True  # the attention matmuls carry Q/DQ

    def to_qdq(self, flavour: str = ONNXRUNTIME, *, registry: dict[str, OpRule] | None = None,
               float_dtype: str | None = None, cpu: str | None = None) -> onnx.ModelProto:
        """The QDQ graph for ``flavour``; ``float_dtype`` (None: the flavour's default, fp16 for tensorrt)
        is the dtype everything unquantized computes in; ``cpu``: see ``insert_qdq``."""
        fl = get_flavour(flavour, cpu)
        dtype = fl.float_dtype(float_dtype)
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        insert_qdq(proto, self.params, fl, registry=registry)
        to_float_dtype(proto, dtype)
        set_metadata(proto, {FLOAT_DTYPE_KEY: dtype})
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the QDQ graph fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
        return proto


def _attention_quantizers(model: nn.Module, quantizers: dict) -> dict:
    """The quantizers on the inputs of the attention matmuls (q @ k^T, attn @ v)."""
    from maskaq_deploy.calib.qmodules import QuantMatMul

    return {n: q for n, q in quantizers.items() if isinstance(model.get_submodule(n.rpartition(".")[0]), QuantMatMul)}


def trace_quantized(model: nn.Module, options: ExportOptions, *, attention_qdq: bool | None = None) -> MarkedGraph:
    """Trace a calibrated quantized model with markers and read its quantizers' parameters.

    ``attention_qdq``: None exports the attention matmuls as calibrated; False leaves them without Q/DQ (they
    then compute in the graph's float dtype; on some TensorRT versions INT8 attention does not fuse and is
    slower than FP16); True insists on Q/DQ there and refuses a checkpoint calibrated without it.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    from maskaq_deploy.calib.quantizers import WeightQuantizer

    quantizers = collect_quantizers(model)
    attention = _attention_quantizers(model, quantizers)
    if attention_qdq and not attention:
        raise ExportError("this checkpoint was calibrated without attention-matmul quantizers, so there is no "
                          "scale to export; recalibrate with `attention_qdq` on, or export with `attention_qdq` off")
    if attention_qdq is False:
        quantizers = {n: q for n, q in quantizers.items() if n not in attention}
    params = {}
    for name, q in quantizers.items():
        if isinstance(q, WeightQuantizer):
            owner = model.get_submodule(name.rpartition(".")[0])
            params[name] = weight_params(name, q, owner.weight)
    dropped = attention if attention_qdq is False else {}
    for q in dropped.values():
        q.enabled = False
    try:
        with markers_in_place_of_quantizers(model, list(quantizers)) as markers:
            proto = trace_to_onnx(model, options, with_markers=True)
            numels = {n: m.sample_numel for n, m in markers.items()}
    finally:
        for q in dropped.values():
            q.enabled = True
    for name, q in quantizers.items():
        if name in params:
            continue
        if numels[name] is None:
            raise ExportError(f"activation quantizer {name} never ran in the forward pass; disable it or keep "
                              "its module float")
        params[name] = act_params(name, q, numels[name])
    return MarkedGraph(proto, params, options, attention_qdq=bool(attention) and attention_qdq is not False)


def build_qdq_model(model: nn.Module, options: ExportOptions, flavour: str = ONNXRUNTIME, *,
                    registry: dict[str, OpRule] | None = None, float_dtype: str | None = None,
                    cpu: str | None = None) -> onnx.ModelProto:
    """The QDQ ModelProto of a calibrated quantized model (nothing written). ``options.opset`` must be set."""
    get_flavour(flavour, cpu).float_dtype(float_dtype)  # fail before the (slow) trace
    return trace_quantized(model, options).to_qdq(flavour, registry=registry, float_dtype=float_dtype, cpu=cpu)


def default_options(model: nn.Module, *, input_shape=None, batch_size: int = 1, dynamic_batch: bool = False,
                    opset: int | None = None) -> ExportOptions:
    """ExportOptions with the model's input shape and the opset its weights need (20, or 21 for INT4)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    if opset is None:
        opset = INT4_OPSET if needs_int4_opset(model) else DEFAULT_OPSET
    return ExportOptions(input_shape or input_shape_of(model), batch_size, dynamic_batch, opset)


def write_qdq(marked: MarkedGraph, path, flavour: str = ONNXRUNTIME, *, registry: dict[str, OpRule] | None = None,
              metadata: dict | None = None, float_dtype: str | None = None, cpu: str | None = None) -> QDQExport:
    """Write the ``flavour`` QDQ graph of an already traced model (trace once, write both flavours)."""
    fl = get_flavour(flavour, cpu)
    proto = marked.to_qdq(fl, registry=registry, float_dtype=float_dtype)
    o = marked.options
    meta = {"maskaq.kind": "qdq", "maskaq.input_size": ",".join(map(str, o.input_shape)),
            "maskaq.attention_qdq": "on" if marked.attention_qdq else "off"}
    meta.update({k if str(k).startswith("maskaq.") else f"maskaq.{k}": v for k, v in (metadata or {}).items()})
    set_metadata(proto, meta)
    out = save_onnx(proto, path)
    counts = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
    log.info("wrote %s (%s flavour, %d quantizers)", out, flavour, len(marked.params))
    dtype = fl.float_dtype(float_dtype)
    return QDQExport(out, fl.name, o.opset, o.dynamic_batch, o.batch_size, o.input_shape, len(marked.params), counts,
                     dtype, fl.cpu)


def export_qdq_onnx(model: nn.Module, path, *, flavour: str = ONNXRUNTIME, input_shape=None,
                    batch_size: int = 1, dynamic_batch: bool = False, opset: int | None = None,
                    registry: dict[str, OpRule] | None = None, metadata: dict | None = None,
                    float_dtype: str | None = None, attention_qdq: bool | None = None,
                    cpu: str | None = None) -> QDQExport:
    """Export a calibrated quantized model as a QDQ ONNX file for ``flavour`` ("tensorrt" | "onnxruntime").

    ``input_shape`` (C, H, W) defaults to the model's; the batch is fixed to ``batch_size`` unless
    ``dynamic_batch``. ``metadata`` goes into the model's metadata_props (e.g. the recipe name). ``opset``
    None: 20, or 21 when the model has block-wise (INT4) weights, 22 for bf16. ``float_dtype``: what the unquantized ops
    compute in, "fp16" (the tensorrt default), "bf16" or "fp32" (onnxruntime: fp32 only); I/O stay float32.
    ``attention_qdq``: see ``trace_quantized``. ``cpu``: the CPU family an onnxruntime graph is laid out for,
    "x86-vnni", "x86-avx2" or "arm" (None / "auto": this machine's; export/ortcpu.py), recorded in its
    metadata.
    """
    dtype = get_flavour(flavour, cpu).float_dtype(float_dtype)  # fail before the (slow) trace
    if opset is None and dtype == "bf16":
        opset = BF16_OPSET
    options = default_options(model, input_shape=input_shape, batch_size=batch_size, dynamic_batch=dynamic_batch,
                              opset=opset)
    marked = trace_quantized(model, options, attention_qdq=attention_qdq)
    return write_qdq(marked, path, flavour, registry=registry, metadata=metadata, float_dtype=float_dtype, cpu=cpu)
