"""`dgemma serve`: the OpenAI-compatible server on a tiny random checkpoint, driven by the official
`openai` client and plain HTTP on 127.0.0.1."""

import json
import socket
import threading
import time

import pytest
import torch
from chat_fixture import write_chat_checkpoint

import dgemma

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package brings

from dgemma.server import OpenAIServer, create_app  # noqa: E402

MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_chat_checkpoint(tmp_path_factory.mktemp("serve"), seed=3)
    return dgemma.load(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def server(engine):
    srv = OpenAIServer(engine, model_name=MODEL, max_batch=8, max_context=512)
    port = free_port()
    config = uvicorn.Config(create_app(srv), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield srv, f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(timeout=30)


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
