"""The DiffusionGemma text model, written against the ops interface.

One set of layer weights serves both passes: the *encoder* runs causally over prompt tokens and
committed canvases and writes the KV cache; the *decoder* runs bidirectionally over a canvas,
attending to ``[cached prefix ; canvas]``, and never writes the cache. Only the layer scalars differ.
"""

from __future__ import annotations

import torch

from .cache import KVCache, PrefixView, same_device
from .config import ModelConfig
from .errors import DgemmaError
from .ops import ReferenceOps
from .rope import cos_sin_joint, inverse_frequencies, joint_frequencies
from .vision import VisionTower
from .weights import ModelWeights


class DiffusionGemmaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, ops: ReferenceOps):
        self.cfg = cfg
        self.w = weights
        self.ops = ops
        ops.prepare_weights(weights)
        # NOTE: on the weights' device once: a host tensor here would be copied to the GPU on every step (a
        # synchronous copy, which also cannot be captured in a CUDA graph).
        device = weights.embed.device
        self.inv_freq = {spec.kind: inverse_frequencies(spec).to(device) for spec in cfg.layers}
        self._rope_freqs, self._rope_slices = joint_frequencies(self.inv_freq)
        self.vision = None if weights.vision is None else VisionTower(cfg.vision, weights.vision, ops)

    # -- shared pieces -------------------------------------------------------------------------

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer kind: (cos, sin)} for ``positions``: every kind's table in one pass (views of one table)."""
        return cos_sin_joint(self._rope_freqs, self._rope_slices, positions, dtype)

    def _project_qkv(self, i: int, x: torch.Tensor, ropes: dict, h=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's attention inputs from its input ``x`` (the input norm first), or from ``h``, that input already
        normed by the previous layer's last op (:meth:`ReferenceOps.ffn_residual_qkv`): q [B, Hq, T, D], k and v
        [B, Hkv, T, D]; q/k RMSNorm (weighted) + RoPE, weightless v_norm."""
        spec, lw = self.cfg.layers[i], self.w.layers[i]
        if h is not None:
            return self.ops.project_qkv(h, lw.attn, spec.head_dim, *ropes[spec.kind], self.cfg.rms_norm_eps)
        return self.ops.norm_project_qkv(x, lw.input_norm, lw.attn, spec.head_dim, *ropes[spec.kind],
                                         self.cfg.rms_norm_eps)

    def _layer(self, i: int, x: torch.Tensor, h, attend, scalar: torch.Tensor, independent_rows: bool = False):
        """x + post_attn_norm(o_proj(attention(x))) (``attend(i, x, h)`` applies the input norm unless ``h`` holds
        the normed input already), then (x + post_ff_norm(post_mlp_norm(MLP(pre_ff_norm x)) + post_moe_norm(MoE)))
        times the layer scalar: the attention residual with both feed-forward branches one op (the CUDA backend runs
        the MLP as shared experts of the expert GEMMs), the feed-forward residual another (one kernel that also
        writes the next layer's attention input). ``independent_rows``: the rows of x [B, T, H] are unrelated
        sequences (see :meth:`denoise_hidden_rows`). Returns (x, the next layer's normed attention input, or None
        after the last layer)."""
        w, eps, ops = self.w.layers[i], self.cfg.rms_norm_eps, self.ops
        attn = attend(i, x, h)
        x, mlp, moe = ops.residual_ffn(x, ops.linear(attn, w.attn.o_proj), w.post_attn_norm, eps, w, self.cfg.top_k,
                                       x.shape[1] if independent_rows else None)
        args = (x, mlp, moe, w.post_mlp_norm, w.post_moe_norm, w.post_ff_norm, scalar, eps)
        if i + 1 == len(self.w.layers):
            return ops.ffn_residual(*args), None
        nxt = self.w.layers[i + 1]
        return ops.ffn_residual_qkv(*args, nxt.input_norm, nxt.attn, self.cfg.layers[i + 1].head_dim)

    # -- encoder -------------------------------------------------------------------------------

    def image_blocks(self, ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, T] index of the image each token belongs to (−1 for text): a run of image (or video) tokens
        is one block, read from ``mm_token_type_ids`` (1 image, 2 video) or else from the placeholder ids.
        None when images need no mask of their own (no image, or a causal-only config)."""
        if not self.cfg.bidirectional_vision:
            return None
        if mm_token_type_ids is not None:
            is_image = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
        else:
            placeholders = [i for i in (self.cfg.image_token_id, self.cfg.video_token_id) if i is not None]
            if not placeholders:
                return None
            is_image = torch.isin(ids, torch.tensor(placeholders, device=ids.device))
        if not bool(is_image.any()):
            return None
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, torch.cumsum(starts.int(), dim=1) - 1, -1)

    def encode(self, ids: torch.Tensor, cache: KVCache, token_mask: torch.Tensor | None = None,
               image_features: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
               video_features: torch.Tensor | None = None) -> None:
        """Run the causal encoder over ``ids`` [B, T] (positions continue the cache) and append their K/V.

        ``token_mask`` [B, T] marks real tokens (False = padding never attended to).
        ``image_features`` [n, H] (from :meth:`image_features`) replace, in order, the embeddings of the
        n image placeholder tokens, and ``video_features`` [m, H] the m video placeholder tokens (every frame's
        soft tokens, frames in order); ``mm_token_type_ids`` [B, T] (0 text, 1 image, 2 video), when given,
        says which tokens form each image's (frame's) block. The caller has validated shapes, ids, the placeholder
        count and room; on return ``cache.length`` has grown by T.
        """
        t = ids.shape[1]
        start = cache.length
        positions = torch.arange(start, start + t, device=ids.device)
        ropes = self._rope_tables(positions[None], self.w.embed.dtype)
        valid = cache.valid.clone()
        valid[:, start:start + t] = True if token_mask is None else token_mask
        # One host check per call (not per layer): the attention ops skip ``valid`` without padding.
        has_padding = cache.has_padding or (token_mask is not None and not bool(token_mask.all()))
        attend_valid = valid if has_padding else None
        x = self.ops.embed(ids, self.w.embed, self.cfg.embed_scale)
        if image_features is not None or video_features is not None:
            x = x.clone()
        if image_features is not None:
            x[ids == self.cfg.image_token_id] = image_features.to(x.dtype)
        if video_features is not None:
            x[ids == self.cfg.video_token_id] = video_features.to(x.dtype)
        vision = image_features is not None or video_features is not None or mm_token_type_ids is not None
        blocks = self.image_blocks(ids, mm_token_type_ids) if vision else None
        def attention(i, q, k, v):
            if blocks is None:
                return self.ops.encoder_attention(q, k, v, cache, i, start, attend_valid)
            return self.ops.encoder_attention(q, k, v, cache, i, start, attend_valid, blocks)

        for i, k, v in self._encoder_kv(x, ropes, attention):
            cache.write(i, k, v, start)
        cache.valid.copy_(valid)
        cache.has_padding = has_padding
        cache.length = start + t

    def _encoder_kv(self, x: torch.Tensor, ropes: dict, attention) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Run the encoder layers over embedded tokens ``x`` [B, T, H] with ``attention(layer, q, k, v)`` ->
        [B, T, Hq, D], and return every layer's (layer, k, v) for the caller to store.

        NOTE: nothing is written here: the caller writes K/V only after every layer ran, so an interrupted call
        leaves the cache (in particular the sliding rings, which overwrite old slots) exactly as it was."""
        b, t, _ = x.shape
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def attend(i: int, x: torch.Tensor, h) -> torch.Tensor:
            q, k, v = self._project_qkv(i, x, ropes, h)
            pending.append((i, k, v))
            return attention(i, q, k, v).reshape(b, t, -1)

        last = len(self.w.layers) - 1
        h = None
        for i, lw in enumerate(self.w.layers[:-1]):
            x, h = self._layer(i, x, h, attend, lw.encoder_scalar)
        # Only the cache is kept from the encoder: the last layer contributes its K/V and nothing else.
        _, k, v = self._project_qkv(last, x, ropes, h)
        pending.append((last, k, v))
        return pending

    def encode_view(self, ids: torch.Tensor, cache: KVCache, prefix: PrefixView) -> None:
        """:meth:`encode` of ``ids`` [B, T] (real tokens, no images) with the start positions on the device
        (``prefix.lengths``, planned for ``prefix.bound``): no launch argument depends on the exact length,
        so a commit pass can be captured once per bucket (see :mod:`dgemma.steps`). The K/V of the new
        positions are scattered into the cache on the device; the caller updates ``cache.length`` (and saves
        what a transaction needs, :meth:`KVCache.save_for_undo`) on the host. Each sliding ring must hold T."""
        t = ids.shape[1]
        for i, spec in enumerate(self.cfg.layers):
            if spec.is_sliding and cache.ring_size(i) < t:
                # Two positions would share a ring slot in one scatter (which one lands is unspecified on a GPU).
                raise DgemmaError(f"encode_view of {t} tokens needs every sliding ring to hold them; layer {i}'s ring "
                                  f"has {cache.ring_size(i)} slots (make the cache with rollback >= "
                                  f"{t - cache.ring_size(i) + cache.rollback}, or use encode)")
        dev = ids.device
        positions = prefix.lengths.long()[:, None] + torch.arange(t, device=dev)  # [B, T]
        ropes = self._rope_tables(positions, self.w.embed.dtype)
        valid = cache.valid.scatter(1, positions, True)
        x = self.ops.embed(ids, self.w.embed, self.cfg.embed_scale)

        def attention(i, q, k, v):
            return self.ops.encoder_attention_view(q, k, v, cache, i, prefix, valid)

        for i, k, v in self._encoder_kv(x, ropes, attention):
            cache.scatter(i, k, v, positions)
        cache.valid.copy_(valid)

    def image_features(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Soft tokens [n, H] of preprocessed images (see :class:`dgemma.vision.VisionTower`)."""
        if self.vision is None:
            raise DgemmaError("this model has no vision tower (no vision_config, or its tensors were not in the "
                              "checkpoint): it cannot take images")
        return self.vision(pixel_values, positions)

    # -- decoder -------------------------------------------------------------------------------

    def soft_input(self, logits: torch.Tensor) -> torch.Tensor:
        """The self-conditioning input of a step from the previous step's logits: softmax(logits)·E·sqrt(H)."""
        return self.ops.soft_embedding(logits, self.w.embed, self.cfg.embed_scale)

    def decoder_input(self, canvas: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        """post_norm(embed(canvas) + MLP_sc(pre_norm(soft))) for the self-conditioning input ``soft``
        [B, C, H] (see :meth:`soft_input`); without one it is zeros, and the MLP of zeros is exactly zero,
        so it is skipped."""
        sc = None if soft is None else self._self_conditioning(soft)
        return self.ops.embed_norm(canvas, self.w.embed, self.cfg.embed_scale, sc, self.cfg.rms_norm_eps)

    def _decoder_input_qkv(self, canvas: torch.Tensor, soft: torch.Tensor | None):
        """(:meth:`decoder_input`, the first layer's normed attention input in the ops' own form): one op, so a
        backend writes the first layer's FP8 q/k/v input with the decoder input."""
        sc = None if soft is None else self._self_conditioning(soft)
        first = self.w.layers[0]
        return self.ops.embed_norm_qkv(canvas, self.w.embed, self.cfg.embed_scale, sc, self.cfg.rms_norm_eps,
                                       first.input_norm, first.attn, self.cfg.layers[0].head_dim)

    def _self_conditioning(self, soft: torch.Tensor) -> torch.Tensor:
        """MLP_sc(pre_norm(soft)): what a self-conditioning input adds to the canvas embeddings."""
        w = self.w
        return self.ops.norm_gated_mlp(soft, w.sc_pre_norm, self.cfg.rms_norm_eps, w.sc_gate, w.sc_up, w.sc_down)

    def _decoder_attend(self, canvas: torch.Tensor, cache: KVCache, prefix: PrefixView | None):
        """``attend(i, x, h)`` for the decoder over ``canvas`` [B, C] at the positions after the cached prefix."""
        b, c = canvas.shape
        if prefix is None:
            positions = torch.arange(cache.length, cache.length + c, device=canvas.device)[None]
        else:
            positions = prefix.lengths.long()[:, None] + torch.arange(c, device=canvas.device)
        ropes = self._rope_tables(positions, self.w.embed.dtype)

        def attend(i: int, x: torch.Tensor, h) -> torch.Tensor:
            q, k, v = self._project_qkv(i, x, ropes, h)
            if prefix is None:
                return self.ops.decoder_attention(q, k, v, cache, i).reshape(b, c, -1)
            return self.ops.decoder_attention(q, k, v, cache, i, prefix).reshape(b, c, -1)

        return attend

    def _decoder_states(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None,
                        prefix: PrefixView | None = None):
        """(layer, output) of the decoder over the canvas: (-1, its input), then each layer in turn."""
        attend = self._decoder_attend(canvas, cache, prefix)
        x, h = self._decoder_input_qkv(canvas, soft)
        yield -1, x
        for i, lw in enumerate(self.w.layers):
            x, h = self._layer(i, x, h, attend, lw.decoder_scalar)
            yield i, x

    def decoder_layer_outputs(self, canvas: torch.Tensor, cache: KVCache, inputs: list[torch.Tensor]
                              ) -> list[torch.Tensor]:
        """Each decoder layer i applied to ``inputs[i]`` [B, C, H] (another run's input to that layer, e.g. the
        reference backend's), over ``canvas`` at the positions after the cached prefix: the outputs, one per layer.

        Teacher forcing for parity checks: each output carries that layer's own error only. Run freely, errors
        compound, and on random weights they grow several-fold per layer (sharp random attention), so two correct
        backends end up uncorrelated after a few dozen layers."""
        if len(inputs) != len(self.w.layers):
            raise DgemmaError(f"decoder_layer_outputs takes one input per layer ({len(self.w.layers)}), "
                              f"got {len(inputs)}")
        attend = self._decoder_attend(canvas, cache, None)
        return [self._layer(i, x.to(self.w.embed.dtype), None, attend, lw.decoder_scalar)[0]
                for i, (lw, x) in enumerate(zip(self.w.layers, inputs))]

    def denoise_hidden(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None,
                       prefix: PrefixView | None = None) -> torch.Tensor:
        """Final-normed decoder hidden states [B, C, H] of the canvas; reads the cache, never writes it.

        With ``prefix`` the pass reads the prefix lengths from the device (see :class:`PrefixView`): no
        launch argument depends on the exact length, so it can be captured once per bucket and replayed."""
        for _, x in self._decoder_states(canvas, cache, soft, prefix):
            pass
        return self.ops.rms_norm(x, self.w.final_norm, self.cfg.rms_norm_eps)

    def denoise_hidden_rows(self, canvas: torch.Tensor, caches: list[KVCache], softs: list[torch.Tensor | None],
                            *, check_ids: bool = True) -> torch.Tensor:
        """:meth:`denoise_hidden` of B independent sequences in one decoder pass: row r of ``canvas`` [B, C]
        attends to its own cache ``caches[r]`` (batch 1 each, any lengths) with self-conditioning input
        ``softs[r]`` ([1, C, H] or None). Where the ops compute each row whatever the others
        (``ops.rows_batch_invariant``: the FP8 CUDA path), every op but attention runs once over the B canvases
        (the weights are read once) and attention per row against its cache; elsewhere each row runs its own pass.
        Either way row r equals ``denoise_hidden(canvas[r:r+1], caches[r], softs[r])`` bit for bit (the server
        batches its requests' steps this way, so a request's tokens do not depend on what else runs).
        ``check_ids=False`` skips the canvas ids' range check (a device sync on a GPU) for canvases the engine's own
        sampler made (the scheduler's DecoderPass canvases); the arguments' shapes, types and devices are checked
        either way."""
        self._check_rows(canvas, caches, softs, check_ids)
        b, c = canvas.shape
        if not self.ops.rows_batch_invariant(self.w):  # one pass per row: the same bits as each row alone
            return torch.cat([self.denoise_hidden(canvas[r:r + 1], caches[r], softs[r]) for r in range(b)])
        ops, w, eps = self.ops, self.w, self.cfg.rms_norm_eps
        dev = canvas.device
        positions = torch.stack([torch.arange(k.length, k.length + c, device=dev) for k in caches])
        ropes = self._rope_tables(positions, w.embed.dtype)
        x = ops.embed(canvas, w.embed, self.cfg.embed_scale)
        rows = [r for r, s in enumerate(softs) if s is not None]
        if rows:  # the self-conditioning MLP only for rows that have an input (as decoder_input skips it)
            sc = self._self_conditioning(torch.cat([softs[r] for r in rows]))
            if len(rows) == b:
                x = x + sc
            else:
                index = torch.tensor(rows, device=dev)
                x = x.index_copy(0, index, x.index_select(0, index) + sc)
        x = ops.rms_norm(x, None, eps)

        def attend(i: int, x: torch.Tensor, h) -> torch.Tensor:
            q, k, v = self._project_qkv(i, x, ropes, h)
            out = [ops.decoder_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], caches[r], i) for r in range(b)]
            return torch.cat(out).reshape(b, c, -1)

        h = None
        for i, lw in enumerate(self.w.layers):
            x, h = self._layer(i, x, h, attend, lw.decoder_scalar, independent_rows=True)
        return ops.rms_norm(x, w.final_norm, eps)

    def _check_rows(self, canvas, caches, softs, check_ids: bool) -> None:
        """Refuse, naming the argument, what denoise_hidden_rows cannot run (before any op sees it)."""
        cfg, dev, dtype = self.cfg, self.w.embed.device, self.w.embed.dtype
        if (not isinstance(canvas, torch.Tensor) or canvas.dim() != 2 or canvas.dtype == torch.bool
                or canvas.is_floating_point() or canvas.is_complex() or canvas.numel() == 0):
            got = f"{list(canvas.shape)} {canvas.dtype}" if isinstance(canvas, torch.Tensor) else type(canvas).__name__
            raise DgemmaError(f"denoise_hidden_rows: canvas must be a non-empty integer tensor [rows, length] of "
                              f"token ids, got {got}")
        if not same_device(canvas.device, dev):
            raise DgemmaError(f"denoise_hidden_rows: canvas is on {canvas.device}, expected the model's {dev}")
        b, c = canvas.shape
        if not isinstance(caches, (list, tuple)) or not isinstance(softs, (list, tuple)) or len(caches) != b \
                or len(softs) != b:
            def count(x):
                return len(x) if isinstance(x, (list, tuple)) else f"a {type(x).__name__} of"

            raise DgemmaError(f"denoise_hidden_rows takes one batch-1 cache and one soft input per row (lists; a soft "
                              f"input may be None); got {b} rows, {count(caches)} caches, {count(softs)} soft inputs")
        for r, k in enumerate(caches):
            if not isinstance(k, KVCache) or k.config is not cfg or k.batch != 1 or k.dtype != dtype \
                    or not same_device(k.device, dev):
                raise DgemmaError(f"denoise_hidden_rows: caches[{r}] must be a batch-1 KVCache of this model "
                                  f"({dtype}, {dev}), got {k!r:.80}")
            if k.length + c > cfg.max_position_embeddings:
                raise DgemmaError(f"denoise_hidden_rows: row {r}'s canvas positions {k.length}..{k.length + c - 1} "
                                  f"exceed max_position_embeddings {cfg.max_position_embeddings}")
        for r, s in enumerate(softs):
            if s is not None and (not isinstance(s, torch.Tensor) or list(s.shape) != [1, c, cfg.hidden_size]
                                  or s.dtype != dtype or not same_device(s.device, dev)):
                got = f"{list(s.shape)} {s.dtype} on {s.device}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise DgemmaError(f"denoise_hidden_rows: softs[{r}] must be None or a {dtype} tensor "
                                  f"[1, {c}, {cfg.hidden_size}] on {dev}, got {got}")
        if not check_ids:
            return
        low, high = (int(x) for x in canvas.aminmax())
        if low < 0 or high >= cfg.vocab_size:
            raise DgemmaError(f"denoise_hidden_rows: canvas holds token id {low if low < 0 else high}, outside "
                              f"[0, {cfg.vocab_size})")

    def first_nonfinite_layer(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None) -> int | None:
        """The first decoder layer whose output holds NaN/Inf for ``canvas`` (-1: the decoder input; None: none).

        Runs the decoder again with a check after every layer: only for reporting an error, never on the
        normal path (each check is a host sync)."""
        for i, x in self._decoder_states(canvas, cache, soft):
            if not bool(torch.isfinite(x).all()):
                return i
        return None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 softcapped logits [B, C, V] of final-normed hidden states (the tied embedding as lm_head)."""
        return self.ops.lm_head_softcap(h, self.w.embed, self.cfg.final_logit_softcapping)

    def denoise(self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None) -> torch.Tensor:
        """fp32 softcapped logits [B, C, V] of the canvas; reads the cache, never writes it."""
        soft = None if sc_logits is None else self.soft_input(sc_logits)
        return self.logits(self.denoise_hidden(canvas, cache, soft))
