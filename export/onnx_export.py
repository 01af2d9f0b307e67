"""torch -> ONNX: the float graph, and the same graph with quantizer *markers* for Q/DQ insertion.

Exporter choice: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``). On a tiny ViT it gives 64 nodes
where the legacy TorchScript exporter gives 104: no Identity/Constant/Shape/Where/Expand clutter around the CLS
token, initializers keep their torch parameter names, and its onnxscript optimizer already folds constants.
It also takes a custom-op translation table, which is how the markers below survive into the graph; the legacy
exporter would need ``symbolic`` functions and TorchScript tracing, which torch is phasing out.

Tensor -> quantizer mapping (the markers): before export every enabled quantizer is swapped for an identity
custom op ``maskaq::qmark(x, name)``, which exports as one ONNX node ``maskaq.QMark`` with a ``name``
attribute holding the quantizer's module path (e.g. ``blocks.0.attn.qk_matmul.b_quantizer``). The Q/DQ pass
(export/qdq.py) replaces each marker by the Q/DQ (or quantized initializer) its quantizer calls for. Markers
sit exactly where torch applies the quantizer, so the mapping does not depend on node names or name scopes.

Attention: timm's fused SDPA is switched off (``fused_attn = False``) and the opset stays below 23 (where ONNX
gained a fused Attention op), so attention exports as MatMul -> Softmax -> MatMul. Opset 20 by default (Gelu
is one node); QDQ exports with INT4 weights use 21, the first with INT4 and block-wise DequantizeLinear.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from maskaq_deploy.export.errors import ExportError, UnsupportedModelError, UnsupportedOpError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20  # export/qdq.py says why not 21 for int8 graphs
INT4_OPSET = 21  # first opset with INT4 and block-wise DequantizeLinear
MIN_OPSET, MAX_OPSET = 17, 22  # 17: LayerNormalization; 23 brings a fused Attention op
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MARKER_DOMAIN, MARKER_OP = "maskaq", "QMark"
# onnx.helper.make_model stamps the newest IR version, which onnxruntime may reject; pin the one each opset
# was released with (onnx/docs/Versioning.md).
_IR_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


def ir_version_for(opset: int) -> int:
    return _IR_FOR_OPSET[opset]


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset!r} is not supported; use {MIN_OPSET} to {MAX_OPSET} "
                          f"(default {DEFAULT_OPSET}; INT4 weights need {INT4_OPSET} or later)")
    return opset


# ---- the marker op -------------------------------------------------------------------------------------------

@torch.library.custom_op("maskaq::qmark", mutates_args=())
def _qmark(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@_qmark.register_fake
def _qmark_fake(x, name):
    return torch.empty_like(x)


def register_marker_schema() -> None:
    # The dynamo exporter takes a node's output count from its ONNX schema; a custom domain op needs one.
    if onnx.defs.has(MARKER_OP, MARKER_DOMAIN):
        return
    S = onnx.defs.OpSchema
    onnx.defs.register_schema(S(
        MARKER_OP, MARKER_DOMAIN, 1,
        inputs=[S.FormalParameter("x", "T")], outputs=[S.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float")],
        attributes=[S.Attribute("name", S.AttrType.STRING, "quantizer module path")],
        doc="Identity marking where a torch quantizer acts; replaced by Q/DQ in export/qdq.py."))


def _marker_translation(x, name: str):
    import onnxscript

    return onnxscript.values.Opset(MARKER_DOMAIN, 1).QMark(x, name=name)


class Marker(nn.Module):
    """Stands in for a quantizer during export; records the per-sample size it sees (for LSQ's scale)."""

    def __init__(self, qname: str):
        super().__init__()
        self.qname = qname
        self.sample_numel: int | None = None
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.sample_numel = int(x[0].numel())
        return torch.ops.maskaq.qmark(x, self.qname)


# ---- model preparation ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def unfused_attention(model: nn.Module):
    """Temporarily turn timm's fused SDPA off everywhere (explicit MatMul / Softmax / MatMul)."""
    saved = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m, v in saved:
            m.fused_attn = v


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@contextlib.contextmanager
def markers_in_place_of_quantizers(model: nn.Module, names):
    """Swap the named quantizer submodules for Markers; yields {name: Marker}; restores them on exit."""
    originals = {n: model.get_submodule(n) for n in names}
    markers = {n: Marker(n) for n in names}
    for n, mk in markers.items():
        _set_child(model, n, mk)
    try:
        yield markers
    finally:
        for n, q in originals.items():
            _set_child(model, n, q)


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) from timm's pretrained_cfg / patch embedding; raises if the model does not say."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    if img is not None and chans is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return int(chans), int(h), int(w)
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])
    raise ExportError(f"cannot tell the input size of {type(model).__name__}; pass input_shape=(C, H, W)")


