"""Ops backed by dgemma's CUDA kernels (``dgemma._C``); ops without a kernel yet use the reference."""

from __future__ import annotations

import torch

from .. import _ext
from . import cuda_attention, cuda_vocab_head
from .cuda_moe import Fp8MoeOpsMixin
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


class AttentionOpsMixin:
    """Cache-aware attention on the dgemma kernels for bf16 CUDA tensors of head_dim 256/512."""

    @staticmethod
    def _attention_fits(q: torch.Tensor) -> bool:
        return q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in (256, 512)

    def encoder_attention(self, q, k, v, cache, layer, start, valid, blocks=None):
        # NOTE: the kernel is causal only; a prompt with images attending to themselves whole runs the reference.
        if blocks is not None or not self._attention_fits(q):
            return super().encoder_attention(q, k, v, cache, layer, start, valid, blocks)
        spec = cache.config.layers[layer]
        ring = cache.ring_size(layer) if spec.is_sliding else 0
        return cuda_attention.encoder_attention(q, k, v, cache.keys[layer], cache.values[layer], start, ring,
                                                spec.window, valid=valid)

    def decoder_attention(self, q, k, v, cache, layer):
        if not self._attention_fits(q):
            return super().decoder_attention(q, k, v, cache, layer)
        spec = cache.config.layers[layer]
        ring = cache.ring_size(layer) if spec.is_sliding else 0
        return cuda_attention.decoder_attention(q, cache.keys[layer], cache.values[layer], k, v, cache.length, ring,
                                                spec.window, valid=cache.valid if cache.has_padding else None)


class VocabHeadOpsMixin:
    """The fused vocabulary head as the sampler, where it applies: bf16 on the GPU, at sizes the kernel
    supports (asked of the extension)."""

    vocab_head_step = staticmethod(cuda_vocab_head.vocab_head_step)

    def fused_vocab_head(self, engine, settings) -> bool:
        cfg = engine.config
        if engine.device.type != "cuda" or engine.dtype != torch.bfloat16:
            return False
        return _ext.require_cuda().vocab_head_unsupported(1, cfg.canvas_length, cfg.vocab_size, cfg.hidden_size) == ""


class CudaOps(VocabHeadOpsMixin, AttentionOpsMixin, Fp8MoeOpsMixin, ReferenceOps):
    """Reference ops with the CUDA kernels swapped in where their inputs fit (mixins first)."""

    name = "cuda"

    def __init__(self):
        _ext.require_cuda()

    def rms_norm(self, x, weight, eps):
        if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0:
            return rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)
