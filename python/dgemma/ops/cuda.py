"""Ops backed by dgemma's CUDA kernels (``dgemma._C``); ops without a kernel yet use the reference."""

from __future__ import annotations

import torch

from .. import _ext
from .reference import ReferenceOps


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """RMSNorm over the last dimension on the GPU: ``x * (mean(x^2) + eps)^-1/2 [* weight]``.

    Args:
        x: CUDA tensor, float32 or bfloat16, last dimension contiguous, rows evenly strided.
        weight: ``[x.shape[-1]]`` of x's dtype, or None for the weightless variant.
        eps: added to the mean square; must be positive.
        out: optional output of x's shape and dtype (may alias x).
    Returns:
        ``out`` (allocated when not given), computed in fp32 and rounded once to x's dtype.
    """
    lib = _ext.require_cuda()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.rms_norm(x, weight, out, float(eps), torch.cuda.current_stream(x.device).cuda_stream)
    return out


class CudaOps(ReferenceOps):
    name = "cuda"

    def __init__(self):
        _ext.require_cuda()

    def rms_norm(self, x, weight, eps):
        if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0:
            return rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)
