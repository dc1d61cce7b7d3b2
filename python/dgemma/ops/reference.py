"""PyTorch reference implementation of every op (the numerical oracle).

Rounding follows the model's definition: norms, softmaxes and the router compute in fp32 and round
once to the activation dtype; matmuls run in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import Fp8Weight, as_float
from ..sampler import StepOutput, reference_sample_step
from ..vocab_head import reference_vocab_head_step


class ReferenceOps:
    name = "reference"

    def rows_batch_invariant(self, weights) -> bool:
        """Whether one decoder pass over many sequences' rows gives each row the bits of its own pass. Not with
        these ops: a matmul's rounding may depend on its row count (CPU BLAS and cuBLAS pick kernels and blockings
        by shape), and the sampler's acceptance turns a last-bit difference into other tokens."""
        return False

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """x * (mean(x^2) + eps)^-1/2 [* weight] over the last dim; weight None = weightless variant."""
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
        if weight is not None:
            y = y * weight.float()
        return y.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x + rms_norm(y) * weight: a layer's attention residual."""
        return x + self.rms_norm(y, weight, eps)

    def residual_mlp(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                     mlp_norm: torch.Tensor, gate, up, down) -> tuple[torch.Tensor, torch.Tensor]:
        """(x' = :meth:`add_rms_norm` (x, y, weight), :meth:`norm_gated_mlp` (x', mlp_norm, ...)): a layer's attention
        residual and the dense MLP that reads it, one op so a backend can write the MLP's input with the residual."""
        x = self.add_rms_norm(x, y, weight, eps)
        return x, self.norm_gated_mlp(x, mlp_norm, eps, gate, up, down)

    def residual_ffn(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, w, top_k: int,
                     tokens_per_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's attention residual and both feed-forward branches that read it, before their post-norms:
        (x' = :meth:`add_rms_norm` (x, y, weight), the dense MLP of ``pre_ff_norm(x')``, the routed experts of
        ``pre_moe_norm(x')`` routed by x'), with ``w`` the layer's :class:`~dgemma.weights.LayerWeights`.
        ``tokens_per_row``: the rows of x ``[B, T, H]`` are unrelated sequences of that many tokens (see
        :meth:`moe_rows`). One op so a backend can run the MLP and the experts as one pipeline. The two branches go
        only to :meth:`ffn_residual` / :meth:`ffn_residual_qkv` of the same ops, so a backend may hand them over in its
        own form (the CUDA backend: the expert rows before their combine, summed by the residual kernel)."""
        gate, up, down = w.mlp_weights()
        x, mlp = self.residual_mlp(x, y, weight, eps, w.pre_ff_norm, gate, up, down)
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.route(flat, w.router_scale, w.router_proj, w.router_expert_scale, top_k, eps)
        moe = self.norm_moe(flat, w.pre_moe_norm, eps, ids, weights, w.experts_gate_up, w.experts_down,
                            tokens_per_row)
        return x, mlp, moe.view_as(x)

    def ffn_residual(self, x: torch.Tensor, mlp: torch.Tensor, moe: torch.Tensor, w_mlp: torch.Tensor,
                     w_moe: torch.Tensor, w_ff: torch.Tensor, scalar: torch.Tensor, eps: float) -> torch.Tensor:
        """(x + rms_norm(rms_norm(mlp)·w_mlp + rms_norm(moe)·w_moe)·w_ff) · scalar: a layer's feed-forward residual
        (the dense MLP and the experts side by side) and its layer scalar."""
        ff = self.rms_norm(self.rms_norm(mlp, w_mlp, eps) + self.rms_norm(moe, w_moe, eps), w_ff, eps)
        return (x + ff) * scalar

    def ffn_residual_qkv(self, x: torch.Tensor, mlp: torch.Tensor, moe: torch.Tensor, w_mlp: torch.Tensor,
                         w_moe: torch.Tensor, w_ff: torch.Tensor, scalar: torch.Tensor, eps: float,
                         next_norm: torch.Tensor, next_attn, head_dim: int):
        """(x' = :meth:`ffn_residual` (...), the next layer's attention input ``rms_norm(x', next_norm)``), for
        :meth:`project_qkv` with the next layer's weights ``next_attn`` (head dim ``head_dim``): one op so a backend
        can write the next projection's input with the residual (in its own form: project_qkv takes it back)."""
        x = self.ffn_residual(x, mlp, moe, w_mlp, w_moe, w_ff, scalar, eps)
        return x, self.rms_norm(x, next_norm, eps)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | Fp8Weight) -> torch.Tensor:
        """x @ weight^T; an FP8 weight is dequantised and the product computed in fp32."""
        if isinstance(weight, Fp8Weight):
            return F.linear(x.float(), weight.dequantize()).to(x.dtype)
        return F.linear(x, weight)

    def gated_mlp(self, x: torch.Tensor, gate: torch.Tensor | Fp8Weight, up: torch.Tensor | Fp8Weight,
                  down: torch.Tensor | Fp8Weight) -> torch.Tensor:
        """down(gelu_tanh(gate(x)) * up(x)); with FP8 weights: dequantised, computed in fp32."""
        if any(isinstance(w, Fp8Weight) for w in (gate, up, down)):
            xf = x.float()
            g, u, d = (as_float(w, torch.float32) for w in (gate, up, down))
            return F.linear(F.gelu(F.linear(xf, g), approximate="tanh") * F.linear(xf, u), d).to(x.dtype)
        return F.linear(F.gelu(F.linear(x, gate), approximate="tanh") * F.linear(x, up), down)

    def norm_gated_mlp(self, x: torch.Tensor, norm: torch.Tensor | None, eps: float, gate, up, down) -> torch.Tensor:
        """gated_mlp(rms_norm(x, norm)): a norm and the MLP it feeds, one op so a backend can fuse the norm with
        the MLP's input quantisation."""
        return self.gated_mlp(self.rms_norm(x, norm, eps), gate, up, down)

    def prepare_weights(self, weights) -> None:
        """Called once when a model is built on these ops: a backend may lay its weights out for its kernels here
        (same values, e.g. projections of one input stacked into one weight). The reference keeps them as loaded."""

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on x [B, T, heads, D] with cos/sin [B|1, T, D]."""
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def project_qkv(self, h: torch.Tensor, w, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention inputs of ``h`` [B, T, H] for :class:`~dgemma.weights.AttentionWeights` ``w``:
        q = rope(rms_norm(h·Wqᵀ, q_norm)), k = rope(rms_norm(h·Wkᵀ, k_norm)), v = rms_norm(h·Wvᵀ) (weightless;
        V = K's projection where ``w.v_proj`` is None). Returns q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
        b, t, _ = h.shape
        q = self.linear(h, w.q_proj).view(b, t, -1, head_dim)
        q = self.rope(self.rms_norm(q, w.q_norm, eps), cos, sin)
        k_raw = self.linear(h, w.k_proj).view(b, t, -1, head_dim)
        v_raw = k_raw if w.v_proj is None else self.linear(h, w.v_proj).view(b, t, -1, head_dim)
        k = self.rope(self.rms_norm(k_raw, w.k_norm, eps), cos, sin)
        v = self.rms_norm(v_raw, None, eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def norm_project_qkv(self, x: torch.Tensor, norm: torch.Tensor, w, head_dim: int, cos: torch.Tensor,
                         sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project_qkv` of ``rms_norm(x, norm)`` (a layer's input norm and its attention projections)."""
        return self.project_qkv(self.rms_norm(x, norm, eps), w, head_dim, cos, sin, eps)

    def embed(self, ids: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
        """table[ids] * scale, with the scale rounded to the table dtype (sqrt(2816) is 53.0 in bf16)."""
        return F.embedding(ids, table) * torch.tensor(scale, dtype=torch.float32).to(table.dtype)

    def embed_norm(self, ids: torch.Tensor, table: torch.Tensor, scale: float, add: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        """The decoder's input: ``rms_norm(embed(ids) [+ add])`` (weightless norm; ``add`` the self-conditioning
        MLP's output), one op so a backend can run it as one kernel."""
        x = self.embed(ids, table, scale)
        if add is not None:
            x = x + add
        return self.rms_norm(x, None, eps)

    def embed_norm_qkv(self, ids: torch.Tensor, table: torch.Tensor, scale: float, add: torch.Tensor | None,
                       eps: float, next_norm: torch.Tensor, next_attn, head_dim: int):
        """(x = :meth:`embed_norm` (...), the first layer's attention input ``rms_norm(x, next_norm)`` for
        :meth:`project_qkv`), as :meth:`ffn_residual_qkv` hands the next layer its input."""
        x = self.embed_norm(ids, table, scale, add, eps)
        return x, self.rms_norm(x, next_norm, eps)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention with scale 1 (q/k norms make it so) and grouped KV heads.

        q [B, Hq, Q, D]; k, v [B, Hkv, K, D]; mask bool [B, Q, K] (True = attend) or None.
        Returns [B, Q, Hq, D].
        """
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        rep = hq // hkv
        # NOTE: K/V heads are expanded to the query heads (not grouped) so the matmuls have the same
        # shapes, hence the same fp32 rounding, as the reference implementation's eager attention.
        k = k[:, :, None].expand(b, hkv, rep, nk, d).reshape(b, hq, nk, d)
        v = v[:, :, None].expand(b, hkv, rep, nk, d).reshape(b, hq, nk, d)
        scores = torch.matmul(q, k.transpose(2, 3))  # [B, Hq, Q, K]
        if mask is not None:
            # A finite fill keeps fully masked rows (padding queries) finite rather than NaN.
            scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2)

    def route(self, x: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, expert_scale: torch.Tensor,
              top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: weightless RMSNorm of the residual, * scale * hidden^-1/2, proj, fp32 softmax, top-k,
        renormalise, * per-expert scale. Returns (weights fp32 [N, k], expert ids int64 [N, k])."""
        h = self.rms_norm(x, None, eps)
        h = h * scale * (x.shape[-1] ** -0.5)
        probs = torch.softmax(F.linear(h, proj), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * expert_scale[ids], ids

    def moe(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor | Fp8Weight,
            down: torch.Tensor | Fp8Weight) -> torch.Tensor:
        """Routed experts: sum_k weights[n,k] * down_e(gelu_tanh(gate_e x) * up_e x), e = ids[n,k].

        Tokens are grouped by expert with a stable sort of the k-major flattened ids (rows ordered by
        slot, then token: the order the reference implementation gathers them in, which fixes the fp32
        rounding of the expert GEMMs) and accumulated expert by expert in ascending id order, in the
        activation dtype. With FP8 weights each expert is dequantised and everything (the accumulation
        included) runs in fp32, rounded once to x's dtype.
        """
        fp8 = isinstance(gate_up, Fp8Weight) or isinstance(down, Fp8Weight)
        out_dtype = x.dtype
        if fp8:
            x = x.float()
        n, top_k = ids.shape
        out = torch.zeros_like(x)
        flat = ids.t().reshape(-1)  # [k * n]: slot-major
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
        flat_weights = weights.t().reshape(-1)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            sel = order[start:start + count]
            start += count
            rows = sel % n
            w_gate_up = as_float(gate_up[expert], torch.float32) if fp8 else gate_up[expert]
            w_down = as_float(down[expert], torch.float32) if fp8 else down[expert]
            gate, up = F.linear(x[rows], w_gate_up).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, w_down)
            y = y * flat_weights[sel, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.to(out_dtype)

    def moe_rows(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up, down,
                 tokens_per_row: int) -> torch.Tensor:
        """:meth:`moe` of tokens that come in independent sequences of ``tokens_per_row`` (a batch of unrelated
        requests): computed sequence by sequence, so each equals its own :meth:`moe` bit for bit (the grouped
        expert GEMMs would otherwise mix sequences and round differently)."""
        n = x.shape[0]
        if n <= tokens_per_row:
            return self.moe(x, ids, weights, gate_up, down)
        return torch.cat([self.moe(x[i:i + tokens_per_row], ids[i:i + tokens_per_row], weights[i:i + tokens_per_row],
                                   gate_up, down) for i in range(0, n, tokens_per_row)])

    def norm_moe(self, x: torch.Tensor, norm: torch.Tensor, eps: float, ids: torch.Tensor, weights: torch.Tensor,
                 gate_up, down, tokens_per_row: int | None = None) -> torch.Tensor:
        """:meth:`moe` (or, with ``tokens_per_row``, :meth:`moe_rows`) of ``rms_norm(x, norm)``: the layer's pre-MoE
        norm and the experts as one op, so a backend can fuse the norm into the experts' input quantisation."""
        h = self.rms_norm(x, norm, eps)
        if tokens_per_row is None:
            return self.moe(h, ids, weights, gate_up, down)
        return self.moe_rows(h, ids, weights, gate_up, down, tokens_per_row)

    def soft_embedding(self, logits: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
        """Self-conditioning input: softmax(logits) (fp32, then table dtype) @ table * scale."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(table.dtype)
        return torch.matmul(probs, table) * torch.tensor(scale, dtype=torch.float32).to(table.dtype)

    def lm_head_softcap(self, h: torch.Tensor, table: torch.Tensor, cap: float) -> torch.Tensor:
        """fp32 logits = cap * tanh((h @ table^T) / cap)."""
        logits = F.linear(h, table).float()
        return torch.tanh(logits / cap) * cap

    def fused_vocab_head(self, engine, settings) -> bool:
        """Whether generation should sample with :meth:`vocab_head_step` (dgemma's Philox stream) instead of
        logits + :meth:`sample_step` (transformers' stream). The reference keeps transformers' stream."""
        return False

    # The fused vocabulary head: processed logits, statistics, Philox sample, acceptance, stopping flags and
    # the next step's self-conditioning input in one call. This fp32 CPU version is the CUDA kernel's oracle.
    vocab_head_step = staticmethod(reference_vocab_head_step)

    def sample_step(self, logits: torch.Tensor, canvas: torch.Tensor, temp: torch.Tensor, bound: float,
                    generator: torch.Generator | None) -> StepOutput:
        """One entropy-bounded sampler step on fp32 logits [B, C, V] (see :mod:`dgemma.sampler`)."""
        return reference_sample_step(logits, canvas, temp, bound, generator)

    # -- attention over the KV cache -----------------------------------------------------------

    def encoder_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, start: int,
                          valid: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of new tokens at positions ``start..start+T-1`` over ``[cached ; new]``.

        q [B, Hq, T, D]; k, v [B, Hkv, T, D] (not yet in the cache); ``valid`` [B, capacity] marks real
        tokens, the new ones included, or is None when nothing cached or new is padding. Sliding layers
        see keys with ``qpos - window < kpos <= qpos``. ``blocks`` [B, T] (or None) numbers the new tokens'
        images (−1 for text): tokens of one image also see each other whole, whatever their order or
        distance (padding stays excluded).
        Returns [B, T, Hq, D]. The cache is not written here.
        """
        t = q.shape[2]
        past_k, past_v, past_pos = cache.read(layer)
        keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        positions = torch.arange(start, start + t, device=q.device)
        kpos = torch.cat((past_pos, positions))
        mask = kpos[None, :] <= positions[:, None]
        window = cache.config.layers[layer].window
        if window is not None:
            mask &= kpos[None, :] > positions[:, None] - window
        mask = mask[None]
        if blocks is not None:
            same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)  # [B, T, T]
            past = torch.zeros(same.shape[0], t, keys.shape[2] - t, dtype=torch.bool, device=q.device)
            mask = mask | torch.cat((past, same), dim=-1)
        if valid is not None:
            mask = mask & valid[:, kpos][:, None, :]
        return self.attention(q, keys, values, mask)

    def encoder_attention_view(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, prefix,
                               valid: torch.Tensor) -> torch.Tensor:
        """Causal attention of T new tokens at per-row positions ``prefix.lengths[b] + j`` over the cached slots
        (as :meth:`_prefix_keys` reads them) and the new tokens themselves, with no host read. ``valid``
        [B, capacity] covers the cache and the new tokens. Returns [B, T, Hq, D]."""
        t = q.shape[2]
        keys, values, visible = self._prefix_keys(cache, layer, prefix)
        spec = cache.config.layers[layer]
        lengths = prefix.lengths.long()[:, None]
        qpos = lengths + torch.arange(t, device=q.device)  # [B, T]
        mask = visible[:, None, :].expand(-1, t, -1)  # cached keys: all < start, hence <= every query
        if spec.is_sliding:
            kpos = self._slot_positions(cache, layer, prefix)  # [B, S]
            mask = mask & (kpos[:, None, :] > qpos[:, :, None] - spec.window)
        j = torch.arange(t, device=q.device)
        new = j[None, :] <= j[:, None]
        if spec.window is not None:
            new = new & (j[None, :] > j[:, None] - spec.window)
        new = new[None].expand(q.shape[0], -1, -1) & torch.gather(valid, 1, qpos)[:, None, :]
        mask = torch.cat((mask, new), dim=-1)
        return self.attention(q, torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2), mask)

    def decoder_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int,
                          prefix=None) -> torch.Tensor:
        """Bidirectional attention of the canvas over ``[cached prefix ; canvas]`` (padding excluded).

        q [B, Hq, C, D]; k, v [B, Hkv, C, D]: the canvas's own K/V. Returns [B, C, Hq, D].
        With a :class:`~dgemma.cache.PrefixView` each row reads its own length from the device and the keys
        are the cache's slots up to the bound, masked (see :meth:`_prefix_keys`).
        """
        if prefix is not None:
            keys, values, visible = self._prefix_keys(cache, layer, prefix)
            canvas_valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
            mask = torch.cat((visible, canvas_valid), dim=1)[:, None, :].expand(-1, q.shape[2], -1)
            return self.attention(q, torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2), mask)
        b, c = q.shape[0], q.shape[2]
        past_k, past_v, past_pos = cache.read(layer)
        keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        mask = None
        if cache.has_padding:
            canvas_valid = torch.ones(b, c, dtype=torch.bool, device=q.device)
            mask = torch.cat((cache.valid[:, past_pos], canvas_valid), dim=1)[:, None, :].expand(b, c, -1)
        return self.attention(q, keys, values, mask)

    @staticmethod
    def _slot_positions(cache, layer: int, prefix) -> torch.Tensor:
        """[B, S] the position each slot read by :meth:`_prefix_keys` holds (negative: never written)."""
        lengths = prefix.lengths.long()[:, None]
        if cache.config.layers[layer].is_sliding:
            ring = cache.ring_size(layer)
            return lengths - 1 - torch.remainder(lengths - 1 - torch.arange(ring, device=cache.device), ring)
        n = min(prefix.bound, cache.capacity)
        return torch.arange(n, device=cache.device)[None].expand(lengths.shape[0], n)

    @staticmethod
    def _prefix_keys(cache, layer: int, prefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, visible [B, S]) of ``layer`` for per-row lengths on the device, with no host read:
        a full layer's slots ``0 .. bound-1`` (slot = position), a sliding layer's whole ring (slot s holds
        the latest position p < length with p % ring == s); visible: p < length, within the window, real."""
        spec = cache.config.layers[layer]
        lengths = prefix.lengths.long()[:, None]
        pos = ReferenceOps._slot_positions(cache, layer, prefix)
        if spec.is_sliding:
            visible = (pos >= 0) & (pos > lengths - spec.window)
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            visible = pos < lengths
            keys, values = cache.keys[layer][:, :, :pos.shape[1]], cache.values[layer][:, :, :pos.shape[1]]
        if cache.has_padding:
            visible = visible & torch.gather(cache.valid, 1, pos.clamp(min=0))
        return keys, values, visible
