"""Checkpoint formats: how a quantised checkpoint stores the weights of :func:`dgemma.weights.weight_map`.

The format is read from ``config.json``'s ``quantization_config`` (or, for ModelOpt exports,
``hf_quant_config.json``) by :func:`detect_format`. Every format works on the same names: a Linear
layer ``<module>`` whose dense weight ``<module>.weight`` is ``[out, in]`` is stored as

* dense (no ``quantization_config``): ``<module>.weight`` in F32/BF16/F16.
* compressed-tensors FP8 (``format: "float-quantized"``, or ``"naive-quantized"`` with 8-bit float
  weights): ``<module>.weight`` F8_E4M3 ``[out, in]`` and ``<module>.weight_scale`` (F32/BF16/F16)
  ``[out, 1]`` per output channel or ``[1]`` per tensor; the weight is ``float(q) * scale``. A
  static activation scale ``<module>.input_scale`` ``[1]`` may follow; dgemma quantises activations
  per token instead, so it is validated and not used.
* compressed-tensors NVFP4 (``format: "nvfp4-pack-quantized"``): ``<module>.weight_packed`` U8
  ``[out, in/2]``, ``<module>.weight_scale`` F8_E4M3 ``[out, in/16]``, ``<module>.weight_global_scale``
  F32 ``[1]`` (and the unused ``<module>.input_global_scale`` F32 ``[1]``); the weight is
  ``e2m1 * (float(weight_scale) / weight_global_scale)`` per block of 16 inputs.
* ModelOpt NVFP4 (``quant_method: "modelopt"``, ``quant_algo: "NVFP4"``): ``<module>.weight`` U8
  ``[out, in/2]``, ``<module>.weight_scale`` F8_E4M3 ``[out, in/16]``, ``<module>.weight_scale_2``
  F32 ``[]`` or ``[1]`` (and the unused ``<module>.input_scale``); the weight is
  ``e2m1 * float(weight_scale) * weight_scale_2``.

NVFP4 packs two E2M1 codes per byte, the even input column in the low nibble (the same in
compressed-tensors' ``pack_fp4_to_uint8`` and ModelOpt's ``NVFP4QTensor``); a code is
``sign << 3 | index`` into ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.

NOTE: compressed-tensors quantises only Linear modules: the fused MoE experts (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj``) are 3-D parameters and stay dense in its output (so do the
modules in the checkpoint's ignore list: router, self-conditioning, vision tower, lm_head in the
usual recipes). The formats here accept exactly that; a quantised expert tensor is refused.

FP8 weights are kept as stored (:class:`~dgemma.quant.Fp8Weight`, the scale broadcast to one fp32
value per output channel) where dgemma runs FP8 (:attr:`WeightSpec.quantized`), and dequantised to
the model dtype elsewhere; NVFP4 weights are dequantised to the model dtype on load (the reference
backend runs them).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .config import read_json_file
from .errors import CheckpointError, ConfigError
from .quant import Fp8Weight

# The safetensors dtypes quantised tensors are stored in, beyond the float ones the loader reads.
STORED_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8}
FLOAT_DTYPES = ("F32", "BF16", "F16")
NVFP4_BLOCK = 16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
HF_QUANT_CONFIG = "hf_quant_config.json"
SUPPORTED = "expected compressed-tensors FP8/NVFP4 or modelopt NVFP4"


@dataclass(frozen=True, slots=True)
class Part:
    """One stored tensor of a quantised weight: its role (``q``, ``scale``, ``global_scale``,
    ``input_scale``), checkpoint key, accepted shapes and safetensors dtypes."""

    role: str
    key: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class StoredWeight:
    """A weight the checkpoint stores quantised: the dense name it stands for and its parts present."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.parts)


def _shape_str(shapes) -> str:
    return " or ".join(str(list(s)) for s in shapes)


