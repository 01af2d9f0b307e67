"""Which quantized layers hurt, and which to keep in float to meet a top-1 budget.

Metric (the choice, and why): the **isolated** SQNR of each quantized layer. The model runs in float (every
quantizer off); at each quantized module a forward hook runs that module once more with only its own quantizers
on, on the very input the float model gave it, and compares the two outputs:

    sqnr_db = 10 * log10( sum(out_float^2) / sum((out_quant - out_float)^2) )   over all the images

So a row measures the error that layer adds by itself, not the error accumulated from the layers before it
(comparing outputs inside the fully quantized model would rank the deepest layers worst just for being deep),
and all layers cost one extra module call each: about two float forward passes in all, cheap enough to run at
every verify. ``weight_sqnr_db`` and ``act_sqnr_db`` split the blame between the layer's weight grid and its
input grid(s). "Float" here is the checkpoint's own weights with quantization off, which is what
``--keep-fp`` would run.

``suggest_keep_fp`` turns the table into a ``--keep-fp`` list: greedily switch the worst layers to float
(disabling their quantizers; no recalibration) until the torch fake-quant top-1 drop against the original
full-precision model is <= ``max_drop``; a layer whose float version does not lower the drop is switched back
(see ``greedy_float_search``). The search runs on a seeded subset of the validation images (2000 by default: on a subset
of 500 a single image is 0.2 points, as coarse as a typical budget); the result is then measured on the full
set, and the search continues there if the subset was optimistic. The
rebuild with ``--keep-fp`` recalibrates the remaining quantizers, so its drop can differ a little from the
figure found here; verify it (``build --keep-fp ... --max-drop P`` does).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from maskaq_deploy.calib.checkpoint import atomic_write_json
from maskaq_deploy.calib.qmodules import QuantConv2d, QuantLinear, QuantMatMul
from maskaq_deploy.calib.quantize import iter_quantizers, quantizers_enabled
from maskaq_deploy.data import ImageSet
from maskaq_deploy.errors import DataError, UsageError
from maskaq_deploy.gate import TOLERANCE
from maskaq_deploy.run import Run, model_logits, top1
from maskaq_deploy.runtimes.compare import Energy

log = logging.getLogger(__name__)

METRIC = "isolated layer-output SQNR (only that layer quantized, float input), dB; worst first"
SENSITIVITY_FILE = "sensitivity.json"


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every quantized module that owns at least one quantizer, in forward order."""
    return [(name, mod) for name, mod in qmodel.named_modules()
            if isinstance(mod, (QuantLinear, QuantConv2d, QuantMatMul)) and any(True for _ in iter_quantizers(mod))]


def _batches(images, batch_size: int, limit: int | None):
    """Image tensors from an ImageSet, a tensor [N, C, H, W], or an iterable of tensors / (images, labels)."""
    if isinstance(images, ImageSet):
        yield from (x for x, _ in images.subset(limit).batches(batch_size))
        return
    if isinstance(images, torch.Tensor):
        images = images[:limit] if limit is not None else images
        yield from (x for x in images.split(batch_size) if len(x))
        return
    seen = 0
    for batch in images:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if limit is not None:
            if seen >= limit:
                return
            x = x[:limit - seen]
        if len(x):
            seen += len(x)
            yield x


def _db(energy: Energy) -> float | None:
    """The SQNR rounded as report.json keeps it; None when the quantized values are exactly the float ones
    (nothing to keep in float)."""
    v = energy.db()
    return None if v == math.inf else round(v, 3)


def _sort_key(row: dict):
    v = row["sqnr_db"]
    return (math.inf if v is None else v, row["index"])


ACT_QUANTIZERS = (("input_quantizer", 0), ("a_quantizer", 0), ("b_quantizer", 1))  # (attribute, input index)


def _act_inputs(mod: nn.Module, args: tuple):
    """(activation quantizer, the input it quantizes) pairs of a quantized module."""
    for attr, i in ACT_QUANTIZERS:
        q = getattr(mod, attr, None)
        if q is not None and len(args) > i:
            yield q, args[i]


