"""Typed errors raised by the quantization core.

Every error carries a one-line message that names the problem and, where there is one, the fix, and its exit code
(see maskaq_deploy.errors, the root). Library code never prints or exits.
"""

from maskaq_deploy.errors import EXIT_USAGE, MaskAQDeployError


class QuantError(MaskAQDeployError):
    """Base class: something about the model or the recipe cannot be quantized as asked."""


class RecipeError(QuantError, ValueError):
    """A recipe is unknown or has an out-of-range field."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(QuantError, TypeError):
    """The model is not one this toolchain handles: not an nn.Module, not a ViT-family architecture the quantizer
    knows, or (for a QDQ export) a model without quantizers. The one class for it: the exporter raises it too."""

    exit_code = EXIT_USAGE


class CheckpointError(QuantError):
    """A quantized checkpoint directory is missing, incomplete, corrupt or does not fit the model."""
