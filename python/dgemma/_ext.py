"""Access to the compiled extension, with clear errors when a capability is missing."""

from __future__ import annotations

from types import ModuleType

from .errors import BackendUnavailableError

try:
    from . import _C
except ImportError as e:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""


def extension() -> ModuleType:
    if _C is None:
        raise BackendUnavailableError(
            f"dgemma's compiled extension is not available ({_IMPORT_ERROR}); reinstall with `pip install .`"
        )
    return _C


def cuda_status() -> str | None:
    """None when CUDA kernels can run here, else the reason they cannot."""
    if _C is None:
        return f"dgemma's compiled extension is not available ({_IMPORT_ERROR})"
    if not _C.built_with_cuda():
        return "dgemma was built without CUDA (no CUDA toolkit at build time); reinstall on a machine with nvcc"
    import torch

    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"dgemma's kernels are compiled for sm_90a (H100/H200); this GPU is sm_{major}{minor}"
    return None


def require_cuda() -> ModuleType:
    reason = cuda_status()
    if reason is not None:
        raise BackendUnavailableError(f"the CUDA backend is unavailable: {reason}")
    return _C
