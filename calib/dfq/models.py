"""The two models of data-free calibration, their token layout, and attention capture.

* P (teacher): the full-precision function. Built as a private copy of Q's structure with quantizers
  disabled and the float weights of ``fp_model``, so P and Q capture attention the same way; its parameters
  are frozen (``requires_grad=False``) and it never receives gradients.
* Q (student): the model with quantizers, calibrated and possibly fine-tuned in place.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from maskaq_deploy.calib.errors import UnsupportedModelError
from maskaq_deploy.calib.families import SWIN, family_of
from maskaq_deploy.calib.quantize import attention_modules, set_quantizers_enabled


@dataclass(frozen=True)
class TokenLayout:
    """How a model's attention tokens map to image patches (derived from the model, never assumed).

    ViT / DeiT: ``num_prefix`` leading tokens (CLS, distillation, registers) then ``num_patches`` patch
    tokens; ``has_cls`` says whether token 0 is a class token whose attention row scores the patches.
    Swin: attention runs inside windows; there are no prefix tokens and every token is a patch (``windowed``).
    """

    family: str
    num_prefix: int
    has_cls: bool
    num_patches: int
    grid: tuple[int, int] | None
    windowed: bool


def token_layout(model: nn.Module) -> TokenLayout:
    family = family_of(model)  # the float or the quantized model: the model class is the same
    if family == SWIN:
        return TokenLayout(SWIN, 0, False, 0, None, True)
    if family is None:
        raise UnsupportedModelError(f"data-free calibration supports timm ViT / DeiT / Swin models, "
                                    f"not {type(model).__name__}")
    pe = getattr(model, "patch_embed", None)
    grid = tuple(int(g) for g in pe.grid_size) if pe is not None and getattr(pe, "grid_size", None) else None
    num_patches = int(pe.num_patches) if pe is not None else 0
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    has_cls = getattr(model, "cls_token", None) is not None
    return TokenLayout(family, num_prefix, has_cls, num_patches, grid, False)


def make_teacher(fp_model: nn.Module, q_model: nn.Module) -> nn.Module:
    """P: a copy of ``q_model``'s structure computing the float function with ``fp_model``'s weights, frozen.

    ``fp_model`` may be the plain timm model or one with (disabled or enabled) quantizers; only its float
    tensors (timm state-dict names) are used, so it is never modified and shares no storage with P.
    """
    if not attention_modules(q_model):
        raise UnsupportedModelError("the quantized model has no quantized attention modules; "
                                    "attach quantizers with calib.attach_quantizers first")
    teacher = copy.deepcopy(q_model)
    set_quantizers_enabled(teacher, False)
    fp_state = {k: v for k, v in fp_model.state_dict().items() if "_quantizer." not in k}
    missing, unexpected = teacher.load_state_dict(fp_state, strict=False)
    missing = [k for k in missing if "_quantizer." not in k]
    if missing or unexpected:
        raise UnsupportedModelError(f"the float model does not match the quantized model: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}; build both from the same timm model")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


@contextlib.contextmanager
def frozen(model: nn.Module):
    """No parameter of ``model`` requires grad inside (gradients still flow to the inputs); restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in saved:
            p.requires_grad_(r)


class Capture:
    """Turns attention capture on for a model; ``logits()`` / ``outputs()`` return the last forward's tensors
    in layer order, ``clear()`` drops them (they hold autograd graphs)."""

    def __init__(self, model: nn.Module):
        self.mods = attention_modules(model)

    def __enter__(self):
        for m in self.mods:
            m.capture = True
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.capture = False
        self.clear()

    def logits(self) -> list[torch.Tensor]:
        return [m.captured_logits for m in self.mods]

    def outputs(self) -> list[torch.Tensor]:
        return [m.captured_output for m in self.mods]

    def clear(self) -> None:
        for m in self.mods:
            m.captured_logits = None
            m.captured_output = None


def group_by_shape(tensors: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Stack consecutive equal-shaped tensors: [(count, stacked [count, ...])]. A ViT gives one group of all
    layers (so a loss is one batched op); a Swin gives one group per stage."""
    groups: list[list[torch.Tensor]] = []
    for t in tensors:
        if groups and groups[-1][0].shape == t.shape:
            groups[-1].append(t)
        else:
            groups.append([t])
    return [(len(g), torch.stack(g)) for g in groups]
