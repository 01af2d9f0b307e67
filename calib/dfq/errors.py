"""Typed errors of data-free calibration (all are ``calib.errors.QuantError``s with one-line messages)."""

from maskaq_deploy.calib.errors import QuantError
from maskaq_deploy.errors import EXIT_USAGE


class DFQConfigError(QuantError, ValueError):
    """A data-free calibration config, preset or method argument is invalid."""

    exit_code = EXIT_USAGE


class ResumeError(QuantError):
    """A run directory cannot be resumed (different config or model, or unreadable state)."""

    exit_code = EXIT_USAGE


class SynthesisError(QuantError, RuntimeError):
    """Image synthesis diverged (non-finite pixels) even after retrying with fresh seeds."""
