"""Typed errors of the runtime backends."""


class BackendError(Exception):
    """A backend cannot run what was asked (bad artifact, bad input)."""


class BackendUnavailable(BackendError):
    """The backend's library, device or artifact is not usable here; the message says why and what is."""
