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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    ``int4_weights``: INT4 block-wise weight DQ may feed it (TensorRT: MatMul/Gemm only).
    ``weight_only_dq``: a quantized weight with float activations stays as DQ (TensorRT weight-only GEMM);
    otherwise the dequantized values are folded into a float initializer (same numerics, no Q/DQ).
    ``matmulnbits``: the onnxruntime flavour may lower INT4 weight-only to com.microsoft MatMulNBits.
    ``trt_float_only``: TensorRT must not see a DequantizeLinear feeding it (it would run it in INT8).
    """

    op_type: str
    inputs: tuple[tuple[int, InputKind], ...] = ()
    int4_weights: bool = False
    weight_only_dq: bool = False
    matmulnbits: bool = False
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
        object.__setattr__(self, "inputs", pairs)
        object.__setattr__(self, "_by_index", dict(pairs))

    @property
    def quantizable(self) -> bool:
        return bool(self.inputs)

    def kind_of(self, index: int) -> InputKind | None:
        """The kind of Q/DQ input ``index`` may carry, or None if it must stay float."""
        return self._by_index.get(index)

    def weight_inputs(self) -> tuple[int, ...]:
        return tuple(i for i, k in self.inputs if k is not InputKind.ACTIVATION)


A, W, E = InputKind.ACTIVATION, InputKind.WEIGHT, InputKind.EITHER

_DEFAULT_RULES = (
    OpRule("MatMul", ((0, A), (1, E)), int4_weights=True, weight_only_dq=True, matmulnbits=True,
           note="Linear (3-D input) and both attention matmuls"),
    OpRule("Gemm", ((0, A), (1, W)), int4_weights=True, weight_only_dq=True, matmulnbits=True,
           note="Linear with 2-D input (classifier head); input 2 (bias) stays float"),
    OpRule("Conv", ((0, A), (1, W)), note="patch embedding; input 2 (bias) stays float"),
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
