"""Per-operator Q/DQ rules, in ONE registry keyed by ONNX op type.

The Q/DQ pass (export/qdq.py) and the TensorRT conformance checker (export/rules.py) both read it; neither has
an if-chain over op types. An entry says which inputs of an op may carry Q/DQ and of what kind:

* ``ACTIVATION``: a per-tensor QuantizeLinear -> DequantizeLinear pair on a computed tensor;
* ``WEIGHT``: a quantized initializer followed by DequantizeLinear (per channel or block-wise);
* ``EITHER``: MatMul's input 1 is a weight for a Linear layer and an activation for the attention matmuls
  (k^T in q @ k^T, v in attn @ v).

Ops registered with no quantizable inputs (Softmax, LayerNormalization, Gelu, Add, ...) stay float; a
quantizer that feeds one of them, or an op missing from the registry, is an UnsupportedOpError at export.
Adding an op is adding an entry here.

An entry also says how a quantized weight of that op is written, per export flavour: an ordered tuple of
lowerings (export/lowering.py), the first that applies wins (``OpRule.lower_weight``). The flavours' names
and their activation containers are defined here, once (``FLAVOURS``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from maskaq_deploy.export import lowering as lw
from maskaq_deploy.export import ortcpu
from maskaq_deploy.export.errors import ExportError, TargetError
from maskaq_deploy.runtimes import targets
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TENSORRT


@dataclass(frozen=True)
class Flavour:
    """What one export flavour does with activations (weights: the ops' lowerings below).

    ``unsigned_acts``: activations in a uint8 container (a signed grid moves up by 128, zero point 128), which
    onnxruntime's x86 integer kernels need; otherwise a signed grid stays int8 with zero point 0 (TensorRT, and
    onnxruntime on ARM). ``simulate_grids``: sub-8-bit or asymmetric activation grids become a Clip + 8-bit
    Q/DQ; otherwise they are a TargetError. ``float_dtypes``: the dtypes the unquantized ops may compute in
    (``--float-dtype``), the default first (export/precision.py). ``cpu``: the CPU family an onnxruntime graph
    is laid out for (export/ortcpu.py); None for TensorRT.
    """

    name: str
    unsigned_acts: bool
    simulate_grids: bool
    float_dtypes: tuple[str, ...]
    cpu: str | None = None

    @property
    def signed_weights(self) -> bool:
        """Integer-kernel weights stay int8 (zero point 0); otherwise uint8 with zero point 128 (x86 without
        VNNI, where onnxruntime's u8 x s8 products saturate)."""
        return self.cpu != ortcpu.X86_AVX2

    def float_dtype(self, requested: str | None) -> str:
        """``requested`` (None: the default) if this flavour computes in it; ExportError otherwise."""
        if requested is None:
            return self.float_dtypes[0]
        if requested not in self.float_dtypes:
            raise ExportError(f"flavour {self.name} computes in {' or '.join(self.float_dtypes)}, not "
                              f"{requested!r}" + (f"; half precision is for `flavour` {TENSORRT}"
                                                  if self.float_dtypes == ("fp32",) else ""))
        return requested


FLAVOURS: dict[str, Flavour] = {
    # TensorRT builds strongly typed networks: a float32 tensor would run in FP32 there, so fp16 by default
    TENSORRT: Flavour(TENSORRT, unsigned_acts=False, simulate_grids=False, float_dtypes=("fp16", "bf16", "fp32")),
    # onnxruntime's CPU kernels compute in float32 (fp16 ops would be cast back and forth)
    ONNXRUNTIME: Flavour(ONNXRUNTIME, unsigned_acts=True, simulate_grids=True, float_dtypes=("fp32",)),
}


def get_flavour(name, cpu: str | None = None) -> Flavour:
    """The flavour called ``name``; for onnxruntime, laid out for CPU family ``cpu`` (None / "auto": this
    machine's, export/ortcpu.py). A Flavour passes through (``cpu`` must then be None or agree)."""
    if isinstance(name, Flavour):
        if cpu not in (None, ortcpu.AUTO) and name.cpu != cpu:
            raise ExportError(f"flavour {name.name} is laid out for {name.cpu}, not {cpu}")
        return name
    fl = FLAVOURS[targets.check_name(name, targets.FLAVOURS, "export flavour", ExportError)]
    if fl.name != ONNXRUNTIME:
        if cpu not in (None, ortcpu.AUTO):
            raise ExportError(f"a CPU family ({cpu}) is for the onnxruntime flavour; {fl.name} has one layout")
        return fl
    family = ortcpu.resolve(cpu)
    # x86 integer kernels take uint8 activations; ARM's take int8 as they are
    return replace(fl, cpu=family, unsigned_acts=family != ortcpu.ARM)


class InputKind(str, enum.Enum):
    ACTIVATION = "activation"
    WEIGHT = "weight"
    EITHER = "either"

    def accepts(self, kind: "InputKind") -> bool:
        return self is InputKind.EITHER or self is kind


@dataclass(frozen=True)
class OpRule:
    """Q/DQ behaviour of one ONNX op type.

    ``inputs``: (input index, kind) pairs that may be quantized; empty = the op always stays float.
    ``lowerings``: {flavour name: lowerings tried in order} for a quantized weight input.
    ``trt_float_only``: TensorRT must not see a DequantizeLinear feeding it (it would run it in INT8).
    """

    op_type: str
    inputs: tuple[tuple[int, InputKind], ...] = ()
    lowerings: dict = field(default_factory=dict, compare=False)
    trt_float_only: bool = False
    note: str = ""
    _by_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.op_type or not isinstance(self.op_type, str):
            raise ValueError("an OpRule needs an ONNX op type name")
        pairs = tuple((int(i), InputKind(k)) for i, k in self.inputs)
        if len({i for i, _ in pairs}) != len(pairs):
            raise ValueError(f"OpRule {self.op_type}: an input index is listed twice")
        if any(i < 0 for i, _ in pairs):
            raise ValueError(f"OpRule {self.op_type}: input indices must be >= 0")
        unknown = sorted(set(self.lowerings) - set(targets.FLAVOURS))
        if unknown:
            raise ValueError(f"OpRule {self.op_type}: lowerings for unknown flavour(s) {unknown}")
        object.__setattr__(self, "inputs", pairs)
        object.__setattr__(self, "lowerings", {f: tuple(ls) for f, ls in self.lowerings.items()})
        object.__setattr__(self, "_by_index", dict(pairs))

    @property
    def quantizable(self) -> bool:
        return bool(self.inputs)

    def kind_of(self, index: int) -> InputKind | None:
        """The kind of Q/DQ input ``index`` may carry, or None if it must stay float."""
        return self._by_index.get(index)

    @property
    def int4_weights(self) -> bool:
        """TensorRT takes INT4 block weights into this op (its tensorrt lowerings include the INT4 DQ)."""
        return any(isinstance(lo, lw.Int4BlockDQ) for lo in self.lowerings.get(TENSORRT, ()))

    def lower_weight(self, site: "lw.WeightSite") -> None:
        """Write the quantized weight at ``site`` with the first of this op's lowerings that applies."""
        for lowering in self.lowerings.get(site.flavour, ()):
            if lowering.applies(site):
                lowering.emit(site)
                return
        raise TargetError(f"weight quantizer {site.params.name}: {self.op_type} has no {site.flavour} form for a "
                          f"{site.params.bits}-bit {site.params.granularity}-wise weight; keep that module float "
                          "(keep_fp) or add a lowering in export/registry.py")


A, W, E = InputKind.ACTIVATION, InputKind.WEIGHT, InputKind.EITHER

# A GEMM keeps weight-only DQ (TensorRT's weight-only INT4 GEMM, onnxruntime's MatMulNBits); a Conv with float
# activations gets its fake-quant values folded into a float weight (same numerics, no Q/DQ).
_GEMM = {
    TENSORRT: (lw.Int4BlockDQ(with_act_quant=False), lw.RefuseBlock(), lw.ChannelDQ()),
    ONNXRUNTIME: (lw.MatMulNBits(), lw.Int4BlockDQ(with_act_quant=True), lw.BlockDQ(), lw.IntegerMatMul(),
                  lw.ChannelDQ()),
}
_CONV = {
    TENSORRT: (lw.FoldDequantized(), lw.RefuseBlock(), lw.ChannelDQ()),
    ONNXRUNTIME: (lw.FoldDequantized(), lw.BlockDQ(), lw.ChannelDQ()),
}

_DEFAULT_RULES = (
    OpRule("MatMul", ((0, A), (1, E)), _GEMM, note="Linear (3-D input) and both attention matmuls"),
    OpRule("Gemm", ((0, A), (1, W)), _GEMM,
           note="Linear with 2-D input (classifier head); input 2 (bias) stays float"),
    OpRule("Conv", ((0, A), (1, W)), _CONV, note="patch embedding; input 2 (bias) stays float"),
    OpRule("Softmax", note="attention probabilities are quantized at av_matmul's input, not here"),
    OpRule("LayerNormalization", trt_float_only=True, note="INT8 LayerNorm loses accuracy"),
    OpRule("Gelu", trt_float_only=True, note="INT8 GELU loses accuracy"),
    OpRule("Erf", trt_float_only=True, note="GELU as decomposed by older opsets"),
    OpRule("Add", note="residuals and biases stay float"),
    OpRule("Mul"),
    OpRule("Div"),
    OpRule("Sub"),
)

REGISTRY: dict[str, OpRule] = {r.op_type: r for r in _DEFAULT_RULES}


def register(rule: OpRule, registry: dict[str, OpRule] | None = None, *, replace: bool = False) -> OpRule:
    """Add ``rule`` to ``registry`` (default: the global one); refuses to overwrite unless ``replace``."""
    target = REGISTRY if registry is None else registry
    if rule.op_type in target and not replace:
        raise ValueError(f"op type {rule.op_type!r} already has a Q/DQ rule; pass replace=True to change it")
    target[rule.op_type] = rule
    return rule


def rule_for(op_type: str, registry: dict[str, OpRule] | None = None) -> OpRule | None:
    return (REGISTRY if registry is None else registry).get(op_type)


def quantized_op_types(registry: dict[str, OpRule] | None = None) -> tuple[str, ...]:
    return tuple(op for op, r in (REGISTRY if registry is None else registry).items() if r.quantizable)


def trt_float_only_ops(registry: dict[str, OpRule] | None = None) -> tuple[str, ...]:
    return tuple(op for op, r in (REGISTRY if registry is None else registry).items() if r.trt_float_only)


def int4_consumers(registry: dict[str, OpRule] | None = None) -> tuple[str, ...]:
    return tuple(op for op, r in (REGISTRY if registry is None else registry).items() if r.int4_weights)
