"""Bad or inconsistent input to the Python API found by the third fuzzing round: each is refused with a
DgemmaError naming the value (before anything is changed) or handled as documented."""

import pytest
import torch

import dgemma
from dgemma.demo import write_demo_checkpoint
from dgemma.cache import KVCache
from dgemma.errors import DgemmaError

SMALL = dict(max_new_tokens=4, max_denoising_steps=2, seed=0)


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return dgemma.load(write_demo_checkpoint(tmp_path_factory.mktemp("input_errors_api") / "demo"),
                       dtype=torch.float32)


def _ids(batch, length, seed=0):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_mask_and_a_cache_of_another_batch_size_name_the_batch_sizes(eng):
    cache = eng.encode(_ids(2, 4))
    before = (cache.length, cache.valid.clone())
    with pytest.raises(DgemmaError, match="batch size 3 does not match the cache's batch size 2"):
        eng.generate(_ids(3, 2), attention_mask=torch.ones(3, 2), cache=cache, **SMALL)
    with pytest.raises(DgemmaError, match="batch size 3 does not match the cache's batch size 2"):
        eng.generate(["a b", "c", "d e f"], cache=cache, **SMALL)
    assert cache.length == before[0] and torch.equal(cache.valid, before[1])


@pytest.mark.parametrize("eos,message", [(torch.tensor([1.0, 2.0]), "eos_token_id 1.0 is not a token id"),
                                         (torch.tensor(3.5), "eos_token_id 3.5 is not a token id")])
def test_float_eos_tensors_are_refused_by_value(eng, eos, message):
    with pytest.raises(DgemmaError, match=message):
        eng.generate(_ids(1, 3), eos_token_id=eos, **SMALL)


def test_an_empty_eos_tensor_is_no_eos_like_an_empty_list(eng):
    a = eng.generate(_ids(1, 3), eos_token_id=torch.tensor([], dtype=torch.long), **SMALL)
    b = eng.generate(_ids(1, 3), eos_token_id=[], **SMALL)
    assert torch.equal(a.sequences, b.sequences)


def test_encode_refuses_capacity_with_a_cache(eng):
    cache = eng.encode(_ids(1, 4))
    with pytest.raises(DgemmaError, match="capacity= sizes a new cache; it cannot be combined with cache="):
        eng.encode(_ids(1, 2), cache=cache, capacity=4000)
    assert cache.length == 4


def test_unknown_keywords_name_the_public_call(eng):
    with pytest.raises(DgemmaError, match=r"generate_stream\(\) does not take stream=: it is an iterator"):
        eng.generate_stream("hi", stream=print)
    with pytest.raises(DgemmaError, match=r"generate_stream\(\) got an unknown argument 'temprature'"):
        eng.generate_stream([[2, 10, 11]], temprature=0.5)
    with pytest.raises(DgemmaError, match=r"generate\(\) got an unknown argument 'foo'; generation takes .*max_length"):
        eng.generate("hi", foo=1)
    chat = eng.chat()
    with pytest.raises(DgemmaError, match=r"ChatSession.send\(\) got an unknown argument 'foo'"):
        chat.send("hi", foo=1)
    assert chat.messages == [] and chat.cache is None


def test_text_continuing_a_cache_gets_no_beginning_of_sequence_token(eng, monkeypatch):
    first = eng.generate("The sky", capacity=200, **SMALL)
    cache = first.cache
    before = cache.length
    seen = []
    original = dgemma.engine.Engine.generate

    def spy(self, ids, **kw):
        seen.append(ids[0].tolist())
        return original(self, ids, **kw)

    monkeypatch.setattr(dgemma.engine.Engine, "generate", spy)
    eng.generate(" is blue", cache=cache, **SMALL)
    eng.generate(" is blue", **SMALL)
    continued, fresh = seen
    assert fresh[0] == eng.bos_token_id and continued == fresh[1:]
    assert cache.length > before