@torch.no_grad()
def layer_sensitivity(qmodel: nn.Module, images, limit: int | None = None, *, batch_size: int = 32,
                      device: str = "cpu") -> list[dict]:
    """One row per quantized layer, worst (lowest ``sqnr_db``) first; see the module docstring.

    Row keys: ``rank`` (1 = worst), ``layer`` (module name, usable as a --keep-fp pattern), ``kind``
    (Linear / Conv2d / MatMul), ``bits`` (e.g. "w4a4"), ``sqnr_db`` (None: exact), ``weight_sqnr_db``,
    ``act_sqnr_db``, ``index`` (position in forward order).
    """
    layers = quantized_layers(qmodel)
    out_e = {name: Energy() for name, _ in layers}
    act_e = {name: Energy() for name, _ in layers}
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs, out):
            qs = [q for _, q in iter_quantizers(mod)]
            for q in qs:
                q.enabled = True
            try:
                out_e[name].add(out, mod.forward(*args, **kwargs))
                for q, x in _act_inputs(mod, args):
                    act_e[name].add(x, q(x))
            finally:
                for q in qs:
                    q.enabled = False
        return hook

    was_training = qmodel.training
    qmodel.eval()
    seen = 0
    try:
        for name, mod in layers:
            handles.append(mod.register_forward_hook(make_hook(name), with_kwargs=True))
        with quantizers_enabled(qmodel, False):
            for x in _batches(images, batch_size, limit):
                qmodel(x.to(device))
                seen += len(x)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    if seen == 0:
        raise ValueError("layer_sensitivity needs at least one image")

    rows = []
    for index, (name, mod) in enumerate(layers):
        wq = getattr(mod, "weight_quantizer", None)
        w_db = None
        if wq is not None:
            e = Energy()
            with quantizers_enabled(mod, True):
                e.add(mod.weight, wq(mod.weight))
            w_db = _db(e)
        acts = [getattr(mod, a) for a, _ in ACT_QUANTIZERS if getattr(mod, a, None) is not None]
        w_bits = wq.bits if wq is not None else None
        a_bits = acts[0].bits if acts else None
        rows.append({"layer": name, "kind": _kind(mod), "bits": _bits(w_bits, a_bits),
                     "sqnr_db": _db(out_e[name]), "weight_sqnr_db": w_db,
                     "act_sqnr_db": _db(act_e[name]) if acts else None, "index": index})
    rows.sort(key=_sort_key)
    return [{"rank": rank, **row} for rank, row in enumerate(rows, 1)]


def _kind(mod: nn.Module) -> str:
    return "Linear" if isinstance(mod, QuantLinear) else "Conv2d" if isinstance(mod, QuantConv2d) else "MatMul"


def _bits(w_bits, a_bits) -> str:
    return (f"w{w_bits}" if w_bits else "") + (f"a{a_bits}" if a_bits else ("a16" if w_bits else ""))


def set_layers_float(qmodel: nn.Module, names, enabled: bool = False) -> None:
    """Switch the quantizers of the named modules off (float) or back on."""
    for name in names:
        for _, q in iter_quantizers(qmodel.get_submodule(name)):
            q.enabled = enabled


def compress_patterns(names: list[str], all_layers: list[str]) -> list[str]:
    """Shorter fnmatch patterns for ``names``: 'blocks.3.*' when every quantized layer under blocks.3 is in
    ``names`` (and the pattern matches no other quantized layer). Order follows ``names``."""
    chosen = set(names)
    covered: dict[str, str] = {}
    prefixes = sorted({n.rsplit(".", k)[0] for n in names for k in range(1, n.count(".") + 1)},
                      key=lambda p: (p.count("."), p))
    for prefix in prefixes:
        pattern = f"{prefix}.*"
        under = [n for n in all_layers if fnmatch.fnmatchcase(n, pattern)]
        if len(under) >= 2 and set(under) <= chosen and not any(n in covered for n in under):
            for n in under:
                covered[n] = pattern
    out = []
    for n in names:
        p = covered.get(n, n)
        if p not in out:
            out.append(p)
    return out


