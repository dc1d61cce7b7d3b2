"""Random-weight DiffusionGemma checkpoints in the Hugging Face layout, for demos and benchmarks."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .weights import expected_shapes, vision_shapes

# A tiny vision tower (Gemma 4's layout: 16-px patches, 3x3 pooling, 2-D rotary positions).
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, patch_size=16, pooling_kernel_size=3,
                   position_embedding_size=1024, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)

PRESETS = {
    # Small enough to encode and denoise on a laptop CPU in well under a second.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=32, num_experts=8, top_k_experts=2,
                 moe_intermediate_size=24, max_position_embeddings=8192,
                 per_layer_config={"5": {"head_dim": 32, "num_key_value_heads": 1}}),
    # The 26B-A4B's attention shapes (head_dim 256/512, 16 q heads, 8/2 KV heads) at a small width,
    # with kernel-friendly sizes: for GPU tests of the CUDA engine against the reference.
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=64,
                  num_experts=32, top_k_experts=8, moe_intermediate_size=128, max_position_embeddings=8192,
                  per_layer_config={"5": {"head_dim": 512, "num_key_value_heads": 2}}),
    # DiffusionGemma 26B-A4B's text model.
    "26b-a4b": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                    num_experts=128, top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144,
                    per_layer_config={str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in range(5, 30, 6)}),
}


def preset_config(preset: str, *, canvas_length: int = 256, **overrides) -> dict:
    """The ``config.json`` contents of a preset; ``overrides`` replace text_config fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}, expected one of {', '.join(PRESETS)}")
    text = dict(PRESETS[preset], **overrides)
    n = text["num_hidden_layers"]
    text.update(
        model_type="diffusion_gemma_text", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
        final_logit_softcapping=30.0,
    )
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "text_config": text, "canvas_length": canvas_length, "tie_word_embeddings": True}


def random_tensors(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", progress: bool = False, transform=None) -> dict:
    """Random values for every tensor: linear weights ~ N(0, 1/fan_in), norms and scales around 1.

    Tensors are drawn one at a time directly on ``device`` in ``dtype`` (the 26B preset never exists
    in fp32 or on the host); ``transform(key, tensor)`` may replace each one as it is made (e.g. by
    its FP8 quantisation), so only the transformed model is ever held."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = {**expected_shapes(cfg), **vision_shapes(cfg)}  # the vision tower where the config has one
    out = {}
    for key, shape in tqdm(shapes.items(), desc="random weights", unit="tensor", disable=not progress):
        if len(shape) <= 1:
            t = torch.rand(shape, generator=g, device=device, dtype=torch.float32).mul_(0.8).add_(0.6).to(dtype)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(1.0 / math.sqrt(shape[-1]))
        replaced = transform(key, t) if transform is not None else None
        out[key] = t if replaced is None else replaced
    return out


def random_engine(preset: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", backend: str = "reference", progress: bool = False,
                  canvas_length: int = 256, quantization: str | None = None):
    """An :class:`~dgemma.engine.Engine` with random weights at a preset's shapes, built in memory
    (``quantization="fp8"`` quantises them as :func:`dgemma.load` does)."""
    from .engine import Engine
    from .weights import ModelWeights

    cfg = ModelConfig.from_dict(preset_config(preset, canvas_length=canvas_length))
    transform = None
    if quantization is not None:
        from .quant import QUANTIZATIONS, fp8_transform

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {quantization!r} is not supported (expected one of {QUANTIZATIONS})")
        transform = lambda key, t: fp8_transform(key, t, torch.device(device))  # noqa: E731
    tensors = random_tensors(cfg, seed=seed, dtype=dtype, device=device, progress=progress, transform=transform)
    return Engine(cfg, ModelWeights.from_tensors(cfg, tensors), device=torch.device(device), dtype=dtype,
                  backend=backend)


def write_random_checkpoint(path: str | os.PathLike, preset: str = "tiny", *, seed: int = 0,
                            dtype: torch.dtype = torch.float32, shards: int = 1, canvas_length: int = 256,
                            vision: dict | None = None, image_token_ids: tuple[int, int, int] | None = None,
                            video_token_id: int | None = None, **overrides) -> str:
    """Write ``config.json``, ``generation_config.json`` and random safetensors weights (``shards`` > 1:
    sharded with an index); ``overrides`` replace text_config fields of the preset (e.g. ``vocab_size``).
    ``vision`` (e.g. :data:`TINY_VISION`) adds a vision tower with that config, random too, and
    ``image_token_ids`` its (begin-of-image, image placeholder, end-of-image) token ids, ``video_token_id`` the
    placeholder of video frames' soft tokens."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    raw = preset_config(preset, canvas_length=canvas_length, **overrides)
    if vision is not None:
        raw["vision_config"] = dict(vision, model_type="gemma4_vision")
        if image_token_ids is not None:
            raw["boi_token_id"], raw["image_token_id"], raw["eoi_token_id"] = image_token_ids
        if video_token_id is not None:
            raw["video_token_id"] = video_token_id
    cfg = ModelConfig.from_dict(raw)
    tensors = random_tensors(cfg, seed=seed, dtype=dtype)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
    # Generation stops at EOS only with the ids of generation_config.json, as on a released checkpoint.
    text = raw["text_config"]
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": text["eos_token_id"], "pad_token_id": text["pad_token_id"],
                   "bos_token_id": text["bos_token_id"]}, f, indent=2)
    keys = list(tensors)
    if shards <= 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