def test_chat_messages_with_a_cache_that_holds_tokens_are_refused(eng):
    cache = eng.encode(_ids(1, 4), capacity=100)
    with pytest.raises(DgemmaError, match=r"chat messages with a cache that already holds tokens.*eng.chat\(\)"):
        eng.generate([{"role": "user", "content": "hi"}], cache=cache, **SMALL)
    assert cache.length == 4
    # A cache that holds nothing yet is a fresh start.
    empty = eng.new_cache(1, 400)
    eng.generate([{"role": "user", "content": "hi"}], cache=empty, **SMALL)
    assert empty.length > 0


@pytest.mark.parametrize("where", ["tool name", "tool call name", "send_tool_result"])
def test_vision_placeholders_spelled_outside_content_are_refused(eng, where):
    chat = eng.chat()
    if where == "send_tool_result":
        with pytest.raises(DgemmaError, match=r"holds 1 '<\|image\|>' placeholder\(s\).*tool names"):
            chat.send_tool_result("f<|image|>", {"t": 1}, **SMALL)
        assert chat.messages == []
        return
    if where == "tool name":
        messages = [{"role": "user", "content": "hi"}, {"role": "tool", "name": "g<|image|>", "content": "1"}]
    else:
        call = {"type": "function", "function": {"name": "g<|image|>", "arguments": {}}}
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    with pytest.raises(DgemmaError, match=r"conversation 0 has 0 image\(s\) but its rendered chat prompt holds 1"):
        eng.generate(messages, **SMALL)


@pytest.mark.parametrize("text", ["look <|image|> here", "<|video|>", "a <|image> b"])
def test_plain_text_prompts_may_not_spell_vision_tokens(eng, text):
    with pytest.raises(DgemmaError, match="text contains .*prompt text may not spell the vision tokens"):
        eng.generate(text, **SMALL)
    with pytest.raises(DgemmaError, match=r"inputs\[1\] contains"):
        eng.generate(["fine", text], **SMALL)


def test_pixel_inputs_beside_messages_with_images_are_refused(eng):
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    with pytest.raises(DgemmaError, match="pixel_values= with chat messages that attach images"):
        eng.generate(messages, pixel_values=torch.zeros(1, 9, 768), max_image_tokens=70, **SMALL)


def test_continuing_a_result_cache_as_documented_equals_encoding_the_whole_sequence(eng):
    """result.cache holds all blocks but the last; encoding the rest as the docs say gives the same state as
    encoding the whole sequence afresh."""
    r = eng.generate(_ids(1, 5), max_new_tokens=2 * eng.config.canvas_length, capacity=300, eos_token_id=[],
                     max_denoising_steps=2, seed=0)
    assert r.cache.length == 5 + eng.config.canvas_length
    cache = eng.encode(r.sequences[:, r.cache.length:], cache=r.cache)
    fresh = eng.encode(r.sequences)
    assert cache.length == fresh.length == r.sequences.shape[1]
    canvas = _ids(1, eng.config.canvas_length, seed=3)
    torch.testing.assert_close(eng.denoise(cache, canvas), eng.denoise(fresh, canvas), atol=1e-4, rtol=1e-4)


