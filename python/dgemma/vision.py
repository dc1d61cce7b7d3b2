"""The Gemma 4 vision tower and its projector into the text model, written against the ops interface.

Per image: patches (``3·patch²`` values in [0, 1], from :mod:`dgemma.vision_inputs`) are mapped to
``2·(x − 0.5)``, projected, given learned x/y position embeddings, run through a bidirectional encoder
with 2-D rotary embeddings (head dims split in halves: the first rotated by the x position, the second
by the y position), average-pooled over ``k×k`` patch blocks to soft tokens, scaled by sqrt(hidden)
(and standardised where the checkpoint says so), then projected into the text model's hidden size.
Padding patches carry position (−1, −1): they are never attended to and never pooled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import VisionConfig
from .errors import DgemmaError
from .weights import ClippedLinear, VisionLayerWeights, VisionWeights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class VisionTower:
    def __init__(self, cfg: VisionConfig, weights: VisionWeights, ops):
        self.cfg, self.w, self.ops = cfg, weights, ops
        spatial = cfg.head_dim // 2
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))

    # -- pieces --------------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, lin: ClippedLinear) -> torch.Tensor:
        if lin.bounds is not None:
            x = torch.clamp(x, lin.bounds[0], lin.bounds[1])
        y = self.ops.linear(x, lin.weight)
        return y if lin.bounds is None else torch.clamp(y, lin.bounds[2], lin.bounds[3])

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, N, head_dim]: x frequencies twice, then y frequencies twice."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [B, N, 2, head_dim/4]
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        angles = torch.cat((fx, fx, fy, fy), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, N, heads, D]: each half of D rotated (rotate-half convention) by its own axis's angles."""
        half = x.shape[-1] // 2
        parts = []
        for xp, c, s in zip(x.split(half, dim=-1), cos.split(half, dim=-1), sin.split(half, dim=-1)):
            parts.append(xp * c[:, :, None] + _rotate_half(xp) * s[:, :, None])
        return torch.cat(parts, dim=-1)

    def _attention(self, lw: VisionLayerWeights, h: torch.Tensor, cos, sin, key_valid: torch.Tensor) -> torch.Tensor:
        cfg, ops, eps = self.cfg, self.ops, self.cfg.rms_norm_eps
        b, n, _ = h.shape
        q = ops.rms_norm(self._linear(h, lw.q_proj).view(b, n, -1, cfg.head_dim), lw.q_norm, eps)
        k = ops.rms_norm(self._linear(h, lw.k_proj).view(b, n, -1, cfg.head_dim), lw.k_norm, eps)
        v = ops.rms_norm(self._linear(h, lw.v_proj).view(b, n, -1, cfg.head_dim), None, eps)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        mask = key_valid[:, None, :].expand(b, n, n)
        out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # [B, N, Hq, D]
        return self._linear(out.reshape(b, n, -1), lw.o_proj)

    def _layer(self, lw: VisionLayerWeights, x: torch.Tensor, cos, sin, key_valid) -> torch.Tensor:
        ops, eps = self.ops, self.cfg.rms_norm_eps
        x = x + ops.rms_norm(self._attention(lw, ops.rms_norm(x, lw.input_norm, eps), cos, sin, key_valid),
                             lw.post_attn_norm, eps)
        h = ops.rms_norm(x, lw.pre_ff_norm, eps)
        h = self._linear(F.gelu(self._linear(h, lw.gate), approximate="tanh") * self._linear(h, lw.up), lw.down)
        return x + ops.rms_norm(h, lw.post_ff_norm, eps)

    def _pool(self, x: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Average of each k×k block of patches (k² · length = patches), fp32 scaled by sqrt(hidden);
        returns (features [B, length, Hv] fp32, valid [B, length])."""
        x = x.masked_fill(padding[..., None], 0.0)
        n = x.shape[1]
        valid = ~padding  # NOTE: without pooling (kernel 1) the real patches are the soft tokens
        if n != length:
            k = int((n // length) ** 0.5)
            if k * k * length != n:
                raise DgemmaError(f"cannot pool {n} patches to {length} soft tokens: {k}² · {length} != {n}")
            pos = positions.clamp(min=0)
            width = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
            cell = torch.div(pos, k, rounding_mode="floor")
            index = cell[..., 0] + (width // k) * cell[..., 1]
            if int(index.max()) >= length:  # positions that are no k x k grid of these patches (one_hot would fail)
                raise DgemmaError(f"the patch positions do not form a grid of {length} pooled {k}x{k} cells: a patch "
                                  f"at (x, y) = {tuple(pos.flatten(0, -2)[int(index.argmax())].tolist())} pools "
                                  f"into cell {int(index.max())}; expected each image's positions to cover its "
                                  f"patches row by row from (0, 0)")
            weights = F.one_hot(index.long(), length).float() / (k * k)  # [B, N, length]
            # NOTE: the pooled sum is rounded to the working dtype before the fp32 scaling, as the
            # reference does.
            x = (weights.transpose(1, 2) @ x.float()).to(x.dtype)
            valid = ~(weights == 0).all(dim=1)
        return x.float() * self.cfg.hidden_size**0.5, valid

    # -- forward -------------------------------------------------------------------------------

    def __call__(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Soft tokens of a batch of images, in the text model's hidden size: [total soft tokens, H].

        ``pixel_values`` [B, N, 3·patch²] in [0, 1]; ``positions`` [B, N, 2] int (x, y) patch
        coordinates, (−1, −1) for padding. N must be a multiple of pooling_kernel_size²; each image
        yields as many soft tokens as its pooled cells hold real patches, images in order.
        """
        cfg, w, ops = self.cfg, self.w, self.ops
        dtype = w.input_proj.dtype
        k2 = cfg.pooling_kernel_size ** 2
        length = pixel_values.shape[-2] // k2
        padding = (positions == -1).all(dim=-1)
        x = ops.linear((2 * (pixel_values - 0.5)).to(dtype), w.input_proj)
        pos = positions.clamp(min=0)
        table = w.position_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        x = x + torch.where(padding[..., None], 0.0, pe)
        cos, sin = self._rope_tables(positions, x.dtype)
        for lw in w.layers:
            x = self._layer(lw, x, cos, sin, ~padding)
        pooled, valid = self._pool(x, positions, padding, length)
        feats = pooled[valid]
        if w.std_bias is not None:
            feats = (feats - w.std_bias.float()) * w.std_scale.float()
        feats = feats.to(x.dtype)
        # embed_vision: weightless RMSNorm (the vision eps), then the projection into the text width.
        return ops.linear(ops.rms_norm(feats, None, cfg.rms_norm_eps), w.projection)
