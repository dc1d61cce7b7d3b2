"""Bad input found by fuzzing the Python API: each gets a DgemmaError naming the value and what was expected
(never a TypeError, AttributeError, RecursionError or a silent NaN), and leaves the engine, its caches and
chat sessions as they were."""

import json
import shutil

import numpy as np
import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.demo import write_demo_checkpoint
from dgemma.errors import CheckpointError, ConfigError, DgemmaError, NonFiniteError

SMALL = dict(max_new_tokens=8, max_denoising_steps=2)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("input_errors") / "demo", canvas_length=8)


@pytest.fixture(scope="module")
def eng(demo):
    return dgemma.load(demo, dtype=torch.float32)


def _copy(demo, tmp_path, edit):
    path = tmp_path / "ck"
    shutil.copytree(demo, path)
    edit(path)
    return path


def _cache_state(cache):
    return cache.length, cache.valid.clone(), [k.clone() for k in cache.keys], [v.clone() for v in cache.values]


def _assert_cache_same(a, b):
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2] + a[3], b[2] + b[3]))


# -- 1. text the tokenizer cannot encode ----------------------------------------------------------------


def test_lone_surrogate_is_refused_naming_where(eng):
    with pytest.raises(DgemmaError, match=r"^text has an unpaired surrogate \(U\+D800\) at index 1"):
        eng.generate("a\ud800", **SMALL)
    with pytest.raises(DgemmaError, match=r"inputs\[1\] has an unpaired surrogate \(U\+DC80\) at index 0"):
        eng.generate(["ok", "\udc80b"], **SMALL)
    with pytest.raises(DgemmaError, match=r"text has an unpaired surrogate \(U\+D800\) at index 1"):
        eng.tokenizer.encode("a\ud800")  # every caller of the tokenizer gets the check
    chat = eng.chat()
    with pytest.raises(DgemmaError, match=r"messages\[0\]\['content'\] has an unpaired surrogate \(U\+D800\) at "
                                          r"index 1"):
        chat.send("a\ud800", **SMALL)
    assert chat.messages == [] and chat.cached_ids == [] and chat.cache is None
    with pytest.raises(DgemmaError, match=r"messages\[0\]\['content'\]\[0\]\['text'\] has an unpaired surrogate"):
        eng.generate([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], **SMALL)
    with pytest.raises(DgemmaError, match=r"rendered chat prompt has an unpaired surrogate"):
        eng.generate(USER, tools=[{"function": {"name": "f", "description": "\ud800"}}], **SMALL)
    assert chat.send("hi", seed=0, **SMALL).texts


# -- 2. broken tokenizer and template files ------------------------------------------------------------


def _write(name, data):
    def edit(path):
        (path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return edit


def _tokenizer_config(**changes):
    def edit(path):
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg.update(changes)
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit,file,message", [
    (_write("tokenizer_config.json", "[1, 2]"), "tokenizer_config.json", "expected a JSON object, got list"),
    (_write("tokenizer_config.json", "[" * 100_000 + "]" * 100_000), "tokenizer_config.json", "nested too deeply"),
    (_tokenizer_config(add_bos_token="false"), "tokenizer_config.json",
     r"add_bos_token = 'false', expected true or false"),
    (_write("chat_template.jinja", b"\xff\xfe{{ messages }}"), "chat_template.jinja", "not UTF-8 text"),
])
def test_broken_tokenizer_files_are_checkpoint_errors(demo, tmp_path, edit, file, message):
    path = _copy(demo, tmp_path, edit)
    eng = dgemma.load(path, dtype=torch.float32)
    for call in (lambda: eng.generate("hi", **SMALL), lambda: eng.chat().send("hi", **SMALL)):
        with pytest.raises(CheckpointError, match=message) as e:
            call()
        assert str(path / file) in str(e.value)


