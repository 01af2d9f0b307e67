"""Attach fake quantizers to a timm ViT-family model instance, following a recipe.

Supported: ``VisionTransformer`` (with or without a CLS token), ``VisionTransformerDistilled`` (DeiT with a
distillation token) and ``SwinTransformer``. Quantized: every Linear (qkv, proj, fc1, fc2, head), the patch
embedding Conv, and both attention matmuls. LayerNorm, Softmax, GELU and residual adds stay float.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

from torch import nn

from maskaq_deploy.calib.errors import UnsupportedModelError
from maskaq_deploy.calib.families import SUPPORTED_FAMILIES, VIT, family_of
from maskaq_deploy.calib.qmodules import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention
from maskaq_deploy.calib.quantizers import ActQuantizer, WeightQuantizer
from maskaq_deploy.calib.recipes import Recipe


def _attention_classes():
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    return {Attention: QuantAttention, WindowAttention: QuantWindowAttention}


def check_supported(model: nn.Module) -> str:
    """Return the family name (calib.families) of a supported model or raise UnsupportedModelError."""
    family = family_of(model)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {type(model).__name__}; supported families: {SUPPORTED_FAMILIES}")
    if family == VIT and not any(isinstance(m, tuple(_attention_classes())) for m in model.modules()):
        raise UnsupportedModelError(f"{type(model).__name__} uses an attention layer this tool does not quantize; "
                                    f"supported: {SUPPORTED_FAMILIES}")
    return family


@dataclass
class QuantizedModelInfo:
    family: str
    recipe: Recipe
    quantized: list[str] = field(default_factory=list)  # module names with quantizers
    kept_fp: list[str] = field(default_factory=list)  # quantizable modules left float by keep_fp


def _kept(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def attach_quantizers(model: nn.Module, recipe: Recipe, keep_fp=()) -> QuantizedModelInfo:
    """Replace ``model``'s Linear / Conv2d / attention submodules by quantized ones, in place.

    Modules whose name matches a pattern in ``recipe.keep_fp`` or ``keep_fp`` keep their float computation
    (they are still replaced, with no quantizers, so the model's structure does not depend on the recipe's
    exclusions). Weight quantizers are initialized from the weights at once; activation quantizers need
    ``calibrate_observers``.
    """
    family = check_supported(model)
    patterns = tuple(recipe.keep_fp) + tuple(keep_fp)
    info = QuantizedModelInfo(family=family, recipe=recipe)
    attn_map = _attention_classes()

    def act():
        return ActQuantizer(recipe.a_bits, recipe.a_symmetric, recipe.a_observer,
                            recipe.number_format) if recipe.a_bits else None

    # Replace attention modules first (their qkv/proj children are then replaced like any Linear).
    for name, mod in list(model.named_modules()):
        for src_cls, dst_cls in attn_map.items():
            if type(mod) is src_cls:
                _set_submodule(model, name, dst_cls(mod))
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            _set_submodule(model, name, QuantLinear(mod))
        elif type(mod) is nn.Conv2d:
            _set_submodule(model, name, QuantConv2d(mod))

    for name, mod in model.named_modules():
        if not isinstance(mod, (QuantLinear, QuantConv2d, QuantMatMul)):
            continue
        if _kept(name, patterns) or (isinstance(mod, QuantMatMul) and not recipe.quantize_attention):
            info.kept_fp.append(name)
            continue
        if isinstance(mod, QuantMatMul):
            if recipe.a_bits is None:  # weight-only recipe: attention matmuls have no weights
                info.kept_fp.append(name)
                continue
            mod.a_quantizer, mod.b_quantizer = act(), act()
        else:
            mod.input_quantizer = act()
            gran = recipe.w_granularity if isinstance(mod, QuantLinear) else "channel"
            mod.weight_quantizer = WeightQuantizer(recipe.w_bits, gran, recipe.w_block_size, recipe.w_observer,
                                                   recipe.number_format)
            mod.weight_quantizer.init_from(mod.weight)
        info.quantized.append(name)
    return info


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def iter_quantizers(model: nn.Module):
    """Yield (name, quantizer) for every weight and activation quantizer of the model."""
    for name, mod in model.named_modules():
        if isinstance(mod, (ActQuantizer, WeightQuantizer)):
            yield name, mod


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    for _, q in iter_quantizers(model):
        q.enabled = enabled


@contextlib.contextmanager
def quantizers_enabled(model: nn.Module, enabled: bool):
    """Temporarily switch all quantizers on or off (off: the model computes its float function)."""
    saved = [(q, q.enabled) for _, q in iter_quantizers(model)]
    set_quantizers_enabled(model, enabled)
    try:
        yield model
    finally:
        for q, e in saved:
            q.enabled = e


def attention_modules(model: nn.Module):
    """The quantized attention modules in forward order (for capturing logits and outputs)."""
    return [m for m in model.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))]
