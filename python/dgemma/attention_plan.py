"""Host-side planning of the attention kernels: which cached positions a query sees, where they sit
in a ring-buffer cache, how many key tiles that makes, and how to split the keys across blocks.

Pure Python (no GPU): the CUDA wrappers (:mod:`dgemma.ops.cuda_attention`) call these with the tile
shape the compiled kernel reports (``_C.attention_tile_shape``), and the CPU tests check them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# Splitting the keys of a query tile costs a combine pass over fp32 partials; below this many key
# tiles per split that pass costs more than the parallelism gains.
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 64


def visible_prefix(prefix_len: int, window: int | None) -> int:
    """Cached positions a query attends to: all of them, or the last ``window - 1`` for a sliding layer."""
    if prefix_len < 0:
        raise ValueError(f"prefix length {prefix_len} must be >= 0")
    if not window:
        return prefix_len
    if window < 1:
        raise ValueError(f"window {window} must be >= 1")
    return min(prefix_len, window - 1)


def ring_slot_ranges(prefix_len: int, ring_size: int, window: int | None) -> list[tuple[int, int]]:
    """Slot ranges ``[start, stop)`` holding the visible prefix, in position order.

    ``ring_size`` 0 means position p is at slot p (full layers); otherwise slot = p % ring_size, and
    the visible prefix wraps around the ring at most once.
    """
    n = visible_prefix(prefix_len, window)
    first = prefix_len - n
    if n == 0:
        return []
    if ring_size == 0:
        return [(first, prefix_len)]
    if n > ring_size:
        raise ValueError(f"a ring of {ring_size} slots cannot hold {n} visible positions")
    start = first % ring_size
    if start + n <= ring_size:
        return [(start, start + n)]
    return [(start, ring_size), (0, start + n - ring_size)]


def key_tiles(num_keys: int, block_n: int) -> int:
    return -(-num_keys // block_n)


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Grid of one attention call: ``query_tiles`` x heads x (batch * ``num_splits``) blocks; split s
    covers key tiles ``[s * split_tiles, (s + 1) * split_tiles)``."""

    num_splits: int
    split_tiles: int
    key_tiles: int
    query_tiles: int

    def workspace_shapes(self, batch: int, q_heads: int, queries: int, head_dim: int
                         ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Shapes of the fp32 partial outputs and log-sum-exps, or None without splits."""
        if self.num_splits == 1:
            return None
        return (self.num_splits, batch, q_heads, queries, head_dim), (self.num_splits, batch, q_heads, queries)


def _wave_efficiency(blocks: int, num_sms: int) -> float:
    return blocks / (num_sms * math.ceil(blocks / num_sms))


@functools.lru_cache(maxsize=256)
def plan_splits(*, batch: int, q_heads: int, queries: int, max_prefix: int, window: int | None, block_m: int,
                block_n: int, num_sms: int, causal: bool = False, num_splits: int | None = None,
                key_queries: int | None = None) -> SplitPlan:
    """Choose how many blocks share the keys of one (sequence, head, query tile).

    The keys are ``visible_prefix(max_prefix) + key_queries`` (default ``queries``: the tail's own keys; a kernel
    that packs the query heads of a KV group passes the KV heads as ``q_heads``, the packed rows as ``queries`` and
    the tokens as ``key_queries``). Causal calls (the encoder) have many query
    tiles and short per-tile key ranges, so they never split. Otherwise the smallest split count whose
    last wave is at least 85% as full as the best choice wins, keeping >= MIN_TILES_PER_SPLIT key tiles
    per split. ``num_splits`` forces a count (tests); it is clamped to the key tiles.
    """
    key_queries = queries if key_queries is None else key_queries
    for name, v in (("batch", batch), ("q_heads", q_heads), ("queries", queries), ("block_m", block_m),
                    ("block_n", block_n), ("num_sms", num_sms), ("key_queries", key_queries)):
        if v <= 0:
            raise ValueError(f"{name} {v} must be positive")
    tiles = key_tiles(visible_prefix(max_prefix, window) + key_queries, block_n)
    q_tiles = -(-queries // block_m)
    if num_splits is not None:
        if num_splits <= 0:
            raise ValueError(f"num_splits {num_splits} must be positive")
        splits = min(num_splits, tiles)
    elif causal:
        splits = 1
    else:
        blocks = batch * q_heads * q_tiles
        limit = max(1, min(MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT))
        effs = {}
        for s in range(1, limit + 1):
            real = key_tiles(tiles, key_tiles(tiles, s))  # splits left after rounding tiles per split up
            effs[real] = _wave_efficiency(blocks * real, num_sms)
        best = max(effs.values())
        splits = min(s for s, e in effs.items() if e >= 0.85 * best)
    per = key_tiles(tiles, splits)
    return SplitPlan(num_splits=key_tiles(tiles, per), split_tiles=per, key_tiles=tiles, query_tiles=q_tiles)