class CheckpointFormat:
    """Dense checkpoints; the base of the quantised formats (which override the layout and decoding)."""

    name = "dense"
    # Suffixes (after ``<module>.``) of the tensors a quantised weight brings besides ``weight``.
    extra_suffixes: tuple[str, ...] = ()
    # Whether the dense weight's own key (``<module>.weight``) is absent when it is quantised.
    renames_weight = False

    def __init__(self, ignore=(), source: str = "config.json"):
        self.ignore = tuple(ignore)
        self.source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ignore={len(self.ignore)} entries)"

    # -- the ignore list ------------------------------------------------------------------------

    def is_ignored(self, module: str) -> bool:
        """Whether the checkpoint's ignore list names ``module`` (compressed-tensors: exact names and
        ``re:`` patterns matched from the start, as its ``match_name``)."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif pattern == module:
                return True
        return False

    # -- layout ---------------------------------------------------------------------------------

    def parts(self, name: str, shape: tuple[int, ...]) -> tuple[Part, ...]:
        """The stored tensors of the quantised form of the dense weight ``name`` of ``shape``."""
        return ()

    def stores_quantized(self, name: str, entries: Mapping) -> bool:
        """Whether the checkpoint holds ``name`` (a ``<module>.weight``) in this format's quantised form."""
        return False

    def present(self, name: str, entries: Mapping) -> bool:
        """Whether the checkpoint holds the dense tensor ``name``, as stored or in quantised form."""
        return name in entries or (name.endswith(".weight") and self.stores_quantized(name, entries))

    def base_of(self, key: str) -> str | None:
        """The dense weight name an extra tensor ``key`` of this format belongs to (else None)."""
        module, _, suffix = key.rpartition(".")
        if module and suffix in self.extra_suffixes:
            return module + ".weight"
        return None

    def plan(self, expected: Mapping[str, tuple[int, ...]], entries: Mapping) -> dict[str, StoredWeight]:
        """Which of the ``expected`` dense tensors the checkpoint stores quantised, validated.

        ``entries`` maps checkpoint keys to objects with ``dtype`` (safetensors name), ``shape`` and
        ``file`` (:class:`dgemma.checkpoint.TensorEntry`). Every part of a quantised weight is checked
        for presence, dtype and shape; a quantised weight of a module in the ignore list, and a
        quantised tensor this format cannot hold (a 3-D expert tensor), are refused by name.
        """
        out: dict[str, StoredWeight] = {}
        for name, shape in expected.items():
            linear = name.endswith(".weight") and len(shape) == 2
            if linear and self.stores_quantized(name, entries):
                out[name] = self._validate(name, tuple(shape), entries)
                continue
            e = entries.get(name)
            extras = [] if linear else [k for k in (f"{name}_scale", f"{name}_packed") if k in entries]
            if (e is not None and e.dtype in STORED_DTYPES) or extras:
                file = e.file if e is not None else entries[extras[0]].file
                what = f"dtype {e.dtype}" if e is not None and e.dtype in STORED_DTYPES else f"tensor {extras[0]!r}"
                if not linear:
                    why = "compressed-tensors quantises Linear modules only; dgemma reads no other quantised layout"
                elif type(self) is CheckpointFormat:
                    why = f"{self.source} has no quantization_config"
                else:
                    why = f"{self.name} stores this weight in other dtypes"
                raise CheckpointError(f"{file}: tensor {name!r} is stored quantised ({what}); a {self.name} "
                                      f"checkpoint holds it dense (F32/BF16/F16): {why}")
        return out

    def _validate(self, name: str, shape: tuple[int, ...], entries: Mapping) -> StoredWeight:
        module = name[: -len(".weight")]
        parts = self.parts(name, shape)
        file = _file_of(entries, [p.key for p in parts])
        if self.is_ignored(module):
            raise CheckpointError(
                f"{file}: tensor {name!r} of module {module!r} is stored quantised ({self.name}), but the "
                f"module is in {self.source}'s quantization ignore list: expected a dense weight")
        present = []
        for part in parts:
            e = entries.get(part.key)
            if e is None:
                if part.optional:
                    continue
                raise CheckpointError(f"{file}: missing tensor {part.key!r} ({self.name} {part.role} of "
                                      f"{name!r}: {'/'.join(part.dtypes)} {_shape_str(part.shapes)})")
            if e.dtype not in part.dtypes:
                raise CheckpointError(f"{e.file}: tensor {part.key!r} has dtype {e.dtype}, expected "
                                      f"{' or '.join(part.dtypes)} ({self.name} {part.role} of {name!r})")
            if tuple(e.shape) not in part.shapes:
                raise CheckpointError(f"{e.file}: tensor {part.key!r} has shape {list(e.shape)}, expected "
                                      f"{_shape_str(part.shapes)} ({self.name} {part.role} of {name!r} "
                                      f"{list(shape)})")
            present.append(part)
        return StoredWeight(name, shape, tuple(present))

    # -- decoding -------------------------------------------------------------------------------

    def build(self, stored: StoredWeight, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
              device: torch.device | str = "cpu", keep_fp8: bool = True):
        """What dgemma holds for ``stored`` from its parts (``tensors`` by checkpoint key, as read)."""
        raise NotImplementedError(f"{self.name} checkpoints store no quantised weights")


