"""One ONNX graph indexed for reading (``GraphView``: producers, consumers, constants, element types) and for
the Q/DQ pass's edits (``GraphEdit``). The conformance checker, the inspector and the exporter share it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from maskaq_deploy.export.int4 import int4_initializer_to_array

INT4_TYPES = {TensorProto.INT4, TensorProto.UINT4}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class GraphView:
    """Producer / consumer / constant lookups over one graph (main graph only; subgraphs are not walked)."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        g = proto.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.value_types = {v.name: v.type.tensor_type.elem_type
                            for v in list(g.input) + list(g.value_info) + list(g.output)}

    def name(self, node) -> str:
        return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"

    def is_constant(self, tensor: str) -> bool:
        """An initializer, a Constant's output, or a Q/DQ / Transpose / Reshape of constants."""
        if tensor in self.inits:
            return True
        p = self.producer.get(tensor)
        if p is None:
            return False
        if p.op_type == "Constant":
            return True
        if p.op_type in QDQ_OPS + ("Transpose", "Reshape", "Cast", "Identity"):
            return bool(p.input) and self.is_constant(p.input[0])
        return False

    def const_array(self, tensor: str):
        """The value of a constant tensor (initializer or Constant), or None."""
        t = self.inits.get(tensor)
        if t is None:
            p = self.producer.get(tensor)
            if p is not None and p.op_type == "Constant":
                for a in p.attribute:
                    if a.name == "value":
                        t = a.t
        if t is None:
            return None
        if t.data_type in INT4_TYPES:
            return int4_initializer_to_array(t)
        try:
            return numpy_helper.to_array(t)
        except Exception:  # exotic types: treat as unknown
            return None

    def elem_type(self, tensor: str) -> int | None:
        if tensor in self.inits:
            return self.inits[tensor].data_type
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return a.t.data_type
        return self.value_types.get(tensor) or None

    def qdq_dtype(self, node) -> int | None:
        """The integer type a Q produces / a DQ consumes."""
        if node.op_type == "DequantizeLinear":
            t = self.elem_type(node.input[0])
            if t:
                return t
            p = self.producer.get(node.input[0])
            if p is not None and p.op_type == "QuantizeLinear":
                return self.qdq_dtype(p)
            return self.elem_type(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        for a in node.attribute:
            if a.name == "output_dtype" and a.i:
                return a.i
        if len(node.input) > 2 and node.input[2]:
            return self.elem_type(node.input[2])
        return TensorProto.UINT8  # QuantizeLinear's default without a zero point

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


class GraphEdit(GraphView):
    """A GraphView plus the edits the Q/DQ pass accumulates; ``finish`` applies them to the graph."""

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
