"""`dgemma serve` under adversarial clients, found by fuzzing: request bodies are bounded in size and upload time,
a stop signal answers waiting generations at once and ends within its grace period whatever a client does, request
parsing runs apart from answer decoding, long stop strings and tools are bounded, and tool calls the model writes
with unreadable numbers or unbounded nesting stay text rather than failing the request."""

import json
import socket
import threading
import time

import pytest
from serve_fixture import MODEL, engine, pace_decoder, serving  # noqa: F401 - fixtures

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from dgemma.chat import MAX_ARGUMENT_DEPTH, parse_response_lenient, parse_tool_call  # noqa: E402
from dgemma.errors import DgemmaError  # noqa: E402
from dgemma.server import MAX_STOP_CHARS, OpenAIServer, RequestError, _stop_prefix  # noqa: E402

USER = [{"role": "user", "content": "Why is the sky blue?"}]


def _server(engine, max_batch=8):
    return OpenAIServer(engine, model_name=MODEL, max_batch=max_batch, max_context=512)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _raw_reply(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except socket.timeout:
        pass
    return out


def test_a_body_past_the_limit_is_413_declared_or_not(engine):
    with serving(_server(engine), max_body_bytes=2000) as base:
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}
        r = httpx.post(base + "/v1/chat/completions", json=big, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "this server takes at most 2000" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the bytes read are counted
            yield json.dumps(big).encode()

        r = httpx.post(base + "/v1/chat/completions", content=chunks(), timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 2000 bytes" in r.json()["error"]["message"], r.text
        ok = httpx.post(base + "/v1/chat/completions", timeout=60,
                        json={"model": MODEL, "messages": USER, "max_tokens": 4, "max_denoising_steps": 2})
        assert ok.status_code == 200, ok.text


def test_a_body_that_stalls_is_408(engine):
    with serving(_server(engine), body_seconds=0.5) as base:
        with socket.create_connection(("127.0.0.1", _port(base))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messa")
            t = time.time()
            reply = _raw_reply(s, 10)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"did not arrive within 0.5 s (7 bytes came)" in reply and time.time() - t < 5


def test_a_stop_signal_answers_waiting_generations_at_once_and_ends_within_its_grace(engine, monkeypatch):
    """max_batch 1, decoder passes slowed: one generation runs, two wait. On the stop signal the waiting ones get a
    503 at once (they used to be generated first, one after another), the running one may finish, and a client
    stalled mid-body cannot hold the server past its grace period."""
    pace_decoder(monkeypatch, engine, 0.3)
    srv = _server(engine, max_batch=1)
    results: dict[int, tuple[int, float]] = {}
    body = {"model": MODEL, "messages": USER, "max_tokens": 64, "max_denoising_steps": 4, "seed": 1}

    def ask(i, base):
        try:
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            results[i] = (r.status_code, time.time())
        except httpx.HTTPError:
            results[i] = (-1, time.time())

    stall = None
    with serving(srv, shutdown_seconds=2) as base:
        threads = [threading.Thread(target=ask, args=(i, base)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not (srv.scheduler.snapshot()["active"] == 1 and srv.scheduler.snapshot()["queue_length"] == 2):
            assert time.time() < deadline, srv.scheduler.snapshot()
            time.sleep(0.02)
        stall = socket.create_connection(("127.0.0.1", _port(base)))
        stall.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        signalled = time.time()
    # serving() set should_exit and joined the server thread: it ended within the grace period (plus start-up of
    # the shutdown), though a client still holds a half-sent request.
    assert time.time() - signalled < 10
    for t in threads:
        t.join(60)
    stall.close()
    refused = [i for i, (status, _) in results.items() if status == 503]
    assert len(refused) == 2, results
    assert all(results[i][1] - signalled < 3 for i in refused), results


def test_requests_are_planned_apart_from_answer_decoding(engine, monkeypatch):
    """Request bodies become plans on the dgemma-parse threads: a burst of costly requests waits there, not in the
    pool that decodes the blocks of answers being streamed."""
    srv = _server(engine)
    seen = []
    plan = srv.plan

    def recording(body, *, chat):
        seen.append(threading.current_thread().name)
        return plan(body, chat=chat)

    monkeypatch.setattr(srv, "plan", recording)
    with serving(srv) as base:
        r = httpx.post(base + "/v1/chat/completions", timeout=120,
                       json={"model": MODEL, "messages": USER, "max_tokens": 4, "max_denoising_steps": 2})
    assert r.status_code == 200, r.text
    assert seen and all(name.startswith("dgemma-parse") for name in seen), seen


def test_long_stop_strings_and_tools_are_refused_before_the_work(engine, monkeypatch):
    srv = _server(engine)
    with pytest.raises(RequestError, match=rf"a stop string of {MAX_STOP_CHARS + 1} characters: expected at most "
                                           rf"{MAX_STOP_CHARS}") as e:
        srv.plan({"model": MODEL, "messages": USER, "stop": ["ok", "s" * (MAX_STOP_CHARS + 1)]}, chat=True)
    assert e.value.param == "stop"

    def never(*a, **k):
        raise AssertionError("rendered")

    monkeypatch.setattr("dgemma.prompts.render_chat", never)
    tools = [{"type": "function", "function": {"name": "f", "description": "word " * 1_000_000,
                                               "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(RequestError, match=r"is longer than this server's context 512") as e:
        srv.plan({"model": MODEL, "messages": USER, "tools": tools}, chat=True)
    assert e.value.code == "context_length_exceeded"


def test_stop_prefix_reads_only_what_the_tail_can_match():
    """The failure table covers the characters a match of the text's tail can reach, not the whole stop string (a
    million-character one made every block of every choice cost a million steps)."""
    stop = "ab" * 500_000
    assert _stop_prefix("x" * 10_000 + "abab", [stop]) == 4
    t = time.perf_counter()
    for _ in range(100):
        assert _stop_prefix("short ab", [stop]) == 2  # an 8-character tail: a 9-character table
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("arguments, why", [
    ("{x:" + "9" * 5000 + "}", "number not readable"),
    ("{x:" + "[" * 3000 + "]" * 3000 + "}", f"nested deeper than {MAX_ARGUMENT_DEPTH}"),
    ("{x:1e999}", "number '1e999' is not finite"),
    ('{x:"a\\qb"}', "invalid string"),
])
def test_tool_calls_with_unreadable_arguments_are_malformed_and_stay_text(arguments, why):
    """A 5000-digit integer (past Python's digit limit), nesting 3000 deep (a RecursionError), a number that
    overflows to infinity (no JSON number), an invalid escape: malformed calls (DgemmaError), which the server's
    lenient parse leaves in the answer's text as written (the request used to fail with a 500)."""
    with pytest.raises(DgemmaError, match=why):
        parse_tool_call("f" + arguments)
    written = "<|tool_call>call:f" + arguments + "<tool_call|>"
    response = parse_response_lenient("Calling. " + written)
    assert response.tool_calls == [] and response.text == "Calling. " + written
    nested = "{x:" + "[" * (MAX_ARGUMENT_DEPTH - 2) + "1" + "]" * (MAX_ARGUMENT_DEPTH - 2) + "}"
    value = parse_tool_call("f" + nested)["arguments"]["x"]
    for _ in range(MAX_ARGUMENT_DEPTH - 3):
        value = value[0]
    assert value == [1]


def test_a_server_started_again_serves_again(engine):
    """The same OpenAIServer served, stopped and served again: the stop's refusal of new work and the planning
    threads belong to one run (the second run answered 503 "shutting down" or 500)."""
    srv = _server(engine)
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "max_denoising_steps": 2}
    for _ in range(2):
        with serving(srv) as base:
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
