"""Exceptions raised by dgemma. All are ``ValueError`` subclasses: bad input, never a crash."""


class DgemmaError(ValueError):
    """Base class for errors about user input (arguments, checkpoints, configs)."""


class ConfigError(DgemmaError):
    """A ``config.json`` that is missing, malformed or describes an unsupported architecture."""


class CheckpointError(DgemmaError):
    """A checkpoint whose files or tensors are missing, corrupt or of the wrong shape or dtype."""


class BackendUnavailableError(DgemmaError):
    """A backend (e.g. ``"cuda"``) was requested that this build or machine cannot provide."""
