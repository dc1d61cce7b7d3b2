"""The encoder's KV cache, preallocated at creation.

Full-attention layers hold every position up to a capacity fixed at creation. Sliding layers hold
only the last ``window - 1`` positions in a ring buffer (slot = position mod ring size): a causal
query sees ``window`` keys including itself, and the decoder's canvas sees those cached ``window - 1``
plus itself. ``valid`` marks, per sequence, which cached positions are real tokens (not padding).

A cache created with ``rollback=R`` keeps R extra ring slots, so that it can be truncated by up to
R tokens (a chat re-encodes its last answer as the template renders it) without losing any position
a sliding window still needs.

Changes made inside :meth:`KVCache.transaction` are undone when it exits with an exception: the K/V
slots a write overwrites are saved on their first overwrite (only those), and the length, validity
and padding flag are restored, so a failed or interrupted ``generate`` leaves the cache exactly as it
was. One transaction is open at a time; another (a second thread, or a second generation while a
``generate_stream`` over the same cache is suspended) is refused with a :class:`DgemmaError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import CacheFullError, DgemmaError, OutOfMemoryError


# Prefix lengths up to this many tokens share one bucket; above it a bucket spans a quarter of the power of
# two below the length, so a bound overshoots its lengths by at most ~25 %.
MIN_PREFIX_BUCKET = 1024


def prefix_bucket(length: int, capacity: int) -> int:
    """The upper bound a decoder pass over ``length`` cached tokens is planned for: the smallest bucket
    boundary >= ``length`` (1024, 2048, 3072, 4096, 5120, ..., 8192, 10240, ...), at most ``capacity``.
    Every length of a bucket runs the same kernels with the same launch arguments (one CUDA graph)."""
    if length <= MIN_PREFIX_BUCKET:
        return min(MIN_PREFIX_BUCKET, capacity)
    step = max(MIN_PREFIX_BUCKET, 1 << (length.bit_length() - 3))
    return min(-(-length // step) * step, capacity)


@dataclass(frozen=True, slots=True)
class PrefixView:
    """What a decoder pass reads of a cache, with the lengths on the device: row b sees its first
    ``lengths[b]`` cached positions (the last ``window - 1`` of them on sliding layers) and its canvas sits
    at positions ``lengths[b] .. lengths[b] + C - 1``. ``bound`` >= every length is the host-side size the
    pass is planned for, so a pass reads no length on the host and rows may differ."""

    lengths: torch.Tensor  # int32 [B] on the cache's device
    bound: int


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (a CUDA device without an index is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str, rollback: int = 0):
        for name, value in (("batch size", batch), ("capacity", capacity), ("rollback", rollback)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DgemmaError(f"cache {name} {value!r:.40} must be an integer")
        if batch <= 0:
            raise DgemmaError(f"cache batch size {batch} must be positive")
        if capacity <= 0:
            raise DgemmaError(f"cache capacity {capacity} must be positive")
        if capacity > cfg.max_position_embeddings:
            raise DgemmaError(f"cache capacity {capacity} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")
        if rollback < 0:
            raise DgemmaError(f"cache rollback {rollback} must be >= 0")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DgemmaError(f"cache dtype {dtype!r:.40} is not valid: expected a floating torch.dtype (the "
                              f"engine's, e.g. torch.float32 or torch.bfloat16)")
        self.config = cfg
        self.rollback = rollback
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        self.device = _cache_device(device)
        self._length = 0
        self._high_water = 0  # the furthest position ever written (exclusive): see truncate
        self.has_padding = False  # whether any cached position is padding (lets kernels skip ``valid``)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._undo: _Undo | None = None
        self._lock = threading.Lock()
        shapes = []
        for spec in cfg.layers:
            slots = min(capacity, spec.window - 1 + rollback) if spec.is_sliding else capacity
            shapes.append((batch, spec.num_kv_heads, slots, spec.head_dim))
        itemsize = torch.empty((), dtype=dtype).element_size()
        need = 2 * itemsize * sum(b * h * s * d for b, h, s, d in shapes) + batch * capacity
        _check_allocation(need, self.device, f"a KV cache for batch {batch} and capacity {capacity}")
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        for shape in shapes:
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, length={self.length}, capacity={self.capacity}, "
                f"dtype={self.dtype}, device={self.device}, {self.nbytes() / 2**20:.1f} MiB)")

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        # NOTE: every growth (encode, a commit pass, ...) sets the length; the high-water mark remembers how far
        # the sliding rings were written, which a later truncation cannot undo.
        self._length = value
        if value > self._high_water:
            self._high_water = value

    @property
    def high_water(self) -> int:
        """The furthest length this cache ever held (undone transactions aside): each sliding ring holds the last
        ``ring_size`` positions before it (see :attr:`min_length`)."""
        return self._high_water

    @property
    def min_length(self) -> int:
        """The shortest length other than 0 that :meth:`truncate` accepts now: a sliding layer at length L reads
        positions L - (window - 1) .. L - 1, and its ring of ``ring_size`` slots holds the positions from
        ``high_water - ring_size`` on once it has wrapped (``high_water - rollback`` for a ring of window - 1 +
        rollback slots); a ring that never wrapped holds everything. 0 without sliding layers."""
        need = 0
        for i, spec in enumerate(self.config.layers):
            ring = self.ring_size(i)
            if spec.is_sliding and self._high_water > ring:
                need = max(need, self._high_water - ring + spec.window - 1)
        return need

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

    def prefix_view(self, lengths: torch.Tensor | None = None) -> PrefixView:
        """A :class:`PrefixView` of the current length, bound to its :func:`prefix_bucket`; ``lengths``
        (int32 [B] on the device, e.g. a CUDA graph's static input) is filled rather than allocated."""
        if lengths is None:
            lengths = torch.full((self.batch,), self.length, dtype=torch.int32, device=self.device)
        else:
            lengths.fill_(self.length)
        return PrefixView(lengths, prefix_bucket(self.length, self.capacity))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k/v [B, KVH, T, D] of positions ``start..start+T-1`` (only the tail a ring keeps)."""
        t = k.shape[2]
        if self._undo is not None:
            self._undo.save(layer, start, t)
        if self.config.layers[layer].is_sliding:
            keep = min(t, self.ring_size(layer))
            pos = torch.arange(start + t - keep, start + t, device=self.device)
            slots = pos % self.ring_size(layer)
            self.keys[layer][:, :, slots] = k[:, :, t - keep:]
            self.values[layer][:, :, slots] = v[:, :, t - keep:]
        else:
            self.keys[layer][:, :, start:start + t] = k
            self.values[layer][:, :, start:start + t] = v

    def scatter(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store k/v [B, KVH, T, D] at per-row positions [B, T] (a device tensor: no host read), slot =
        position % ring on sliding layers. The caller made sure each ring holds T positions and saved what a
        transaction needs (:meth:`save_for_undo`); ``length`` is not changed here."""
        slots = positions % self.ring_size(layer) if self.config.layers[layer].is_sliding else positions
        index = slots[:, None, :, None].expand(k.shape)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)

    def save_for_undo(self, start: int, t: int) -> None:
        """Before a device-side write of positions ``start..start+t-1`` (:meth:`scatter`): keep, in an open
        transaction, what the write will overwrite on every layer (as :meth:`write` does for itself)."""
        if self._undo is not None:
            for layer in range(len(self.keys)):
                self._undo.save(layer, start, t)

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise CacheFullError(
                f"cache capacity {self.capacity} exceeded: it holds {self.length} tokens and {new_tokens} more "
                f"were given; create a larger one with engine.new_cache(batch, capacity=...)",
                length=self.length, new_tokens=new_tokens, capacity=self.capacity)

    def truncate(self, length: int) -> None:
        """Drop every position from ``length`` on (e.g. to re-encode a differently rendered turn)."""
        self.check_free()
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise DgemmaError(f"cannot truncate a cache of {self.length} tokens to {length!r:.40}")
        if 0 < length < self.min_length:
            # The rings were written up to the high-water mark: truncating twice (or truncating, encoding less,
            # truncating again) must not go back further in total than the spare slots cover.
            raise DgemmaError(f"cannot roll back a cache of {self.length} tokens to {length}: it has held up to "
                              f"{self._high_water} tokens (its high-water mark) and keeps {self.rollback} spare "
                              f"sliding-window slots (rollback={self.rollback}), so it can be truncated to "
                              f"{self.min_length} at the shortest; create the cache with a larger rollback= or "
                              f"encode the tokens again into a new one")
        with torch.inference_mode():  # a cache that encode() made holds inference tensors
            self.valid[:, length:] = False
        self.length = length
        if length == 0:  # nothing held: every position is written again before it is read
            self._high_water = 0

    @contextlib.contextmanager
    def transaction(self):
        """Undo every change made to the cache inside the block if it exits with an exception
        (including ``GeneratorExit`` when a suspended ``generate_stream`` is closed).

        Nested use in the thread that opened it joins the open transaction. A transaction from another
        thread, or while the open one is suspended (see :meth:`suspended`), raises :class:`DgemmaError`.
        """
        me = threading.get_ident()
        undo = self._undo
        if undo is not None:
            if undo.thread == me and not undo.paused:
                yield undo
                return
            raise DgemmaError(self._busy_message(undo, me))
        if not self._lock.acquire(blocking=False):
            raise DgemmaError("this KV cache is being changed by another thread: a cache holds one conversation and "
                              "serves one generation at a time")
        try:
            undo = self._undo = _Undo(self, me)
            try:
                yield undo
            except BaseException:
                undo.restore()
                raise
        finally:
            self._undo = None
            self._lock.release()

    @staticmethod
    def _busy_message(undo: "_Undo", thread: int) -> str:
        if undo.thread != thread:
            return ("this KV cache is in use by another thread: a cache holds one conversation and serves one "
                    "generation at a time")
        return ("this KV cache belongs to a generation that has not finished (a generate_stream not consumed to its "
                "end or closed, or a generate whose stream callback is running): finish it before using the cache "
                "again")

    def check_free(self) -> None:
        """Refuse to use a cache that an open transaction of another caller holds."""
        undo = self._undo
        me = threading.get_ident()
        if undo is not None and (undo.paused or undo.thread != me):
            raise DgemmaError(self._busy_message(undo, me))


