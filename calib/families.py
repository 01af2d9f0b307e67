"""Model families: which timm architectures the toolchain quantizes, told apart in one place.

    family_of(model) -> "vit" | "deit_distilled" | "swin" | None

``vit``: ``VisionTransformer`` with or without a CLS token (ViT, DeiT); ``deit_distilled``:
``VisionTransformerDistilled`` (DeiT with a distillation token, whose logits average two heads); ``swin``:
``SwinTransformer`` (attention inside windows, no prefix tokens). The quantizer attachment and the data-free
calibration's token layout both read the family from here. Works on the float and on the quantized model (whose
attention classes are replaced, not its model class).
"""

from __future__ import annotations

from torch import nn

VIT, DEIT_DISTILLED, SWIN = "vit", "deit_distilled", "swin"
FAMILIES = (VIT, DEIT_DISTILLED, SWIN)
SUPPORTED_FAMILIES = "VisionTransformer (ViT, DeiT), VisionTransformerDistilled (DeiT distilled), SwinTransformer"


def family_of(model: nn.Module) -> str | None:
    """The family of ``model``, or None when it is none of the supported architectures."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformer):
        return SWIN
    if isinstance(model, VisionTransformer):
        # by class name, as timm names it: a subclass of the distilled model is treated as a plain ViT
        return DEIT_DISTILLED if type(model).__name__ == "VisionTransformerDistilled" else VIT
    return None
