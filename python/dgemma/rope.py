"""Rotary position embeddings: inverse frequencies per layer type and the cos/sin tables."""

from __future__ import annotations

import torch

from .config import LayerSpec


def inverse_frequencies(spec: LayerSpec) -> torch.Tensor:
    """[head_dim/2] fp32 inverse frequencies. Proportional RoPE spaces the rotated frequencies over the
    whole head_dim and pads the unrotated remainder with zeros (cos 1, sin 0: identity)."""
    rope, head_dim = spec.rope, spec.head_dim
    if rope.kind == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
        return 1.0 / (rope.theta**exponents)
    angles = int(rope.partial_rotary_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv = 1.0 / (rope.theta**exponents)
    inv = torch.cat((inv, torch.zeros(head_dim // 2 - angles, dtype=torch.float32)))
    return inv / rope.factor


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., head_dim] for integer ``positions`` [...], computed in fp32, rounded to ``dtype``."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def joint_frequencies(inv_freqs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, slice]]:
    """Every layer kind's table frequencies side by side (each kind's inverse frequencies twice, as
    :func:`cos_sin` lays them out) and each kind's slice of them: :func:`cos_sin_joint` then computes the tables of
    all kinds in one pass (a handful of kernels per step instead of that many per kind)."""
    parts, slices, at = [], {}, 0
    for kind, inv in inv_freqs.items():
        parts.append(torch.cat((inv, inv)).float())
        slices[kind] = slice(at, at + 2 * inv.shape[0])
        at += 2 * inv.shape[0]
    return torch.cat(parts), slices


def cos_sin_joint(freqs: torch.Tensor, slices: dict[str, slice], positions: torch.Tensor, dtype: torch.dtype
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kind: (cos, sin)} for integer ``positions`` [...]: views of one table over :func:`joint_frequencies`, equal
    to :func:`cos_sin` of each kind bit for bit (the same fp32 products, cos and sin, one rounding)."""
    emb = positions[..., None].float() * freqs.to(positions.device)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return {kind: (cos[..., s], sin[..., s]) for kind, s in slices.items()}
