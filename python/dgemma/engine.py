"""The engine on token ids: ``encode`` / ``denoise`` and ``generate``. The text front end (tokenizer, chat
template, chat sessions) wraps it in :mod:`dgemma.text`; this module never imports it."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from . import _ext
from .cache import KVCache, same_device
from .config import ModelConfig
from .errors import BackendUnavailableError, DgemmaError
from .generation import GenerationResult, drive, run_generation
from .model import DiffusionGemmaModel
from .ops import BACKENDS, get_ops
from .quant import Fp8Weight
from .sampler import GenerationSettings
from .weights import ModelWeights

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# Room a fresh cache leaves beyond the prompt, in canvases (committed blocks append to it).
DEFAULT_CACHE_CANVASES = 8


def resolve_device(device) -> torch.device:
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


def resolve_backend(backend: str | None, device: torch.device) -> str:
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


def check_attention_mask(attention_mask, ids: torch.Tensor, cache: KVCache | None = None, *,
                         left_only: bool = False, empty_rows: bool = False) -> torch.Tensor:
    """A bool [B, T] mask of 0/1 matching ``ids``, with at least one real token per row (``empty_rows``: a row
    may be all padding, as in one chunk of a long left-padded prompt encoded in pieces).

    ``left_only`` (generation): padding after a real token (right padding, a hole, or any padding in a
    row whose earlier tokens are in ``cache``) is refused. Padding is never attended to, but it keeps its
    positions: left padding shifts a whole row (relative positions, hence logits, are unchanged), while
    padding after real tokens would put a gap between the prompt and the canvas, and the logits would
    silently differ from the unpadded prompt's."""
    try:
        mask = torch.as_tensor(attention_mask, device=ids.device)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise DgemmaError(f"attention_mask must be a [batch, length] tensor of 0/1, got "
                          f"{type(attention_mask).__name__}") from None
    if mask.shape != ids.shape:
        raise DgemmaError(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)}")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise DgemmaError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.bool()
    if not empty_rows and not bool(mask.any(dim=1).all()):
        raise DgemmaError("attention_mask masks every token of some prompt: prompts must not be empty")
    if not left_only:
        return mask
    seen = torch.cummax(mask.int(), dim=1).values.bool()
    if cache is not None and cache.length > 0:
        seen |= cache.valid[:, :cache.length].any(dim=1, keepdim=True).to(seen.device)
    late = seen & ~mask
    if bool(late.any()):
        row, pos = (int(x) for x in late.nonzero()[0])
        raise DgemmaError(f"attention_mask row {row} has padding at position {pos}, after real tokens: only left "
                          "padding (zeros before a row's first token, in its first prompt) is supported")
    return mask


@dataclass(frozen=True, slots=True)
class EngineInfo:
    backend: str
    device: str
    dtype: str
    parameters: int
    weight_bytes: int  # what the weights hold on the device (FP8 weights: one byte each plus fp32 scales)
    format: str = "dense"  # the checkpoint's storage format (dgemma.formats)
    disk_bytes: int = 0  # the checkpoint's safetensors files (0 when built in memory)


