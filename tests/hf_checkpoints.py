"""Tiny random DiffusionGemma checkpoints written by transformers (the numerical reference)."""

from __future__ import annotations

import math

import torch

ARCHS = {
    # Odd sizes, a window shorter than the prompts, two full layers.
    "odd": dict(vocab_size=131, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, global_head_dim=20, num_global_key_value_heads=1,
                sliding_window=7, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"],
                num_experts=5, top_k_experts=3, moe_intermediate_size=10, max_position_embeddings=4096),
    # The 26B-A4B's ratios scaled down: 16 q heads, 8 KV heads of 256 -> 8 of 32 (sliding); 2 KV heads of
    # 512 -> 2 of 64 (full); 5 sliding : 1 full; 128 experts top-8 -> 16 top-8; window 1024 -> 16.
    "a4b_scaled": dict(vocab_size=257, hidden_size=88, intermediate_size=66, num_hidden_layers=6,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=32, global_head_dim=64,
                       num_global_key_value_heads=2, sliding_window=16, num_experts=16, top_k_experts=8,
                       moe_intermediate_size=22, max_position_embeddings=4096),
    # Plain multi-head attention in every layer, no GQA, default layer pattern truncated.
    "mha": dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, global_head_dim=16, num_global_key_value_heads=2,
                sliding_window=4, num_experts=4, top_k_experts=1, moe_intermediate_size=8,
                max_position_embeddings=4096),
}

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=8)


def build_hf_model(arch: str, *, seed: int = 0, canvas_length: int = 8, text_overrides: dict | None = None,
                   vision_overrides: dict | None = None, config_overrides: dict | None = None):
    """A transformers DiffusionGemmaForBlockDiffusion with *every* tensor randomised (norm weights,
    router and per-expert scales, and layer scalars that differ between encoder and decoder, the vision
    tower's too). ``text_overrides`` replace fields of the architecture (a value of None removes the
    field), ``vision_overrides`` of the vision config, ``config_overrides`` of the outer config."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(ARCHS[arch], **(text_overrides or {}))
    text = {k: v for k, v in text.items() if v is not None}
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=dict(VISION, **(vision_overrides or {})),
                               canvas_length=canvas_length, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("_min", "_max")):  # clipped linears' bounds: they clip the tails
                bound = 1.5 + torch.rand(t.shape, generator=g)
                t.copy_(-bound if name.endswith("_min") else bound)
            elif t.dim() <= 1:  # norm weights, router scale, per-expert scale
                t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))
    return model


def save_hf_checkpoint(arch: str, path, *, seed: int = 0, dtype=torch.float32, max_shard_size=None, **kw):
    model = build_hf_model(arch, seed=seed, **kw).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model
