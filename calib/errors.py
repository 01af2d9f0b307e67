"""Typed errors raised by the quantization core.

Every error carries a one-line message that names the problem and, where there is one, the fix. The CLI turns
them into exit codes; library code never prints or exits.
"""


class QuantError(Exception):
    """Base class: something about the model or the recipe cannot be quantized as asked."""


class RecipeError(QuantError, ValueError):
    """A recipe is unknown or has an out-of-range field."""


class UnsupportedModelError(QuantError, TypeError):
    """The model is not a ViT-family architecture the quantizer knows."""


class CheckpointError(QuantError):
    """A quantized checkpoint directory is missing, incomplete, corrupt or does not fit the model."""
