"""Checks that refuse what would otherwise pass silently: unusable devices, labels the classifier cannot
produce, --keep-fp patterns that match nothing, non-finite tensors.

Bad input is a UsageError (exit 2) naming the file or option; a non-finite computed value is a NonFiniteError
(exit 1, a stage failure) naming the layer that produced it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

import torch
from torch import nn

from maskaq_deploy.errors import NonFiniteError, UsageError

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def device_available(device: str) -> None:
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"`device` {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise UsageError(f"`device` {device}: torch sees {count} CUDA device(s) here; use `device` cpu"
                             + (f" or cuda:0..{count - 1}" if count else ""))


def num_classes(model: nn.Module) -> int | None:
    """The classifier's output count (timm's ``num_classes``), or None when the model does not say."""
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


def labels_in_range(labels, classes: int | None, what: str) -> None:
    """Refuse labels the classifier cannot predict (they would score 0% for FP and quantized alike)."""
    if labels is None or classes is None or len(labels) == 0:
        return
    t = torch.as_tensor(labels)
    bad = (t < 0) | (t >= classes)
    if bool(bad.any()):
        raise UsageError(f"{what}: {int(bad.sum())} label(s) outside [0, {classes}) (found {int(t.min())} to "
                         f"{int(t.max())}); the model has {classes} classes, so give labels 0 to {classes - 1}")


def keep_fp_patterns(patterns, module_names: list[str]) -> None:
    """Every --keep-fp pattern must match a module; a miss names the closest module names."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise UsageError(f"`keep_fp` takes module-name patterns (strings), got {pattern!r}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in module_names):
            close = difflib.get_close_matches(pattern, module_names, n=4, cutoff=0.3) or module_names[:4]
            raise UsageError(f"`keep_fp` pattern {pattern!r} matches no module of the model; close names: "
                             f"{', '.join(close)}")


def finite_tensors(state: dict, source: str) -> None:
    """Refuse a state dict with NaN or infinite values (input: exit 2, naming the file and the tensor)."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UsageError(f"checkpoint {source}: tensor {key} has {bad} NaN or infinite value(s) of {t.numel()}; "
                             "give a checkpoint with finite weights")


@torch.no_grad()
def finite_outputs(model: nn.Module, x: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming the first layer whose output is not finite, when ``out`` is not finite."""
    if bool(torch.isfinite(out).all()):
        return
    raise NonFiniteError(f"{what} produced NaN or infinite logits; first non-finite output: "
                         f"{first_nonfinite_layer(model, x) or 'the model output'}; recalibrate, or keep that layer "
                         "in float with `keep_fp`")


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, x: torch.Tensor) -> str | None:
    """The name of the first module (in execution order) whose output holds NaN or inf on ``x``."""
    found: list[str] = []

    def hook(name):
        def fn(_module, _inputs, output):
            if not found and torch.is_tensor(output) and output.is_floating_point() \
                    and not bool(torch.isfinite(output).all()):
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def finite_logits(logits: torch.Tensor, what: str, model: nn.Module | None = None, images=None) -> None:
    """Refuse non-finite logits (a stage failure). With the torch ``model`` and the ImageSet ``images`` they came
    from, the error names the first layer whose output went non-finite on the first bad image."""
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return
    layer = None
    if model is not None and images is not None:
        index = int(bad.any(1).nonzero()[0])
        for i, (x, _) in enumerate(images.batches(1)):
            if i == index:
                layer = first_nonfinite_layer(model, x)
                break
    raise NonFiniteError(f"{what} produced {int(bad.sum())} NaN or infinite logit(s)"
                         + (f"; first non-finite output: {layer}" if layer else "")
                         + "; recalibrate or re-export it, or keep that layer in float with `keep_fp`")
