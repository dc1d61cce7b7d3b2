"""``dgemma.load``: a checkpoint directory to a ready engine."""

from __future__ import annotations

import logging
import os

import torch

from .checkpoint import checkpoint_dtype, checkpoint_files, load_tensors
from .config import ModelConfig
from .engine import SUPPORTED_DTYPES, resolve_backend, resolve_device
from .errors import CheckpointError, ConfigError, DgemmaError
from .formats import detect_format
from .sampler import read_generation_config
from .text import TextEngine
from .weights import ModelWeights


def load(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None, backend: str | None = None,
         progress: bool | None = None, quantization: str | None = None, max_batch: int | None = None,
         max_context: int | None = None, check_finite: bool | None = None, cuda_graphs: bool = False
         ) -> TextEngine:
    """Load a DiffusionGemma checkpoint (Hugging Face layout) into a :class:`~dgemma.text.TextEngine`
    (the engine on token ids with the checkpoint's tokenizer and chat template).

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
            (any device/dtype) dequantises and computes in fp32. A checkpoint already quantised
            (``config.json``'s ``quantization_config``, see :mod:`dgemma.formats`) is read as stored
            with either setting: compressed-tensors FP8 weights stay FP8 with the checkpoint's own
            scales (never requantised), even with None; what it stores dense (e.g. the experts) is
            quantised online only with ``"fp8"``. NVFP4 (compressed-tensors or ModelOpt) weights are
            dequantised to ``dtype`` on load, for the reference backend.
        check_finite: scan every weight for NaN/Inf while loading and refuse the checkpoint naming the
            tensor; default: on for checkpoints up to 2 GiB (dgemma.checkpoint.FINITE_CHECK_MAX_BYTES).
        cuda_graphs: replay each denoising step from a CUDA graph (captured once per batch, prefix-length
            bucket and cache; see :mod:`dgemma.steps`) where the step can be captured: the CUDA backend
            with the fused vocabulary head and FP8 experts; elsewhere it is ignored with a warning. The
            tokens are the same as without graphs. Default off.
        max_batch, max_context: when given, the memory plan (weights + KV cache for this batch and
            context + step workspace) is logged, and on a GPU a plan that does not fit its free memory
            is refused with the numbers (:class:`DgemmaError`).
    """
    from .quant import QUANTIZATIONS, fp8_transform

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise DgemmaError(f"quantization {quantization!r} is not supported (expected None or "
                          f"{', '.join(repr(q) for q in QUANTIZATIONS)})")
    _check_load_arguments(path, progress=progress, check_finite=check_finite, cuda_graphs=cuda_graphs,
                          max_batch=max_batch, max_context=max_context)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    check_max_context(cfg, max_context)
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    if dtype is None:
        dtype = checkpoint_dtype(path)
        dtype = dtype if dtype in SUPPORTED_DTYPES else torch.bfloat16
    elif dtype not in SUPPORTED_DTYPES:
        raise DgemmaError(f"dtype {dtype} is not supported (expected torch.float32 or torch.bfloat16)")
    settings, special = read_generation_config(path)
    check_special_tokens(special, cfg.vocab_size, os.path.join(path, "generation_config.json"))
    transform = None
    if quantization == "fp8":
        transform = lambda key, t: fp8_transform(key, t, dev)  # noqa: E731
    tensors = load_tensors(path, cfg, dtype=dtype, device=dev, progress=progress, transform=transform,
                           check_finite=check_finite)
    weights = ModelWeights.from_tensors(cfg, tensors)
    # NOTE: only the weights keep the loaded tensors from here: a backend that restacks projections while the
    # model is built (ops.prepare_weights) then frees each original as it goes, instead of holding both.
    del tensors
    eng = TextEngine(cfg, weights, device=dev, dtype=dtype, backend=backend, path=path,
                     generation_settings=settings, special_tokens=special)
    if cuda_graphs:
        from .steps import graphs_supported

        why = graphs_supported(eng)
        if why is not None:
            logging.getLogger("dgemma").warning("dgemma: CUDA graphs are off for this engine: %s", why)
            cuda_graphs = False
    eng.cuda_graphs = cuda_graphs
    eng.checkpoint_format = detect_format(path).name
    eng.disk_bytes = sum(os.path.getsize(f) for f in checkpoint_files(path))
    info = eng.info
    logging.getLogger("dgemma").info(
        "dgemma: %s: %s checkpoint, %.2f GiB on disk, %.2f GiB of weights on %s (%s)", path, info.format,
        info.disk_bytes / 2**30, info.weight_bytes / 2**30, info.device, info.dtype)
    if max_batch is not None or max_context is not None:
        eng.check_memory(max_batch or 1, max_context or cfg.max_position_embeddings)
    return eng


def _check_load_arguments(path, *, progress, check_finite, cuda_graphs, max_batch, max_context) -> None:
    """Refuse, naming the value, load() arguments of the wrong type before anything is read."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise DgemmaError(f"path {path!r:.80} is not a checkpoint directory path: expected a str or os.PathLike "
                          f"naming a directory")
    for name, value in (("progress", progress), ("check_finite", check_finite)):
        if value is not None and not isinstance(value, bool):
            raise DgemmaError(f"{name} must be True, False or None, got {value!r:.40}")
    if not isinstance(cuda_graphs, bool):
        raise DgemmaError(f"cuda_graphs must be True or False, got {cuda_graphs!r:.40}")
    for name, value in (("max_batch", max_batch), ("max_context", max_context)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise DgemmaError(f"{name} must be a positive integer or None, got {value!r:.40}")


def check_max_context(cfg: ModelConfig, max_context: int | None) -> None:
    """A context (tokens per sequence: prompt and answer) the model can run: at least one prompt token and one
    canvas, at most its max_position_embeddings."""
    if max_context is None:
        return
    if max_context > cfg.max_position_embeddings:
        raise DgemmaError(f"max_context {max_context} exceeds max_position_embeddings "
                          f"{cfg.max_position_embeddings} (config.json)")
    if max_context < cfg.canvas_length + 1:
        raise DgemmaError(f"max_context {max_context} leaves no room for an answer: a request needs at least one "
                          f"prompt token and one {cfg.canvas_length}-token canvas ({cfg.canvas_length + 1})")


def check_special_tokens(special: dict, vocab_size: int, file: str) -> None:
    """generation_config.json's eos/pad/bos ids must be in the vocabulary (config.json's vocab_size): an id
    beyond it would fail every later generate, so it is refused at load."""
    for key, value in special.items():
        for i in value if isinstance(value, list) else [value]:
            if not 0 <= i < vocab_size:
                raise ConfigError(f"{file}: {key} = {value!r:.80} is outside the vocabulary: expected a token id in "
                                  f"[0, {vocab_size}) (config.json's vocab_size {vocab_size})")
