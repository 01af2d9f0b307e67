"""Quantized ViT core: quantizers, observers, quantized modules for timm ViT-family models, calibration
methods (real images, MaskAQ, PSAQ-ViT, Gaussian noise) and the quantized-checkpoint artifact."""

from maskaq_deploy.calib.errors import CheckpointError, QuantError, RecipeError, UnsupportedModelError
from maskaq_deploy.calib.recipes import RECIPES, Recipe, get_recipe, load_recipe_toml
from maskaq_deploy.calib.quantize import (
    QuantizedModelInfo,
    attach_quantizers,
    iter_quantizers,
    quantizers_enabled,
    set_quantizers_enabled,
)
from maskaq_deploy.calib.calibrate import calibrate_observers
from maskaq_deploy.calib.checkpoint import load_quantized_checkpoint, save_quantized_checkpoint

__all__ = [
    "CheckpointError",
    "QuantError",
    "RecipeError",
    "UnsupportedModelError",
    "RECIPES",
    "Recipe",
    "get_recipe",
    "load_recipe_toml",
    "QuantizedModelInfo",
    "attach_quantizers",
    "iter_quantizers",
    "quantizers_enabled",
    "set_quantizers_enabled",
    "calibrate_observers",
    "load_quantized_checkpoint",
    "save_quantized_checkpoint",
]
