"""The user-facing engine: ``dgemma.load`` and the low-level ``encode`` / ``denoise`` API."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _ext
from .cache import KVCache
from .checkpoint import checkpoint_dtype, load_tensors
from .config import ModelConfig
from .errors import BackendUnavailableError, CheckpointError, DgemmaError
from .model import DiffusionGemmaModel
from .ops import BACKENDS, get_ops
from .weights import ModelWeights

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# Room a fresh cache leaves beyond the prompt, in canvases (committed blocks append to it).
DEFAULT_CACHE_CANVASES = 8


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DgemmaError(f"device {device!r} is not a valid torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} requested but torch reports no usable CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DgemmaError(f"device {device!r} out of range: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise DgemmaError(f"device {device!r} is not supported (expected 'cpu' or 'cuda[:N]')")
    return dev


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "cuda" if device.type == "cuda" and _ext.cuda_status() is None else "reference"
    if backend not in BACKENDS:
        raise DgemmaError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "cuda":
        reason = _ext.cuda_status()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cuda' is unavailable: {reason}")
        if device.type != "cuda":
            raise DgemmaError(f"backend 'cuda' needs device='cuda', got device={str(device)!r}")
    return backend


def load(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None, backend: str | None = None,
         progress: bool | None = None) -> "Engine":
    """Load a DiffusionGemma checkpoint (Hugging Face layout) into an :class:`Engine`.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``.
        device: ``"cpu"`` (default) or ``"cuda[:N]"``.
        dtype: ``torch.float32`` or ``torch.bfloat16``; default: the checkpoint's own (bf16 for others).
        backend: ``"reference"`` (PyTorch) or ``"cuda"`` (dgemma kernels); default: ``"cuda"`` on a
            GPU when the extension has CUDA kernels, else ``"reference"``.
        progress: show a progress bar while loading; default: only for checkpoints over 1 GiB.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    dev = _resolve_device(device)
    backend = _resolve_backend(backend, dev)
    if dtype is None:
        dtype = checkpoint_dtype(path)
        dtype = dtype if dtype in SUPPORTED_DTYPES else torch.bfloat16
    elif dtype not in SUPPORTED_DTYPES:
        raise DgemmaError(f"dtype {dtype} is not supported (expected torch.float32 or torch.bfloat16)")
    tensors = load_tensors(path, cfg, dtype=dtype, device=dev, progress=progress)
    return Engine(cfg, ModelWeights.from_tensors(cfg, tensors), device=dev, dtype=dtype, backend=backend)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    backend: str
    device: str
    dtype: str
    parameters: int
    weight_bytes: int