def _file_of(entries: Mapping, keys) -> str:
    for k in keys:
        if k in entries:
            return entries[k].file
    return "checkpoint"


def _require_finite(t: torch.Tensor, key: str, what: str) -> None:
    bad = ~torch.isfinite(t.float())
    if bool(bad.any()):
        i = [int(x) for x in bad.nonzero()[0]]
        raise CheckpointError(f"tensor {key!r} ({what}) holds a non-finite value at index {i}: the checkpoint "
                              "is corrupt")


def _require_scale(t: torch.Tensor, key: str, what: str, *, positive: bool = False) -> None:
    """A quantisation scale: finite, never negative (a sign is the values' to carry), not all zero (the whole
    tensor would be zero); ``positive``: no zero at all (a scale that is divided by)."""
    _require_finite(t, key, what)
    t = t.float()
    bad = (t <= 0) if positive else (t < 0)
    if bool(bad.any()):
        i = [int(x) for x in bad.nonzero()[0]] if t.dim() else []
        raise CheckpointError(f"tensor {key!r} ({what}) holds {float(t[tuple(i)]):g} at index {i}: scales are "
                              f"{'positive' if positive else 'non-negative'}; the checkpoint is corrupt")
    if not bool((t != 0).any()):
        raise CheckpointError(f"tensor {key!r} ({what}) is all zero: the checkpoint is corrupt")