class Engine:
    """A loaded model. ``encode`` fills a KV cache; ``denoise`` scores a canvas against it.

    >>> eng = dgemma.load(path, device="cpu", dtype=torch.float32)
    >>> cache = eng.encode(prompt_ids)                          # [B, T] -> KV cache
    >>> logits = eng.denoise(cache, canvas)                     # [B, C, V] fp32, softcapped
    >>> cache = eng.encode(committed_ids, cache=cache)          # append a committed block
    """

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, device: torch.device, dtype: torch.dtype,
                 backend: str = "reference", path: str | None = None,
                 generation_settings: GenerationSettings | None = None, special_tokens: dict | None = None):
        self.config = cfg
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.path = path
        self.model = DiffusionGemmaModel(cfg, weights, get_ops(backend))
        self.checkpoint_format, self.disk_bytes = "dense", 0  # set by dgemma.load from the checkpoint
        # Replay denoising steps from CUDA graphs where they can be captured (dgemma.steps); set by load().
        self.cuda_graphs = False
        self.generation_settings = generation_settings or GenerationSettings()
        special = special_tokens or {}
        # NOTE: generation stops at EOS and pads only with the ids of generation_config.json (or passed to
        # generate), as transformers does; config.json's eos/pad ids never change what is generated.
        eos = special.get("eos_token_id", [])
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id: int | None = special.get("pad_token_id")
        self.bos_token_id: int | None = special.get("bos_token_id", cfg.bos_token_id)

    def end_ids(self, eos_token_ids=None) -> set[int]:
        """The ids an answer's text ends at: generation's end-of-sequence ids (``eos_token_ids``, default the
        engine's) and config.json's own (a model may write those too; they end the text, not the generation)."""
        eos = self.eos_token_ids if eos_token_ids is None else eos_token_ids
        return set([eos] if isinstance(eos, int) else eos) | set(self.config.eos_token_ids)

    @property
    def info(self) -> EngineInfo:
        tensors = _all_tensors(self.model.w)
        return EngineInfo(self.backend, str(self.device), str(self.dtype).removeprefix("torch."),
                          sum(t.numel() for t in tensors), sum(_nbytes(t) for t in tensors),
                          self.checkpoint_format, self.disk_bytes)

    def __repr__(self) -> str:
        i = self.info
        return (f"Engine(layers={self.config.num_layers}, hidden={self.config.hidden_size}, "
                f"params={i.parameters / 1e6:.1f}M, backend={i.backend}, device={i.device}, dtype={i.dtype})")

    def memory_plan(self, batch: int, context: int):
        """:class:`~dgemma.memory.MemoryPlan` of this engine for ``batch`` sequences of ``context`` tokens."""
        from .memory import plan

        return plan(self.config, self.info.weight_bytes, batch, context, self.dtype,
                    fused_vocab_head=self.model.ops.fused_vocab_head(self, self.generation_settings))

    def check_memory(self, batch: int, context: int) -> None:
        """Log the memory plan; on a GPU, refuse (with the numbers) one that does not fit."""
        import logging

        from .memory import check_fits

        p = self.memory_plan(batch, context)
        logging.getLogger("dgemma").info("dgemma memory plan: %s", p)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            check_fits(p, free, already_resident=p.weights)

    def new_cache(self, batch: int, capacity: int, *, rollback: int = 0) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens (``rollback``: how many
        trailing tokens :meth:`KVCache.truncate` may later drop)."""
        return KVCache(self.config, batch, capacity, dtype=self.dtype, device=self.device, rollback=rollback)

    def token_ids(self, ids, what: str = "input_ids") -> torch.Tensor:
        """``ids`` validated as a [batch, length] batch of token ids, as a long tensor on the engine's device."""
        if not isinstance(ids, torch.Tensor):
            try:
                # NOTE: no dtype here: floats and bools are refused below instead of being truncated to ids.
                ids = torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise DgemmaError(f"{what} must be a [batch, length] tensor of token ids") from None
            if ids.numel() == 0 and ids.is_floating_point():  # [[]]: no values, so no dtype to refuse
                ids = ids.long()
        _check_has_data(ids, what)
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
               capacity: int | None = None, pixel_values: torch.Tensor | None = None,
               image_position_ids: torch.Tensor | None = None, mm_token_type_ids=None,
               pixel_values_videos: torch.Tensor | None = None,
               video_position_ids: torch.Tensor | None = None) -> KVCache:
        """Run the causal encoder over ``input_ids`` [B, T] and append their K/V to ``cache``.

        Without ``cache`` a new one is created with room for ``capacity`` tokens (default: T plus
        8 canvases, at most ``max_position_embeddings``). ``attention_mask`` [B, T] (1 = token,
        0 = padding) keeps padding out of every later attention. ``pixel_values`` [N, P, 3·patch²] and
        ``image_position_ids`` [N, P, 2] (from :func:`dgemma.vision_inputs.preprocess_images`) are N images
        whose soft tokens replace, in order, the prompt's image placeholder tokens
        (``config.image_token_id``; their count must match). ``mm_token_type_ids`` [B, T] (0 text,
        1 image, 2 video, as transformers' processor returns it) marks each image's tokens; by default
        they are the placeholder ids. ``pixel_values_videos`` / ``video_position_ids`` (from
        :func:`dgemma.vision_inputs.preprocess_video`) do the same for video frames and the video placeholders
        (``config.video_token_id``). The cache is returned; on error it is left unchanged.
        """
        ids = self.token_ids(input_ids, "input_ids")
        b, t = ids.shape
        features = self.image_features(ids, pixel_values, image_position_ids)
        videos = self.video_features(ids, pixel_values_videos, video_position_ids)
        types = self.token_types(mm_token_type_ids, ids)
        if cache is None:
            if capacity is None:
                capacity = min(t + DEFAULT_CACHE_CANVASES * self.config.canvas_length,
                               self.config.max_position_embeddings)
            if isinstance(capacity, bool) or not isinstance(capacity, int):
                raise DgemmaError(f"capacity must be a positive integer, got {capacity!r:.80}")
            if t > capacity:
                raise DgemmaError(f"prompt of {t} tokens exceeds the cache capacity {capacity}")
            mask = None if attention_mask is None else check_attention_mask(attention_mask, ids)
            cache = self.new_cache(b, capacity)
            self.model.encode(ids, cache, mask, features, types, videos)
            return cache
        if capacity is not None:
            raise DgemmaError("capacity= sizes a new cache; it cannot be combined with cache=")
        self._check_cache(cache, b)
        cache.check_room(t)
        # A chunk of a long left-padded prompt may be all padding for a row (generate refuses a prompt that is).
        mask = None if attention_mask is None else check_attention_mask(attention_mask, ids, empty_rows=True)
        with cache.transaction():
            self.model.encode(ids, cache, mask, features, types, videos)
        return cache

    def token_types(self, mm_token_type_ids, ids: torch.Tensor) -> torch.Tensor | None:
        """``mm_token_type_ids`` validated against ``ids``: [B, T] integers in 0..3 (None stays None)."""
        if mm_token_type_ids is None:
            return None
        if isinstance(mm_token_type_ids, torch.Tensor):
            _check_has_data(mm_token_type_ids, "mm_token_type_ids")
        try:
            types = torch.as_tensor(mm_token_type_ids, device=self.device)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise DgemmaError(f"mm_token_type_ids must be a [batch, length] tensor of integers 0..3 matching the "
                              f"input's shape {list(ids.shape)}, got {type(mm_token_type_ids).__name__}") from None
        if list(types.shape) != list(ids.shape) or types.is_floating_point() or types.dtype == torch.bool:
            raise DgemmaError(f"mm_token_type_ids has shape {list(types.shape)} and dtype {types.dtype}, expected "
                              f"integers of the input's shape {list(ids.shape)}")
        if types.numel() and (int(types.min()) < 0 or int(types.max()) > 3):
            raise DgemmaError(f"mm_token_type_ids must be 0 (text), 1 (image), 2 (video) or 3 (audio), got values "
                              f"{int(types.min())}..{int(types.max())}")
        return types.long()

    @torch.inference_mode()
    def image_features(self, ids: torch.Tensor, pixel_values, image_position_ids) -> torch.Tensor | None:
        """The vision tower's soft tokens [n, H] for the n image placeholders of ``ids`` (None without images)."""
        return self._vision_features(ids, pixel_values, image_position_ids, "pixel_values", "image_position_ids",
                                     "image", self.config.image_token_id)

    @torch.inference_mode()
    def video_features(self, ids: torch.Tensor, pixel_values_videos, video_position_ids) -> torch.Tensor | None:
        """The vision tower's soft tokens [m, H] of every frame of the videos (frames in order, as
        :func:`dgemma.vision_inputs.preprocess_video` concatenates them) for the m video placeholders of ``ids``
        (``config.video_token_id``); None without videos. The tower runs on each frame as on an image."""
        return self._vision_features(ids, pixel_values_videos, video_position_ids, "pixel_values_videos",
                                     "video_position_ids", "video", self.config.video_token_id)

    def _vision_features(self, ids, pixels, positions, pixels_name: str, positions_name: str, what: str,
                         token_id: int | None) -> torch.Tensor | None:
        if pixels is None and positions is None:
            return None
        if pixels is None or positions is None:
            raise DgemmaError(f"{pixels_name} and {positions_name} go together: pass both or neither")
        cfg = self.config
        if self.model.vision is None:
            raise DgemmaError(f"this model has no vision tower (no vision_config, or its tensors were not in the "
                              f"checkpoint): it cannot take {what}s")
        v = cfg.vision
        width = 3 * v.patch_size**2
        unit = "frames" if what == "video" else "images"
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 3 or pixels.shape[-1] != width \
                or not pixels.is_floating_point():
            got = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise DgemmaError(f"{pixels_name} has shape {got}, expected a float tensor [{unit}, patches, {width}]")
        n, p = pixels.shape[:2]
        if not isinstance(positions, torch.Tensor) or list(positions.shape) != [n, p, 2] \
                or positions.is_floating_point():
            got = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise DgemmaError(f"{positions_name} has shape {got}, expected an integer tensor [{n}, {p}, 2]")
        _check_has_data(pixels, pixels_name)
        _check_has_data(positions, positions_name)
        _check_finite(pixels, pixels_name, unit[:-1])
        k2 = v.pooling_kernel_size**2
        if n == 0 or p == 0 or p % k2:
            raise DgemmaError(f"{pixels_name} has {n} {unit} of {p} patches: expected at least one and a "
                              f"positive multiple of {k2} patches (pooling_kernel_size²)")
        where = positions.to(self.device, torch.long)
        if int(where.min()) < -1 or int(where.max()) >= v.position_embedding_size:
            raise DgemmaError(f"{positions_name} must lie in [-1, {v.position_embedding_size}) "
                              f"(vision position_embedding_size), got {int(where.min())}..{int(where.max())}")
        features = self.model.image_features(pixels.to(self.device, torch.float32), where)
        placeholders = int((ids == token_id).sum()) if token_id is not None else 0
        if placeholders != features.shape[0]:
            raise DgemmaError(f"the prompt has {placeholders} {what} placeholder tokens (id {token_id}) but "
                              f"the {what}s give {features.shape[0]} soft tokens")
        return features

    @torch.inference_mode()
    def denoise(self, cache: KVCache, canvas, self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 softcapped logits [B, C, V] for ``canvas`` [B, C] at positions after the cached prefix.

        ``self_conditioning_logits`` [B, C, V]: the previous step's (processed) logits, or None on the
        first step. The cache is only read.
        """
        canvas = self.token_ids(canvas, "canvas")
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
            _check_has_data(sc, "self_conditioning_logits")
            sc = sc.to(self.device)
            _check_finite(sc, "self_conditioning_logits", "row")
        return self.model.denoise(canvas, cache, sc)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids, *, max_new_tokens: int | None = None, max_length: int | None = None,
                 max_denoising_steps: int | None = None,
                 entropy_bound: float | None = None, t_max: float | None = None, t_min: float | None = None,
                 stability_threshold: int | None = None, confidence_threshold: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, stream=None,
                 attention_mask=None, canvas=None, cache: KVCache | None = None,
                 capacity: int | None = None, pixel_values: torch.Tensor | None = None,
                 image_position_ids: torch.Tensor | None = None, mm_token_type_ids=None,
                 pixel_values_videos: torch.Tensor | None = None,
                 video_position_ids: torch.Tensor | None = None) -> GenerationResult:
        """Generate with the block-diffusion loop and the entropy-bounded sampler.

        Args:
            input_ids: token ids ``[B, T]`` (a tensor or nested lists); with ``cache``, the new tokens only.
            max_new_tokens: token budget, rounded up to whole canvases; generation also stops at EOS.
            max_length: the budget as a whole length instead (the cache's tokens, the prompt and the new tokens),
                used where ``max_new_tokens`` is not given; ``generation_config.json``'s ``max_length`` applies
                where neither the call nor that file gives ``max_new_tokens`` (or the file gives 256). Where both
                are given, transformers 5.23 prefers max_length whenever max_new_tokens is 256 and ignores it
                otherwise; here the call's own argument wins, then the file's max_new_tokens.
            max_denoising_steps, entropy_bound, t_max, t_min, stability_threshold, confidence_threshold:
                sampler settings; defaults come from the checkpoint's ``generation_config.json`` where set,
                else 256 / 48 / 0.1 / 0.8 / 0.4 / 1 / 0.005.
            eos_token_id, pad_token_id: default to the checkpoint's ``generation_config.json`` (as in
                transformers; config.json's ids are not used); tokens after the first EOS become pad.
            generator / seed: the random stream (a seeded generator reproduces transformers' ``generate``
                after ``torch.manual_seed`` on the reference backend); neither: torch's global generator.
            stream: a callable receiving a :class:`StreamEvent` per draft and per committed block (see
                :meth:`generate_stream` for an iterator).
            attention_mask: ``[B, T]`` (1 = token, 0 = padding) for left-padded batches.
            canvas: the first block's starting canvas ``[B, canvas_length]`` (default: uniform random).
            cache: continue a conversation held in this cache.
            capacity: size of the cache created when none is given (default: what this call needs, so
                pass more to continue the conversation from ``result.cache`` later). ``result.cache`` holds the
                prompt and every block but the last (a block is committed through the encoder when the next one
                starts; a chat's next turn renders the answer anew): to continue the sequence itself, encode the
                rest first, ``eng.encode(result.sequences[:, result.cache.length:], cache=result.cache)``.
            pixel_values, image_position_ids, mm_token_type_ids: images whose soft tokens fill the prompt's
                image placeholders (see :meth:`encode`); pixel_values_videos, video_position_ids: video frames,
                likewise for the video placeholders.
        Returns:
            :class:`GenerationResult` with ``sequences``, ``steps_per_block``, ``tokens_per_forward`` and
            ``timings`` (the text front end, :class:`dgemma.text.TextEngine`, adds ``texts``/``responses``).
        """
        if stream is not None and not callable(stream):
            raise DgemmaError(f"stream must be a callable taking a StreamEvent, got {type(stream).__name__}")
        return drive(self.generate_stream(input_ids, max_new_tokens=max_new_tokens, max_length=max_length,
                                          max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound,
                                          t_max=t_max, t_min=t_min, stability_threshold=stability_threshold,
                                          confidence_threshold=confidence_threshold, eos_token_id=eos_token_id,
                                          pad_token_id=pad_token_id, generator=generator, seed=seed,
                                          attention_mask=attention_mask, canvas=canvas, cache=cache,
                                          capacity=capacity, pixel_values=pixel_values,
                                          image_position_ids=image_position_ids,
                                          mm_token_type_ids=mm_token_type_ids,
                                          pixel_values_videos=pixel_values_videos,
                                          video_position_ids=video_position_ids), stream)

    def generate_stream(self, input_ids, *, attention_mask=None, pixel_values=None, image_position_ids=None,
                        mm_token_type_ids=None, pixel_values_videos=None, video_position_ids=None,
                        external_decoder: bool = False, **kwargs):
        """Like :meth:`generate`, as an iterator: a :class:`StreamEvent` per draft and per committed
        block, then the :class:`GenerationResult`. Generation advances as the iterator is consumed.

        ``external_decoder=True``: before each denoising step a :class:`~dgemma.generation.DecoderPass` is
        yielded, and the consumer sends back the decoder's hidden states (``iterator.send(h)``), e.g. after
        running many generations' passes as one batch (what the server's scheduler does)."""
        if not isinstance(external_decoder, bool):
            raise DgemmaError(f"external_decoder must be True or False, got {external_decoder!r:.40}")
        check_generate_arguments(kwargs, "generate_stream", stream=False)
        ids = self.token_ids(input_ids)
        cache = kwargs.get("cache")
        if cache is not None:
            self._check_cache(cache, ids.shape[0])  # before the mask's check reads it
        mask = None if attention_mask is None else check_attention_mask(attention_mask, ids, cache, left_only=True)
        args = self._resolve(ids, **kwargs)  # bad arguments raise here, before the first item
        args["image_features"] = self.image_features(ids, pixel_values, image_position_ids)
        args["video_features"] = self.video_features(ids, pixel_values_videos, video_position_ids)
        args["mm_token_type_ids"] = self.token_types(mm_token_type_ids, ids)
        args["external_decoder"] = external_decoder
        return self._run(ids, mask, args)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, args: dict):
        yield from run_generation(self, ids, mask, **args)

    def _resolve(self, ids: torch.Tensor, *, max_new_tokens=None, max_denoising_steps=None, entropy_bound=None,
                 t_max=None, t_min=None, stability_threshold=None, confidence_threshold=None, eos_token_id=None,
                 pad_token_id=None, generator=None, seed=None, canvas=None, cache=None, capacity=None,
                 max_length=None):
        for name, value in (("max_new_tokens", max_new_tokens), ("capacity", capacity), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DgemmaError(f"{name} must be a positive integer, got {value!r:.80}")
        settings = self.generation_settings.updated(
            max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound,
            t_max=t_max, t_min=t_min, stability_threshold=stability_threshold,
            confidence_threshold=confidence_threshold, max_length=max_length)
        b, t = ids.shape
        cfg = self.config
        if cache is not None:
            self._check_cache(cache, b)  # before anything reads the cache
        past = 0 if cache is None else cache.length
        if max_new_tokens is None and settings.max_length is not None:  # the budget is what max_length leaves
            if settings.max_length <= past + t:
                source = "" if max_length is not None else " (generation_config.json)"
                raise DgemmaError(f"max_length {settings.max_length}{source} leaves no room for new tokens after the "
                                  f"{past + t} tokens before them (cache {past}, prompt {t}); raise it or pass "
                                  f"max_new_tokens")
            settings = dataclasses.replace(settings, max_new_tokens=settings.max_length - past - t)
        blocks = -(-settings.max_new_tokens // cfg.canvas_length)
        end = past + t + blocks * cfg.canvas_length
        if end > cfg.max_position_embeddings:
            raise DgemmaError(f"prompt ({past + t} tokens) + max_new_tokens {settings.max_new_tokens} (rounded to "
                              f"{blocks} canvases of {cfg.canvas_length}) needs {end} positions, beyond "
                              f"max_position_embeddings {cfg.max_position_embeddings}")
        needed = t + (blocks - 1) * cfg.canvas_length
        if cache is not None:
            if capacity is not None:
                raise DgemmaError("capacity= sizes a new cache; it cannot be combined with cache=")
            self._check_cache(cache, b)
            cache.check_free()
            cache.check_room(needed)
        else:
            if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                         or capacity < needed):
                raise DgemmaError(f"capacity {capacity!r} is too small: this call needs {needed} cache positions")
            cache = self.new_cache(b, capacity or needed)
        eos = self.eos_token_ids if eos_token_id is None else eos_token_id
        if isinstance(eos, torch.Tensor):
            eos = eos.tolist() if eos.dim() else [eos.item()]  # float ids are refused below, by value
        eos = [eos] if isinstance(eos, int) or not isinstance(eos, (list, tuple)) else list(eos)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
                    raise DgemmaError(f"{name} {i!r} is not a token id in [0, {cfg.vocab_size})")
        if generator is not None and seed is not None:
            raise DgemmaError("pass either generator= or seed=, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DgemmaError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise DgemmaError(f"seed must be an integer in [0, 2**64), got {seed!r:.80}")
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if generator is not None and torch.device(generator.device).type != self.device.type:
            raise DgemmaError(f"generator is on {generator.device}, expected the engine's device {self.device}")
        if canvas is not None:
            canvas = self.token_ids(canvas, "canvas")
            if list(canvas.shape) != [b, cfg.canvas_length]:
                raise DgemmaError(f"canvas has shape {list(canvas.shape)}, expected [{b}, {cfg.canvas_length}]")
        return dict(settings=settings, eos_token_ids=eos, pad_token_id=pad, generator=generator, canvas=canvas,
                    cache=cache, cache_length=cache.length)

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise DgemmaError(f"cache must be a dgemma KVCache, got {type(cache).__name__}")
        if cache.config is not self.config:
            raise DgemmaError("cache was created by a different engine")
        if cache.batch != batch:
            raise DgemmaError(f"batch size {batch} does not match the cache's batch size {cache.batch}")
        if cache.dtype != self.dtype:
            raise DgemmaError(f"cache dtype {cache.dtype} does not match the engine's dtype {self.dtype}: create the "
                              f"cache with engine.new_cache(batch, capacity)")
        if not same_device(cache.valid.device, self.device):
            raise DgemmaError(f"cache device {cache.device} does not match the engine's device {self.device}: create "
                              f"the cache with engine.new_cache(batch, capacity)")


def check_generate_arguments(kwargs: dict, where: str, *, stream: bool = True) -> None:
    """Refuse a keyword ``generate`` does not take (``stream=`` too where ``stream`` is False: an iterator is
    the stream), naming it and ``where`` it was passed, before the call does anything."""
    known = _GENERATE_ARGUMENTS if stream else (_GENERATE_ARGUMENTS - {"stream"}) | {"external_decoder"}
    for name in kwargs:
        if name == "stream" and not stream:
            raise DgemmaError(f"{where}() does not take stream=: it is an iterator of the stream events itself; "
                              f"pass stream= to generate()")
        if name not in known:
            raise DgemmaError(f"{where}() got an unknown argument {name!r:.60}; generation takes "
                              f"{', '.join(sorted(known))}")


def _check_has_data(t: torch.Tensor, name: str) -> None:
    if t.device.type == "meta":
        raise DgemmaError(f"{name} is on the meta device (a tensor without data): expected a tensor on the CPU or "
                          f"the engine's device")


def _check_finite(t: torch.Tensor, name: str, unit: str) -> None:
    """Refuse NaN or infinite values (one host sync per call, on the entry points only)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = int(bad.flatten(1).any(dim=1).nonzero()[0])
        raise DgemmaError(f"{name} holds NaN or infinite values ({unit} {first}): expected finite values")


def _all_tensors(w: ModelWeights) -> list:
    """Every tensor (or Fp8Weight) the weights hold, the vision tower's included."""
    out = []

    def walk(x):
        if isinstance(x, (torch.Tensor, Fp8Weight)):
            out.append(x)
        elif dataclasses.is_dataclass(x):
            for f in dataclasses.fields(x):
                if not f.metadata.get("derived"):
                    walk(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)

    walk(w)
    return out


def _nbytes(t) -> int:
    """Bytes held: an FP8 weight's one byte per parameter plus its fp32 scales."""
    if isinstance(t, Fp8Weight):
        return t.q.numel() * t.q.element_size() + t.scale.numel() * t.scale.element_size()
    return t.numel() * t.element_size()


# The keywords Engine.generate takes besides the input ids (generate_stream: the same but stream=, and
# external_decoder=).
_GENERATE_ARGUMENTS = frozenset(inspect.signature(Engine.generate).parameters) - {"self", "input_ids"}