@dataclass
class KeepFpSuggestion:
    """What ``suggest_keep_fp`` found. ``patterns`` is the complete --keep-fp list for the rebuild (the
    checkpoint's own keep_fp first); drops are top-1 points against the full-precision model."""

    patterns: list[str]
    added: list[str]  # layers switched to float, in the order the search added them
    max_drop: float
    fp_top1: float
    quant_top1_before: float
    drop_before: float  # full set, as calibrated
    drop_after: float  # full set, with ``added`` in float (quantizers off, no recalibration)
    met: bool
    num_images: int
    search_images: int
    steps: list[dict] = field(default_factory=list)  # {"layer", "kept", "drop", "images", "accepted"}

    def to_dict(self) -> dict:
        return asdict(self)


def suggest_keep_fp(run, val_images=None, max_drop: float = 1.0, *, rows: list[dict] | None = None,
                    search_images: int = 2000, limit: int | None = None, batch_size: int = 256,
                    sensitivity_images: int = 256) -> KeepFpSuggestion:
    """Greedy --keep-fp search on the checkpoint of ``run`` (a Run or its directory; see the module docstring).

    ``val_images``: an ImageSet, a --val-data spec, or None (the run's validation images: the embedded test set
    for the embedded model). ``rows``: a ``layer_sensitivity`` table to follow (computed on the search subset
    when None). The checkpoint's quantizers are switched in place: pass a Run whose model is not needed after.
    """
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise UsageError(f"`max_drop` {max_drop} must be a finite number of points >= 0, e.g. `max_drop` 1")
    run = Run.of(run, val_data=None if isinstance(val_images, ImageSet) else val_images)
    qmodel, manifest = run.quantized, run.manifest
    images = _val_images(run, val_images).subset(limit)
    search = images.subset(search_images, seed=1)
    if rows is None:
        rows = layer_sensitivity(qmodel, search, limit=sensitivity_images)

    fp_model = run.fp_model.model  # the original FP model: the checkpoint may be fine-tuned
    fp_logits, labels = model_logits(fp_model, images, batch_size)
    fp_top1 = top1(fp_logits, labels)

    def drop(imgs, fp_ref) -> float:
        q_logits, lbl = model_logits(qmodel, imgs, batch_size)
        return round(top1(fp_ref, lbl) - top1(q_logits, lbl), 4)

    q_before = top1(model_logits(qmodel, images, batch_size)[0], labels)
    drop_before = round(fp_top1 - q_before, 4)
    added: list[str] = []
    steps: list[dict] = []
    current = drop_before
    if drop_before > max_drop + TOLERANCE:
        order = [r["layer"] for r in rows]
        if len(search) < len(images):  # search on the subset, then confirm on the full set
            fp_search = model_logits(fp_model, search, batch_size)[0]
            added, _ = greedy_float_search(qmodel, order, lambda: drop(search, fp_search),
                                           drop(search, fp_search), max_drop, steps, len(search))
            current = drop(images, fp_logits)
            steps.append({"layer": None, "kept": len(added), "drop": current, "images": len(images),
                          "accepted": True})
        # on the full set: everything when there is no subset, or as long as the subset was optimistic
        rest = [n for n in order if n not in added]
        more, current = greedy_float_search(qmodel, rest, lambda: drop(images, fp_logits), current, max_drop, steps,
                                            len(images), start=len(added))
        added += more
    all_layers = [n for n, _ in quantized_layers(qmodel)]  # quantizers switched off still count
    existing = list(manifest.keep_fp or [])
    patterns = existing + [p for p in compress_patterns(added, all_layers) if p not in existing]
    return KeepFpSuggestion(patterns, added, float(max_drop), fp_top1, q_before, drop_before, current,
                            current <= max_drop + TOLERANCE, len(images), len(search), steps)


