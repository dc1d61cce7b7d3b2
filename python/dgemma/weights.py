"""The tensors of a DiffusionGemma checkpoint, under their Hugging Face names, and their shapes.

Text weights live once under ``model.decoder.*``; the encoder shares them, except its own
``model.encoder.language_model.layers.N.layer_scalar``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

DECODER = "model.decoder."
ENCODER_LAYERS = "model.encoder.language_model.layers."

LAYER_NORMS = (
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
    "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2",
)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the text model needs, mapped to its shape."""
    h, v, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        DECODER + "embed_tokens.weight": (v, h),
        DECODER + "norm.weight": (h,),
        DECODER + "self_conditioning.pre_norm.weight": (h,),
        DECODER + "self_conditioning.gate_proj.weight": (inter, h),
        DECODER + "self_conditioning.up_proj.weight": (inter, h),
        DECODER + "self_conditioning.down_proj.weight": (h, inter),
    }
    for spec in cfg.layers:
        p = f"{DECODER}layers.{spec.index}."
        q_out, kv_out = cfg.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        if not spec.k_eq_v:
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[p + "self_attn.q_norm.weight"] = (spec.head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (spec.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        for norm in LAYER_NORMS:
            shapes[p + norm + ".weight"] = (h,)
        shapes[p + "layer_scalar"] = (1,)
        shapes[p + "router.proj.weight"] = (cfg.num_experts, h)
        shapes[p + "router.scale"] = (h,)
        shapes[p + "router.per_expert_scale"] = (cfg.num_experts,)
        shapes[p + "experts.gate_up_proj"] = (cfg.num_experts, 2 * cfg.moe_intermediate_size, h)
        shapes[p + "experts.down_proj"] = (cfg.num_experts, h, cfg.moe_intermediate_size)
        shapes[f"{ENCODER_LAYERS}{spec.index}.layer_scalar"] = (1,)
    return shapes


VISION = "model.encoder.vision_tower."
EMBED_VISION = "model.encoder.embed_vision.embedding_projection.weight"
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def vision_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the vision tower and its projector into the text model, mapped to its shape
    (empty for a checkpoint without a vision tower)."""
    v = cfg.vision
    if v is None:
        return {}
    hv, p = v.hidden_size, v.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        VISION + "patch_embedder.input_proj.weight": (hv, 3 * p * p),
        VISION + "patch_embedder.position_embedding_table": (2, v.position_embedding_size, hv),
        EMBED_VISION: (cfg.hidden_size, hv),
    }
    if v.standardize:
        shapes[VISION + "std_bias"] = (hv,)
        shapes[VISION + "std_scale"] = (hv,)
    linears = {"self_attn.q_proj": (v.num_heads * v.head_dim, hv), "self_attn.k_proj": (v.num_kv_heads * v.head_dim, hv),
               "self_attn.v_proj": (v.num_kv_heads * v.head_dim, hv), "self_attn.o_proj": (hv, v.num_heads * v.head_dim),
               "mlp.gate_proj": (v.intermediate_size, hv), "mlp.up_proj": (v.intermediate_size, hv),
               "mlp.down_proj": (hv, v.intermediate_size)}
    for i in range(v.num_layers):
        p_ = f"{VISION}encoder.layers.{i}."
        for name, shape in linears.items():
            shapes[p_ + name + ".linear.weight"] = shape
            if v.use_clipped_linears:
                shapes.update({f"{p_}{name}.{b}": () for b in CLIP_BOUNDS})
        shapes[p_ + "self_attn.q_norm.weight"] = (v.head_dim,)
        shapes[p_ + "self_attn.k_norm.weight"] = (v.head_dim,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p_ + norm + ".weight"] = (hv,)
    return shapes


@dataclass(slots=True)
class ClippedLinear:
    weight: torch.Tensor  # [out, in]
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # input min/max, output min/max


@dataclass(slots=True)
class VisionLayerWeights:
    q_proj: ClippedLinear
    k_proj: ClippedLinear
    v_proj: ClippedLinear
    o_proj: ClippedLinear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    gate: ClippedLinear
    up: ClippedLinear
    down: ClippedLinear


@dataclass(slots=True)
class VisionWeights:
    input_proj: torch.Tensor  # [Hv, 3 * patch²]
    position_table: torch.Tensor  # [2, position_embedding_size, Hv]: x then y
    layers: list[VisionLayerWeights]
    std_bias: torch.Tensor | None
    std_scale: torch.Tensor | None
    projection: torch.Tensor  # [H, Hv]: embed_vision, into the text model

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, t: dict[str, torch.Tensor]) -> "VisionWeights | None":
        v = cfg.vision
        if v is None or EMBED_VISION not in t:
            return None

        def linear(prefix: str) -> ClippedLinear:
            bounds = tuple(t[f"{prefix}.{b}"] for b in CLIP_BOUNDS) if v.use_clipped_linears else None
            return ClippedLinear(t[prefix + ".linear.weight"], bounds)

        layers = []
        for i in range(v.num_layers):
            p = f"{VISION}encoder.layers.{i}."
            layers.append(VisionLayerWeights(
                q_proj=linear(p + "self_attn.q_proj"), k_proj=linear(p + "self_attn.k_proj"),
                v_proj=linear(p + "self_attn.v_proj"), o_proj=linear(p + "self_attn.o_proj"),
                q_norm=t[p + "self_attn.q_norm.weight"], k_norm=t[p + "self_attn.k_norm.weight"],
                input_norm=t[p + "input_layernorm.weight"], post_attn_norm=t[p + "post_attention_layernorm.weight"],
                pre_ff_norm=t[p + "pre_feedforward_layernorm.weight"],
                post_ff_norm=t[p + "post_feedforward_layernorm.weight"],
                gate=linear(p + "mlp.gate_proj"), up=linear(p + "mlp.up_proj"), down=linear(p + "mlp.down_proj")))
        return cls(input_proj=t[VISION + "patch_embedder.input_proj.weight"],
                   position_table=t[VISION + "patch_embedder.position_embedding_table"], layers=layers,
                   std_bias=t.get(VISION + "std_bias"), std_scale=t.get(VISION + "std_scale"),
                   projection=t[EMBED_VISION])


def ignored_kind(key: str) -> str | None:
    """Why a checkpoint tensor outside :func:`expected_shapes` may be skipped, or None if it is unexpected."""
    if key.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
        return "vision"
    if key == "lm_head.weight":
        return "tied"  # the lm_head is the embedding table
    if key.startswith("model.encoder.language_model.") and not key.endswith("layer_scalar"):
        return "tied"  # an untied save repeating the decoder's text weights
    return None


@dataclass(slots=True)
class AttentionWeights:
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor | None  # None where V = v_norm(k_proj(x)) (full-attention layers)
    o_proj: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor


@dataclass(slots=True)
class LayerWeights:
    attn: AttentionWeights
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    post_mlp_norm: torch.Tensor  # post_feedforward_layernorm_1
    post_moe_norm: torch.Tensor  # post_feedforward_layernorm_2
    pre_moe_norm: torch.Tensor  # pre_feedforward_layernorm_2
    mlp_gate: torch.Tensor
    mlp_up: torch.Tensor
    mlp_down: torch.Tensor
    router_proj: torch.Tensor
    router_scale: torch.Tensor
    router_expert_scale: torch.Tensor
    experts_gate_up: torch.Tensor  # [E, 2*I, H]: gate rows first, then up rows
    experts_down: torch.Tensor  # [E, H, I]
    decoder_scalar: torch.Tensor
    encoder_scalar: torch.Tensor


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [V, H], also the lm_head
    final_norm: torch.Tensor
    sc_pre_norm: torch.Tensor
    sc_gate: torch.Tensor
    sc_up: torch.Tensor
    sc_down: torch.Tensor
    layers: list[LayerWeights]
    vision: VisionWeights | None = None  # the vision tower, when the checkpoint has one and it was loaded

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, t: dict[str, torch.Tensor]) -> "ModelWeights":
        layers = []
        for spec in cfg.layers:
            p = f"{DECODER}layers.{spec.index}."
            attn = AttentionWeights(
                q_proj=t[p + "self_attn.q_proj.weight"], k_proj=t[p + "self_attn.k_proj.weight"],
                v_proj=t.get(p + "self_attn.v_proj.weight"), o_proj=t[p + "self_attn.o_proj.weight"],
                q_norm=t[p + "self_attn.q_norm.weight"], k_norm=t[p + "self_attn.k_norm.weight"],
            )
            layers.append(LayerWeights(
                attn=attn,
                input_norm=t[p + "input_layernorm.weight"],
                post_attn_norm=t[p + "post_attention_layernorm.weight"],
                pre_ff_norm=t[p + "pre_feedforward_layernorm.weight"],
                post_ff_norm=t[p + "post_feedforward_layernorm.weight"],
                post_mlp_norm=t[p + "post_feedforward_layernorm_1.weight"],
                post_moe_norm=t[p + "post_feedforward_layernorm_2.weight"],
                pre_moe_norm=t[p + "pre_feedforward_layernorm_2.weight"],
                mlp_gate=t[p + "mlp.gate_proj.weight"], mlp_up=t[p + "mlp.up_proj.weight"],
                mlp_down=t[p + "mlp.down_proj.weight"],
                router_proj=t[p + "router.proj.weight"], router_scale=t[p + "router.scale"],
                router_expert_scale=t[p + "router.per_expert_scale"],
                experts_gate_up=t[p + "experts.gate_up_proj"], experts_down=t[p + "experts.down_proj"],
                decoder_scalar=t[p + "layer_scalar"],
                encoder_scalar=t[f"{ENCODER_LAYERS}{spec.index}.layer_scalar"],
            ))
        d = DECODER
        return cls(
            embed=t[d + "embed_tokens.weight"], final_norm=t[d + "norm.weight"],
            sc_pre_norm=t[d + "self_conditioning.pre_norm.weight"],
            sc_gate=t[d + "self_conditioning.gate_proj.weight"], sc_up=t[d + "self_conditioning.up_proj.weight"],
            sc_down=t[d + "self_conditioning.down_proj.weight"], layers=layers,
            vision=VisionWeights.from_tensors(cfg, t),
        )


def named_tensors(cfg: ModelConfig, w: ModelWeights) -> dict[str, torch.Tensor]:
    """The inverse of :meth:`ModelWeights.from_tensors`: every tensor under its Hugging Face name."""
    d = DECODER
    out = {d + "embed_tokens.weight": w.embed, d + "norm.weight": w.final_norm,
           d + "self_conditioning.pre_norm.weight": w.sc_pre_norm, d + "self_conditioning.gate_proj.weight": w.sc_gate,
           d + "self_conditioning.up_proj.weight": w.sc_up, d + "self_conditioning.down_proj.weight": w.sc_down}
    for spec, lw in zip(cfg.layers, w.layers):
        p = f"{DECODER}layers.{spec.index}."
        a = lw.attn
        out.update({p + "self_attn.q_proj.weight": a.q_proj, p + "self_attn.k_proj.weight": a.k_proj,
                    p + "self_attn.o_proj.weight": a.o_proj, p + "self_attn.q_norm.weight": a.q_norm,
                    p + "self_attn.k_norm.weight": a.k_norm})
        if a.v_proj is not None:
            out[p + "self_attn.v_proj.weight"] = a.v_proj
        norms = (lw.input_norm, lw.post_attn_norm, lw.pre_ff_norm, lw.post_ff_norm, lw.post_mlp_norm,
                 lw.post_moe_norm, lw.pre_moe_norm)
        out.update({p + name + ".weight": t for name, t in zip(LAYER_NORMS, norms)})
        out.update({p + "mlp.gate_proj.weight": lw.mlp_gate, p + "mlp.up_proj.weight": lw.mlp_up,
                    p + "mlp.down_proj.weight": lw.mlp_down, p + "router.proj.weight": lw.router_proj,
                    p + "router.scale": lw.router_scale, p + "router.per_expert_scale": lw.router_expert_scale,
                    p + "experts.gate_up_proj": lw.experts_gate_up, p + "experts.down_proj": lw.experts_down,
                    p + "layer_scalar": lw.decoder_scalar,
                    f"{ENCODER_LAYERS}{spec.index}.layer_scalar": lw.encoder_scalar})
    return out
