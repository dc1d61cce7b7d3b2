"""Ops backed by dgemma's CUDA kernels (``dgemma._C``); ops without a kernel yet use the reference."""

from __future__ import annotations

import functools

import torch

from .. import _ext
from ..quant import Fp8Rows, Fp8Weight, fuse_rows
from ..vocab_head import embedding_fp8
from . import cuda_attention, cuda_vocab_head
from .cuda_moe import ExpertRows, Fp8MoeOpsMixin, gated_mlp_fp8, linear_fp8, rms_norm_fp8, share_dense_mlp
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
    lib.rms_norm(x, weight, out, float(eps), _ext.current_stream(x.device))
    return out


def residual_norm(x, a, wa, eps, b=None, wb=None, wc=None, scalar=None) -> torch.Tensor:
    """One kernel for a layer's residual update (``_C.residual_norm``): ``x + rms_norm(a)·wa``, or with ``b``:
    ``(x + rms_norm(rms_norm(a)·wa + rms_norm(b)·wb)·wc)·scalar``; each step rounded to x's dtype as the
    reference's ops round it. All CUDA tensors of one dtype (float32 or bfloat16); x, a, b contiguous."""
    lib = _ext.require_cuda()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.residual_norm(x, a, b, wa, wb, wc, scalar, out, float(eps), _ext.current_stream(x.device))
    return out