class Engine:
    """A loaded model. ``encode`` fills a KV cache; ``denoise`` scores a canvas against it.

    >>> eng = dgemma.load(path, device="cpu", dtype=torch.float32)
    >>> cache = eng.encode(prompt_ids)                          # [B, T] -> KV cache
    >>> logits = eng.denoise(cache, canvas)                     # [B, C, V] fp32, softcapped
    >>> cache = eng.encode(committed_ids, cache=cache)          # append a committed block
    """

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, device: torch.device, dtype: torch.dtype,
                 backend: str = "reference"):
        self.config = cfg
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.model = DiffusionGemmaModel(cfg, weights, get_ops(backend))

    @property
    def info(self) -> EngineInfo:
        tensors = _all_tensors(self.model.w)
        return EngineInfo(self.backend, str(self.device), str(self.dtype).removeprefix("torch."),
                          sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors))

    def __repr__(self) -> str:
        i = self.info
        return (f"Engine(layers={self.config.num_layers}, hidden={self.config.hidden_size}, "
                f"params={i.parameters / 1e6:.1f}M, backend={i.backend}, device={i.device}, dtype={i.dtype})")

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens."""
        return KVCache(self.config, batch, capacity, dtype=self.dtype, device=self.device)

    def _ids(self, ids, what: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.as_tensor(ids, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise DgemmaError(f"{what} must be a [batch, length] tensor of token ids") from None
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DgemmaError(f"{what} has dtype {ids.dtype}, expected an integer tensor of token ids")
        if ids.dim() != 2:
            raise DgemmaError(f"{what} has shape {list(ids.shape)}, expected [batch, length]")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DgemmaError(f"{what} has shape {list(ids.shape)}: batch and length must be positive")
        lo, hi = int(ids.min()), int(ids.max())
        v = self.config.vocab_size
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise DgemmaError(f"{what} contains token id {bad}, outside the vocabulary [0, {v})")
        return ids.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def encode(self, input_ids, *, cache: KVCache | None = None, attention_mask=None,
               capacity: int | None = None) -> KVCache:
        """Run the causal encoder over ``input_ids`` [B, T] and append their K/V to ``cache``.

        Without ``cache`` a new one is created with room for ``capacity`` tokens (default: T plus
        8 canvases, at most ``max_position_embeddings``). ``attention_mask`` [B, T] (1 = token,
        0 = padding) keeps padding out of every later attention. The cache is returned; on error it is
        left unchanged.
        """
        ids = self._ids(input_ids, "input_ids")
        b, t = ids.shape
        if cache is None:
            if capacity is None:
                capacity = min(t + DEFAULT_CACHE_CANVASES * self.config.canvas_length,
                               self.config.max_position_embeddings)
            if t > capacity:
                raise DgemmaError(f"prompt of {t} tokens exceeds the cache capacity {capacity}")
            cache = self.new_cache(b, capacity)
        else:
            self._check_cache(cache, b)
            cache.check_room(t)
        mask = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, device=self.device)
            if mask.shape != ids.shape:
                raise DgemmaError(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)}")
            mask = mask.bool()
        self.model.encode(ids, cache, mask)
        return cache

    @torch.inference_mode()
    def denoise(self, cache: KVCache, canvas, self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 softcapped logits [B, C, V] for ``canvas`` [B, C] at positions after the cached prefix.

        ``self_conditioning_logits`` [B, C, V]: the previous step's (processed) logits, or None on the
        first step. The cache is only read.
        """
        canvas = self._ids(canvas, "canvas")
        b, c = canvas.shape
        self._check_cache(cache, b)
        if cache.length + c > self.config.max_position_embeddings:
            raise DgemmaError(f"canvas positions {cache.length}..{cache.length + c - 1} exceed "
                              f"max_position_embeddings {self.config.max_position_embeddings}")
        sc = self_conditioning_logits
        if sc is not None:
            expected = [b, c, self.config.vocab_size]
            if not isinstance(sc, torch.Tensor) or list(sc.shape) != expected or not sc.is_floating_point():
                got = list(sc.shape) if isinstance(sc, torch.Tensor) else type(sc).__name__
                raise DgemmaError(f"self_conditioning_logits has shape {got}, expected a float tensor {expected}")
            sc = sc.to(self.device)
        return self.model.denoise(canvas, cache, sc)

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise DgemmaError(f"cache must be a dgemma KVCache, got {type(cache).__name__}")
        if cache.config is not self.config:
            raise DgemmaError("cache was created by a different engine")
        if cache.batch != batch:
            raise DgemmaError(f"batch size {batch} does not match the cache's batch size {cache.batch}")


def _all_tensors(w: ModelWeights) -> list[torch.Tensor]:
    out = [w.embed, w.final_norm, w.sc_pre_norm, w.sc_gate, w.sc_up, w.sc_down]
    for lw in w.layers:
        a = lw.attn
        out += [t for t in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.q_norm, a.k_norm) if t is not None]
        out += [lw.input_norm, lw.post_attn_norm, lw.pre_ff_norm, lw.post_ff_norm, lw.post_mlp_norm,
                lw.post_moe_norm, lw.pre_moe_norm, lw.mlp_gate, lw.mlp_up, lw.mlp_down, lw.router_proj,
                lw.router_scale, lw.router_expert_scale, lw.experts_gate_up, lw.experts_down, lw.decoder_scalar,
                lw.encoder_scalar]
    return out
