"""dgemma: fast inference for DiffusionGemma, Google's block-diffusion Mixture-of-Experts model."""

from .cache import KVCache
from .config import ModelConfig
from .engine import Engine
from .errors import BackendUnavailableError, CheckpointError, ConfigError, DgemmaError
from .loading import load
from .text import TextEngine

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "CheckpointError", "ConfigError", "DgemmaError", "Engine", "KVCache",
           "ModelConfig", "TextEngine", "__version__", "load"]
