"""Property tests: any header, config or generate argument gives a DgemmaError or a correct result, never
another exception. Each is bounded to a few seconds."""

import copy
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma.checkpoint import read_header
from dgemma.config import ModelConfig
from dgemma.errors import CheckpointError, ConfigError, DgemmaError
from dgemma.random_checkpoint import preset_config, random_engine

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)


def _file(tmp_path_factory, raw: bytes) -> str:
    path = tmp_path_factory.mktemp("fz") / "m.safetensors"
    path.write_bytes(raw)
    return str(path)


@FAST
@given(data=st.binary(max_size=256))
def test_header_parser_random_bytes(tmp_path_factory, data):
    try:
        read_header(_file(tmp_path_factory, data))
    except CheckpointError:
        pass


@FAST
@given(data=st.binary(max_size=64), header=json_values)
def test_header_parser_random_json(tmp_path_factory, data, header):
    raw = json.dumps(header).encode()
    try:
        read_header(_file(tmp_path_factory, struct.pack("<Q", len(raw)) + raw + data))
    except CheckpointError:
        pass


dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "I8", "XX"])
entry = st.fixed_dictionaries({
    "dtype": dtypes,
    "shape": st.lists(st.one_of(st.integers(0, 4), st.integers(-2, 2**65), st.booleans(), st.text(max_size=2)),
                      max_size=3),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2),
                              st.lists(st.integers(0, 80), max_size=3), st.lists(st.text(max_size=2), max_size=2)),
})


@st.composite
def headers(draw):
    """Mostly well-formed safetensors headers (contiguous offsets from valid shapes), with random damage."""
    n = draw(st.integers(0, 4))
    header, offset = {}, 0
    for i in range(n):
        if draw(st.booleans()):
            dtype = draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I64"]))
            shape = draw(st.lists(st.integers(0, 3), max_size=3))
            size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8}[dtype]
            for s in shape:
                size *= s
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        else:
            header[f"t{i}"] = draw(entry)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                                max_size=2), json_values))
    slack = draw(st.integers(-3, 3))
    return header, max(0, offset + slack)


@FAST
@given(spec=headers())
def test_header_parser_agrees_with_safetensors(tmp_path_factory, spec):
    from safetensors import safe_open

    header, nbytes = spec
    raw = json.dumps(header).encode()
    path = _file(tmp_path_factory, struct.pack("<Q", len(raw)) + raw + bytes(nbytes))
    try:
        ours = read_header(path)
    except CheckpointError:
        ours = None
    try:
        with safe_open(path, "pt") as f:
            theirs = set(f.keys())
    except Exception:  # noqa: BLE001 - the library's own error types vary
        theirs = None
    assert (ours is None) == (theirs is None), (header, nbytes)
    if ours is not None:
        assert set(ours) == theirs


# -- config -------------------------------------------------------------------------------------

BASE = preset_config("tiny")
TEXT_KEYS = sorted(BASE["text_config"]) + ["global_head_dim", "num_global_key_value_heads"]
OUTER_KEYS = ["canvas_length", "vision_config", "image_token_id", "tie_word_embeddings", "text_config"]


@FAST
@given(edits=st.lists(st.tuples(st.booleans(), st.sampled_from(TEXT_KEYS + OUTER_KEYS), json_values), max_size=4))
def test_config_validator(edits):
    raw = copy.deepcopy(BASE)
    for outer, key, value in edits:
        if outer or key not in TEXT_KEYS or not isinstance(raw.get("text_config"), dict):
            raw[key] = value
        else:
            raw["text_config"][key] = value
    try:
        cfg = ModelConfig.from_dict(raw)
    except ConfigError:
        return
    assert 0 < cfg.canvas_length <= 4096 and 0 < cfg.num_layers <= 1024
    assert 0 < cfg.rms_norm_eps <= 0.1 and all(0 < s.rope.theta <= 1e12 for s in cfg.layers)


# -- generate arguments --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eng():
    return random_engine("tiny", seed=0, canvas_length=8)


args = st.fixed_dictionaries({}, optional={
    "max_new_tokens": json_scalars, "max_denoising_steps": json_scalars, "entropy_bound": json_scalars,
    "t_max": json_scalars, "t_min": json_scalars, "stability_threshold": json_scalars,
    "confidence_threshold": json_scalars, "eos_token_id": json_values, "pad_token_id": json_values,
    "seed": json_scalars, "capacity": json_scalars,
    "attention_mask": st.lists(st.lists(st.integers(-1, 2), min_size=1, max_size=5), min_size=1, max_size=2),
    "canvas": st.lists(st.lists(st.integers(-1, 600), min_size=1, max_size=9), min_size=1, max_size=2),
})


@FAST
@given(ids=st.one_of(st.lists(st.lists(st.integers(-1, 600), min_size=1, max_size=5), min_size=1, max_size=2),
                     json_values),
       kw=args)
def test_generate_argument_checks(eng, ids, kw):
    try:
        it = eng.generate_stream(ids, **kw)
    except DgemmaError:
        return
    try:
        first = next(it)  # the arguments were accepted: the first step runs
    finally:
        it.close()
    assert first.kind in ("draft", "block", "result")


def test_huge_integer_sampling_numbers_are_floats_or_refused(eng):
    """A real-valued setting given as an int beyond 64 bits (found by the fuzzer above) is held as a float, so the
    sampler's tensor arithmetic takes it; one beyond the float range is refused by name."""
    from dgemma.sampler import GenerationSettings

    s = GenerationSettings(entropy_bound=2**64, confidence_threshold=2**64).validate()
    assert isinstance(s.entropy_bound, float) and s.entropy_bound == 2.0**64
    it = eng.generate_stream([[0]], entropy_bound=2**64, confidence_threshold=2**64)
    try:
        assert next(it).kind in ("draft", "block", "result")
    finally:
        it.close()
    with pytest.raises(DgemmaError, match="t_max must be a finite number"):
        GenerationSettings(t_max=10**400).validate()