class CompressedTensorsFp8(CheckpointFormat):
    """compressed-tensors ``float-quantized`` E4M3 weights, per-channel or per-tensor scales."""

    name = "compressed-tensors FP8"
    extra_suffixes = ("weight_scale", "input_scale")

    def parts(self, name, shape):
        module = name[: -len(".weight")]
        out, _ = shape
        return (Part("q", name, (tuple(shape),), ("F8_E4M3",)),
                Part("scale", module + ".weight_scale", ((out, 1), (1,), (out,), ()), FLOAT_DTYPES),
                Part("input_scale", module + ".input_scale", ((1,), ()), FLOAT_DTYPES, optional=True))

    def stores_quantized(self, name, entries):
        e = entries.get(name)
        return (e is not None and e.dtype == "F8_E4M3") or name[: -len("weight")] + "weight_scale" in entries

    def build(self, stored, tensors, *, dtype, device="cpu", keep_fp8=True):
        roles = {p.role: p.key for p in stored.parts}
        q, scale = tensors[roles["q"]], tensors[roles["scale"]]
        out = stored.shape[0]
        # NOTE: the scale is used as stored (bf16/fp16 -> fp32 is exact), one value per output channel;
        # a per-tensor scale is repeated per channel, so float(q) * scale is exactly the checkpoint's weight.
        scale = scale.float().reshape(-1)
        scale = scale.expand(out).clone() if scale.numel() == 1 else scale.contiguous()
        _require_scale(scale, roles["scale"], "FP8 weight scale")
        if bool(((q.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise CheckpointError(f"tensor {roles['q']!r} holds an FP8 NaN: the checkpoint is corrupt")
        w = Fp8Weight(q.to(device), scale.to(device))
        return w if keep_fp8 else w.dequantize(dtype)


class _Nvfp4(CheckpointFormat):
    """E2M1 values, an E4M3 scale per block of 16 inputs and one fp32 scale per tensor."""

    def _packed_shape(self, shape):
        out, n = shape
        blocks = -(-n // NVFP4_BLOCK)
        return (out, blocks * NVFP4_BLOCK // 2), (out, blocks)

    def build(self, stored, tensors, *, dtype, device="cpu", keep_fp8=True):
        roles = {p.role: p.key for p in stored.parts}
        packed, block_scale = tensors[roles["q"]], tensors[roles["scale"]]
        tensor_scale = tensors[roles["global_scale"]].float().reshape(())
        _require_scale(tensor_scale, roles["global_scale"], "NVFP4 per-tensor scale", positive=True)
        _require_scale(block_scale, roles["scale"], "NVFP4 block scale")
        out, n = stored.shape
        packed = packed.to(device)
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(out, -1)  # low nibble first
        values = torch.tensor(E2M1_VALUES, device=device)[(codes & 0x07).long()]
        values = torch.where((codes & 0x08).bool(), -values, values)
        scale = self._block_scale(block_scale.to(device).float(), tensor_scale.to(device))
        w = (values.view(out, -1, NVFP4_BLOCK) * scale.unsqueeze(-1)).reshape(out, -1)[:, :n]
        w = w.to(dtype).contiguous()
        _require_finite(w, roles["q"], f"NVFP4 weight dequantised to {dtype}")  # e.g. a tiny per-tensor scale
        return w

    def _block_scale(self, block_scale, tensor_scale):
        raise NotImplementedError


class CompressedTensorsNvfp4(_Nvfp4):
    """compressed-tensors ``nvfp4-pack-quantized`` (its NVFP4 / NVFP4A16 presets)."""

    name = "compressed-tensors NVFP4"
    extra_suffixes = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    renames_weight = True

    def parts(self, name, shape):
        module = name[: -len(".weight")]
        packed, scale = self._packed_shape(shape)
        return (Part("q", module + ".weight_packed", (packed,), ("U8",)),
                Part("scale", module + ".weight_scale", (scale,), ("F8_E4M3",)),
                Part("global_scale", module + ".weight_global_scale", ((1,), ()), ("F32",)),
                Part("input_scale", module + ".input_global_scale", ((1,), ()), ("F32",), optional=True))

    def stores_quantized(self, name, entries):
        module = name[: -len(".weight")]
        if module + ".weight_packed" not in entries:
            return any(module + "." + s in entries for s in self.extra_suffixes)
        if name in entries:
            raise CheckpointError(f"{entries[name].file}: module {module!r} has both a dense {name!r} and a "
                                  f"packed {module + '.weight_packed'!r}: expected one of them")
        return True

    def _block_scale(self, block_scale, tensor_scale):
        # compressed-tensors divides: scale = weight_scale / weight_global_scale (its _dequantize).
        return block_scale / tensor_scale


class ModelOptNvfp4(_Nvfp4):
    """ModelOpt's unified Hugging Face export with ``quant_algo: "NVFP4"``."""

    name = "modelopt NVFP4"
    extra_suffixes = ("weight_scale", "weight_scale_2", "input_scale")

    def is_ignored(self, module: str) -> bool:
        # ModelOpt's exclude_modules are shell-style wildcards (e.g. "*vision_tower*", "lm_head").
        return any(fnmatch.fnmatchcase(module, p) for p in self.ignore)

    def parts(self, name, shape):
        module = name[: -len(".weight")]
        packed, scale = self._packed_shape(shape)
        return (Part("q", name, (packed,), ("U8",)),
                Part("scale", module + ".weight_scale", (scale,), ("F8_E4M3",)),
                Part("global_scale", module + ".weight_scale_2", ((), (1,)), ("F32",)),
                Part("input_scale", module + ".input_scale", ((), (1,)), ("F32",), optional=True))

    def stores_quantized(self, name, entries):
        e = entries.get(name)
        module = name[: -len(".weight")]
        return (e is not None and e.dtype == "U8") or any(module + "." + s in entries for s in self.extra_suffixes)

    def _block_scale(self, block_scale, tensor_scale):
        # ModelOpt multiplies: scale = weight_scale * weight_scale_2 (NVFP4QTensor.dequantize).
        return block_scale * tensor_scale


# -- detection ------------------------------------------------------------------------------------


def _ignore_list(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of module names, got {value!r:.80}")
    return tuple(value)


def detect_format(path: str) -> CheckpointFormat:
    """The format of the checkpoint directory ``path``, from ``config.json``'s ``quantization_config``
    (or ``hf_quant_config.json`` for a ModelOpt export); unsupported schemes are refused by name
    (:class:`~dgemma.errors.ConfigError`)."""
    config_path = os.path.join(path, "config.json")
    config = read_json_file(config_path) if os.path.isfile(config_path) else {}
    qc = config.get("quantization_config")
    if qc is None:
        hf_quant = os.path.join(path, HF_QUANT_CONFIG)
        if os.path.isfile(hf_quant):
            return format_from_config(read_json_file(hf_quant), hf_quant)
        return CheckpointFormat(source=config_path)
    return format_from_config(qc, config_path)


def format_from_config(qc, source: str) -> CheckpointFormat:
    """The format a ``quantization_config`` dict (or a ModelOpt ``hf_quant_config.json``) describes;
    ``source`` names the file in errors."""
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(qc).__name__}")
    if "quant_method" not in qc and isinstance(qc.get("quantization"), dict):  # hf_quant_config.json
        producer = qc.get("producer", {}).get("name") if isinstance(qc.get("producer"), dict) else None
        if producer not in (None, "modelopt"):
            raise ConfigError(f"{source}: producer {producer!r:.40} is not supported ({SUPPORTED})")
        nested = qc["quantization"]
        return _modelopt(nested.get("quant_algo"), nested.get("group_size"), nested.get("exclude_modules"),
                         f"{source}: quantization", source)
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where, source)
    if method == "modelopt":
        ignore = qc.get("ignore", qc.get("exclude_modules"))
        return _modelopt(qc.get("quant_algo"), qc.get("group_size"), ignore, where, source)
    raise ConfigError(f"{where} quant_method {method!r:.40} is not supported ({SUPPORTED})")


# Ignore patterns are matched against every module name at load: patterns whose backtracking can blow up are
# refused. Repeats with more than this many possible iterations count as open-ended; a pattern may hold a few of
# those (k of them cost about C(len(name), k) steps on a name: tens of thousands for names of ~40 characters).
_REPEAT_BOUND = 64
_MAX_OPEN_REPEATS = 5


def _slow_regex(pattern: str) -> str | None:
    """Why ``pattern`` (a valid regular expression) may backtrack without bound on a name, or None: a repeat of
    a variable count inside another (``(.*)*``, ``(a+)+``, ``(.{1,60}){1,60}``), alternatives inside a repeat of a
    variable count (``(a|ab)*``, ``(aa|a){1,60}``), a backreference, or more than a few open-ended repeats (``.*``
    n times matches in about length^n / n! steps)."""
    try:
        from re import _constants as c, _parser as parser  # noqa: PLC2701 - the stdlib's own parser
    except ImportError:  # a Python without them: only the length is bounded
        return "a pattern over 200 characters" if len(pattern) > 200 else None
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))
    count = 0
    stack = [(parser.parse(pattern), False)]
    while stack:
        items, inside = stack.pop()
        for op, av in items:
            if op in repeats:
                low, high, sub = av
                variable = low != high  # a fixed count ({3}) leaves nothing to try again
                if variable and inside:
                    return "a repeat inside a repeat"
                if variable and any(o == c.BRANCH for o, _ in sub):
                    return "a repeat of alternatives"
                count += high == c.MAXREPEAT or high > _REPEAT_BOUND
                stack.append((sub, inside or variable))
            elif op == c.SUBPATTERN:
                stack.append((av[-1], inside))
            elif op == c.BRANCH:
                if inside:
                    return "a repeat of alternatives"
                stack.extend((branch, inside) for branch in av[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                stack.append((av[1], inside))
            elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return "a backreference"
    return f"{count} open-ended repeats" if count > _MAX_OPEN_REPEATS else None


def _modelopt(algo, group_size, ignore, where: str, source: str) -> CheckpointFormat:
    if algo != "NVFP4":
        raise ConfigError(f"{where} quant_algo {algo!r:.40} is not supported ({SUPPORTED})")
    if group_size not in (None, NVFP4_BLOCK):
        raise ConfigError(f"{where} group_size {group_size!r:.20} is not supported (NVFP4 uses {NVFP4_BLOCK})")
    return ModelOptNvfp4(_ignore_list(ignore, f"{where} ignore/exclude_modules"), source)


_CT_FORMATS = {"float-quantized": "fp8", "naive-quantized": "fp8", "nvfp4-pack-quantized": "nvfp4"}


def _compressed_tensors(qc: dict, where: str, source: str) -> CheckpointFormat:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{where} quantization_status {status!r:.40} is not supported (expected 'compressed': "
                          "weights stored in their quantised form)")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(key):
            raise ConfigError(f"{where} {key} is not supported (expected it empty or null)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where} config_groups must be a non-empty object")
    kinds = set()
    for gname, group in groups.items():
        g = f"{where} config_groups.{gname}"
        if not isinstance(group, dict):
            raise ConfigError(f"{g} must be an object")
        fmt = group.get("format") or qc.get("format")
        if not isinstance(fmt, str) or fmt not in _CT_FORMATS:
            inherited = "" if group.get("format") else f"; the group takes {where}'s own format"
            raise ConfigError(f"{g} format {fmt!r:.40} is not supported: expected one of "
                              f"{', '.join(repr(f) for f in _CT_FORMATS)} ({SUPPORTED}){inherited}")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise ConfigError(f"{g}.weights must be an object (weight quantisation is required)")
        kind = _CT_FORMATS[fmt]
        if fmt == "naive-quantized" and not (w.get("type") == "float" and w.get("num_bits") == 8):
            raise ConfigError(f"{g} format 'naive-quantized' with {w.get('num_bits')}-bit {w.get('type')} "
                              f"weights is not supported ({SUPPORTED})")
        if not isinstance(w.get("symmetric", True), bool):
            raise ConfigError(f"{g}.weights symmetric = {w['symmetric']!r:.40}, expected true or false")
        if not w.get("symmetric", True):
            raise ConfigError(f"{g}.weights symmetric false is not supported (expected symmetric weights)")
        if w.get("dynamic"):
            raise ConfigError(f"{g}.weights dynamic {w.get('dynamic')!r} is not supported (expected stored weights)")
        if kind == "fp8":
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ConfigError(f"{g}.weights {w.get('num_bits')}-bit {w.get('type')} is not supported "
                                  "(FP8 expects 8-bit float)")
            if w.get("strategy") not in ("channel", "tensor"):
                raise ConfigError(f"{g}.weights strategy {w.get('strategy')!r:.40} is not supported "
                                  "(FP8 expects 'channel' or 'tensor')")
        else:
            if (w.get("type"), w.get("num_bits"), w.get("group_size")) != ("float", 4, NVFP4_BLOCK) or \
                    w.get("strategy") not in ("tensor_group", None):
                raise ConfigError(f"{g}.weights ({w.get('num_bits')}-bit {w.get('type')}, strategy "
                                  f"{w.get('strategy')!r}, group_size {w.get('group_size')!r}) is not NVFP4 "
                                  f"(4-bit float, 'tensor_group', group_size {NVFP4_BLOCK})")
        a = group.get("input_activations")
        if kind == "fp8" and isinstance(a, dict) and a.get("type") not in (None, "float"):
            raise ConfigError(f"{g}.input_activations type {a.get('type')!r:.20} is not supported (dgemma "
                              "quantises activations to FP8 per token)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise ConfigError(f"{where} mixes FP8 and NVFP4 config_groups: not supported (expected one format)")
    ignore = _ignore_list(qc.get("ignore"), f"{where} ignore")
    for pattern in ignore:  # compressed-tensors' "re:" entries are regular expressions: refuse a bad one now
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise ConfigError(f"{where} ignore entry {pattern!r:.80} is not a valid regular expression ({e}): "
                                  "expected a module name or 're:' followed by a Python regular expression") from None
            slow = _slow_regex(pattern[3:])
            if slow:
                raise ConfigError(f"{where} ignore entry {pattern!r:.80}: {slow}, which can take exponential time "
                                  "to match a module name; expected a pattern like 're:.*vision_tower.*'")
    return CompressedTensorsFp8(ignore, source) if kinds == {"fp8"} else CompressedTensorsNvfp4(ignore, source)
