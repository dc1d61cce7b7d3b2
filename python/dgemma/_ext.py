"""Access to the compiled extension, with clear errors when a capability is missing."""

from __future__ import annotations

import functools
import os
from types import ModuleType

from .errors import BackendUnavailableError, DgemmaError

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


_cuda_ready = False  # set once cuda_status() has said yes: it cannot change within a process


def require_cuda() -> ModuleType:
    """The extension, when its CUDA kernels can run here (checked once: every kernel call passes here)."""
    global _cuda_ready
    if _cuda_ready:
        return _C
    reason = cuda_status()
    if reason is not None:
        raise BackendUnavailableError(f"the CUDA backend is unavailable: {reason}")
    _cuda_ready = True
    return _C


def current_stream(device) -> int:
    """The raw handle of the current CUDA stream of ``device`` (a torch.device), as the kernels take it.

    NOTE: every kernel call needs it; torch's own accessor avoids building a torch.cuda.Stream object each
    time (a few microseconds per launch)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(index).cuda_stream


def implementation(impl: str | None, env: str, choices, default: str, what: str) -> str:
    """``impl``, or the environment variable ``env`` (looked up at each call), or ``default``; checked against
    ``choices`` (an error names the bad value, where it came from, and the choices)."""
    name = impl if impl is not None else os.environ.get(env, "") or default
    if name not in choices:
        where = "impl" if impl is not None else env
        raise DgemmaError(f"{where} = {name!r:.80} is not {what}; expected one of {', '.join(choices)}")
    return name


# Fused paths that can be switched off for triage on a GPU, e.g. DGEMMA_DISABLE_KERNELS=qkv_fusion,residual_norm:
# the ops then run the reference chain of ops (still on the GPU), the commit pass the plain encoder.
DISABLE_CHOICES = ("qkv_fusion", "residual_norm", "view_commit", "norm_quant", "moe_contiguous", "fp8_dense",
                   "fp8_moe", "shared_experts", "split_kv")


def disabled_kernels() -> frozenset[str]:
    """The fused paths DGEMMA_DISABLE_KERNELS switches off (the variable is looked up at each call, so a test
    may set it; its parse is remembered)."""
    return _parse_disabled(os.environ.get("DGEMMA_DISABLE_KERNELS", ""))


@functools.lru_cache(maxsize=8)
def _parse_disabled(raw: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = names - set(DISABLE_CHOICES)
    if unknown:
        raise DgemmaError(f"DGEMMA_DISABLE_KERNELS names {', '.join(sorted(unknown))}; expected some of "
                          f"{', '.join(DISABLE_CHOICES)}")
    return names
