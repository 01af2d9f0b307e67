"""Typed errors of the runtime backends (under the project's root, maskaq_deploy.errors)."""

from maskaq_deploy.errors import MaskAQDeployError


class BackendError(MaskAQDeployError):
    """A backend cannot run what was asked (bad artifact, bad input)."""


class BackendUnavailable(BackendError):
    """The backend's library, device or artifact is not usable here; the message says why and what is."""
