"""Model configuration, read from a checkpoint's ``config.json`` (the single source of model facts)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from .errors import ConfigError, DgemmaError

SLIDING = "sliding_attention"
FULL = "full_attention"
MODEL_TYPE = "diffusion_gemma"

# Upper bounds of config sizes, generous for real models (Gemma 4 has a 262 144 vocabulary, 5 376 hidden,
# 62 layers, 256 canvases), so that a bad value is refused here rather than allocating without end.
LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 65_536,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "num_experts": 4096,
    "top_k_experts": 4096,
    "moe_intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
    "canvas_length": 4096,
    "token_id": 1 << 31,
    # vision tower
    "pooling_kernel_size": 64,
    "patch_size": 1024,
    "position_embedding_size": 1 << 20,
}
# Finite ranges (low exclusive, high inclusive) of the float settings.
RMS_NORM_EPS_MAX = 0.1
ROPE_THETA_MAX = 1e12
ROPE_FACTOR_MAX = 1e6
SOFTCAP_MAX = 1e6
# The embedding (also the lm_head) is one tensor: 2^32 elements (16 GiB in fp32) is far above real models.
MAX_EMBEDDING_ELEMENTS = 1 << 32
MAX_CONFIG_BYTES = 64 << 20  # config.json / generation_config.json


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary embedding of one layer type.

    ``kind`` is ``"default"`` (all of head_dim rotates) or ``"proportional"`` (the first
    ``partial_rotary_factor`` of each half rotates with frequencies spaced over the *whole* head_dim;
    the rest keep frequency 0, i.e. pass through unrotated).
    """

    kind: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class LayerSpec:
    index: int
    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope: RopeSpec
    window: int | None  # attention window (keys a causal query sees, itself included); None for full layers

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING

    @property
    def k_eq_v(self) -> bool:
        """Full layers have no v_proj: V = v_norm(k_proj(x)) while K = rope(k_norm(k_proj(x)))."""
        return not self.is_sliding


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """The Gemma 4 vision tower: patches of ``patch_size``² RGB pixels through a bidirectional encoder with
    2-D (axial) RoPE, pooled ``pooling_kernel_size``² patches to one soft token."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    pooling_kernel_size: int
    patch_size: int
    position_embedding_size: int
    use_clipped_linears: bool
    standardize: bool


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    final_logit_softcapping: float
    canvas_length: int
    layers: tuple[LayerSpec, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vision: VisionConfig | None = None  # None: the checkpoint has no vision tower
    image_token_id: int | None = None  # the placeholder each image soft token replaces
    video_token_id: int | None = None  # the placeholder each video frame's soft token replaces (Gemma 4's id)
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    bidirectional_vision: bool = False  # use_bidirectional_attention == "vision": an image attends to itself whole

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @property
    def sliding_window(self) -> int | None:
        return next((spec.window for spec in self.layers if spec.is_sliding), None)

    @property
    def vision_token_ids(self) -> frozenset[int]:
        """The image and video placeholders and the begin/end-of-image markers: input-only tokens, never text."""
        ids = (self.image_token_id, self.video_token_id, self.boi_token_id, self.eoi_token_id)
        return frozenset(i for i in ids if i is not None)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing 'text_config' object")
        return _parse_text_config(text, raw, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        return cls.from_dict(read_json_file(path, object_only=False), source=path)


def read_json_file(path: str, error: type[DgemmaError] = ConfigError, *, object_only: bool = True,
                   invalid: str = "not valid JSON"):
    """The JSON in the file ``path`` (a checkpoint's config, generation or tokenizer config, its index: at most
    MAX_CONFIG_BYTES), or ``error`` naming the file and why not: unreadable, too large, ``invalid`` (not UTF-8 JSON,
    nested too deeply), or (``object_only``) not a JSON object."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise error(f"{path}: {size} bytes, more than the limit of {MAX_CONFIG_BYTES} for a config file")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    except RecursionError:
        raise error(f"{path}: {invalid} (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a number beyond Python's digit limit
        raise error(f"{path}: {invalid} ({e})") from None
    if object_only and not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _get(d: dict, key: str, source: str, kind: type | tuple, default=None, required: bool = True):
    if key not in d or d[key] is None:
        if default is not None or not required:
            return default
        raise ConfigError(f"{source}: text_config.{key} is missing")
    v = d[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{source}: text_config.{key} = {v!r:.80}, expected an integer")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise ConfigError(f"{source}: text_config.{key} = {v!r:.80}, expected a finite number")
    return float(v) if kind is float else v


def _positive(v: int, key: str, source: str, limit: int | None = None) -> int:
    """``v`` if it is a positive integer no larger than ``limit`` (default: ``LIMITS[key]``)."""
    limit = LIMITS.get(key.rsplit(".", 1)[-1]) if limit is None else limit
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{source}: text_config.{key} = {v!r:.80}, expected a positive integer")
    if limit is not None and v > limit:
        raise ConfigError(f"{source}: text_config.{key} = {v}, expected at most {limit}")
    return v


def _number(v, what: str, low: float, high: float) -> float:
    """``v`` as a float if it is a finite number in (low, high]; ``what`` names it in the error."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low < v <= high:
        raise ConfigError(f"{what} = {v!r:.80}, expected a finite number in ({low:g}, {high:g}]")
    return float(v)


def _parse_rope(params: dict | None, layer_type: str, source: str) -> RopeSpec:
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: text_config.rope_parameters = {params!r:.80}, expected an object keyed by "
                          "layer type")
    p = (params or defaults).get(layer_type)
    if not isinstance(p, dict):
        raise ConfigError(f"{source}: text_config.rope_parameters has no entry for {layer_type!r}")
    kind = p.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ConfigError(
            f"{source}: rope_type {kind!r} for {layer_type} is not supported (expected 'default' or 'proportional')"
        )
    theta = _number(p.get("rope_theta"), f"{source}: rope_theta for {layer_type}", 0.0, ROPE_THETA_MAX)
    partial = _number(p.get("partial_rotary_factor", 1.0), f"{source}: partial_rotary_factor for {layer_type}",
                      0.0, 1.0)
    if kind == "default" and partial != 1.0:
        raise ConfigError(f"{source}: partial rotary ({partial}) is only supported with rope_type 'proportional'")
    factor = _number(p.get("factor", 1.0), f"{source}: rope factor for {layer_type}", 0.0, ROPE_FACTOR_MAX)
    return RopeSpec(kind=kind, theta=float(theta), partial_rotary_factor=partial, factor=factor)


def _parse_text_config(t: dict, outer: dict, source: str) -> ModelConfig:
    ints = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size"):
        ints[key] = _positive(_get(t, key, source, int), key, source)
    max_pos = _positive(_get(t, "max_position_embeddings", source, int, default=131_072), "max_position_embeddings",
                        source)
    if ints["vocab_size"] * ints["hidden_size"] > MAX_EMBEDDING_ELEMENTS:
        raise ConfigError(f"{source}: text_config.vocab_size × hidden_size = {ints['vocab_size']} × "
                          f"{ints['hidden_size']}, expected at most {MAX_EMBEDDING_ELEMENTS} elements")
    eps = _number(_get(t, "rms_norm_eps", source, float, default=1e-6), f"{source}: text_config.rms_norm_eps",
                  0.0, RMS_NORM_EPS_MAX)
    softcap = _number(_get(t, "final_logit_softcapping", source, float, default=30.0),
                      f"{source}: text_config.final_logit_softcapping", 0.0, SOFTCAP_MAX)
    act = t.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_activation {act!r} is not supported (expected 'gelu_pytorch_tanh')")
    if t.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias = true is not supported (DiffusionGemma has no biases)")
    bidir = t.get("use_bidirectional_attention")
    if bidir not in (None, "vision"):
        raise ConfigError(
            f"{source}: use_bidirectional_attention = {bidir!r} is not supported (expected null or 'vision')"
        )
    for where, d in (("tie_word_embeddings", outer), ("text_config.tie_word_embeddings", t)):
        if not isinstance(d.get("tie_word_embeddings", True), bool):
            raise ConfigError(f"{source}: {where} = {d['tie_word_embeddings']!r:.40}, expected true or false")
    if not outer.get("tie_word_embeddings", True) or not t.get("tie_word_embeddings", True):
        raise ConfigError(f"{source}: tie_word_embeddings = false is not supported (lm_head is the embedding)")

    n_layers = ints["num_hidden_layers"]
    n_heads = ints["num_attention_heads"]
    if ints["top_k_experts"] > ints["num_experts"]:
        raise ConfigError(
            f"{source}: top_k_experts = {ints['top_k_experts']} exceeds num_experts = {ints['num_experts']}"
        )
    layer_types = t.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ConfigError(f"{source}: layer_types must list {n_layers} entries (num_hidden_layers)")
    for i, lt in enumerate(layer_types):
        if lt not in (SLIDING, FULL):
            raise ConfigError(f"{source}: layer_types[{i}] = {lt!r}, expected {SLIDING!r} or {FULL!r}")
    # NOTE: transformers forces the last layer to full attention; we follow it so logits agree.
    layer_types = list(layer_types[:-1]) + [FULL]

    window = None
    if SLIDING in layer_types:
        window = _positive(_get(t, "sliding_window", source, int), "sliding_window", source)
        if window < 2:
            raise ConfigError(f"{source}: text_config.sliding_window = {window}, expected at least 2")

    per_layer = _per_layer_overrides(t, layer_types, ints["num_key_value_heads"], source)
    rope_params = t.get("rope_parameters")
    ropes = {lt: _parse_rope(rope_params, lt, source) for lt in set(layer_types)}
    specs = []
    for i, lt in enumerate(layer_types):
        over = per_layer.get(i, {})
        head_dim = _positive(over.get("head_dim", ints["head_dim"]), f"per_layer_config.{i}.head_dim", source)
        kv = _positive(over.get("num_key_value_heads", ints["num_key_value_heads"]),
                       f"per_layer_config.{i}.num_key_value_heads", source)
        if head_dim % 2:
            raise ConfigError(f"{source}: layer {i} head_dim = {head_dim}, expected an even number (RoPE)")
        if n_heads % kv:
            raise ConfigError(
                f"{source}: layer {i}: num_attention_heads = {n_heads} is not a multiple of its "
                f"{kv} key/value heads"
            )
        specs.append(LayerSpec(index=i, kind=lt, head_dim=head_dim, num_kv_heads=kv, rope=ropes[lt],
                               window=window if lt == SLIDING else None))

    eos = t.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for key, ids in (("eos_token_id", eos_ids), ("pad_token_id", (t.get("pad_token_id"),)),
                     ("bos_token_id", (t.get("bos_token_id"),))):
        for i in ids:
            if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < LIMITS["token_id"]):
                raise ConfigError(f"{source}: text_config.{key} = {i!r:.80}, expected a non-negative token id")
            if i is not None and i >= ints["vocab_size"]:
                # Generation (and the text front end's padding / BOS) would use it: every later call would fail.
                raise ConfigError(f"{source}: text_config.{key} = {i} is outside the vocabulary: expected a token "
                                  f"id in [0, {ints['vocab_size']}) (text_config.vocab_size {ints['vocab_size']})")
    canvas = outer.get("canvas_length", 256)
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas <= 0:
        raise ConfigError(f"{source}: canvas_length = {canvas!r:.80}, expected a positive integer")
    if canvas > LIMITS["canvas_length"] or canvas > max_pos:
        raise ConfigError(f"{source}: canvas_length = {canvas}, expected at most "
                          f"{min(LIMITS['canvas_length'], max_pos)} (and max_position_embeddings = {max_pos})")
    return ModelConfig(
        vocab_size=ints["vocab_size"], hidden_size=ints["hidden_size"], intermediate_size=ints["intermediate_size"],
        num_layers=n_layers, num_heads=n_heads, num_experts=ints["num_experts"], top_k=ints["top_k_experts"],
        moe_intermediate_size=ints["moe_intermediate_size"], rms_norm_eps=eps, max_position_embeddings=max_pos,
        final_logit_softcapping=softcap, canvas_length=canvas, layers=tuple(specs),
        pad_token_id=t.get("pad_token_id", 0), bos_token_id=t.get("bos_token_id", 2), eos_token_ids=eos_ids,
        vision=_parse_vision_config(outer.get("vision_config"), source),
        image_token_id=_token_id(outer, "image_token_id", 258_880, ints["vocab_size"], source),
        video_token_id=_token_id(outer, "video_token_id", 258_884, ints["vocab_size"], source),
        boi_token_id=_token_id(outer, "boi_token_id", 255_999, ints["vocab_size"], source),
        eoi_token_id=_token_id(outer, "eoi_token_id", 258_882, ints["vocab_size"], source),
        bidirectional_vision=bidir == "vision",
    )


def _token_id(outer: dict, key: str, default: int, vocab: int, source: str) -> int | None:
    """A special token id of the outer config; None when it lies outside the vocabulary (tiny models)."""
    v = outer.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{source}: {key} = {v!r}, expected a non-negative token id")
    return v if v < vocab else None


def _parse_vision_config(v: dict | None, source: str) -> VisionConfig | None:
    if v is None:
        return None
    src = f"{source}: vision_config"
    if not isinstance(v, dict):
        raise ConfigError(f"{src} must be an object, got {type(v).__name__}")

    def integer(key: str, default: int) -> int:
        x = v.get(key, default)
        limit = LIMITS.get({"num_layers": "num_hidden_layers"}.get(key, key))
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ConfigError(f"{src}.{key} = {x!r:.80}, expected a positive integer")
        if limit is not None and x > limit:
            raise ConfigError(f"{src}.{key} = {x}, expected at most {limit}")
        return x

    def number(x, key: str, high: float) -> float:
        return _number(x, f"{src}.{key}", 0.0, high)

    def flag(key: str) -> bool:
        x = v.get(key, False)
        if not isinstance(x, bool):
            raise ConfigError(f"{src}.{key} = {x!r:.80}, expected true or false")
        return x

    act = v.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{src}.hidden_activation {act!r} is not supported (expected 'gelu_pytorch_tanh')")
    rope = v.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{src}.rope_parameters = {rope!r}: only rope_type 'axial' is supported")
    heads, kv = integer("num_attention_heads", 12), integer("num_key_value_heads", 12)
    head_dim = integer("head_dim", 64)
    if heads % kv:
        raise ConfigError(f"{src}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv}")
    if head_dim % 4:
        raise ConfigError(f"{src}.head_dim = {head_dim}, expected a multiple of 4 (2-D rotary embedding)")
    return VisionConfig(
        hidden_size=integer("hidden_size", 768), intermediate_size=integer("intermediate_size", 3072),
        num_layers=integer("num_hidden_layers", 16), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        rms_norm_eps=number(v.get("rms_norm_eps", 1e-6), "rms_norm_eps", RMS_NORM_EPS_MAX),
        rope_theta=number(rope.get("rope_theta", 100.0), "rope_parameters.rope_theta", ROPE_THETA_MAX),
        pooling_kernel_size=integer("pooling_kernel_size", 3), patch_size=integer("patch_size", 16),
        position_embedding_size=integer("position_embedding_size", 10 * 1024),
        use_clipped_linears=flag("use_clipped_linears"), standardize=flag("standardize"),
    )


def _per_layer_overrides(t: dict, layer_types: list[str], default_kv: int, source: str) -> dict[int, dict]:
    """Head-dim / KV-head overrides of full-attention layers.

    Checkpoints written by transformers carry ``per_layer_config`` ({"5": {"head_dim": 512, ...}});
    hand-written ones may instead give ``global_head_dim`` / ``num_global_key_value_heads``.
    """
    plc = t.get("per_layer_config")
    if plc is not None:
        if not isinstance(plc, dict):
            raise ConfigError(f"{source}: text_config.per_layer_config must be an object keyed by layer index")
        out, keys = {}, {}
        for k, v in plc.items():
            # ASCII digits, zero-padded or not: transformers 5.23 writes "05", "11" (sorting as numbers); int() alone
            # would also take " 5" and "٥".
            if not isinstance(k, str) or not re.fullmatch(r"[0-9]{1,9}", k):
                raise ConfigError(f"{source}: per_layer_config key {k!r} is not a layer index (expected \"0\", "
                                  f"\"1\", ... or \"00\", \"01\", ...)")
            idx = int(k)
            if not 0 <= idx < len(layer_types) or not isinstance(v, dict):
                raise ConfigError(f"{source}: per_layer_config[{k!r}] does not name a layer with an object")
            if idx in keys:
                raise ConfigError(f"{source}: per_layer_config keys {keys[idx]!r} and {k!r} name the same layer {idx}")
            keys[idx] = k
            out[idx] = v
        return out
    head_dim = t.get("global_head_dim", 512)
    kv = t.get("num_global_key_value_heads") or default_kv
    return {i: {"head_dim": head_dim, "num_key_value_heads": kv} for i, lt in enumerate(layer_types) if lt == FULL}