# ---- export --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportOptions:
    """How the torch graph is traced. ``batch_size`` is the fixed batch, or the example batch if dynamic."""

    input_shape: tuple[int, int, int]
    batch_size: int = 1
    dynamic_batch: bool = False
    opset: int = DEFAULT_OPSET

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ExportError(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ExportError(f"batch size must be a positive integer, got {self.batch_size!r}")
        check_opset(self.opset)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # torch's ConversionError puts the interesting cause in the chain, not in its own first line
    cause = e.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    line = text[0] if text else type(e).__name__
    if cause is not None and str(cause).strip():
        line = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    return line[:300]


def trace_to_onnx(model: nn.Module, options: ExportOptions, *, with_markers: bool = False) -> onnx.ModelProto:
    """Run the dynamo exporter on ``model`` (eval mode, fused attention off) and return the ModelProto.

    ``with_markers`` adds the marker op's translation (the model must already hold Markers). Exporter failures
    become one-line ExportErrors; the exporter's own progress printing is silenced.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    register_marker_schema()
    param = next(model.parameters(), None)
    example = torch.zeros((options.batch_size, *options.input_shape), dtype=torch.float32,
                          device=param.device if param is not None else "cpu")
    kwargs = {}
    if options.dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    table = {torch.ops.maskaq.qmark.default: _marker_translation} if with_markers else None
    was_training = model.training
    model.eval()
    sink = io.StringIO()
    try:
        with unfused_attention(model), torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            if with_markers:  # eager pass: Markers record the per-sample sizes LSQ's scale depends on
                markers = [m for m in model.modules() if isinstance(m, Marker)]
                for m in markers:
                    m.recording = True
                try:
                    model(example)
                finally:
                    for m in markers:
                        m.recording = False
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=options.opset, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], custom_translation_table=table,
                optimize=True, external_data=False, **kwargs)
    except ExportError:
        raise
    except Exception as e:  # the exporter raises a zoo of types; the CLI needs one, with one line
        log.debug("torch.onnx.export output:\n%s", sink.getvalue())
        line = _first_line(e)
        op = re.search(r"OpOverload\(op='([^']+)'", line)
        if op is not None or "No ONNX function found" in line:
            what = op.group(1) if op is not None else "an op"
            raise UnsupportedOpError(f"{type(model).__name__} uses {what}, which torch.onnx cannot translate to "
                                     "ONNX; replace that layer or keep it out of the exported model") from e
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {line}") from e
    finally:
        model.train(was_training)
    proto = program.model_proto
    proto.ir_version = ir_version_for(options.opset)
    return proto


def export_fp_onnx(model: nn.Module, path, *, input_shape=None, batch_size: int = 1, dynamic_batch: bool = False,
                   opset: int = DEFAULT_OPSET) -> Path:
    """Export the float function of ``model`` (quantizers, if any, switched off) to ``path``; returns it."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    from maskaq_deploy.calib.quantize import quantizers_enabled

    options = ExportOptions(input_shape or input_shape_of(model), batch_size, dynamic_batch, opset)
    with quantizers_enabled(model, False):
        proto = trace_to_onnx(model, options)
    set_metadata(proto, {"maskaq.kind": "float", "maskaq.input_size": ",".join(map(str, options.input_shape))})
    return save_onnx(proto, path)


def set_metadata(proto: onnx.ModelProto, items: dict) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in items.items():
        if k in existing:
            existing[k].value = str(v)
        else:
            proto.metadata_props.add(key=k, value=str(v))


def save_onnx(proto: onnx.ModelProto, path) -> Path:
    """Write ``proto`` as one self-contained file, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise ExportError(f"{path.name}: the model is over 2 GB, which one ONNX file cannot hold")
    from maskaq_deploy.calib.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
