"""The tensors of a DiffusionGemma checkpoint, under their Hugging Face names, and their shapes.

Text weights live once under ``model.decoder.*``; the encoder shares them, except its own
``model.encoder.language_model.layers.N.layer_scalar``.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from .config import ModelConfig

DECODER = "model.decoder."
ENCODER_LAYERS = "model.encoder.language_model.layers."


@dataclass(frozen=True, slots=True)
class WeightSpec:
    """One tensor of the text model: its checkpoint name, shape, where it lives in :class:`ModelWeights`
    (``field``; ``layers.N.`` prefix for a layer's, ``attn.`` inside it for attention), and whether the
    FP8 formats quantise it (per output channel: attention projections, dense MLP, experts)."""

    name: str
    shape: tuple[int, ...]
    field: str
    quantized: bool = False


# Per layer: (checkpoint suffix, field in LayerWeights / AttentionWeights, shape(cfg, spec), quantised).
# NOTE: the one place the text model's Hugging Face names are written; everything else reads weight_map().
_LAYER_TENSORS = (
    ("self_attn.q_proj.weight", "attn.q_proj", lambda c, s: (c.num_heads * s.head_dim, c.hidden_size), True),
    ("self_attn.k_proj.weight", "attn.k_proj", lambda c, s: (s.num_kv_heads * s.head_dim, c.hidden_size), True),
    ("self_attn.v_proj.weight", "attn.v_proj", lambda c, s: (s.num_kv_heads * s.head_dim, c.hidden_size), True),
    ("self_attn.o_proj.weight", "attn.o_proj", lambda c, s: (c.hidden_size, c.num_heads * s.head_dim), True),
    ("self_attn.q_norm.weight", "attn.q_norm", lambda c, s: (s.head_dim,), False),
    ("self_attn.k_norm.weight", "attn.k_norm", lambda c, s: (s.head_dim,), False),
    ("mlp.gate_proj.weight", "mlp_gate", lambda c, s: (c.intermediate_size, c.hidden_size), True),
    ("mlp.up_proj.weight", "mlp_up", lambda c, s: (c.intermediate_size, c.hidden_size), True),
    ("mlp.down_proj.weight", "mlp_down", lambda c, s: (c.hidden_size, c.intermediate_size), True),
    ("input_layernorm.weight", "input_norm", lambda c, s: (c.hidden_size,), False),
    ("post_attention_layernorm.weight", "post_attn_norm", lambda c, s: (c.hidden_size,), False),
    ("pre_feedforward_layernorm.weight", "pre_ff_norm", lambda c, s: (c.hidden_size,), False),
    ("post_feedforward_layernorm.weight", "post_ff_norm", lambda c, s: (c.hidden_size,), False),
    ("post_feedforward_layernorm_1.weight", "post_mlp_norm", lambda c, s: (c.hidden_size,), False),
    ("post_feedforward_layernorm_2.weight", "post_moe_norm", lambda c, s: (c.hidden_size,), False),
    ("pre_feedforward_layernorm_2.weight", "pre_moe_norm", lambda c, s: (c.hidden_size,), False),
    ("layer_scalar", "decoder_scalar", lambda c, s: (1,), False),
    ("router.proj.weight", "router_proj", lambda c, s: (c.num_experts, c.hidden_size), False),
    ("router.scale", "router_scale", lambda c, s: (c.hidden_size,), False),
    ("router.per_expert_scale", "router_expert_scale", lambda c, s: (c.num_experts,), False),
    ("experts.gate_up_proj", "experts_gate_up",
     lambda c, s: (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size), True),
    ("experts.down_proj", "experts_down", lambda c, s: (c.num_experts, c.hidden_size, c.moe_intermediate_size), True),
)
_MODEL_TENSORS = (
    ("embed_tokens.weight", "embed", lambda c: (c.vocab_size, c.hidden_size)),
    ("norm.weight", "final_norm", lambda c: (c.hidden_size,)),
    ("self_conditioning.pre_norm.weight", "sc_pre_norm", lambda c: (c.hidden_size,)),
    ("self_conditioning.gate_proj.weight", "sc_gate", lambda c: (c.intermediate_size, c.hidden_size)),
    ("self_conditioning.up_proj.weight", "sc_up", lambda c: (c.intermediate_size, c.hidden_size)),
    ("self_conditioning.down_proj.weight", "sc_down", lambda c: (c.hidden_size, c.intermediate_size)),
)
QUANTIZED_SUFFIXES = tuple(suffix for suffix, _, _, quantized in _LAYER_TENSORS if quantized)


def weight_map(cfg: ModelConfig) -> dict[str, WeightSpec]:
    """Every tensor of the text model, by checkpoint name, in checkpoint order."""
    out = {DECODER + name: WeightSpec(DECODER + name, shape(cfg), field) for name, field, shape in _MODEL_TENSORS}
    for spec in cfg.layers:
        p = f"{DECODER}layers.{spec.index}."
        for suffix, field, shape, quantized in _LAYER_TENSORS:
            if field == "attn.v_proj" and spec.k_eq_v:
                continue  # full-attention layers have no v_proj (V comes from k_proj)
            out[p + suffix] = WeightSpec(p + suffix, shape(cfg, spec), f"layers.{spec.index}.{field}", quantized)
        name = f"{ENCODER_LAYERS}{spec.index}.layer_scalar"
        out[name] = WeightSpec(name, (1,), f"layers.{spec.index}.encoder_scalar")
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the text model needs, mapped to its shape."""
    return {name: spec.shape for name, spec in weight_map(cfg).items()}


def is_quantized_name(name: str) -> bool:
    """Whether the FP8 formats store this text-model tensor as FP8 with per-output-channel scales."""
    return name.startswith(DECODER + "layers.") and name.endswith(QUANTIZED_SUFFIXES)


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


def tied_twin(key: str) -> str | None:
    """The decoder tensor a tied copy repeats (``lm_head.weight``: the embedding table; the encoder's text weights:
    the decoder's), or None."""
    if key == "lm_head.weight":
        return DECODER + "embed_tokens.weight"
    if key.startswith("model.encoder.language_model."):
        return DECODER + key[len("model.encoder.language_model."):]
    return None


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
    # [Wq; Wk; (Wv)] as one FP8 weight, built by the CUDA ops on first use (q/k/v_proj then view its rows);
    # derived, so never saved or counted.
    qkv: object | None = dataclass_field(default=None, repr=False, compare=False, metadata={"derived": True})


@dataclass(slots=True)
class SharedExperts:
    """A layer's dense MLP cut into pieces the size of one expert and stacked after the routed experts, so the MLP
    runs inside the expert GEMMs as *shared* experts (every token visits each, weight 1): piece c holds the gate and
    up rows ``[c*I, (c+1)*I)`` and the down columns of the same range, so the MLP is the sum of its pieces. Built by
    the CUDA ops (:func:`dgemma.ops.cuda.share_dense_mlp`), FP8 only.

    ``gate_up`` ``[shared, 2I, H]`` and ``down`` ``[shared, H, I]`` are views of the stacks' tails; the layer's
    ``experts_gate_up`` / ``experts_down`` view their heads, and its ``mlp_*`` fields are None (no second copy)."""

    gate_up: object  # Fp8Weight views
    down: object
    stack_gate_up: object = dataclass_field(repr=False, compare=False, metadata={"derived": True})
    stack_down: object = dataclass_field(repr=False, compare=False, metadata={"derived": True})
    # The reassembled MLP, built on first use (a path that does not run the MLP among the experts) and kept.
    reassembled: tuple | None = dataclass_field(default=None, repr=False, compare=False, metadata={"derived": True})

    @property
    def shared(self) -> int:
        return self.gate_up.q.shape[0]

    def dense(self) -> tuple:
        """(gate, up, down) of the dense MLP, reassembled from the pieces (bit-identical to the originals; gate and
        up as row views of one weight, so they stay one GEMM). Built once, then kept: a path that does not run the MLP
        among the experts (a kernel switched off, activations the kernels do not take) holds it alongside."""
        if self.reassembled is None:
            from .quant import Fp8Weight, fuse_rows

            inter = self.gate_up.q.shape[1] // 2
            gu, d = self.gate_up, self.down
            gate = Fp8Weight(gu.q[:, :inter].reshape(-1, gu.q.shape[2]), gu.scale[:, :inter].reshape(-1))
            up = Fp8Weight(gu.q[:, inter:].reshape(-1, gu.q.shape[2]), gu.scale[:, inter:].reshape(-1))
            down = Fp8Weight(d.q.permute(1, 0, 2).reshape(d.q.shape[1], -1), d.scale[0].clone())
            gate, up = fuse_rows([gate, up])[1]
            self.reassembled = (gate, up, down)
        return self.reassembled


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
    # The dense MLP as shared experts of the expert GEMMs (CUDA, FP8): then mlp_gate/up/down are None.
    shared_experts: SharedExperts | None = None

    def mlp_weights(self) -> tuple:
        """(gate, up, down) of the dense MLP, reassembled when it lives in :attr:`shared_experts`."""
        if self.shared_experts is not None and self.mlp_gate is None:
            return self.shared_experts.dense()
        return self.mlp_gate, self.mlp_up, self.mlp_down


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
    # The FP8 self-conditioning operand (dgemma.vocab_head.embedding_fp8 of embed), built by the CUDA ops at load
    # when DGEMMA_VOCAB_HEAD_SOFT=fp8; None: the bf16 product.
    embed_fp8: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, t: dict[str, torch.Tensor]) -> "ModelWeights":
        fields: dict = {}
        layers = [{"attn": {"v_proj": None}} for _ in cfg.layers]
        for name, spec in weight_map(cfg).items():
            parts = spec.field.split(".")
            if parts[0] != "layers":
                fields[spec.field] = t[name]
            elif parts[2] == "attn":
                layers[int(parts[1])]["attn"][parts[3]] = t[name]
            else:
                layers[int(parts[1])][parts[2]] = t[name]
        built = [LayerWeights(**dict(lw, attn=AttentionWeights(**lw["attn"]))) for lw in layers]
        return cls(**fields, layers=built, vision=VisionWeights.from_tensors(cfg, t))


_MLP_FIELDS = ("mlp_gate", "mlp_up", "mlp_down")


def named_tensors(cfg: ModelConfig, w: ModelWeights) -> dict[str, torch.Tensor]:
    """The inverse of :meth:`ModelWeights.from_tensors`: every text-model tensor under its Hugging Face name."""
    out = {}
    for name, spec in weight_map(cfg).items():
        parts = spec.field.split(".")
        if parts[0] == "layers":  # layers.N.field or layers.N.attn.field
            obj, parts = w.layers[int(parts[1])], parts[2:]
            if parts[0] in _MLP_FIELDS:  # reassembled when the MLP lives among the experts
                out[name] = obj.mlp_weights()[_MLP_FIELDS.index(parts[0])]
                continue
        else:
            obj = w
        for part in parts:
            obj = getattr(obj, part)
        out[name] = obj
    return out
