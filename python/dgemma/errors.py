"""Exceptions raised by dgemma. All are ``ValueError`` subclasses: bad input, never a crash.

The promise: every bad input (an argument, a prompt, a chat template, a config, a checkpoint file) is
refused with a :class:`DgemmaError` subclass whose message names the bad value (the argument, config
key, file and tensor) and what was expected, never with another exception type, a crash or a hang.
After such an error the engine stays usable, and a KV cache passed to the failed call is exactly as
it was before the call (``encode``, ``generate``, ``generate_stream`` and ``ChatSession.send`` change
caches in a transaction that an exception, including one raised by a ``stream`` callback, rolls
back). Resources are bounded: config sizes, header sizes, denoising steps, rendered chat templates
(time and size) and cache allocations have limits, and exceeding one names the limit.
"""


class DgemmaError(ValueError):
    """Base class for errors about user input (arguments, checkpoints, configs)."""


class ConfigError(DgemmaError):
    """A ``config.json`` that is missing, malformed or describes an unsupported architecture."""


class CheckpointError(DgemmaError):
    """A checkpoint whose files or tensors are missing, corrupt or of the wrong shape or dtype."""


class BackendUnavailableError(DgemmaError):
    """A backend (e.g. ``"cuda"``) was requested that this build or machine cannot provide."""


class OutOfMemoryError(DgemmaError):
    """A batch, context or cache that does not fit the device's available memory (refused before allocating, with
    the numbers): the request is valid, the machine cannot hold it now (a server answers 503)."""


class NonFiniteError(DgemmaError):
    """The model produced NaN or infinite logits (corrupt weights or extreme inputs); the message names
    the row, position, block, step and, where it can be found, the first decoder layer at fault."""


class CacheFullError(DgemmaError):
    """A KV cache without room for the tokens a call would add: ``length`` held, ``new_tokens`` more, ``capacity``."""

    def __init__(self, message: str, *, length: int | None = None, new_tokens: int | None = None,
                 capacity: int | None = None):
        super().__init__(message)
        self.length, self.new_tokens, self.capacity = length, new_tokens, capacity
