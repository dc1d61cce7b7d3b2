"""Attention kernels on the GPU: decoder attention of the canvas over ``[cached prefix ; canvas]``,
causal encoder attention over ``[cached prefix ; new tokens]``, and the fused q/k/v preparation.

Layouts match :class:`dgemma.cache.KVCache`: ``cache_k``/``cache_v`` are ``[B, Hkv, slots, D]``; a
sliding layer's cache is a ring of ``ring_size`` slots (position p at slot ``p % ring_size``), a full
layer's stores position p at slot p (``ring_size=0``). Scale is 1 (q/k norms make it so), softmax is
fp32, K/V heads are grouped (query head h uses KV head ``h // (Hq // Hkv)``). head_dim 256 or 512.

Kernels (:data:`IMPLS`): ``"mma_sync"`` (mma.sync tiles, one query head per block), ``"wgmma"`` (Hopper warpgroup
MMAs, the query heads of a KV group packed into one block so they share each K/V tile) and ``"wgmma_deep"`` (the
same with a deeper key pipeline at head_dim 256, :data:`PACKED`). ``"auto"`` (the default) picks one per call from
the call's shape (:func:`kernel_for`); DGEMMA_ATTENTION or ``impl`` names a policy for every call that passes no
``impl``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..attention_plan import SplitPlan, plan_splits, visible_prefix

_NUM_SMS: dict[int, int] = {}

# The attention kernels (csrc/ops/attention.h kAttention*).
IMPLS = {"mma_sync": 0, "wgmma": 1, "wgmma_deep": 2}
# The kernels that pack a KV group's query heads into one block (csrc/ops/attention.h attention_is_wgmma). wgmma_deep:
# the wgmma kernel with 48-key tiles in three stages at head_dim 256 (each tile requested two tiles ahead; not yet
# measured, named explicitly only: auto never picks it); at head_dim 512 the wgmma kernel.
PACKED = ("wgmma", "wgmma_deep")
AUTO = "auto"
CHOICES = (AUTO, *IMPLS)
DEFAULT_IMPL = AUTO
# auto: the wgmma kernel for a full-attention (head_dim 512) decoder call from this many visible keys on.
WGMMA_MIN_FULL_KEYS = 4096


def attention_impl(impl: str | None = None) -> str:
    """The policy a call follows (``auto`` or a kernel of :data:`IMPLS`): ``impl``, or DGEMMA_ATTENTION (looked up at
    each call), or the default."""
    return _ext.implementation(impl, "DGEMMA_ATTENTION", CHOICES, DEFAULT_IMPL, "an attention implementation")


def kernel_for(policy: str, *, head_dim: int, causal: bool, batch: int, q_heads: int, kv_heads: int, queries: int,
               max_prefix: int, window: int | None, num_sms: int, wgmma_block_m: int) -> str:
    """The kernel of :data:`IMPLS` a call runs under ``policy`` (a kernel's name: that kernel).

    ``auto`` follows the kernels' timings on an H200 (bench/results/attention.json, attention_splits.json): the wgmma
    kernel for the encoder (causal; 1.5-1.6x at 4096 tokens, both head dims), for a head_dim-512 decoder call over at
    least WGMMA_MIN_FULL_KEYS keys (1.25x at 4,352 keys, 1.6x at 33,024), and for a head_dim-256 decoder call whose
    packed row tiles fill at least half the multiprocessors without splitting (1.7x at batch 4); otherwise the
    mma.sync kernel (1.3x faster on a batch-1 sliding layer, whose 32 packed tiles leave most multiprocessors idle;
    not slower on a batch-1 full layer over a 1,280-key prefix). ``wgmma_block_m``: the wgmma kernel's packed row
    tile at this head dim (``attention_tile_shape``). Every input is known on the host before launch (``max_prefix``
    is the prefix bucket's bound in a graph), so a captured step keeps its choice."""
    if policy != AUTO:
        return policy
    if causal:
        return "wgmma"
    if head_dim == 512:
        keys = visible_prefix(max_prefix, window) + queries
        return "wgmma" if keys >= WGMMA_MIN_FULL_KEYS else "mma_sync"
    group = q_heads // kv_heads if kv_heads > 0 and q_heads % kv_heads == 0 else 1
    tiles = batch * kv_heads * -(-group * queries // wgmma_block_m)
    return "wgmma" if 2 * tiles >= num_sms else "mma_sync"


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


# Split-KV arrival counters (int32, one per query tile of each sequence and head), one buffer per device: the kernel
# needs them zero and leaves them zero (the last split of a query tile resets its counter), so one buffer serves every
# call, graph replays included. NOTE: calls on one device must therefore be stream-ordered, as an engine's are (its
# steps, eager or replayed, run one after another on one stream). The buffer is made zero outside any graph capture
# (the eager warm-up of a step, which the graph stepper always runs first, creates it); a capture that would have to
# create or grow it fails instead (the stepper then runs that step eagerly), since a zero-fill recorded in one graph
# would not run before the other graphs' replays. A grown buffer's predecessor stays alive: a captured graph may
# still use it.
MIN_COUNTERS = 1 << 16
_COUNTERS: dict[int, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []


def _split_counters(device: torch.device, shape: tuple[int, int, int]) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = shape[0] * shape[1] * shape[2]
    buf = _COUNTERS.get(index)
    if buf is None or buf.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the split-KV attention needs {n} zeroed counters on cuda:{index}, which must be "
                               f"allocated before a CUDA graph capture (run the step once eagerly first)")
        if buf is not None:
            _RETIRED_COUNTERS.append(buf)
        with torch.inference_mode(False):  # usable in and outside inference mode (see cuda_moe._workspace)
            buf = _COUNTERS[index] = torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf[:n].view(shape)


def _prefix_tensor(prefix_lens: int | Sequence[int] | torch.Tensor, batch: int, device: torch.device,
                   max_prefix: int | None) -> tuple[torch.Tensor, int]:
    """int32 [B] device tensor of prefix lengths and an upper bound of them (a host sync only when a
    device tensor is given without ``max_prefix``)."""
    if isinstance(prefix_lens, torch.Tensor):
        lens = prefix_lens.to(device=device, dtype=torch.int32).contiguous()
        bound = int(lens.max()) if max_prefix is None else max_prefix
    else:
        if isinstance(prefix_lens, int):
            if prefix_lens < 0:
                raise ValueError(f"prefix length {prefix_lens} must be >= 0")
            # A fill kernel, not a host-to-device copy: keeps the call asynchronous.
            lens = torch.full((batch,), prefix_lens, dtype=torch.int32, device=device)
            return lens, prefix_lens if max_prefix is None else max_prefix
        values = [int(x) for x in prefix_lens]
        if len(values) != batch:
            raise ValueError(f"prefix_lens has {len(values)} entries, expected {batch} (the batch)")
        if min(values) < 0:
            raise ValueError(f"prefix lengths {values} must be >= 0")
        lens = torch.tensor(values, dtype=torch.int32, device=device)
        bound = max(values) if max_prefix is None else max_prefix
    return lens, bound


def _attention(q, cache_k, cache_v, tail_k, tail_v, prefix_lens, ring_size, window, *, causal, valid, out,
               max_prefix, num_splits, impl) -> torch.Tensor:
    lib = _ext.require_cuda()
    if q.dim() != 4 or cache_k.dim() != 4:
        raise ValueError(f"q has shape {list(q.shape)} and cache_k {list(cache_k.shape)}, expected [B, Hq, T, D] and "
                         f"[B, Hkv, slots, D]")
    b, hq, t, d = q.shape
    hkv = cache_k.shape[1]
    lens, bound = _prefix_tensor(prefix_lens, b, q.device, max_prefix)
    impl = kernel_for(attention_impl(impl), head_dim=d, causal=causal, batch=b, q_heads=hq, kv_heads=hkv, queries=t,
                      max_prefix=bound, window=window or None, num_sms=_num_sms(q.device),
                      wgmma_block_m=lib.attention_tile_shape(d, IMPLS["wgmma"])[0])
    block_m, block_n = lib.attention_tile_shape(d, IMPLS[impl])
    if num_splits is None and "split_kv" in _ext.disabled_kernels():
        num_splits = 1  # triage: no split-KV, so no in-kernel combine
    # The wgmma kernel's blocks take block_m of the group x T query rows of one KV head (packed head-minor).
    packed = impl in PACKED and hkv > 0 and hq % hkv == 0
    tile_heads, tile_rows = (hkv, hq // hkv * t) if packed else (hq, t)
    plan: SplitPlan = plan_splits(batch=b, q_heads=tile_heads, queries=tile_rows, max_prefix=bound,
                                  window=window or None, block_m=block_m, block_n=block_n,
                                  num_sms=_num_sms(q.device), causal=causal, num_splits=num_splits,
                                  key_queries=t)
    if out is None:
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    part_o = part_lse = counters = None
    stream = _ext.current_stream(q.device)
    shapes = plan.workspace_shapes(b, hq, t, d)
    if shapes is not None:
        part_o = torch.empty(shapes[0], dtype=torch.float32, device=q.device)
        part_lse = torch.empty(shapes[1], dtype=torch.float32, device=q.device)
        counters = _split_counters(q.device, (b, tile_heads, plan.query_tiles))
    if valid is not None and valid.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"valid has dtype {valid.dtype}, expected torch.bool")
    lib.attention_forward(q, cache_k, cache_v, tail_k, tail_v, lens, valid, out, part_o, part_lse, counters,
                          int(bound), int(ring_size), int(window or 0), bool(causal), bool(causal), plan.num_splits,
                          plan.split_tiles, stream, IMPLS[impl])
    return out


def decoder_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, canvas_k: torch.Tensor,
                      canvas_v: torch.Tensor, prefix_lens: int | Sequence[int] | torch.Tensor, ring_size: int,
                      window: int | None, *, valid: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      max_prefix: int | None = None, num_splits: int | None = None,
                      impl: str | None = None) -> torch.Tensor:
    """Bidirectional attention of the canvas over ``[visible cached prefix ; canvas]``.

    Args:
        q: ``[B, Hq, C, D]`` bf16 canvas queries (any strides with a contiguous last dim, e.g. the
            ``transpose(1, 2)`` view of a ``[B, C, Hq, D]`` projection).
        cache_k, cache_v: ``[B, Hkv, slots, D]`` bf16 layer cache, read in place.
        canvas_k, canvas_v: ``[B, Hkv, C, D]`` bf16: the canvas's own K/V (never written to the cache).
        prefix_lens: cached tokens per sequence (int, list or int32 tensor ``[B]``); sequences may differ.
        ring_size: ring slots of a sliding layer (``cache.ring_size(layer)``), 0 for a full layer.
        window: the sliding window (the last ``window - 1`` cached positions are visible), None or 0 for
            a full layer (the whole prefix).
        valid: optional bool ``[B, >= max prefix]`` (``cache.valid``): False positions are never attended.
        out: optional ``[B, C, Hq, D]`` bf16 output (contiguous last dim).
        max_prefix: an upper bound of ``prefix_lens`` (avoids a host sync for a device tensor; larger
            device values are clamped to it).
        num_splits: force the split-KV count (default: :func:`dgemma.attention_plan.plan_splits`).
        impl: ``"auto"`` (per call, :func:`kernel_for`) or a kernel of :data:`IMPLS` (default:
            :func:`attention_impl`); the kernels' outputs agree within the tests' bounds, not bit for bit.
    Returns:
        ``out`` ``[B, C, Hq, D]``.
    """
    return _attention(q, cache_k, cache_v, canvas_k, canvas_v, prefix_lens, ring_size, window, causal=False,
                      valid=valid, out=out, max_prefix=max_prefix, num_splits=num_splits, impl=impl)


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                      cache_v: torch.Tensor, start: int | Sequence[int] | torch.Tensor, ring_size: int,
                      window: int | None, *, valid: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      max_prefix: int | None = None, num_splits: int | None = None,
                      impl: str | None = None) -> torch.Tensor:
    """Causal attention of T new tokens (positions ``start..start+T-1``) over ``[cached ; new]``.

    A query at position p sees keys at positions ``<= p`` (and ``> p - window`` on sliding layers).
    The new tokens' K/V come from ``k``/``v`` ``[B, Hkv, T, D]``, not from the cache, so the cache may
    be written after this call (a ring write before it would overwrite positions still in the window).
    Arguments as in :func:`decoder_attention`; ``valid`` (bool ``[B, >= start + T]``) also covers the
    new tokens. Rows that see no key (left padding) are 0. Returns ``out`` ``[B, T, Hq, D]``.
    """
    return _attention(q, cache_k, cache_v, k, v, start, ring_size, window, causal=True, valid=valid, out=out,
                      max_prefix=max_prefix, num_splits=num_splits, impl=impl)


def qkv_prep(q_proj: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor | None, q_norm: torch.Tensor,
             k_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, *,
             cache_k: torch.Tensor | None = None, cache_v: torch.Tensor | None = None, start: int = 0,
             ring_size: int = 0, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention input preparation, one read of each projection row.

    ``q = rope(rms_norm(q_proj, q_norm))``, ``k = rope(rms_norm(k_proj, k_norm))``,
    ``v = rms_norm(v_proj or k_proj)`` (weightless; ``v_proj`` None: full layers, V from k_proj),
    rounded exactly like the reference ops (norm in fp32 rounded once; RoPE as three bf16 ops).

    Args:
        q_proj: ``[B, T, Hq * D]`` bf16 projection output (rows may be strided: a column slice of a
            fused QKV projection works).
        k_proj, v_proj: ``[B, T, Hkv * D]`` bf16.
        q_norm, k_norm: ``[D]`` bf16 norm weights.
        cos, sin: ``[B or 1, T, D]`` bf16 tables (:func:`dgemma.rope.cos_sin`).
        cache_k, cache_v: optional ``[B, Hkv, slots, D]`` cache to also receive k/v at positions
            ``start..start+T-1`` (ring caches, ``ring_size > 0``, keep only the last ``ring_size``).
            NOTE: on sliding layers do this only after the layer's attention read the prefix.
        out: optional ``(q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D])`` contiguous outputs.
    Returns:
        ``(q, k, v)`` as ``[B, T, heads, D]``; ``.transpose(1, 2)`` gives the attention layout.
    """
    lib = _ext.require_cuda()
    b, t, _ = q_proj.shape
    d = q_norm.shape[0]
    if out is None:
        hq, hkv = q_proj.shape[2] // d, k_proj.shape[2] // d
        out = (torch.empty(b, t, hq, d, dtype=q_proj.dtype, device=q_proj.device),
               torch.empty(b, t, hkv, d, dtype=q_proj.dtype, device=q_proj.device),
               torch.empty(b, t, hkv, d, dtype=q_proj.dtype, device=q_proj.device))
    lib.qkv_prep(q_proj, k_proj, v_proj, q_norm, k_norm, cos, sin, out[0], out[1], out[2], cache_k, cache_v,
                 int(start), int(ring_size), float(eps), _ext.current_stream(q_proj.device))
    return out
