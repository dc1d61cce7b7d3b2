"""`dgemma serve`: the OpenAI-compatible server on a tiny random checkpoint, driven by the official
`openai` client and plain HTTP on 127.0.0.1."""

import json
import threading
import time

import pytest
import torch
from serve_fixture import MODEL, engine, hang_up_when, pace_decoder, server  # noqa: F401 - fixtures

import dgemma

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package brings

from dgemma.server import OpenAIServer  # noqa: E402
from dgemma.errors import NonFiniteError, OutOfMemoryError  # noqa: E402



@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
SMALL = dict(max_tokens=16, extra_body={"max_denoising_steps": 3})


def test_chat_completion_matches_the_python_api(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7, **SMALL)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    alone = engine.generate(MESSAGES, seed=7, max_new_tokens=16, max_denoising_steps=3)
    assert choice.message.content == alone.text
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7, **SMALL)
    assert again.choices[0].message.content == choice.message.content
    two = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7, n=2, **SMALL)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content == choice.message.content


def test_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=11, **SMALL)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=11, stream=True,
                                            stream_options={"include_usage": True}, **SMALL)
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content and finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_stream_drafts_send_every_denoising_step(server):
    body = {"model": MODEL, "messages": MESSAGES, "seed": 1, "max_tokens": 16, "stream": True, "stream_drafts": True,
            "max_denoising_steps": 3, "stability_threshold": 0, "confidence_threshold": 1e-9}
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    drafts = [e["choices"][0]["delta"]["draft"] for e in events if "draft" in e["choices"][0]["delta"]]
    assert [d["step"] for d in drafts] == [3, 2, 1]


def test_completions_models_health_metrics(client, server):
    r = client.completions.create(model=MODEL, prompt="The sky is", seed=2, max_tokens=16,
                                  extra_body={"max_denoising_steps": 2})
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[1] + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server[1] + "/metrics").text
    for name in ("dgemma_queue_length", "dgemma_active_requests", "dgemma_tokens_per_second",
                 "dgemma_block_latency_seconds", "dgemma_requests_total"):
        assert f"\n{name} " in "\n" + metrics


def test_tool_call_round_trip_and_thinking(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, seed=3, **SMALL)
    assert first.choices[0].finish_reason in ("stop", "length", "tool_calls")
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=tools, seed=3, **SMALL)
    assert second.choices[0].message.role == "assistant"
    thought = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3, max_tokens=16,
                                             extra_body={"max_denoising_steps": 2, "thinking": True})
    assert hasattr(thought.choices[0].message, "reasoning_content")


def test_response_conversion_of_tool_calls_and_thinking(engine):
    """What the model's own markup becomes in the OpenAI message (parsed by dgemma's chat parser)."""
    from dgemma.chat import parse_response

    srv = OpenAIServer(engine, model_name=MODEL)
    resp = parse_response('<|channel>thought\nCheck the weather.<channel|>'
                          '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>')
    calls = srv.tool_calls(resp)
    assert resp.thinking == "Check the weather."
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "other", "messages": MESSAGES}, 404, "does not exist"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "has role 'wizard'"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"parameters": {}}}]}, 400, "name"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, 400, "more than this server's context 512"),
    ({"messages": MESSAGES, "t_min": 0.9, "t_max": 0.5}, 400, "t_max"),
    ({"messages": MESSAGES, "entropy_bound": -1}, 400, "entropy_bound"),
    ({"messages": MESSAGES, "n": 100}, 400, "'n' = 100 is out of range"),
    ({"messages": MESSAGES, "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool result without a 'name'"),
    ({"messages": []}, 400, "non-empty list"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_json_and_the_server_keeps_serving(server, client):
    r = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1, **SMALL)
    assert ok.choices[0].message.role == "assistant"


def test_load_with_disconnects_answers_everything_and_leaks_no_slot(server, client, engine):
    """64 requests, 16 at a time, a quarter of them streamed and abandoned after the first chunk: every
    other request is answered, seeded outputs equal the same request run alone, and all slots are free."""
    srv, base = server
    results, errors = {}, []
    lock = threading.Lock()

    def one(i):
        try:
            messages = [{"role": "user", "content": f"Question number {i % 5}?"}]
            if i % 4 == 3:
                with httpx.stream("POST", base + "/v1/chat/completions", timeout=60,
                                  json={"model": MODEL, "messages": messages, "seed": i, "stream": True,
                                        "max_tokens": 48, "max_denoising_steps": 3}) as r:
                    next(r.iter_lines())  # the first chunk, then hang up
                return
            r = client.chat.completions.create(model=MODEL, messages=messages, seed=i, max_tokens=32,
                                               extra_body={"max_denoising_steps": 3})
            with lock:
                results[i] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"{i}: {type(e).__name__}: {e}")

    pending = list(range(64))
    while pending:
        wave = [threading.Thread(target=one, args=(i,)) for i in pending[:16]]
        pending = pending[16:]
        for t in wave:
            t.start()
        for t in wave:
            t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(results) == 48
    for i in (0, 5, 18):
        alone = engine.generate([{"role": "user", "content": f"Question number {i % 5}?"}], seed=i,
                                max_new_tokens=32, max_denoising_steps=3)
        assert results[i] == alone.text
    deadline = time.time() + 30
    while True:
        snap = srv.scheduler.snapshot()
        if snap["active"] == 0 and snap["queue_length"] == 0:
            break
        assert time.time() < deadline, snap
        time.sleep(0.05)
    assert snap["requests_cancelled"] >= 1
    # The steps of concurrent requests ran as batched decoder passes (more canvases than passes).
    assert snap["decoder_rows_total"] > 1.5 * snap["decoder_passes_total"], snap


