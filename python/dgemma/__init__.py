"""dgemma: fast inference for DiffusionGemma, Google's block-diffusion Mixture-of-Experts model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The one place the version is written: pyproject.toml reads it from here (scikit-build-core's regex
# metadata provider), and CMake compiles the same string into dgemma._C.
__version__ = "0.1.0"

# The public names are imported on first use, so that ``import dgemma`` (and ``dgemma --help``) does not
# pay for torch and the compiled extension until something needs them.
_EXPORTS = {
    "BackendUnavailableError": "errors", "CacheFullError": "errors", "CheckpointError": "errors",
    "ConfigError": "errors", "DgemmaError": "errors", "Engine": "engine", "KVCache": "cache", "ModelConfig": "config",
    "NonFiniteError": "errors", "OutOfMemoryError": "errors", "TextEngine": "text", "load": "loading",
}

__all__ = ["BackendUnavailableError", "CacheFullError", "CheckpointError", "ConfigError", "DgemmaError", "Engine",
           "KVCache", "ModelConfig", "NonFiniteError", "OutOfMemoryError", "TextEngine", "__version__", "load"]

if TYPE_CHECKING:
    from .cache import KVCache
    from .config import ModelConfig
    from .engine import Engine
    from .errors import (BackendUnavailableError, CacheFullError, CheckpointError, ConfigError, DgemmaError,
                         NonFiniteError, OutOfMemoryError)
    from .loading import load
    from .text import TextEngine


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    # Submodules stay reachable as attributes (``dgemma.generation.StreamEvent`` after ``import dgemma``).
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