def residual_norm_fp8(x, a, wa, eps, next_norm, b=None, wb=None, wc=None, scalar=None) -> tuple[torch.Tensor, Fp8Rows]:
    """:func:`residual_norm` (either form) and, from the same kernel, the FP8 input of the GEMM after the next norm:
    ``rms_norm(out)·next_norm`` quantised per row (bit-identical to :func:`rms_norm_fp8` of out). bf16 CUDA
    tensors, x, a and b contiguous."""
    lib = _ext.require_cuda()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    d = x.shape[-1]
    rows = x.numel() // d
    q = torch.empty(rows, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    lib.residual_norm(x, a, b, wa, wb, wc, scalar, out, float(eps), _ext.current_stream(x.device), next_norm, q,
                      scale)
    return out, Fp8Rows(q, scale, tuple(x.shape[:-1]))


@functools.lru_cache(maxsize=16)
def _rounded_scale(scale: float, dtype: torch.dtype) -> float:
    """The embedding scale as the reference applies it: rounded to the table's dtype first (sqrt(2816) is 53.0 in
    bf16); computed once, not on every step."""
    return float(torch.tensor(scale, dtype=torch.float32).to(dtype))


def embed_norm(ids, table, scale: float, add, eps: float, next_norm=None):
    """The decoder's input in one kernel (``_C.embed_norm``): ``rms_norm(table[ids]·scale [+ add])`` (weightless), each
    step rounded as the reference's embed, add and norm; with ``next_norm`` also the first layer's FP8 q/k/v input
    ``rms_norm(x)·next_norm`` quantised per row (as :func:`residual_norm_fp8`). bf16 CUDA table and add, integer ids."""
    lib = _ext.require_cuda()
    hidden = table.shape[1]
    out = torch.empty(*ids.shape, hidden, dtype=table.dtype, device=table.device)
    s = _rounded_scale(float(scale), table.dtype)
    ids64 = ids if ids.dtype == torch.int64 else ids.long()
    stream = _ext.current_stream(table.device)
    if next_norm is None:
        lib.embed_norm(ids64.contiguous(), table, s, add, out, float(eps), stream)
        return out
    rows = ids.numel()
    q = torch.empty(rows, hidden, dtype=torch.float8_e4m3fn, device=table.device)
    q_scale = torch.empty(rows, dtype=torch.float32, device=table.device)
    lib.embed_norm(ids64.contiguous(), table, s, add, out, float(eps), stream, next_norm, q, q_scale)
    return out, Fp8Rows(q, q_scale, tuple(ids.shape))


def _embed_norm_fits(ids, table, add) -> bool:
    return (table.is_cuda and table.dtype == torch.bfloat16 and ids.is_cuda and ids.numel() > 0
            and not ids.is_floating_point() and table.is_contiguous()
            and (add is None or (add.dtype == torch.bfloat16 and add.is_contiguous()
                                 and tuple(add.shape) == (*ids.shape, table.shape[1])))
            and "residual_norm" not in _ext.disabled_kernels())


def ffn_residual_experts(x, rows: ExpertRows, w_mlp, w_moe, w_ff, scalar, eps, next_norm=None):
    """The feed-forward residual (:func:`residual_norm`'s ffn form) with its two branches summed from the expert
    pipeline's rows (:class:`~dgemma.ops.cuda_moe.ExpertRows`: the dense MLP's shared slots and the routed slots) in
    the same kernel: no combine launch, the branches never stored. With ``next_norm`` also the next GEMM's FP8 input
    (as :func:`residual_norm_fp8`). bf16 CUDA tensors, x contiguous."""
    lib = _ext.require_cuda()
    rows.check()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    stream = _ext.current_stream(x.device)
    if next_norm is None:
        lib.ffn_residual_experts(x, rows.down, rows.row_of, rows.top_k, w_mlp, w_moe, w_ff, scalar, out, float(eps),
                                 stream)
        return out
    d = x.shape[-1]
    n = x.numel() // d
    q = torch.empty(n, d, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    lib.ffn_residual_experts(x, rows.down, rows.row_of, rows.top_k, w_mlp, w_moe, w_ff, scalar, out, float(eps),
                             stream, next_norm, q, scale)
    return out, Fp8Rows(q, scale, tuple(x.shape[:-1]))


@functools.lru_cache(maxsize=64)
def _experts_residual_supported(hidden: int) -> bool:
    """Whether the residual kernel sums the expert rows of this hidden size itself (asked of the extension)."""
    return _ext.require_cuda().ffn_residual_experts_unsupported(hidden) == ""


def _experts_residual_fits(x, rows, *weights) -> bool:
    return (isinstance(rows, ExpertRows) and x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous()
            and _experts_residual_supported(x.shape[-1])
            and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights)
            and "residual_norm" not in _ext.disabled_kernels())


def _branches(mlp, moe):
    """(mlp, moe) as tensors: the expert pipeline's rows summed where they come as :class:`ExpertRows`."""
    if isinstance(mlp, ExpertRows):
        return mlp.tensors()
    return mlp, moe


def _fits_residual(x, *others) -> bool:
    return (x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0 and x.is_contiguous()
            and all(t.dtype == x.dtype and t.is_contiguous() for t in others))


class ResidualOpsMixin:
    """The residual updates of a layer (:meth:`ReferenceOps.add_rms_norm`, :meth:`ReferenceOps.ffn_residual`)
    as one kernel each, where their inputs fit."""

    def embed_norm(self, ids, table, scale, add, eps):
        if _embed_norm_fits(ids, table, add):
            return embed_norm(ids, table, scale, add, eps)
        return super().embed_norm(ids, table, scale, add, eps)

    def add_rms_norm(self, x, y, weight, eps):
        if _fits_residual(x, y, weight) and y.shape == x.shape and "residual_norm" not in _ext.disabled_kernels():
            return residual_norm(x, y, weight, eps)
        return super().add_rms_norm(x, y, weight, eps)

    def residual_mlp(self, x, y, weight, eps, mlp_norm, gate, up, down):
        # One kernel writes the new residual and the MLP's FP8 input (its norm applied): the MLP then starts at
        # its first GEMM.
        if _fits_residual(x, y, weight) and y.shape == x.shape and x.dtype == torch.bfloat16 \
                and mlp_norm.dtype == torch.bfloat16 and all(isinstance(w, Fp8Weight) for w in (gate, up, down)) \
                and not {"residual_norm", "norm_quant", "fp8_dense"} & _ext.disabled_kernels():
            x, h = residual_norm_fp8(x, y, weight, eps, mlp_norm)
            return x, gated_mlp_fp8(h, gate, up, down)
        return super().residual_mlp(x, y, weight, eps, mlp_norm, gate, up, down)

    def ffn_residual(self, x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps):
        # mlp and moe may be the expert pipeline's rows (ExpertRows, from residual_ffn): summed in this kernel.
        if _experts_residual_fits(x, mlp, w_mlp, w_moe, w_ff, scalar):
            return ffn_residual_experts(x, mlp, w_mlp, w_moe, w_ff, scalar, eps)
        mlp, moe = _branches(mlp, moe)
        if _fits_residual(x, mlp, moe, w_mlp, w_moe, w_ff, scalar) and mlp.shape == x.shape == moe.shape \
                and "residual_norm" not in _ext.disabled_kernels():
            return residual_norm(x, mlp, w_mlp, eps, moe, w_moe, w_ff, scalar)
        return super().ffn_residual(x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps)


class AttentionOpsMixin:
    """Cache-aware attention on the dgemma kernels for bf16 CUDA tensors of a head dim they take."""

    @staticmethod
    def _attention_fits(q: torch.Tensor) -> bool:
        return q.is_cuda and q.dtype == torch.bfloat16 and head_dim_supported(q.shape[-1])

    def encoder_attention(self, q, k, v, cache, layer, start, valid, blocks=None):
        # NOTE: the kernel is causal only; a prompt with images attending to themselves whole runs the reference.
        if blocks is not None or not self._attention_fits(q):
            return super().encoder_attention(q, k, v, cache, layer, start, valid, blocks)
        spec = cache.config.layers[layer]
        ring = cache.ring_size(layer) if spec.is_sliding else 0
        return cuda_attention.encoder_attention(q, k, v, cache.keys[layer], cache.values[layer], start, ring,
                                                spec.window, valid=valid)

    def encoder_attention_view(self, q, k, v, cache, layer, prefix, valid):
        if not self._attention_fits(q):
            return super().encoder_attention_view(q, k, v, cache, layer, prefix, valid)
        spec = cache.config.layers[layer]
        ring = cache.ring_size(layer) if spec.is_sliding else 0
        return cuda_attention.encoder_attention(q, k, v, cache.keys[layer], cache.values[layer], prefix.lengths, ring,
                                                spec.window, valid=valid if cache.has_padding else None,
                                                max_prefix=prefix.bound)

    def decoder_attention(self, q, k, v, cache, layer, prefix=None):
        if not self._attention_fits(q):
            return super().decoder_attention(q, k, v, cache, layer, prefix)
        spec = cache.config.layers[layer]
        ring = cache.ring_size(layer) if spec.is_sliding else 0
        valid = cache.valid if cache.has_padding else None
        if prefix is None:
            return cuda_attention.decoder_attention(q, cache.keys[layer], cache.values[layer], k, v, cache.length,
                                                    ring, spec.window, valid=valid)
        # The lengths stay on the device; the split plan follows the bucket's bound.
        return cuda_attention.decoder_attention(q, cache.keys[layer], cache.values[layer], k, v, prefix.lengths,
                                                ring, spec.window, valid=valid, max_prefix=prefix.bound)


@functools.lru_cache(maxsize=64)
def head_dim_supported(head_dim: int) -> bool:
    """Whether the attention and qkv_prep kernels take ``head_dim`` (asked of the extension)."""
    return bool(_ext.require_cuda().attention_head_dim_supported(head_dim))


def fuse_qkv(w) -> Fp8Weight | None:
    """One FP8 weight [Wq; Wk; (Wv)] for attention weights ``w`` whose projections are all FP8 (None otherwise),
    so the three projections are one GEMM with one quantisation of the input. Built once and kept as
    ``w.qkv``; ``w``'s projections become row views of it (no second copy of the weights)."""
    if w.qkv is not None:
        return w.qkv
    fused = fuse_rows([w.q_proj, w.k_proj] + ([] if w.v_proj is None else [w.v_proj]))
    if fused is None:
        return None
    w.qkv, views = fused
    w.q_proj, w.k_proj = views[0], views[1]
    if w.v_proj is not None:
        w.v_proj = views[2]
    return w.qkv


def fuse_gate_up(owner, gate: str, up: str) -> None:
    """Stack ``owner``'s FP8 gate and up projections (attributes ``gate``, ``up``) into one weight and keep row
    views of it in their place, so the gated MLP's gate/up is one GEMM (``_C.fp8_gated_mlp`` sees the rows
    adjacent). Leaves non-FP8 weights as they are."""
    fused = fuse_rows([getattr(owner, gate), getattr(owner, up)])
    if fused is not None:
        setattr(owner, gate, fused[1][0])
        setattr(owner, up, fused[1][1])


class QkvOpsMixin:
    """The attention inputs in few launches where they fit (bf16 CUDA activations, a head dim the kernels take): the
    input norm writing the FP8 GEMM input (``rms_norm_fp8``), one FP8 GEMM for q, k and v together
    (:func:`fuse_qkv`) and the fused norms + RoPE kernel (``qkv_prep``)."""

    @staticmethod
    def _qkv_fits(h, w, head_dim, rope_dtype) -> bool:
        return (h.is_cuda and h.dtype == torch.bfloat16 and rope_dtype == torch.bfloat16
                and w.q_norm.dtype == torch.bfloat16 and head_dim_supported(head_dim)
                and not {"qkv_fusion", "fp8_dense"} & _ext.disabled_kernels())

    def _qkv_prep(self, proj, w, cos, sin, eps):
        nq, nk = w.q_proj.shape[0], w.k_proj.shape[0]
        q_proj, k_proj = proj[..., :nq], proj[..., nq:nq + nk]
        v_proj = None if w.v_proj is None else proj[..., nq + nk:]
        q, k, v = cuda_attention.qkv_prep(q_proj, k_proj, v_proj, w.q_norm, w.k_norm, cos, sin, eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def project_qkv(self, h, w, head_dim, cos, sin, eps):
        if isinstance(h, Fp8Rows):  # already normed and quantised (ffn_residual_qkv below)
            return self._qkv_prep(linear_fp8(h, fuse_qkv(w)), w, cos, sin, eps)
        if not self._qkv_fits(h, w, head_dim, cos.dtype):
            return super().project_qkv(h, w, head_dim, cos, sin, eps)
        fused = fuse_qkv(w)
        if fused is None:
            q_proj, k_proj = self.linear(h, w.q_proj), self.linear(h, w.k_proj)
            v_proj = None if w.v_proj is None else self.linear(h, w.v_proj)
            q, k, v = cuda_attention.qkv_prep(q_proj, k_proj, v_proj, w.q_norm, w.k_norm, cos, sin, eps)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return self._qkv_prep(linear_fp8(h, fused), w, cos, sin, eps)

    def embed_norm_qkv(self, ids, table, scale, add, eps, next_norm, next_attn, head_dim):
        # The decoder input kernel also writes the first layer's q/k/v GEMM input, as ffn_residual_qkv does for the
        # layers after it.
        if _embed_norm_fits(ids, table, add) and next_norm.dtype == torch.bfloat16 \
                and self._qkv_fits(table, next_attn, head_dim, table.dtype) and fuse_qkv(next_attn) is not None \
                and "norm_quant" not in _ext.disabled_kernels():
            return embed_norm(ids, table, scale, add, eps, next_norm)
        return super().embed_norm_qkv(ids, table, scale, add, eps, next_norm, next_attn, head_dim)

    def ffn_residual_qkv(self, x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps, next_norm, next_attn, head_dim):
        # The layer's last residual kernel also writes the next layer's q/k/v GEMM input (its input norm applied),
        # where that projection runs the fused FP8 path; it sums the expert pipeline's rows itself when it gets them.
        quantize = x.dtype == torch.bfloat16 and next_norm.dtype == torch.bfloat16 \
            and self._qkv_fits(x, next_attn, head_dim, x.dtype) and fuse_qkv(next_attn) is not None \
            and "norm_quant" not in _ext.disabled_kernels()
        if quantize and _experts_residual_fits(x, mlp, w_mlp, w_moe, w_ff, scalar, next_norm):
            return ffn_residual_experts(x, mlp, w_mlp, w_moe, w_ff, scalar, eps, next_norm)
        mlp, moe = _branches(mlp, moe)
        if quantize and _fits_residual(x, mlp, moe, w_mlp, w_moe, w_ff, scalar) and mlp.shape == x.shape == moe.shape \
                and "residual_norm" not in _ext.disabled_kernels():
            return residual_norm_fp8(x, mlp, w_mlp, eps, next_norm, moe, w_moe, w_ff, scalar)
        return super().ffn_residual_qkv(x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps, next_norm, next_attn, head_dim)

    def norm_project_qkv(self, x, norm, w, head_dim, cos, sin, eps):
        fused = fuse_qkv(w) if self._qkv_fits(x, w, head_dim, cos.dtype) else None
        if fused is None or norm.dtype != torch.bfloat16 or "norm_quant" in _ext.disabled_kernels():
            return super().norm_project_qkv(x, norm, w, head_dim, cos, sin, eps)
        return self._qkv_prep(linear_fp8(rms_norm_fp8(x, norm, eps), fused), w, cos, sin, eps)


class VocabHeadOpsMixin:
    """The fused vocabulary head as the sampler, where it applies: bf16 on the GPU, at sizes the kernel
    supports (asked of the extension)."""

    vocab_head_step = staticmethod(cuda_vocab_head.vocab_head_step)

    def fused_vocab_head(self, engine, settings) -> bool:
        cfg = engine.config
        if engine.device.type != "cuda" or engine.dtype != torch.bfloat16:
            return False
        return _ext.require_cuda().vocab_head_unsupported(1, cfg.canvas_length, cfg.vocab_size, cfg.hidden_size) == ""


class CudaOps(VocabHeadOpsMixin, QkvOpsMixin, AttentionOpsMixin, ResidualOpsMixin, Fp8MoeOpsMixin, ReferenceOps):
    """Reference ops with the CUDA kernels swapped in where their inputs fit (mixins first)."""

    name = "cuda"

    def __init__(self):
        _ext.require_cuda()

    def rows_batch_invariant(self, weights) -> bool:
        """The FP8 path's kernels compute each row whatever the others (no reduction across rows, tiles chosen so
        that a row's sums run in one order): a batched decoder pass gives each row its own pass's bits
        (test_engine_cuda.py::test_batched_decoder_rows_equal_each_row_alone_on_the_gpu). Other weights run torch's
        matmuls, whose rounding may depend on the row count."""
        return bool(weights.layers) and isinstance(weights.layers[0].attn.q_proj, Fp8Weight)

    def prepare_weights(self, weights) -> None:
        # Projections of one input stacked into one FP8 weight (one GEMM each): q/k/v; the dense MLP as shared
        # experts of the expert stacks where it can be (else its gate/up as one weight).
        share = not {"shared_experts", "fp8_dense", "fp8_moe", "moe_contiguous"} & _ext.disabled_kernels()
        for lw in weights.layers:
            fuse_qkv(lw.attn)
            if not (share and share_dense_mlp(lw)):
                fuse_gate_up(lw, "mlp_gate", "mlp_up")
        fuse_gate_up(weights, "sc_gate", "sc_up")
        # The FP8 self-conditioning table (DGEMMA_VOCAB_HEAD_SOFT=fp8), once: the fused head's P·E reads it.
        table = weights.embed
        if cuda_vocab_head.soft_precision() == "fp8" and table.is_cuda and table.dtype == torch.bfloat16:
            cuda_vocab_head.check_fp8_soft(table.shape[0], table.shape[1], table.device)
            weights.embed_fp8 = embedding_fp8(table)

    def rms_norm(self, x, weight, eps):
        if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and x.numel() > 0:
            return rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)