class _Undo:
    """What a transaction needs to put a cache back: the scalars at its start and, per layer, the old
    contents of each slot the first time it is overwritten."""

    def __init__(self, cache: KVCache, thread: int):
        self.cache, self.thread, self.paused = cache, thread, False
        self.length, self.has_padding = cache.length, cache.has_padding
        self.high_water = cache.high_water
        self.valid = cache.valid.clone()
        self.saved: dict[int, set[int]] = {}
        self.old: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @contextlib.contextmanager
    def suspended(self):
        """Mark the transaction as paused (its generator is suspended at a yield) inside the block."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def save(self, layer: int, start: int, t: int) -> None:
        """Keep the old contents of the slots that writing positions ``start..start+t-1`` overwrites."""
        c = self.cache
        spec = c.config.layers[layer]
        if spec.is_sliding:
            ring = c.ring_size(layer)
            keep = min(t, ring)
            slots = {p % ring for p in range(start + t - keep, start + t)}
        else:
            # Positions at or past the length at the start held nothing the cache promised.
            slots = set(range(start, min(start + t, self.length)))
        done = self.saved.setdefault(layer, set())
        slots -= done
        if not slots:
            return
        done |= slots
        idx = torch.tensor(sorted(slots), device=c.device)
        self.old.append((layer, idx, c.keys[layer].index_select(2, idx), c.values[layer].index_select(2, idx)))

    def restore(self) -> None:
        c = self.cache
        for layer, idx, k, v in reversed(self.old):
            c.keys[layer].index_copy_(2, idx, k)
            c.values[layer].index_copy_(2, idx, v)
        c.valid.copy_(self.valid)
        c.length, c.has_padding = self.length, self.has_padding
        # Every slot written in the transaction is put back, so the rings hold what they held at its start.
        c._high_water = self.high_water
        self.old.clear()


def _cache_device(device) -> torch.device:
    """``device`` as a torch.device a cache can live on (the CPU or a visible CUDA device)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DgemmaError(f"cache device {device!r:.40} is not a valid torch device: expected 'cpu' or "
                          f"'cuda[:N]' (the engine's device)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DgemmaError(f"cache device {device!r:.40}: torch reports no usable CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DgemmaError(f"cache device {device!r:.40} out of range: {torch.cuda.device_count()} CUDA "
                              f"device(s) visible")
    elif dev.type != "cpu":
        raise DgemmaError(f"cache device {device!r:.40} is not supported: expected 'cpu' or 'cuda[:N]' (the "
                          f"engine's device)")
    return dev


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take on ``device`` (None when unknown)."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # noqa: BLE001 - no usable CUDA context: let the allocation itself report
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_allocation(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse (with the numbers) an allocation larger than the memory ``device`` has available, rather
    than let it page the machine to a halt or be killed."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise OutOfMemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {free / 2**30:.2f} GiB "
                               f"available on {device}; use a smaller batch or capacity")