@pytest.mark.parametrize("raw,needle", [
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON (nested too deeply)"),
    (b'{"messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON (a number too long"),
])
def test_json_bodies_too_deep_or_with_too_long_numbers_get_400(server, raw, needle):
    r = httpx.post(server[1] + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


TOOL_HISTORY = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]


def _with_arguments(arguments: str) -> list[dict]:
    call = dict(TOOL_HISTORY[1]["tool_calls"][0], function={"name": "get_weather", "arguments": arguments})
    return [TOOL_HISTORY[0], dict(TOOL_HISTORY[1], tool_calls=[call])]


@pytest.mark.parametrize("body,needle", [
    ({"messages": TOOL_HISTORY + [{"role": "tool", "tool_call_id": [1], "content": "x"}]},
     "messages[2].tool_call_id must be a string, got [1]"),
    ({"messages": _with_arguments("[" * 100_000)},
     "messages[1].tool_calls[0]: arguments are not valid JSON (nested too deeply)"),
    ({"messages": _with_arguments('{"a": 1' + "0" * 5000 + "}")},
     "messages[1].tool_calls[0]: arguments are not valid JSON (a number too long"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "no"}},
     "'chat_template_kwargs.enable_thinking' = 'no': expected true or false"),
    ({"messages": MESSAGES, "chat_template_kwargs": "x"}, "'chat_template_kwargs' must be an object"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": "maybe"}},
     "'stream_options.include_usage' = 'maybe': expected true or false"),
    ({"messages": MESSAGES, "stream_options": False}, "'stream_options' must be an object"),
])
def test_fields_of_the_wrong_type_get_400(server, body, needle):
    r = httpx.post(server[1] + "/v1/chat/completions", json=dict(body, max_tokens=16), timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize("path,raw,needle", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 16}',
     "messages[0].content has an unpaired surrogate (U+D800) at index 1"),
    ("/v1/completions", b'{"prompt": "ab\\udc00", "max_tokens": 16}',
     "prompt has an unpaired surrogate (U+DC00) at index 2"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}',
     "model has an unpaired surrogate"),
])
def test_unpaired_surrogates_get_400_naming_the_field(server, client, path, raw, needle):
    r = httpx.post(server[1] + path, content=raw, timeout=60, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "expected valid Unicode text" in err["message"]
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1, **SMALL)
    assert ok.choices[0].message.role == "assistant"


def test_partial_parse_of_model_output():
    from dgemma.chat import parse_response, parse_response_lenient

    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    assert parse_response_lenient("Sure. " + call) == parse_response("Sure. " + call)
    # While streaming: a call still being written, or a piece of a marker, is held back.
    for cut in (6, 8, 20, 40, len(call) - 3):
        assert parse_response_lenient("Sure. " + call[:cut], partial=True).text == "Sure."
    # At the end a call that does not parse stays in the text, the calls that do are calls.
    bad = "<|tool_call>call:get_weather{city:Paris}<tool_call|>"
    out = parse_response_lenient("A " + bad + " B " + call + " C")
    assert out.text == "A " + bad + " B  C" and [c["name"] for c in out.tool_calls] == ["get_weather"]
    assert parse_response_lenient("A " + call[:40]).text == "A " + call[:40]


