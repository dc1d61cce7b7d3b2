"""Chat front end: the checkpoint's template, thinking, tool calls, multi-turn sessions, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from chat_fixture import TURN_END, write_chat_checkpoint

import dgemma
from dgemma.chat import parse_response, parse_tool_call

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def eng(ckpt):
    return dgemma.load(ckpt, dtype=torch.float32)


def test_generation_config_defaults_are_read(eng):
    s = eng.generation_settings
    assert (s.max_new_tokens, s.max_denoising_steps, s.entropy_bound) == (32, 6, 0.5)
    assert (s.t_max, s.t_min) == (0.8, 0.4)  # not in the file: the recommended defaults
    assert eng.eos_token_ids == [1, TURN_END] and eng.pad_token_id == 0


def test_template_thinking_and_tools(eng):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    plain = eng.chat_template.render(msgs)
    assert plain == "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    thinking = eng.chat_template.render(msgs, thinking=True, tools=TOOLS)
    assert thinking.startswith("<bos><|turn>system\n<|think|>Be brief.<|tool>{")
    assert '"name": "get_weather"' in thinking
    ids = eng.tokenizer.encode(thinking)
    for control in ("<bos>", "<|turn>", "<|think|>", "<|tool>", "<tool|>", "<turn|>"):
        assert eng.tokenizer.token_id(control) in ids  # control tokens are single ids


def test_parse_thinking_text_and_tool_calls():
    out = ('<|channel>thought\nThe user wants the weather.<channel|>Let me check.'
           '<|tool_call>call:get_weather{city:<|"|>Paris, France<|"|>,days:3,scale:1.5,metric:true,'
           'extra:null,tags:[<|"|>a<|"|>,2],opts:{deep:{x:-4}}}<tool_call|><turn|>garbage after the turn')
    r = parse_response(out)
    assert r.thinking == "The user wants the weather."
    assert r.text == "Let me check."
    assert r.tool_calls == [{"name": "get_weather", "arguments": {
        "city": "Paris, France", "days": 3, "scale": 1.5, "metric": True, "extra": None, "tags": ["a", 2],
        "opts": {"deep": {"x": -4}}}}]
    assert isinstance(r.tool_calls[0]["arguments"]["days"], int)
    assert r.as_message() == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": r.tool_calls[0]}]}  # thinking is not kept in the history


def test_parse_survives_the_tokenizer_round_trip(eng):
    text = '<|channel>thought\nhm<channel|>ok<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    decoded = eng.tokenizer.decode(eng.tokenizer.encode(text))
    assert parse_response(decoded).tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("body,message", [
    ("get_weather{city:<|\"|>Paris}", "unterminated string"),
    ("get_weather{city Paris}", "expected ':'"),
    ("{city:1}", "expected a function name"),
    ("f{a:1} trailing", "unexpected text after the arguments"),
])
def test_malformed_tool_calls(body, message):
    with pytest.raises(dgemma.DgemmaError, match=message):
        parse_tool_call(body)


def test_generate_chat_returns_split_response(eng):
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    r = eng.generate(msgs, thinking=True, tools=TOOLS, seed=0)
    assert r.sequences.shape[0] == 1 and len(r.responses) == 1
    assert isinstance(r.text, str) and isinstance(r.tool_calls, list)
    batch = eng.generate([msgs, [{"role": "user", "content": "Hi"}]], seed=0, max_new_tokens=16)
    assert len(batch.texts) == 2 and batch.sequences.shape[0] == 2


def test_text_prompts_get_bos_and_left_padding(eng):
    r = eng.generate(["The sky is", "What is the weather in Paris today?"], seed=0, max_new_tokens=16)
    bos = eng.tokenizer.token_id("<bos>")
    short, long = eng.tokenizer.encode("The sky is"), eng.tokenizer.encode("What is the weather in Paris today?")
    width = len(long) + 1
    assert r.prompt_length == width
    assert r.sequences[1, :width].tolist() == [bos] + long
    assert r.sequences[0, :width].tolist() == [0] * (width - len(short) - 1) + [bos] + short
    assert len(r.texts) == 2


def test_session_encodes_only_new_tokens_and_matches_fresh(eng):
    chat = eng.chat(system="Be brief.", thinking=True, tools=TOOLS)
    chat.send("What is the weather in Paris?", seed=3)
    assert chat.messages[-1]["role"] == "assistant" and "thinking" not in chat.messages[-1]
    chat.send("And tomorrow?", seed=4)
    full = eng.tokenizer.encode(eng.chat_template.render(chat.messages[:-1], tools=TOOLS, thinking=True))
    assert 0 < chat.reencoded_tokens < len(full)  # the earlier turns came from the cache
    assert chat.cached_ids[:len(full)] == full  # the cache holds the conversation as the template renders it
    assert len(chat.cached_ids) == chat.cache.length
    # The reused (truncated, then extended) cache scores a canvas like a fresh encoding of the same ids.
    canvas = torch.randint(0, eng.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ours = eng.denoise(chat.cache, canvas)
    fresh = eng.denoise(eng.encode(torch.tensor([chat.cached_ids])), canvas)
    torch.testing.assert_close(ours, fresh, rtol=0, atol=1e-4)


def test_session_reencodes_from_where_history_diverges(eng):
    chat = eng.chat(max_new_tokens=16)
    chat.send("hello", seed=1)
    held = list(chat.cached_ids)
    chat.messages[0]["content"] = "goodbye"  # rewrite history inside the cached part
    chat.send("again", seed=2)
    full = eng.tokenizer.encode(eng.chat_template.render(chat.messages[:-1]))
    common = next(i for i, (a, b) in enumerate(zip(held, full)) if a != b)
    assert 0 < common and chat.reencoded_tokens == len(full) - common
    assert chat.cached_ids[:len(full)] == full


def test_session_falls_back_to_full_encoding(eng):
    chat = eng.chat(max_new_tokens=16)  # rollback room for one 16-token canvas
    # Three canvases, two committed to the cache (no EOS stop: on another CPU's numerics the answer may end sooner).
    first = chat.send("hello", seed=1, max_new_tokens=48, eos_token_id=[])
    assert first.new_tokens.shape[1] == 48
    # The history rewritten from the start of that answer, more than the cache can roll back: the whole
    # conversation is encoded again (whatever the answer was: a rendered answer may also re-tokenise apart).
    chat.messages[-1] = {"role": "assistant", "content": "a rewritten answer"}
    chat.send("again", seed=2)
    full = eng.tokenizer.encode(eng.chat_template.render(chat.messages[:-1]))
    assert chat.reencoded_tokens == len(full)
    assert chat.cached_ids[:len(full)] == full


def test_tool_result_turn(eng):
    chat = eng.chat(tools=TOOLS)
    chat.send("Weather in Paris?", seed=1)
    r = chat.send_tool_result("get_weather", {"temperature": 21})
    assert chat.messages[-2] == {"role": "tool", "name": "get_weather", "content": json.dumps({"temperature": 21})}
    rendered = eng.chat_template.render(chat.messages)
    assert '<|tool_response>response:get_weather{"temperature": 21}<tool_response|>' in rendered
    assert isinstance(r.text, str)


@pytest.mark.parametrize("call,message", [
    (lambda e: e.generate(""), "prompt 0 is empty"),
    (lambda e: e.generate([]), "inputs must be token ids"),
    (lambda e: e.generate("hi", t_max=0.3, t_min=0.4), r"t_max \(0.3\) must be greater than t_min \(0.4\)"),
    (lambda e: e.generate("hi", t_min=0.0, t_max=1e-40), r"temperature .* = 1.67e-41 \(t_min 0, t_max 1e-40, 6 "
                                                          r"steps\) is below 1e-06"),
    (lambda e: e.generate("hi", entropy_bound=0.0), "entropy_bound must be positive, got 0.0"),
    (lambda e: e.generate("hi", entropy_bound=-1), "entropy_bound must be positive"),
    (lambda e: e.generate("hi", max_denoising_steps=0), "max_denoising_steps must be a positive integer, got 0"),
    (lambda e: e.generate("hi", max_new_tokens=-5), "max_new_tokens must be a positive integer, got -5"),
    (lambda e: e.generate(torch.tensor([[3, 99999]])), r"token id 99999, outside the vocabulary"),
    (lambda e: e.generate("hi", max_new_tokens=10**6), r"beyond max_position_embeddings 8192"),
    (lambda e: e.generate([{"role": "wizard", "content": "x"}]), "unknown role 'wizard'"),
    (lambda e: e.generate([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {
        "name": "bad name"}}]), "invalid function name 'bad name'"),
    (lambda e: e.generate([{"role": "user", "content": "x"}], tools=[{"function": {
        "name": "f", "parameters": {"type": "array"}}}]), "must be a JSON schema of type 'object'"),
    (lambda e: e.generate([{"role": "user", "content": "x"}], tools=[{"function": {
        "name": "f", "parameters": {"type": "object", "properties": {}, "required": ["q"]}}}]),
     "'required' must list declared properties"),
    (lambda e: e.generate("hi", seed=1, generator=torch.Generator()), "either generator= or seed="),
    (lambda e: e.generate("hi", canvas=torch.zeros(1, 3, dtype=torch.long)), r"canvas has shape \[1, 3\]"),
    (lambda e: e.generate("hi", eos_token_id=10**6), "eos_token_id 1000000 is not a token id"),
    (lambda e: e.generate("hi", stream=42), "stream must be a callable"),
])
def test_bad_input_gets_clear_error_and_engine_stays_usable(eng, call, message):
    with pytest.raises(dgemma.DgemmaError, match=message):
        call(eng)
    assert eng.generate("hi", seed=0, max_new_tokens=16, max_denoising_steps=2).sequences.shape[1] > 0


def test_text_without_tokenizer_files(tmp_path):
    from dgemma.random_checkpoint import write_random_checkpoint

    e = dgemma.load(write_random_checkpoint(tmp_path / "nt", "tiny"))
    with pytest.raises(dgemma.CheckpointError, match="no tokenizer.json; text input needs the checkpoint's "
                                                     "tokenizer files"):
        e.generate("hello")
    r = e.generate(torch.tensor([[5, 6, 7]]), seed=0, max_new_tokens=8, max_denoising_steps=2)
    assert r.texts is None and r.sequences.shape == (1, 3 + 256)


def test_checkpoint_without_chat_template(tmp_path):
    e = dgemma.load(write_chat_checkpoint(tmp_path / "nt", with_template=False))
    with pytest.raises(dgemma.DgemmaError, match="the checkpoint has no chat template"):
        e.generate([{"role": "user", "content": "hi"}])
    assert e.generate("plain text works", seed=0).texts


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "dgemma", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_cli_generate(ckpt):
    r = cli("generate", "--model", ckpt, "--prompt", "Why is the sky blue?", "--chat", "--thinking", "--seed", "1",
            "--steps", "3", "--show-drafts")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[block 0 step") == 3
    assert "tokens in" in r.stderr
    again = cli("generate", "--model", ckpt, "--prompt", "Why is the sky blue?", "--chat", "--thinking", "--seed",
                "1", "--steps", "3", "--show-drafts")
    assert again.stdout == r.stdout  # --seed makes it reproducible


def test_cli_generate_fp8(ckpt):
    r = cli("generate", "--model", ckpt, "--prompt", "hi", "--quantization", "fp8", "--steps", "1", "--seed", "0")
    assert r.returncode == 0, r.stderr
    bad = cli("generate", "--model", ckpt, "--prompt", "hi", "--quantization", "int4")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_cli_chat_multi_turn(ckpt):
    r = cli("chat", "--model", ckpt, "--seed", "2", "--steps", "2", stdin="hello\nwhat next?\n/reset\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 4


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "checkpoint directory not found: /nonexistent"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--steps", "0"], "expected a positive integer, got 0"),
    (["generate", "--model", "MODEL", "--prompt", ""], "--prompt is empty"),
    (["generate", "--model", "MODEL"], "the following arguments are required: --prompt"),
    (["chat"], "the following arguments are required: --model"),
])
def test_cli_errors_are_one_line(ckpt, args, message):
    r = cli(*[ckpt if a == "MODEL" else a for a in args])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help_documents_every_option():
    r = cli("generate", "--help")
    for opt in ("--model", "--prompt", "--chat", "--thinking", "--max-new-tokens", "--steps", "--seed",
                "--show-drafts", "--quantization"):
        assert opt in r.stdout
    assert "--system" in cli("chat", "--help").stdout


def test_a_session_takes_max_length_as_generate_does(eng, tmp_path):
    """A session's budget resolves as generate's: the call's max_new_tokens, else the call's max_length, else the
    session's max_new_tokens when it was given one, else the engine's settings (a max_length of
    generation_config.json included). The session used to pass its own max_new_tokens always, so max_length was
    ignored (64 or 256 tokens instead of 16)."""
    msgs = [{"role": "user", "content": "hi"}]
    prompt = len(eng.tokenizer.encode(eng.chat_template.render(msgs)))
    kw = dict(eos_token_id=[], seed=0, max_denoising_steps=2)
    canvas = eng.config.canvas_length
    r = eng.chat(max_new_tokens=4 * canvas).send("hi", max_length=prompt + canvas, **kw)
    assert r.new_tokens.shape[1] == canvas
    assert eng.chat(max_new_tokens=4 * canvas).send("hi", **kw).new_tokens.shape[1] == 4 * canvas
    path = tmp_path / "ckpt"
    write_chat_checkpoint(path)
    config = json.loads((path / "generation_config.json").read_text())
    config.pop("max_new_tokens", None)
    config["max_length"] = prompt + canvas
    (path / "generation_config.json").write_text(json.dumps(config))
    short = dgemma.load(path, dtype=torch.float32)
    assert short.generate(msgs, **kw).new_tokens.shape[1] == canvas
    session = short.chat()
    assert session.send("hi", **kw).new_tokens.shape[1] == canvas
    assert session.budget == -(-(prompt + canvas) // canvas) * canvas  # rollback room for the longest answer
    # A max_length at the end of the positions (a common generation_config.json value): each turn gets the whole
    # canvases that fit (generate alone rounds the last canvas past the end and refuses).
    config["max_length"] = short.config.max_position_embeddings
    (path / "generation_config.json").write_text(json.dumps(config))
    long = dgemma.load(path, dtype=torch.float32).chat(context=8 * canvas)
    reply = long.send("hi", **kw)
    assert reply.new_tokens.shape[1] == (8 * canvas - prompt) // canvas * canvas
    assert long.budget == 8 * canvas  # no more rollback room than the context


def test_a_session_keeps_its_own_copy_of_each_message_and_the_tools(eng):
    """The caller's dicts may change after a turn: the history keeps what was sent (a message dict reused with new
    content rewrote turn 1, and the next turn re-encoded and answered a conversation never had)."""
    tools = [{"type": "function", "function": {"name": "weather", "description": "The weather.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    session = eng.chat(tools=tools)
    tools[0]["function"]["name"] = "changed"
    msg = {"role": "user", "content": "hello"}
    kw = dict(seed=0, max_denoising_steps=2, max_new_tokens=8)
    session.send(msg, **kw)
    msg["content"] = "What is the weather in Paris?"
    session.send(msg, **kw)
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello",
                                                                              "What is the weather in Paris?"]
    assert session.tools[0]["function"]["name"] == "weather"
    # Only the new turn was encoded: the first turn and its reply stayed in the cache.
    turn = len(eng.tokenizer.encode(eng.chat_template.render(session.messages[:3], tools=session.tools)))
    assert session.reencoded_tokens < len(session.cached_ids) - turn + 64


def test_a_session_past_its_context_names_the_sessions_remedy(eng):
    session = eng.chat(context=64)
    with pytest.raises(dgemma.CacheFullError, match=r"positions .* but this session's context is 64: start the "
                                                   r"session with eng.chat\(context=...\)"):
        session.send("hi " * 60, seed=0, max_new_tokens=32, max_denoising_steps=2)
    assert session.messages == [] and session.cache is None
    assert session.send("hi", seed=0, max_new_tokens=8, max_denoising_steps=2).responses  # still usable


def test_truncating_to_nothing_resets_the_high_water_mark():
    """After truncate(0) every position is written again before it is read: a cache filled again takes the
    rollbacks a fresh one takes (it used to refuse them by the old high-water mark)."""
    from dgemma.random_checkpoint import random_engine

    eng = random_engine("tiny", canvas_length=16)
    cache = eng.new_cache(1, 400, rollback=16)
    eng.encode(torch.randint(3, 500, (1, 300)), cache=cache)  # the rings wrap
    cache.truncate(0)
    ids = torch.randint(3, 500, (1, 40))
    eng.encode(ids, cache=cache)
    fresh = eng.new_cache(1, 400, rollback=16)
    eng.encode(ids, cache=fresh)
    assert cache.high_water == fresh.high_water == 40 and cache.min_length == fresh.min_length
    cache.truncate(35)
    fresh.truncate(35)
    nxt = torch.randint(3, 500, (1, 5))
    kw = dict(seed=0, max_new_tokens=16, max_denoising_steps=2, eos_token_id=[])
    assert torch.equal(eng.generate(nxt, cache=cache, **kw).sequences, eng.generate(nxt, cache=fresh, **kw).sequences)