def test_denoise_hidden_rows_refuses_what_it_cannot_run(eng):
    m = eng.model
    c = eng.config.canvas_length
    cache = eng.encode(_ids(1, 4))
    canvas = _ids(1, c)
    h = m.denoise_hidden_rows(canvas, [cache], [None])
    assert h.shape == (1, c, eng.config.hidden_size)
    bad = [
        (lambda: m.denoise_hidden_rows(canvas[0], [cache], [None]), "canvas must be a non-empty integer tensor"),
        (lambda: m.denoise_hidden_rows(canvas.float(), [cache], [None]), "canvas must be a non-empty integer"),
        (lambda: m.denoise_hidden_rows(canvas[:0], [], []), "canvas must be a non-empty integer"),
        (lambda: m.denoise_hidden_rows(canvas + 10**6, [cache], [None]), r"canvas holds token id \d+, outside"),
        (lambda: m.denoise_hidden_rows(canvas - 10**6, [cache], [None]), r"canvas holds token id -\d+, outside"),
        (lambda: m.denoise_hidden_rows(canvas, [None], [None]), r"caches\[0\] must be a batch-1 KVCache"),
        (lambda: m.denoise_hidden_rows(canvas, iter([cache]), [None]), "got 1 rows, a list_iterator of caches"),
        (lambda: m.denoise_hidden_rows(canvas, [KVCache(eng.config, 1, 64, dtype=torch.bfloat16, device="cpu")],
                                       [None]),
         r"caches\[0\] must be a batch-1 KVCache of this model"),
        (lambda: m.denoise_hidden_rows(canvas, [cache], [torch.zeros(2, c, eng.config.hidden_size)]),
         r"softs\[0\] must be None or a torch.float32 tensor"),
        (lambda: m.denoise_hidden_rows(canvas, [cache], [torch.zeros(1, c, 3)]), r"softs\[0\] must be None"),
    ]
    for call, message in bad:
        with pytest.raises(DgemmaError, match=message):
            call()


def test_a_reply_never_holds_a_vision_token(eng, monkeypatch):
    """A model may write an image placeholder; the reply (which goes back into the conversation, where vision
    tokens are refused as text) leaves it out, and the next turn works."""
    from types import SimpleNamespace

    image_id = eng.config.image_token_id
    chat = eng.chat()
    chat.send("hi", max_new_tokens=4, max_denoising_steps=2, seed=0)
    # What attach_text makes of new tokens holding the placeholder (the tiny model rarely writes one).
    result = SimpleNamespace(new_tokens=torch.tensor([[image_id, 300, image_id, 301]]), eos_token_ids=[],
                             pad_token_id=None)
    eng.attach_text(result, chat=True)
    assert "<|image|>" not in result.texts[0] and result.texts[0] == eng.tokenizer.decode([300, 301]).strip()
    chat.messages[-1] = {"role": "assistant", "content": result.texts[0]}
    chat.send("again", max_new_tokens=4, max_denoising_steps=2, seed=1)


def test_chunked_prefill_of_a_left_padded_batch_equals_one_shot(eng):
    """A chunk that is all padding for one row (its prompt starts later) is taken; the cache equals encoding the
    whole padded prompt at once. A whole prompt of padding is still refused."""
    ids = _ids(2, 20, seed=4)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :12] = 0
    canvas = _ids(2, eng.config.canvas_length, seed=5)
    whole = eng.denoise(eng.encode(ids, attention_mask=mask), canvas)
    cache = eng.new_cache(2, 64)
    for start, end in ((0, 10), (10, 20)):
        eng.encode(ids[:, start:end], cache=cache, attention_mask=mask[:, start:end])
    torch.testing.assert_close(eng.denoise(cache, canvas), whole, atol=1e-4, rtol=1e-4)
    with pytest.raises(DgemmaError, match="attention_mask masks every token of some prompt"):
        eng.encode(ids[:, :10], attention_mask=mask[:, :10])


def test_denoise_hidden_rows_can_skip_the_ids_check_for_the_engines_own_canvases(eng):
    """check_ids=False (the scheduler's canvases, made by the engine's sampler) gives the same rows; the shapes are
    checked either way."""
    cache = eng.encode(_ids(1, 4))
    canvas = _ids(1, eng.config.canvas_length)
    assert torch.equal(eng.model.denoise_hidden_rows(canvas, [cache], [None], check_ids=False),
                       eng.model.denoise_hidden_rows(canvas, [cache], [None]))
    with pytest.raises(DgemmaError, match="canvas must be a non-empty integer tensor"):
        eng.model.denoise_hidden_rows(canvas.float(), [cache], [None], check_ids=False)
