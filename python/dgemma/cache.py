"""The encoder's KV cache, preallocated at creation.

Full-attention layers hold every position up to a capacity fixed at creation. Sliding layers hold
only the last ``window - 1`` positions in a ring buffer (slot = position mod ring size): a causal
query sees ``window`` keys including itself, and the decoder's canvas sees those cached ``window - 1``
plus itself. ``valid`` marks, per sequence, which cached positions are real tokens (not padding).

A cache created with ``rollback=R`` keeps R extra ring slots, so that it can be truncated by up to
R tokens (a chat re-encodes its last answer as the template renders it) without losing any position
a sliding window still needs.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import DgemmaError


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str, rollback: int = 0):
        if batch <= 0:
            raise DgemmaError(f"cache batch size {batch} must be positive")
        if capacity <= 0:
            raise DgemmaError(f"cache capacity {capacity} must be positive")
        if capacity > cfg.max_position_embeddings:
            raise DgemmaError(f"cache capacity {capacity} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")
        if rollback < 0:
            raise DgemmaError(f"cache rollback {rollback} must be >= 0")
        self.config = cfg
        self.rollback = rollback
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.has_padding = False  # whether any cached position is padding (lets kernels skip ``valid``)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for spec in cfg.layers:
            slots = min(capacity, spec.window - 1 + rollback) if spec.is_sliding else capacity
            shape = (batch, spec.num_kv_heads, slots, spec.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, length={self.length}, capacity={self.capacity}, "
                f"dtype={self.dtype}, device={self.device}, {self.nbytes() / 2**20:.1f} MiB)")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def ring_size(self, layer: int) -> int:
        return self.keys[layer].shape[2]

    def cached_positions(self, layer: int, length: int | None = None) -> torch.Tensor:
        """Absolute positions held by ``layer`` when the cache holds ``length`` tokens, oldest first."""
        length = self.length if length is None else length
        spec = self.config.layers[layer]
        start = max(0, length - (spec.window - 1)) if spec.is_sliding else 0
        return torch.arange(start, length, device=self.device)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) currently cached for ``layer``, in position order."""
        pos = self.cached_positions(layer)
        if self.config.layers[layer].is_sliding:
            slots = pos % self.ring_size(layer)
            return self.keys[layer][:, :, slots], self.values[layer][:, :, slots], pos
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length], pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k/v [B, KVH, T, D] of positions ``start..start+T-1`` (only the tail a ring keeps)."""
        t = k.shape[2]
        if self.config.layers[layer].is_sliding:
            keep = min(t, self.ring_size(layer))
            pos = torch.arange(start + t - keep, start + t, device=self.device)
            slots = pos % self.ring_size(layer)
            self.keys[layer][:, :, slots] = k[:, :, t - keep:]
            self.values[layer][:, :, slots] = v[:, :, t - keep:]
        else:
            self.keys[layer][:, :, start:start + t] = k
            self.values[layer][:, :, start:start + t] = v

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise DgemmaError(
                f"cache capacity {self.capacity} exceeded: it holds {self.length} tokens and {new_tokens} more "
                f"were given; create a larger one with engine.new_cache(batch, capacity=...)"
            )

    def truncate(self, length: int) -> None:
        """Drop every position from ``length`` on (e.g. to re-encode a differently rendered turn)."""
        if not 0 <= length <= self.length:
            raise DgemmaError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.length - length > self.rollback and any(s.is_sliding for s in self.config.layers):
            raise DgemmaError(f"cannot roll back {self.length - length} tokens: this cache keeps "
                              f"{self.rollback} spare sliding-window slots (rollback=)")
        self.valid[:, length:] = False
        self.length = length
