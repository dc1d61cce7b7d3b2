"""Bad input case by case: each gets a DgemmaError naming the value, the engine stays usable, caches
and sessions are unchanged by a failed call, and resources stay bounded."""

import json
import math
import os
import struct
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma.cache import KVCache
from dgemma.chat import ChatTemplate
from dgemma.checkpoint import load_tensors, read_header
from dgemma.config import ModelConfig
from dgemma.errors import CheckpointError, ConfigError, DgemmaError, NonFiniteError
from dgemma.generation import GenerationResult
from dgemma.random_checkpoint import preset_config, write_random_checkpoint

CANVAS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("hard") / "ck", "tiny", seed=3, canvas_length=CANVAS)


@pytest.fixture(scope="module")
def eng(ckpt):
    return dgemma.load(ckpt, dtype=torch.float32)


def _prompt(n, seed=0, batch=1):
    return torch.randint(3, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


# -- checkpoint files ---------------------------------------------------------------------------


def _write_st(path, header, data: bytes = b"", raw_header: bytes | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _f32(n):
    return {"dtype": "F32", "shape": [n], "data_offsets": None}


@pytest.mark.parametrize("header,data,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"'b'.*expected to start at byte 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), r"'b'.*must be contiguous"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), r"'a'.*expected to start at byte 0"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), r"trailing data"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), r"'a': 8 bytes for shape \[3\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8), r"'a': data_offsets \['0', '8'\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), r"'a': data_offsets \[-8, 0\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), r"'a': data_offsets \[0\] is not a pair"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), r"'a': shape \[True\]"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), r"'a': shape \[-1\]"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"'a': dtype 'Q4' is not a safetensors"),
    ({"a": [1, 2]}, b"", r"'a': expected an object"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8), r"too many elements"),
    ({"__metadata__": {"x": 1}}, b"", r"__metadata__ must map strings to strings"),
    ([1, 2], b"", r"does not start with"),
])
def test_header_validation_is_safetensors(tmp_path, header, data, message):
    f = _write_st(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(f)
    assert "m.safetensors" in str(e.value)
    # The safetensors library refuses each of these files too.
    from safetensors import safe_open

    with pytest.raises(Exception):
        with safe_open(f, "pt"):
            pass


def test_header_deep_json_duplicates_start_and_size(tmp_path):
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CheckpointError, match=r"nested too deeply"):
        read_header(_write_st(tmp_path / "deep.safetensors", None, raw_header=deep))
    dup = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {}}'
    with pytest.raises(CheckpointError, match=r"key 'a' appears twice"):
        read_header(_write_st(tmp_path / "dup.safetensors", None, raw_header=dup))
    with pytest.raises(CheckpointError, match=r"does not start with"):
        read_header(_write_st(tmp_path / "ws.safetensors", None, raw_header=b'  {"a": 1}'))
    with open(tmp_path / "big.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{" + bytes(16))
    with pytest.raises(CheckpointError, match=r"more than the limit of 100000000"):
        read_header(str(tmp_path / "big.safetensors"))
    # A valid file with metadata and an empty tensor reads.
    ok = _write_st(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"},
                                                 "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]},
                                                 "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    assert set(read_header(ok)) == {"e", "w"}


def _sharded(tmp_path, name="sh"):
    return write_random_checkpoint(tmp_path / name, "tiny", seed=1, shards=2, canvas_length=CANVAS)


def _edit_index(path, fn):
    p = f"{path}/model.safetensors.index.json"
    with open(p) as f:
        raw = json.load(f)
    fn(raw["weight_map"]) if isinstance(raw.get("weight_map"), dict) else None
    with open(p, "w") as f:
        json.dump(fn(raw) if not isinstance(raw.get("weight_map"), dict) else raw, f)


@pytest.mark.parametrize("value,message", [
    ("../other/x.safetensors", r"lies outside the checkpoint directory"),
    ("/etc/passwd", r"lies outside the checkpoint directory"),
    ("sub/../../x.safetensors", r"lies outside the checkpoint directory"),
    (["a"], r"expected a shard file name"),
    (7, r"expected a shard file name"),
    (None, r"expected a shard file name"),
    ("", r"expected a shard file name"),
])
def test_index_shard_paths_are_confined(tmp_path, value, message):
    path = _sharded(tmp_path)
    key = "model.decoder.norm.weight"

    def edit(wm):
        wm[key] = value
    _edit_index(path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        dgemma.load(path)
    assert key in str(e.value) and "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {}}, {"weight_map": "x"}, "[" * 100_000])
def test_odd_index_files(tmp_path, index):
    path = _sharded(tmp_path)
    with open(f"{path}/model.safetensors.index.json", "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid safetensors index"):
        dgemma.load(path)


def test_symlink_escaping_the_directory_is_refused(tmp_path):
    path = _sharded(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
    os.replace(f"{path}/{shard}", outside / shard)
    os.symlink(outside / shard, f"{path}/{shard}")
    with pytest.raises(CheckpointError, match=r"is a link to .*outside the checkpoint directory"):
        dgemma.load(path)
    # A link inside the directory is fine, and so is the Hugging Face cache layout.
    os.remove(f"{path}/{shard}")
    os.makedirs(f"{path}/real")
    os.replace(outside / shard, f"{path}/real/{shard}")
    os.symlink(f"{path}/real/{shard}", f"{path}/{shard}")
    dgemma.load(path)
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    snap = repo / "snapshots" / "abc"
    single = write_random_checkpoint(tmp_path / "single", "tiny", seed=1, canvas_length=CANVAS)
    os.makedirs(snap)
    for name in os.listdir(single):
        os.replace(f"{single}/{name}", repo / "blobs" / name)
        os.symlink(f"../../blobs/{name}", snap / name)
    dgemma.load(snap)


def test_weights_do_not_depend_on_the_file_after_load(tmp_path):
    path = write_random_checkpoint(tmp_path / "ck", "tiny", seed=2, canvas_length=CANVAS)
    eng = dgemma.load(path, dtype=torch.float32)
    before = eng.generate(_prompt(5), max_new_tokens=8, max_denoising_steps=3, seed=1).sequences
    f = f"{path}/model.safetensors"
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:  # overwritten in place, then truncated: a mapping would change or SIGBUS
        fh.seek(size // 2)
        fh.write(bytes(size - size // 2))
        fh.truncate(1024)
    after = eng.generate(_prompt(5), max_new_tokens=8, max_denoising_steps=3, seed=1).sequences
    assert torch.equal(before, after)


def test_nonfinite_weights_are_refused_at_load(tmp_path):
    path = write_random_checkpoint(tmp_path / "ck", "tiny", seed=2, canvas_length=CANVAS)
    f = f"{path}/model.safetensors"
    tensors = load_file(f)
    key = "model.decoder.layers.2.mlp.down_proj.weight"
    assert key in tensors
    tensors[key][3, 4] = float("nan")
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"tensor 'model.decoder.layers.2.mlp.down_proj.weight' holds a "
                                              r"non-finite value \(nan\) at index \[3, 4\]"):
        dgemma.load(path)
    cfg = ModelConfig.from_file(f"{path}/config.json")
    out = load_tensors(path, cfg, dtype=torch.float32, device=torch.device("cpu"), check_finite=False)
    assert math.isnan(out[key][3, 4])


def test_nonfinite_logits_at_run_time_name_the_layer(ckpt):
    eng = dgemma.load(ckpt, dtype=torch.float32)
    eng.model.w.layers[3].post_ff_norm.fill_(float("nan"))
    cache = eng.encode(_prompt(6), capacity=64)
    with pytest.raises(NonFiniteError, match=r"not finite .*block 0, denoising step 3, first non-finite output at "
                                             r"decoder layer 3"):
        eng.generate(_prompt(3), cache=cache, max_new_tokens=8, max_denoising_steps=3, seed=0)


# -- config -------------------------------------------------------------------------------------


def _text(**kv):
    raw = preset_config("tiny")
    raw["text_config"].update(kv)
    return raw


@pytest.mark.parametrize("raw,message", [
    (_text(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": math.inf},
                            "full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     r"rope_theta for sliding_attention = inf, expected a finite number in \(0, 1e\+12\]"),
    (_text(rms_norm_eps=1e30), r"text_config.rms_norm_eps = 1e\+30, expected a finite number in \(0, 0.1\]"),
    (_text(rms_norm_eps=float("nan")), r"text_config.rms_norm_eps = nan, expected a finite number"),
    ({**preset_config("tiny"), "canvas_length": True}, r"canvas_length = True, expected a positive integer"),
    ({**preset_config("tiny"), "canvas_length": 10**9}, r"canvas_length = 1000000000, expected at most 4096"),
    (_text(num_hidden_layers=10**8), r"text_config.num_hidden_layers = 100000000, expected at most 1024"),
    (_text(vocab_size=2**25), r"text_config.vocab_size = 33554432, expected at most 16777216"),
    (_text(hidden_size=10**6), r"text_config.hidden_size = 1000000, expected at most 65536"),
    (_text(vocab_size=2**24, hidden_size=65536), r"vocab_size × hidden_size .* expected at most"),
    (_text(num_attention_heads=True), r"text_config.num_attention_heads = True, expected an integer"),
    (_text(max_position_embeddings=2**40), r"max_position_embeddings = 1099511627776, expected at most"),
    (_text(sliding_window=2**30), r"text_config.sliding_window = 1073741824, expected at most"),
    (_text(final_logit_softcapping=math.inf), r"final_logit_softcapping = inf"),
    (_text(rope_parameters=[1]), r"text_config.rope_parameters = \[1\], expected an object"),
    (_text(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                            "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                               "partial_rotary_factor": "abc"}}),
     r"partial_rotary_factor for full_attention = 'abc'"),
    (_text(per_layer_config={"5": {"head_dim": "x"}}), r"per_layer_config.5.head_dim = 'x', expected a positive"),
    (_text(per_layer_config={"5": {"head_dim": 32.5}}), r"per_layer_config.5.head_dim = 32.5"),
    (_text(eos_token_id=["x"]), r"text_config.eos_token_id = 'x', expected a non-negative token id"),
    (_text(pad_token_id=-1), r"text_config.pad_token_id = -1"),
    ({**preset_config("tiny"), "vision_config": {"use_clipped_linears": "yes"}},
     r"vision_config.use_clipped_linears = 'yes', expected true or false"),
    ({**preset_config("tiny"), "vision_config": {"num_hidden_layers": 10**7}},
     r"vision_config.num_hidden_layers = 10000000, expected at most 1024"),
    # int() takes these as 5; they are not how a layer index is written.
    (_text(per_layer_config={"0_5": {}}), r"per_layer_config key '0_5' is not a layer index"),
    (_text(per_layer_config={" 5": {}}), r"per_layer_config key ' 5' is not a layer index"),
    (_text(per_layer_config={"٥": {}}), r"per_layer_config key '٥' is not a layer index"),
    (_text(per_layer_config={"\u0665": {}}), r"per_layer_config key '\u0665' is not a layer index"),
    ({**preset_config("tiny"), "tie_word_embeddings": "false"}, r"tie_word_embeddings = 'false', expected true"),
    (_text(tie_word_embeddings=0), r"text_config.tie_word_embeddings = 0, expected true or false"),
])
def test_config_values_are_range_checked(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_config_and_generation_config_files(tmp_path):
    path = write_random_checkpoint(tmp_path / "ck", "tiny", seed=1, canvas_length=CANVAS)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"max_denoising_steps": 10**9}, f)
    with pytest.raises(ConfigError, match=r"generation_config.json: max_denoising_steps must be at most 1024"):
        dgemma.load(path)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [1, "x"]}, f)
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id = \[1, 'x'\]"):
        dgemma.load(path)
    with open(f"{path}/generation_config.json", "w") as f:
        f.write("[" * 100_000)
    with pytest.raises(ConfigError, match=r"generation_config.json: not valid JSON"):
        dgemma.load(path)
    with open(f"{path}/config.json", "w") as f:
        f.write("[" * 100_000)
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(nested too deeply\)"):
        dgemma.load(path)


# -- chat template ------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "hi"}]


def _doubling(step: str, end: str = "{{ ns.s | length }}") -> str:
    """A template that sets ns.s = <step> 40 times from 'aa' (each step doubling it), then renders ``end``."""
    return "{% set ns = namespace(s='aa') %}{% for i in range(40) %}{% set ns.s = " + step + " %}{% endfor %}" + end


@pytest.mark.parametrize("source,message", [
    ("{{ 'x' * 10**9 }}", r"repeated string or list of 1000000000 items exceeds the output-size limit of 4096"),
    ("{{ 'x'|center(10**9) }}", r"exceeds the output-size limit of 4096"),
    ("{{ '{:>1000000000}'.format('x') }}", r"format width of 1000000000 .* output-size limit"),
    ("{{ '%1000000000s' % 'x' }}", r"format width of 1000000000 .* output-size limit"),
    ("{{ 7 ** 1000000000 }}", r"too large a number"),
    ("{% for i in range(5000) %}xx{% endfor %}", r"its output exceeds the output-size limit of 4096 characters"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"time limit of 0.5 s"),
    ("{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
     r"time limit of 0.5 s"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"recursion too deep"),
    # Doubling a string or a list each iteration: 2**40 characters unless every step is checked.
    (_doubling("ns.s ~ ns.s"), r"a concatenation \(~\) .* exceeds the output-size limit of 4096"),
    (_doubling("[ns.s, ns.s] | join"), r"the 'join' filter's input .* exceeds the output-size limit"),
    (_doubling("''.join([ns.s, ns.s])"), r"a join .* exceeds the output-size limit"),
    (_doubling("ns.s | replace('a', 'aa')"), r"exceeds the output-size limit"),
    (_doubling("ns.s.replace('a', 'aa')"), r"a replacement .* exceeds the output-size limit"),
    (_doubling("[ns.s, ns.s]", "{{ ns.s }}"), r"a printed value .* exceeds the output-size limit"),
    (_doubling("[ns.s, ns.s]", "{{ ns.s | tojson }}"), r"the 'tojson' filter's input .* exceeds the output-size"),
    (_doubling("[ns.s, ns.s]", "{{ 'x' ~ ns.s }}"), r"a concatenation \(~\) .* exceeds the output-size limit"),
    (_doubling("[ns.s, ns.s]", "{{ (ns.s | string) | length }}"), r"the 'string' filter's input .* exceeds"),
])
def test_chat_template_is_bounded(source, message):
    tpl = ChatTemplate(source, time_limit_s=0.5, max_output_chars=4096)
    with pytest.raises(DgemmaError, match=message):
        tpl.render(MSGS)
    assert ChatTemplate("{{ messages[0].content }}", time_limit_s=0.5).render(MSGS) == "hi"


def test_bounded_templates_still_concatenate_join_and_replace():
    source = ("{% for m in messages %}{{ m.role ~ ': ' ~ m.content }}{% endfor %}|{{ messages | tojson }}|"
              "{{ ['a', 'b'] | join(', ') }}|{{ 'abc' | replace('b', 'xx') }}|{{ '-'.join(['x', 'y']) }}|{{ [1, 2] }}")
    assert ChatTemplate(source, max_output_chars=4096).render(MSGS) == \
        'user: hi|[{"role": "user", "content": "hi"}]|a, b|axxc|x-y|[1, 2]'


def test_named_templates_need_string_names():
    from dgemma.chat import load_chat_template

    named = [{"name": ["default"], "template": "A"}, {"name": "default", "template": "B"}, {"name": {"x": 1}}]
    assert load_chat_template("/nonexistent", {"chat_template": named}) == "B"
    assert load_chat_template("/nonexistent", {"chat_template": named[:1]}) is None


def test_chat_template_module_defaults(monkeypatch):
    import dgemma.chat as chat

    monkeypatch.setattr(chat, "RENDER_MAX_CHARS", 10)
    with pytest.raises(DgemmaError, match=r"output-size limit of 10 characters"):
        ChatTemplate("{{ 'abc' * 5 }}").render(MSGS)
    with pytest.raises(DgemmaError, match=r"time_limit_s = -1"):
        ChatTemplate("x", time_limit_s=-1)


# -- transactional caches -----------------------------------------------------------------------


def _state(cache: KVCache):
    """Everything a cache holds: length, validity, padding flag, the sliding rings whole and the full
    layers' cached positions (slots past the length hold nothing and are not part of the state)."""
    n = cache.length
    keep = [k if s.is_sliding else k[:, :, :n] for k, s in zip(cache.keys, cache.config.layers)]
    vals = [v if s.is_sliding else v[:, :, :n] for v, s in zip(cache.values, cache.config.layers)]
    return (n, cache.has_padding, cache.valid.clone(), [k.clone() for k in keep], [v.clone() for v in vals])


def _assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(a[2], b[2])
    for x, y in zip(a[3] + a[4], b[3] + b[4]):
        assert torch.equal(x, y)


class Stop(Exception):
    pass


def test_generate_interrupted_at_every_step_leaves_the_cache_unchanged(eng):
    # A prompt longer than the sliding window, so committed blocks overwrite ring slots.
    prompt = _prompt(40, seed=1)
    kw = dict(max_new_tokens=2 * CANVAS, max_denoising_steps=3, confidence_threshold=1e-12, eos_token_id=[],
              seed=7)
    cache = eng.encode(prompt, capacity=100)
    nxt = _prompt(5, seed=2)
    before = _state(cache)
    events = []
    reference = eng.generate(nxt, cache=eng.encode(prompt, capacity=100), stream=events.append, **kw)
    assert len(events) == 2 * (3 + 1)  # every draft step and block event of two blocks
    for k in range(len(events)):
        seen = []

        def stream(ev, k=k):
            seen.append(ev)
            if len(seen) > k:
                raise Stop(k)

        with pytest.raises(Stop):
            eng.generate(nxt, cache=cache, stream=stream, **kw)
        _assert_same(before, _state(cache))
    retry = eng.generate(nxt, cache=cache, **kw)
    assert torch.equal(retry.sequences, reference.sequences)
    assert cache.length == reference.cache.length


def test_failed_encode_and_abandoned_stream_leave_the_cache_unchanged(eng):
    cache = eng.encode(_prompt(40, seed=1), capacity=100)
    before = _state(cache)
    with pytest.raises(DgemmaError):
        eng.encode([[1, 2, 999]], cache=cache)
    it = eng.generate_stream(_prompt(3), cache=cache, max_new_tokens=CANVAS, max_denoising_steps=3, seed=1)
    assert next(it).kind == "draft"
    with pytest.raises(DgemmaError, match=r"belongs to a generation that has not finished \(a generate_stream"):
        eng.generate(_prompt(3), cache=cache, max_new_tokens=CANVAS)
    with pytest.raises(DgemmaError, match=r"belongs to a generation that has not finished"):
        cache.truncate(10)
    it.close()
    _assert_same(before, _state(cache))
    eng.generate(_prompt(3), cache=cache, max_new_tokens=CANVAS, max_denoising_steps=2, seed=1)
    assert cache.length == 40 + 3


def test_every_stream_item_has_a_kind(eng):
    items = list(eng.generate_stream(_prompt(4), max_new_tokens=CANVAS, max_denoising_steps=2, seed=0))
    assert [i.kind for i in items][-2:] == ["block", "result"]
    assert isinstance(items[-1], GenerationResult) and items[-1].kind == "result"


def test_cache_used_from_two_threads(eng):
    cache = eng.encode(_prompt(10), capacity=100)
    inside, release, errors = threading.Event(), threading.Event(), []

    def stream(ev):
        inside.set()
        release.wait(10)

    t = threading.Thread(target=lambda: eng.generate(_prompt(2), cache=cache, stream=stream, max_new_tokens=CANVAS,
                                                     max_denoising_steps=2, seed=0))
    t.start()
    assert inside.wait(10)
    try:
        eng.encode(_prompt(2), cache=cache)
    except DgemmaError as e:
        errors.append(str(e))
    release.set()
    t.join()
    assert errors and "in use by another thread" in errors[0], errors
    assert cache.length == 10 + 2


def test_a_cache_that_encode_made_can_be_truncated(eng):
    cache = eng.encode(_prompt(10), capacity=100)  # made under inference mode
    cache.truncate(4)
    assert cache.length == 4 and not bool(cache.valid[:, 4:].any())
    eng.encode(_prompt(3), cache=cache)
    assert cache.length == 7


# -- chat sessions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_eng(tmp_path_factory):
    from chat_fixture import write_chat_checkpoint

    return dgemma.load(write_chat_checkpoint(tmp_path_factory.mktemp("hchat")), dtype=torch.float32)


def _session_state(chat):
    return ([dict(m) for m in chat.messages], list(chat.cached_ids), chat.cache,
            None if chat.cache is None else _state(chat.cache))


def test_chat_send_interrupted_leaves_the_session_unchanged(chat_eng):
    kw = dict(max_new_tokens=16, max_denoising_steps=3, seed=5)
    chat = chat_eng.chat(system="Be brief.")
    chat.send("Hello there", **kw)
    ref = chat_eng.chat(system="Be brief.")
    ref.send("Hello there", **kw)
    expected = ref.send("And then?", **kw)
    n_events = []
    chat_eng.chat(system="x").send("count", stream=n_events.append, **kw)
    for k in (0, 1, 3):
        before = _session_state(chat)

        def stream(ev, k=k, seen=[]):  # noqa: B006 - a counter per k
            seen.append(ev)
            if len(seen) > k:
                raise Stop(k)

        with pytest.raises(Stop):
            chat.send("And then?", stream=stream, **kw)
        after = _session_state(chat)
        assert before[0] == after[0] and before[1] == after[1] and before[2] is after[2]
        _assert_same(before[3], after[3])
    got = chat.send("And then?", **kw)
    assert torch.equal(got.new_tokens, expected.new_tokens)
    assert chat.messages == ref.messages and chat.cached_ids == ref.cached_ids


def test_chat_session_from_two_threads_raises_instead_of_losing_turns(chat_eng):
    chat = chat_eng.chat()
    inside, release, errors = threading.Event(), threading.Event(), []

    def stream(ev):
        inside.set()
        release.wait(10)

    t = threading.Thread(target=lambda: chat.send("first", stream=stream, max_new_tokens=8, max_denoising_steps=2,
                                                  seed=0))
    t.start()
    assert inside.wait(10)
    try:
        chat.send("second", max_new_tokens=8, max_denoising_steps=2, seed=0)
    except DgemmaError as e:
        errors.append(str(e))
    release.set()
    t.join()
    assert errors and "already generating a reply" in errors[0]
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and chat.messages[0]["content"] == "first"
    chat.send("second", max_new_tokens=8, max_denoising_steps=2, seed=0)  # usable afterwards
    assert len(chat.messages) == 4


# -- padding and bounds -------------------------------------------------------------------------


def test_right_padding_is_refused_left_padding_works(eng):
    ids = _prompt(6, batch=2)
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(DgemmaError, match=r"attention_mask row 1 has padding at position 4, after real tokens"):
        eng.generate(ids, attention_mask=right, max_new_tokens=CANVAS)
    hole = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(DgemmaError, match=r"attention_mask row 0 has padding at position 2"):
        eng.generate(ids, attention_mask=hole, max_new_tokens=CANVAS)
    with pytest.raises(DgemmaError, match=r"only 0 \(padding\) and 1 \(token\)"):
        eng.generate(ids, attention_mask=torch.full((2, 6), 2), max_new_tokens=CANVAS)
    with pytest.raises(DgemmaError, match=r"attention_mask must be a \[batch, length\] tensor"):
        eng.generate(ids, attention_mask=object(), max_new_tokens=CANVAS)
    left = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    r = eng.generate(ids, attention_mask=left, max_new_tokens=CANVAS, max_denoising_steps=2, seed=0)
    # Continuing a cached row with padding is padding after its real tokens.
    with pytest.raises(DgemmaError, match=r"row 1 has padding at position 0"):
        eng.generate(ids, attention_mask=left, cache=r.cache, max_new_tokens=CANVAS)


@pytest.mark.parametrize("kw,message", [
    (dict(max_denoising_steps=10**9), r"max_denoising_steps must be at most 1024, got 1000000000"),
    (dict(max_new_tokens=10**9), r"beyond max_position_embeddings 8192"),
    (dict(max_new_tokens=True), r"max_new_tokens must be a positive integer, got True"),
    (dict(seed=2**70), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed="abc"), r"seed must be an integer"),
    (dict(generator="abc"), r"generator must be a torch.Generator"),
    (dict(eos_token_id=3.5), r"eos_token_id 3.5 is not a token id"),
    (dict(capacity=2.5), r"capacity must be a positive integer"),
    (dict(stability_threshold=10**6), r"stability_threshold must be at most 1024"),
])
def test_generate_bounds(eng, kw, message):
    with pytest.raises(DgemmaError, match=message):
        eng.generate(_prompt(4), **kw)


def test_bounded_cache_room_and_allocation(eng):
    cache = eng.encode(_prompt(4), capacity=20)
    with pytest.raises(DgemmaError, match=r"cache capacity 20 exceeded"):
        eng.generate(_prompt(4), cache=cache, max_new_tokens=3 * CANVAS)
    with pytest.raises(dgemma.OutOfMemoryError, match=r"a KV cache for batch 1000000 and capacity 8192 needs .* GiB, "
                                                      r"more than"):
        eng.new_cache(10**6, 8192)
    with pytest.raises(DgemmaError, match=r"cache batch size 1.5 must be an integer"):
        eng.new_cache(1.5, 10)


def test_template_checks_cost_little_on_long_conversations_and_ignore_attachment_bytes():
    """messages|length once per message over 2,000 messages renders in well under the time limit (the text-size
    walk is for the filters that write their input as text), and a conversation holding megabytes of attachment
    bytes renders with templates that only count or select messages."""
    source = ("{% for m in messages %}{% set left = (messages|length - 1) - loop.index0 %}{{ m.role }}:{{ left }} "
              "{% endfor %}")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 60} for i in range(2000)]
    t0 = time.perf_counter()
    out = ChatTemplate(source, time_limit_s=10).render(msgs)
    assert out.startswith("user:1999 ") and time.perf_counter() - t0 < 2.0
    video = {"role": "user", "content": [{"type": "video", "video": b"\0" * (9 << 20)}, {"type": "text", "text": "?"}]}
    assert ChatTemplate("{{ messages|length }}|{{ messages|map(attribute='role')|join(',') }}").render([video]) == \
        "1|user"


@pytest.mark.parametrize("body", ["{{ ('%s' % (ns.s,))|length }}", "{{ '{}'.format(ns.s)|length }}",
                                  "{{ '{x}'.format_map({'x': ns.s})|length }}", "SUM"])
def test_formatting_a_self_nesting_list_is_bounded(body):
    step = "[ns.s, ns.s]|sum(start=[])" if body == "SUM" else "[ns.s, ns.s]"  # SUM: a list doubling its length
    source = ("{% set ns = namespace(s=['ab']) %}{% for i in range(40) %}{% set ns.s = " + step + " %}{% endfor %}"
              + ("{{ ns.s|length }}" if body == "SUM" else body))
    with pytest.raises(DgemmaError, match="exceeds the output-size limit"):
        ChatTemplate(source, time_limit_s=5, max_output_chars=4096).render(MSGS)