@pytest.mark.parametrize("edit,message", [
    (_write("tokenizer_config.json", "[1, 2]"), "tokenizer_config.json: expected a JSON object"),
    (_write("chat_template.jinja", b"\xff\xfe{{ messages }}"), "chat_template.jinja: not UTF-8 text"),
])
def test_cli_reports_broken_tokenizer_files_as_checkpoint_errors(demo, tmp_path, capsys, edit, message):
    path = _copy(demo, tmp_path, edit)
    assert main(["chat", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_empty_chat_template_names_the_file(demo, tmp_path):
    path = _copy(demo, tmp_path, _write("chat_template.jinja", ""))
    eng = dgemma.load(path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="chat template is empty") as e:
        eng.generate(USER, **SMALL)
    assert str(path / "chat_template.jinja") in str(e.value)
    assert eng.generate("hi", seed=0, **SMALL).texts  # plain text needs no template


def test_template_rendering_nothing_is_refused(eng, monkeypatch):
    from dgemma.chat import ChatTemplate

    monkeypatch.setattr(eng, "_chat_template", ChatTemplate("{% if false %}x{% endif %}"))
    with pytest.raises(DgemmaError, match=r"chat template \(.*chat_template.jinja\) rendered nothing"):
        eng.generate(USER, **SMALL)


# -- 3, 4. chat session arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("kw,message", [
    (dict(max_new_tokens="abc"), "max_new_tokens must be a positive integer or None, got 'abc'"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer or None, got 2.5"),
    (dict(max_new_tokens=-5), "max_new_tokens must be a positive integer or None, got -5"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer or None, got True"),
    (dict(max_new_tokens=10**6), "max_new_tokens 1000000 exceeds max_position_embeddings"),
    (dict(context="abc"), "context must be a positive integer or None, got 'abc'"),
    (dict(context=-5), "context must be a positive integer or None, got -5"),
    (dict(context=0), "context must be a positive integer or None, got 0"),
    (dict(context=1.5), "context must be a positive integer or None, got 1.5"),
    (dict(thinking="no"), "thinking must be True or False, got 'no'"),
])
def test_chat_constructor_checks_its_arguments(eng, kw, message):
    with pytest.raises(DgemmaError, match=message):
        eng.chat(**kw)


def test_send_refuses_bad_arguments_and_keeps_the_session(eng):
    chat = eng.chat()
    chat.send("Hello", seed=1, **SMALL)
    before = ([dict(m) for m in chat.messages], list(chat.cached_ids), _cache_state(chat.cache))
    calls = [
        (lambda: chat.send_tool_result("f", object(), **SMALL), r"send_tool_result: result must be a string or "
                                                                r"JSON-serialisable.*got object"),
        (lambda: chat.send_tool_result("f", {1, 2}, **SMALL), "result must be a string or JSON-serialisable"),
        (lambda: chat.send_tool_result(5, "x", **SMALL), "send_tool_result: name must be"),
        (lambda: chat.send("hi", cache="x", **SMALL), "ChatSession.send does not take cache="),
        (lambda: chat.send("hi", cache=None, **SMALL), "ChatSession.send does not take cache="),
        (lambda: chat.send("hi", thinking=True, **SMALL), r"does not take thinking=.*eng.chat\(thinking="),
    ]
    for call, message in calls:
        with pytest.raises(DgemmaError, match=message):
            call()
        assert chat.messages == before[0] and chat.cached_ids == before[1]
        _assert_cache_same(_cache_state(chat.cache), before[2])
    assert chat.send_tool_result("f", {"ok": 1}, seed=2, **SMALL).texts is not None


# -- 5, 6, 8. generate arguments -----------------------------------------------------------------------


def test_generate_checks_cache_before_reading_it(eng):
    with pytest.raises(DgemmaError, match="cache must be a dgemma KVCache, got str"):
        eng.generate([[2, 10, 11]], cache="x", **SMALL)
    with pytest.raises(DgemmaError, match="cache must be a dgemma KVCache, got str"):
        eng.encode([[2, 10, 11]], cache="x")


@pytest.mark.parametrize("value", ["no", 1, None])
def test_external_decoder_must_be_a_bool(eng, value):
    with pytest.raises(DgemmaError, match=f"external_decoder must be True or False, got {value!r}"):
        eng.generate_stream([[2, 10, 11]], external_decoder=value, **SMALL)


@pytest.mark.parametrize("inputs", [USER, [[2, 10, 11]], "hi"])
def test_thinking_must_be_a_bool(eng, inputs):
    with pytest.raises(DgemmaError, match="thinking must be True or False, got 'no'"):
        eng.generate(inputs, thinking="no", **SMALL)
    with pytest.raises(DgemmaError, match="thinking must be True or False, got 1"):
        eng.generate_stream(inputs, thinking=1, **SMALL)


# -- 7. generation_config.json ids beyond the vocabulary -----------------------------------------------


@pytest.mark.parametrize("key,value", [("bos_token_id", 99999), ("pad_token_id", 99999), ("eos_token_id", [1, 5000])])
def test_generation_config_ids_outside_the_vocabulary_are_refused_at_load(demo, tmp_path, key, value):
    def edit(path):
        cfg = json.loads((path / "generation_config.json").read_text())
        cfg[key] = value
        (path / "generation_config.json").write_text(json.dumps(cfg))

    path = _copy(demo, tmp_path, edit)
    vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    with pytest.raises(ConfigError, match=rf"{key} = .* outside the vocabulary.*\[0, {vocab}\)") as e:
        dgemma.load(path, dtype=torch.float32)
    assert str(path / "generation_config.json") in str(e.value)


# -- 9. what was given, and what is accepted -----------------------------------------------------------


@pytest.mark.parametrize("inputs,message", [
    ([[2.0, 3.0]], r"inputs\[0\] is a list of float; inputs must be token ids"),
    ([[2, 2.5]], r"inputs\[0\] is a list of float and int"),
    ([[]], r"inputs\[0\] is an empty list; inputs must be token ids"),
    ([torch.tensor([2, 3])], r"inputs\[0\] is a Tensor; inputs must be token ids"),
    ([2, 3], r"flat list of ints.*as \[ids\]"),
    (["hi", USER], "inputs mixes chat messages and strings"),
    ([[2, 3], "hi"], "inputs mixes token ids and strings"),
])
def test_unaccepted_inputs_say_what_was_given(eng, inputs, message):
    with pytest.raises(DgemmaError, match=message):
        eng.generate(inputs, **SMALL)


def test_token_ids_are_not_truncated_from_floats_or_bools(eng):
    with pytest.raises(DgemmaError, match="input_ids has dtype torch.float32"):
        eng.encode([[2, 2.5]])
    with pytest.raises(DgemmaError, match="input_ids has dtype torch.bool"):
        eng.encode([[True, False]])
    with pytest.raises(DgemmaError, match=r"input_ids has shape \[1, 0\]"):
        eng.encode([[]])


# -- 10. non-finite inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(eng):
    from dgemma.vision_inputs import preprocess_images

    vi = preprocess_images([np.zeros((48, 48, 3), np.uint8)], max_soft_tokens=70)
    n = int(vi.num_soft_tokens_per_image[0])
    ids = torch.tensor([[2] + [eng.config.image_token_id] * n + [5]])
    return ids, vi.pixel_values, vi.image_position_ids


def test_non_finite_self_conditioning_logits_are_refused(eng):
    cache = eng.encode([[2, 10, 11]])
    canvas = torch.zeros(1, 8, dtype=torch.long)
    for bad in (float("nan"), float("inf")):
        sc = torch.zeros(1, 8, eng.config.vocab_size)
        sc[0, 3, 7] = bad
        with pytest.raises(DgemmaError, match=r"self_conditioning_logits holds NaN or infinite values \(row 0\)"):
            eng.denoise(cache, canvas, sc)
    assert torch.isfinite(eng.denoise(cache, canvas, torch.zeros(1, 8, eng.config.vocab_size))).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_refused_naming_them(eng, image, bad):
    ids, pixels, positions = image
    pixels = pixels.clone()
    pixels[0, 5, 1] = bad
    with pytest.raises(DgemmaError, match=r"pixel_values holds NaN or infinite values \(image 0\)") as e:
        eng.generate(ids, pixel_values=pixels, image_position_ids=positions, seed=0, **SMALL)
    assert not isinstance(e.value, NonFiniteError)
    cache = eng.encode([[2, 10]], capacity=200)
    before = _cache_state(cache)
    with pytest.raises(DgemmaError, match="pixel_values holds NaN or infinite values"):
        eng.encode(ids, cache=cache, pixel_values=pixels, image_position_ids=positions)
    _assert_cache_same(_cache_state(cache), before)
    assert eng.encode(ids, pixel_values=image[1], image_position_ids=positions).length == ids.shape[1]


# -- 11. mm_token_type_ids and tensors without data ----------------------------------------------------


@pytest.mark.parametrize("types", ["abc", [[1, 2], [3]], {"a": 1}])
def test_mm_token_type_ids_that_are_not_a_tensor(eng, types):
    with pytest.raises(DgemmaError, match=r"mm_token_type_ids must be a \[batch, length\] tensor"):
        eng.encode([[2, 10, 11]], mm_token_type_ids=types)


def test_meta_tensors_are_refused_naming_the_argument(eng, image):
    with pytest.raises(DgemmaError, match="input_ids is on the meta device"):
        eng.encode(torch.empty(1, 3, dtype=torch.long, device="meta"))
    with pytest.raises(DgemmaError, match="canvas is on the meta device"):
        eng.denoise(eng.encode([[2, 10]]), torch.empty(1, 8, dtype=torch.long, device="meta"))
    with pytest.raises(DgemmaError, match="self_conditioning_logits is on the meta device"):
        eng.denoise(eng.encode([[2, 10]]), torch.zeros(1, 8, dtype=torch.long),
                    torch.zeros(1, 8, eng.config.vocab_size, device="meta"))
    with pytest.raises(DgemmaError, match="mm_token_type_ids is on the meta device"):
        eng.encode([[2, 10]], mm_token_type_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"))
    ids, pixels, positions = image
    with pytest.raises(DgemmaError, match="pixel_values is on the meta device"):
        eng.encode(ids, pixel_values=pixels.to("meta"), image_position_ids=positions)


# -- streams consumed oddly -----------------------------------------------------------------------------------


def test_a_stream_whose_cache_was_used_after_it_was_made_is_refused_at_its_first_step(eng):
    """generate_stream checks room and positions when it is made; if the cache is used before its first step the
    checks no longer hold: refused then, naming both lengths, with the cache as the other use left it."""
    canvas = eng.config.canvas_length
    cache = eng.encode([[2, 10, 11, 12, 13, 14, 15]], capacity=7 + 2 + 8 * canvas)
    stream = eng.generate_stream([[30, 31]], cache=cache, seed=1, max_new_tokens=8 * canvas, eos_token_id=[])
    eng.generate([[40] * 5], cache=cache, seed=2, max_new_tokens=canvas, eos_token_id=[])
    before = _cache_state(cache)
    # (its one block is generated, not committed: 7 + 5 tokens)
    with pytest.raises(DgemmaError, match=r"the cache held 7 tokens when this generation was made and holds 12 at "
                                          r"its first step"):
        next(stream)
    _assert_cache_same(before, _cache_state(cache))


def test_sending_a_value_into_a_stream_that_takes_none_is_refused(eng):
    stream = eng.generate_stream([[30, 31]], seed=1, **SMALL)
    assert next(stream).kind == "draft"
    with pytest.raises(DgemmaError, match=r"a draft event was answered with send\(Tensor\): only a DecoderPass "
                                          r"takes an answer"):
        stream.send(torch.zeros(3))
