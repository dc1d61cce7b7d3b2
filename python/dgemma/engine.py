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
from .chat import ChatTemplate, load_chat_template, parse_response
from .generation import GenerationResult, StreamEvent, drive, run_generation
from .model import DiffusionGemmaModel
from .ops import BACKENDS, get_ops
from .prompts import Prompt, check_attention_mask, prepare
from .sampler import GenerationSettings, read_generation_config
from .tokenizer import Tokenizer
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
         progress: bool | None = None, quantization: str | None = None, max_batch: int | None = None,
         max_context: int | None = None) -> "Engine":
    """Load a DiffusionGemma checkpoint (Hugging Face layout) into an :class:`Engine`.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``.
        device: ``"cpu"`` (default) or ``"cuda[:N]"``.
        dtype: ``torch.float32`` or ``torch.bfloat16``; default: the checkpoint's own (bf16 for others).
        backend: ``"reference"`` (PyTorch) or ``"cuda"`` (dgemma kernels); default: ``"cuda"`` on a
            GPU when the extension has CUDA kernels, else ``"reference"``.
        progress: show a progress bar while loading; default: only for checkpoints over 1 GiB.
        quantization: None (weights in ``dtype``) or ``"fp8"``: attention projections, the dense MLP and
            every expert become FP8 E4M3 with one fp32 scale per output channel (quantised while
            streaming, one tensor at a time); embedding/lm_head, router and self-conditioning stay in
            ``dtype``. The CUDA backend runs FP8 kernels for bf16 activations; the reference backend
            (any device/dtype) dequantises and computes in fp32.
        max_batch, max_context: when given, the memory plan (weights + KV cache for this batch and
            context + step workspace) is logged, and on a GPU a plan that does not fit its free memory
            is refused with the numbers (:class:`DgemmaError`).
    """
    from .quant import QUANTIZATIONS, fp8_transform

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise DgemmaError(f"quantization {quantization!r} is not supported (expected None or "
                          f"{', '.join(repr(q) for q in QUANTIZATIONS)})")
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
    settings, special = read_generation_config(path)
    transform = None
    if quantization == "fp8":
        transform = lambda key, t: fp8_transform(key, t, dev)  # noqa: E731
    tensors = load_tensors(path, cfg, dtype=dtype, device=dev, progress=progress, transform=transform)
    eng = Engine(cfg, ModelWeights.from_tensors(cfg, tensors), device=dev, dtype=dtype, backend=backend,
                 path=path, generation_settings=settings, special_tokens=special)
    if max_batch is not None or max_context is not None:
        eng.check_memory(max_batch or 1, max_context or cfg.max_position_embeddings)
    return eng


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
                 backend: str = "reference", path: str | None = None,
                 generation_settings: GenerationSettings | None = None, special_tokens: dict | None = None):
        self.config = cfg
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.path = path
        self.model = DiffusionGemmaModel(cfg, weights, get_ops(backend))
        self.generation_settings = generation_settings or GenerationSettings()
        special = special_tokens or {}
        # NOTE: generation stops at EOS and pads only with the ids of generation_config.json (or passed to
        # generate), as transformers does; config.json's eos/pad ids never change what is generated.
        eos = special.get("eos_token_id", [])
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id: int | None = special.get("pad_token_id")
        self.bos_token_id: int | None = special.get("bos_token_id", cfg.bos_token_id)
        self._tokenizer: Tokenizer | None = None
        self._chat_template: ChatTemplate | None = None

    # -- text front end ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            if self.path is None:
                raise DgemmaError("this engine has no checkpoint directory, so no tokenizer: pass token ids")
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    @property
    def add_bos(self) -> bool:
        return bool(self.tokenizer.config.get("add_bos_token", True))

    @property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's own chat template (``chat_template.jinja`` or ``tokenizer_config.json``)."""
        if self._chat_template is None:
            tok = self.tokenizer
            source = load_chat_template(self.path, tok.config)
            if source is None:
                raise DgemmaError(f"{self.path}: the checkpoint has no chat template "
                                  f"(chat_template.jinja or tokenizer_config.json's chat_template)")
            self._chat_template = ChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)
        return self._chat_template

    def chat(self, *, system: str | None = None, tools: list[dict] | None = None, thinking: bool = False,
             context: int | None = None, max_new_tokens: int | None = None):
        """A multi-turn :class:`~dgemma.session.ChatSession` reusing one KV cache across turns."""
        from .session import ChatSession

        return ChatSession(self, system=system, tools=tools, thinking=thinking, context=context,
                           max_new_tokens=max_new_tokens)

    @property
    def info(self) -> EngineInfo:
        tensors = _all_tensors(self.model.w)
        return EngineInfo(self.backend, str(self.device), str(self.dtype).removeprefix("torch."),
                          sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors))

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
        mask = None if attention_mask is None else check_attention_mask(attention_mask, ids)
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

    # -- generation ----------------------------------------------------------------------------

    def generate(self, inputs, *, max_new_tokens: int | None = None, max_denoising_steps: int | None = None,
                 entropy_bound: float | None = None, t_max: float | None = None, t_min: float | None = None,
                 stability_threshold: int | None = None, confidence_threshold: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, stream=None,
                 attention_mask=None, canvas=None, cache: KVCache | None = None, capacity: int | None = None,
                 thinking: bool = False, tools: list[dict] | None = None) -> GenerationResult:
        """Generate with the block-diffusion loop and the entropy-bounded sampler.

        Args:
            inputs: token ids ``[B, T]``, a string, a list of strings (left-padded into a batch), chat
                messages (``[{"role": ..., "content": ...}, ...]``) or a list of conversations.
            max_new_tokens: token budget, rounded up to whole canvases; generation also stops at EOS.
            max_denoising_steps, entropy_bound, t_max, t_min, stability_threshold, confidence_threshold:
                sampler settings; defaults come from the checkpoint's ``generation_config.json`` where set,
                else 256 / 48 / 0.1 / 0.8 / 0.4 / 1 / 0.005.
            eos_token_id, pad_token_id: default to the checkpoint's ``generation_config.json`` (as in
                transformers; config.json's ids are not used); tokens after the first EOS become pad.
            generator / seed: the random stream (a seeded generator reproduces transformers' ``generate``
                after ``torch.manual_seed`` on the reference backend); neither: torch's global generator.
            stream: a callable receiving a :class:`StreamEvent` per draft and per committed block (see
                :meth:`generate_stream` for an iterator).
            attention_mask: ``[B, T]`` for id inputs with padding (1 = token).
            canvas: the first block's starting canvas ``[B, canvas_length]`` (default: uniform random).
            cache: continue a conversation held in this cache (``inputs`` are the new tokens only).
            capacity: size of the cache created when none is given (default: what this call needs, so
                pass more to continue the conversation from ``result.cache`` later).
            thinking, tools: for chat inputs, passed to the chat template.
        Returns:
            :class:`GenerationResult` with ``sequences``, ``texts``, per-row ``responses`` (chat),
            ``steps_per_block``, ``tokens_per_forward`` and ``timings``.
        """
        prompt = prepare(self, inputs, attention_mask=attention_mask, thinking=thinking, tools=tools)
        return self._generate(prompt, max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
                              entropy_bound=entropy_bound, t_max=t_max, t_min=t_min,
                              stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator, seed=seed,
                              stream=stream, canvas=canvas, cache=cache, capacity=capacity)

    def generate_stream(self, inputs, *, attention_mask=None, thinking: bool = False, tools=None, **kwargs):
        """Like :meth:`generate`, as an iterator: a :class:`StreamEvent` per draft and per committed
        block, then the :class:`GenerationResult`. Generation advances as the iterator is consumed."""
        prompt = prepare(self, inputs, attention_mask=attention_mask, thinking=thinking, tools=tools)
        yield from self._generate_iter(prompt, **kwargs)

    def _resolve(self, prompt: Prompt, *, max_new_tokens=None, max_denoising_steps=None, entropy_bound=None,
                 t_max=None, t_min=None, stability_threshold=None, confidence_threshold=None, eos_token_id=None,
                 pad_token_id=None, generator=None, seed=None, canvas=None, cache=None, capacity=None):
        settings = self.generation_settings.updated(
            max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound,
            t_max=t_max, t_min=t_min, stability_threshold=stability_threshold,
            confidence_threshold=confidence_threshold)
        b, t = prompt.ids.shape
        cfg = self.config
        past = 0 if cache is None else cache.length
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
            cache.check_room(needed)
        else:
            if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                         or capacity < needed):
                raise DgemmaError(f"capacity {capacity!r} is too small: this call needs {needed} cache positions")
            cache = self.new_cache(b, capacity or needed)
        eos = self.eos_token_ids if eos_token_id is None else eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
                    raise DgemmaError(f"{name} {i!r} is not a token id in [0, {cfg.vocab_size})")
        if generator is not None and seed is not None:
            raise DgemmaError("pass either generator= or seed=, not both")
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if generator is not None and torch.device(generator.device).type != self.device.type:
            raise DgemmaError(f"generator is on {generator.device}, expected the engine's device {self.device}")
        if canvas is not None:
            canvas = self._ids(canvas, "canvas")
            if list(canvas.shape) != [b, cfg.canvas_length]:
                raise DgemmaError(f"canvas has shape {list(canvas.shape)}, expected [{b}, {cfg.canvas_length}]")
        return dict(settings=settings, eos_token_ids=eos, pad_token_id=pad, generator=generator, canvas=canvas,
                    cache=cache)

    @torch.inference_mode()
    def _generate_iter(self, prompt: Prompt, **kwargs):
        args = self._resolve(prompt, **kwargs)
        for item in run_generation(self, prompt.ids, prompt.attention_mask, **args):
            if isinstance(item, GenerationResult):
                self._attach_text(item, prompt, args["eos_token_ids"], args["pad_token_id"])
            yield item

    def _generate(self, prompt: Prompt, *, stream=None, **kwargs) -> GenerationResult:
        if stream is not None and not callable(stream):
            raise DgemmaError(f"stream must be a callable taking a StreamEvent, got {type(stream).__name__}")
        return drive(self._generate_iter(prompt, **kwargs), stream)

    def _attach_text(self, result: GenerationResult, prompt: Prompt, eos: list[int], pad: int | None) -> None:
        if self.path is None:
            return
        try:
            tok = self.tokenizer
        except DgemmaError:
            return  # no tokenizer files: ids only
        texts, responses = [], []
        # The text ends at the first end-of-sequence id, generation's or the model's own.
        ends = set(eos) | set(self.config.eos_token_ids)
        for row in result.new_tokens.tolist():
            cut = next((i for i, x in enumerate(row) if x in ends), len(row))
            ids = [x for x in row[:cut] if x != pad]
            if prompt.is_chat:
                resp = parse_response(tok.decode(ids))
                responses.append(resp)
                texts.append(resp.text)
            else:
                texts.append(tok.decode(ids, skip_special_tokens=True))
        result.texts, result.responses = texts, responses

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