def _stream_events(base: str, body: dict) -> tuple[list[dict], list[str]]:
    with httpx.stream("POST", base + "/v1/chat/completions", json=dict(body, stream=True), timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and not [e for e in events if "error" in e], events
    return events, lines


CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'


def test_a_tool_call_split_across_blocks_streams_as_one_call(server, engine, monkeypatch):
    """The first block ends inside a tool call (decoding is faked: the tiny model writes no calls): the
    stream holds it back instead of failing, and the final chunk has the call."""
    tok = engine.tokenizer
    decode, calls = tok.decode, []

    def fake(ids, *, skip_special_tokens=False):
        if skip_special_tokens:
            return decode(ids, skip_special_tokens=True)
        calls.append(ids)
        return "Sure. " + (CALL[:40] if len(calls) == 1 else CALL)

    monkeypatch.setattr(tok, "decode", fake)
    events, _ = _stream_events(server[1], {"model": MODEL, "messages": MESSAGES, "seed": 3, "max_tokens": 32,
                                           "max_denoising_steps": 2})
    assert len(calls) >= 2
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    final = events[-1]["choices"][0]
    assert final["finish_reason"] == "tool_calls"
    [call] = final["delta"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("markup", [CALL[:40], "<|tool_call>call:get_weather{city:Paris}<tool_call|>"])
def test_tool_calls_that_do_not_parse_are_answered_as_text(server, engine, monkeypatch, markup):
    tok = engine.tokenizer
    decode = tok.decode

    def fake(ids, *, skip_special_tokens=False):
        return decode(ids, skip_special_tokens=True) if skip_special_tokens else "Sure. " + markup

    monkeypatch.setattr(tok, "decode", fake)
    body = {"model": MODEL, "messages": MESSAGES, "seed": 3, "max_tokens": 32, "max_denoising_steps": 2}
    r = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Sure. " + markup and not choice["message"].get("tool_calls")
    assert choice["finish_reason"] != "tool_calls"
    events, _ = _stream_events(server[1], body)
    streamed = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert streamed == "Sure. " + markup


def _wait_idle(srv, seconds):
    deadline = time.time() + seconds
    while True:
        snap = srv.scheduler.snapshot()
        if snap["active"] == 0 and snap["queue_length"] == 0:
            return snap
        assert time.time() < deadline, snap
        time.sleep(0.05)


def test_a_non_streamed_client_that_hangs_up_cancels_its_jobs(server, engine, monkeypatch):
    """Like a streamed one: n=4 long answers, the socket closed while they run; the jobs are cancelled at once,
    not run to their end."""
    srv, base = server
    _wait_idle(srv, 30)
    pace_decoder(monkeypatch, engine, 0.25)
    monkeypatch.setattr(engine, "eos_token_ids", [])  # every answer runs to max_tokens (24 blocks)
    before = srv.scheduler.snapshot()
    body = {"model": MODEL, "messages": MESSAGES, "n": 4, "max_tokens": 384, "max_denoising_steps": 16}
    hang_up_when(srv, base, "/v1/chat/completions", body, lambda s: s["requests_total"] >= before["requests_total"] + 4,
                 "the jobs were not submitted", linger=0.3)
    snap = _wait_idle(srv, 5)
    assert snap["requests_cancelled"] - before["requests_cancelled"] == 4, snap
    assert snap["requests_finished"] == before["requests_finished"], snap


# NonFiniteError: the weights' doing, not the request's; OutOfMemoryError: a valid request the device cannot hold now.
@pytest.mark.parametrize("error, status", [(RuntimeError, 500), (NonFiniteError, 500), (OutOfMemoryError, 503)])
def test_a_failure_inside_the_model_is_a_5xx_and_the_server_goes_on(server, client, engine, monkeypatch, error,
                                                                     status):
    def boom(*args, **kwargs):
        raise error("injected decoder failure")

    monkeypatch.setattr(engine.model, "denoise_hidden_rows", boom)
    monkeypatch.setattr(engine.model, "denoise_hidden", boom)
    r = httpx.post(server[1] + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 16,
                                                             "max_denoising_steps": 2}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "injected decoder failure" in err["message"]
    monkeypatch.undo()
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1, **SMALL)
    assert ok.choices[0].message.role == "assistant"


def test_max_image_tokens_is_checked_without_images_and_named(server):
    r = httpx.post(server[1] + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "max_image_tokens": 7})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_image_tokens" and "max_image_tokens=7" in err["message"]
    assert "70, 140, 280, 560, 1120" in err["message"]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """An OpenAIServer (not started) on the demo checkpoint, whose tokenizer has the vision tokens."""
    from dgemma.demo import write_demo_checkpoint

    eng = dgemma.load(write_demo_checkpoint(tmp_path_factory.mktemp("demo")), dtype=torch.float32)
    return OpenAIServer(eng, model_name="demo")


def _png() -> str:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("content,where", [
    ("what is <|image|> here?", "messages[0]['content']"),
    ("<|video|>", "messages[0]['content']"),
    ([{"type": "image_url", "image_url": {"url": "IMAGE"}}, {"type": "text", "text": "and <|image|>"}],
     "messages[0]['content'][1]['text']"),
])
def test_message_text_spelling_a_vision_token_is_refused(vision_server, content, where):
    from dgemma.server import RequestError

    if isinstance(content, list):
        content[0]["image_url"]["url"] = _png()
    with pytest.raises(RequestError) as e:
        vision_server.plan({"messages": [{"role": "user", "content": content}], "max_tokens": 16}, chat=True)
    assert e.value.status == 400 and e.value.param == "messages"
    assert where in e.value.message and "'<|" in e.value.message and "template" not in e.value.message
    # The same message with an image and the budget out of range names max_image_tokens.
    image = {"type": "image_url", "image_url": {"url": _png()}}
    with pytest.raises(RequestError) as e:
        vision_server.plan({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}],
                            "max_tokens": 16, "max_image_tokens": 7}, chat=True)
    assert e.value.param == "max_image_tokens"
    plan = vision_server.plan({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}],
                               "max_tokens": 16, "max_image_tokens": 70}, chat=True)
    assert plan.images