def greedy_float_search(qmodel, order: list[str], measure, current: float, max_drop: float, steps: list, n: int,
            start: int = 0) -> tuple[list[str], float]:
    """Switch layers of ``order`` to float until ``measure()`` (the top-1 drop) is within ``max_drop``.

    First pass: a layer stays float only if the drop goes strictly down (a top-1 drop of a few tenths of a
    point moves up and down with single images, and a float layer that does not help only costs speed).
    Second pass, if still over budget: the rejected layers, in order, kept whatever they do. Each measurement
    is appended to ``steps``. Returns the layers left in float and the drop with them.
    """
    added: list[str] = []
    rejected: list[str] = []
    for strict, names in ((True, order), (False, rejected)):
        for name in list(names):
            if current <= max_drop + TOLERANCE:
                return added, current
            set_layers_float(qmodel, [name])
            d = measure()
            accepted = not strict or d < current - TOLERANCE
            steps.append({"layer": name, "kept": start + len(added) + accepted, "drop": d, "images": n,
                          "accepted": accepted})
            if accepted:
                added.append(name)
                current = d
            else:
                set_layers_float(qmodel, [name], enabled=True)
                rejected.append(name)
    return added, current


def _val_images(run: Run, given) -> ImageSet:
    """``given`` when it is an ImageSet (checked for labels), else the run's validation images."""
    if not isinstance(given, ImageSet):
        return run.val_images
    if given.labels is None or len(given) == 0:
        raise DataError(f"`val_data` {given.source} holds no labelled images")
    return given


def analyze(run, val_data=None, *, max_drop: float = 1.0, limit: int | None = None,
            search_images: int = 2000, sensitivity_images: int = 256, batch_size: int = 256) -> dict:
    """What ``maskaq-deploy sensitivity RUN`` does: the per-layer table and the --keep-fp suggestion, also
    written to RUN/sensitivity.json. Returns that dict ({"rows", "suggestion", ...})."""
    run = Run.of(run, val_data=val_data, limit=limit)
    images = run.val_images
    rows = layer_sensitivity(run.quantized, images.subset(search_images, seed=1), limit=sensitivity_images)
    suggestion = suggest_keep_fp(run, images, max_drop, rows=rows, search_images=search_images,
                                 batch_size=batch_size)
    result = {"metric": METRIC, "val_data": images.source, "images": min(len(images), search_images,
                                                                          sensitivity_images),
              "model": run.manifest.name, "recipe": run.manifest.recipe_name,
              "rows": rows, "suggestion": suggestion.to_dict()}
    atomic_write_json(run.path / SENSITIVITY_FILE, result)
    return result


TABLE_COLUMNS = ("rank", "layer", "kind", "bits", "output SQNR dB", "weight SQNR dB", "input SQNR dB")


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The sensitivity rows as text cells under TABLE_COLUMNS (for the CLI's table)."""
    def db(v):
        return "-" if v is None else f"{v:.1f}"

    return [[str(r["rank"]), r["layer"], r["kind"], r["bits"], "exact" if r["sqnr_db"] is None else db(r["sqnr_db"]),
             db(r["weight_sqnr_db"]), db(r["act_sqnr_db"])] for r in rows]


def summary_lines(result: dict) -> list[str]:
    """What the suggestion means, in lines for the terminal; the last one is the --keep-fp list."""
    s = result["suggestion"]
    lines = [(f"top-1 on {s['num_images']} images: FP {s['fp_top1']:.2f}%, quantized "
              f"{s['quant_top1_before']:.2f}% (drop {s['drop_before']:.2f} pts, budget --max-drop {s['max_drop']:g})")]
    if not s["added"]:
        lines.append("already within the budget: no layer needs to stay in float")
    else:
        verdict = "meets" if s["met"] else "does NOT meet"
        lines.append(f"with {len(s['added'])} more layer(s) in float (quantizers off, no recalibration): drop "
                     f"{s['drop_after']:.2f} pts, {verdict} the budget")
        lines.append("rebuild with the options below (it recalibrates, so verify the figure: add --max-drop "
                     f"{s['max_drop']:g} to build)")
    lines.append("suggested: " + (" ".join(f"--keep-fp '{p}'" for p in s["patterns"]) or "(none)"))
    return lines
