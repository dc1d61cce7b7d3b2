"""`dgemma serve` answers as the OpenAI API defines them, found by fuzzing: max_tokens caps the answer, a stop
string ends the generation (and its usage), a character or stop string split across blocks streams as the whole
answer does, hung-up clients free their places, fields the sampler cannot honour are refused, unknown paths
answer in OpenAI's error form."""

import json
import time

import pytest
from serve_fixture import MODEL, engine, hang_up_when, pace_decoder, server, serving  # noqa: F401 - fixtures

import dgemma

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from dgemma.scheduler import Job, Scheduler  # noqa: E402
from dgemma.server import OpenAIServer, RequestError, _stop_prefix  # noqa: E402

CANVAS = 16
USER = [{"role": "user", "content": "Why is the sky blue?"}]


def _post(base, path, body, **kw):
    return httpx.post(base + path, json=dict({"model": MODEL, "max_denoising_steps": 2, "seed": 1}, **body),
                      timeout=120, **kw)


def _streamed(base, path, body) -> tuple[str, str, dict | None]:
    """(the streamed text, the finish reason, the usage) of a streamed request."""
    body = dict({"model": MODEL, "max_denoising_steps": 2, "seed": 1, "stream": True,
                 "stream_options": {"include_usage": True}}, **body)
    text, finish, usage = "", None, None
    with httpx.stream("POST", base + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for c in event["choices"]:
                text += (c["delta"].get("content") or "") if "delta" in c else c["text"]
                finish = c["finish_reason"] or finish
    return text, finish, usage


def _whole(r) -> tuple[str, str, dict]:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return (c["message"]["content"] if "message" in c else c["text"]), c["finish_reason"], r.json()["usage"]


def _no_eos(engine, monkeypatch):
    """No end-of-sequence ids: answers run to their budget and no token ends their text."""
    monkeypatch.setattr(engine, "eos_token_ids", [])
    monkeypatch.setattr(engine, "end_ids", lambda eos_token_ids=None: set())


def _fake_text(engine, monkeypatch, text_of):
    """Decoding faked: ``text_of(n)`` is the text of an answer's first n tokens (the tiny model writes no such
    text); no EOS ids."""
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "decode", lambda ids, skip_special_tokens=False: text_of(len(ids)))
    _no_eos(engine, monkeypatch)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_caps_the_answer_and_its_usage(server, engine, monkeypatch, path):
    _no_eos(engine, monkeypatch)
    body = {"prompt": "The sky"} if "chat" not in path else {"messages": USER}
    for max_tokens in (1, 5, CANVAS + 3):
        text, finish, usage = _whole(_post(server[1], path, dict(body, max_tokens=max_tokens)))
        assert usage["completion_tokens"] == max_tokens and finish == "length"
        assert _streamed(server[1], path, dict(body, max_tokens=max_tokens)) == (text, finish, usage)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_character_split_across_blocks_streams_whole(server, engine, monkeypatch, path):
    """The first block ends inside a two-byte character (the decoder writes U+FFFD for its first byte): the
    stream holds it back, and the text after it still streams."""
    _fake_text(engine, monkeypatch, lambda n: "Hi caf\ufffd" if n <= CANVAS else "Hi café au lait")
    body = {"prompt": "The sky"} if "chat" not in path else {"messages": USER}
    body["max_tokens"] = 2 * CANVAS
    whole = _whole(_post(server[1], path, body))
    assert whole[0] == "Hi café au lait"
    assert _streamed(server[1], path, body) == whole


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stop_string_split_across_blocks_ends_the_answer_and_the_generation(server, engine, monkeypatch, path):
    srv, base = server
    _fake_text(engine, monkeypatch, lambda n: "Sunlight sca" if n <= CANVAS else "Sunlight scatters. The end")
    body = {"prompt": "The sky"} if "chat" not in path else {"messages": USER}
    body.update(max_tokens=20 * CANVAS, stop=["ters.", "zzz"])
    before = srv.scheduler.snapshot()
    text, finish, usage = _whole(_post(base, path, body))
    assert (text, finish) == ("Sunlight scat", "stop")
    # The answer took two blocks of its twenty: the job ended there, as finished, and usage counts its tokens up
    # to the one that completed the stop string.
    assert usage["completion_tokens"] == CANVAS + 1
    deadline = time.time() + 30
    while srv.scheduler.snapshot()["requests_finished"] == before["requests_finished"]:
        assert time.time() < deadline
        time.sleep(0.02)
    after = srv.scheduler.snapshot()
    assert after["blocks_total"] - before["blocks_total"] <= 3
    assert after["requests_cancelled"] == before["requests_cancelled"]
    assert _streamed(base, path, body) == (text, finish, usage)


def test_stop_prefix():
    assert _stop_prefix("abc XY", ["XYZ"]) == 2
    assert _stop_prefix("abc X", ["XYZ", "X"]) == 1
    assert _stop_prefix("abc", ["XYZ"]) == 0
    assert _stop_prefix("", ["XYZ"]) == 0
    assert _stop_prefix("ab", ["abc", "bcd"]) == 2


def test_generated_tokens_metric_counts_what_usage_counts(server, engine, monkeypatch):
    srv, base = server
    _no_eos(engine, monkeypatch)
    before = srv.scheduler.snapshot()["tokens_total"]
    used = sum(_whole(_post(base, "/v1/completions", {"prompt": "The sky", "max_tokens": m}))[2]["completion_tokens"]
               for m in (3, CANVAS + 1))
    assert srv.scheduler.snapshot()["tokens_total"] - before == used == 3 + CANVAS + 1


def test_a_non_streamed_client_that_hangs_up_is_noticed_between_quick_blocks(server, engine, monkeypatch):
    """Blocks every few tens of milliseconds (faster than the idle poll): the hang-up is still noticed at once."""
    srv, base = server
    pace_decoder(monkeypatch, engine, 0.01)
    _no_eos(engine, monkeypatch)
    before = srv.scheduler.snapshot()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 480, "max_denoising_steps": 2}
    hang_up_when(srv, base, "/v1/completions", body, lambda s: s["blocks_total"] >= before["blocks_total"] + 2,
                 "no block ran")
    deadline = time.time() + 30
    while srv.scheduler.snapshot()["active"]:
        assert time.time() < deadline
        time.sleep(0.01)
    after = srv.scheduler.snapshot()
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1, after
    assert after["blocks_total"] - before["blocks_total"] < 25, after  # 30 blocks if it had run to its end


def test_waiting_jobs_whose_clients_left_hold_no_place_in_the_queue(engine, monkeypatch):
    pace_decoder(monkeypatch, engine, 0.05)
    sched = Scheduler(engine, max_batch=1, max_queue=2)
    sched.start()
    events = []
    try:
        def job(tokens):
            return Job(ids=[2, 10, 11], emit=lambda kind, payload: events.append(kind),
                       kwargs={"max_new_tokens": tokens, "max_denoising_steps": 2, "seed": 0})

        busy = job(20 * CANVAS)
        sched.submit(busy)
        deadline = time.time() + 30
        while sched.snapshot()["active"] == 0:  # the busy job holds the only slot
            assert time.time() < deadline
            time.sleep(0.01)
        waiting = [job(CANVAS), job(CANVAS)]
        for j in waiting:
            sched.submit(j)
        with pytest.raises(dgemma.DgemmaError, match=r"the request queue is full \(2 waiting\)"):
            sched.submit(job(CANVAS))
        for j in waiting:
            j.cancel()
        assert sched.snapshot()["queue_length"] == 0
        sched.submit(job(CANVAS))  # the places of the jobs that left are free
        assert events.count("error") == 2 and sched.snapshot()["requests_cancelled"] == 2
        busy.cancel()
    finally:
        sched.stop()


def test_a_full_queue_is_a_503_for_streamed_requests_too(engine):
    srv = OpenAIServer(engine, model_name=MODEL, max_batch=1, max_context=512)
    with serving(srv) as base:
        srv.scheduler.stop()  # nothing is taken any more
        for stream in (False, True):
            r = _post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text


@pytest.mark.parametrize("field,value", [
    ("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
    ("frequency_penalty", 1), ("response_format", {"type": "json_object"}), ("best_of", 2), ("echo", True),
    ("suffix", "end"), ("temperature", "hot"), ("temperature", 5), ("top_p", 5), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("logprobs", 1)])
def test_fields_the_sampler_cannot_honour_are_refused(server, field, value):
    srv, _ = server
    chat = field not in ("echo", "suffix", "best_of")
    body = {"messages": USER} if chat else {"prompt": "hi"}
    with pytest.raises(RequestError) as e:
        srv.plan(dict(body, max_tokens=4, **{field: value}), chat=chat)
    assert e.value.status == 400 and e.value.param == field, e.value.message


def test_the_values_that_ask_for_nothing_are_accepted(server):
    srv, _ = server
    quiet = {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
             "response_format": {"type": "text"}, "temperature": 0.7, "top_p": 1, "tool_choice": "auto", "user": "x"}
    srv.plan(dict(quiet, messages=USER, max_tokens=4), chat=True)
    srv.plan({"prompt": "hi", "max_tokens": 4, "echo": False, "suffix": "", "best_of": 1, "logprobs": 0}, chat=False)


@pytest.mark.parametrize("fields,param", [({"t_max": 0.1, "t_min": 0.5}, "t_max"),
                                          ({"max_denoising_steps": 5000}, "max_denoising_steps"),
                                          ({"entropy_bound": -1.0}, "entropy_bound"),
                                          ({"confidence_threshold": 0.0}, "confidence_threshold")])
def test_sampler_errors_name_their_field(server, fields, param):
    with pytest.raises(RequestError) as e:
        server[0].plan(dict(messages=USER, max_tokens=4, **fields), chat=True)
    assert e.value.param == param, e.value.message


def test_tool_results_as_parts_are_their_text_and_images_there_are_refused(server):
    srv, _ = server
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def plan(content):
        return srv.plan({"messages": history + [{"role": "tool", "tool_call_id": "c1", "content": content}],
                         "max_tokens": 4}, chat=True)

    assert plan([{"type": "text", "text": "21 "}, {"type": "text", "text": "degrees"}]).ids == plan("21 degrees").ids
    with pytest.raises(RequestError, match="tool result with an image part") as e:
        plan([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    assert e.value.status == 400


@pytest.mark.parametrize("required", [[["city"]], [{"a": 1}], [1]])
def test_tool_required_entries_that_are_not_names_are_refused(server, required):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": required}}}]
    with pytest.raises(RequestError, match="'required' must list declared properties") as e:
        server[0].plan({"messages": USER, "tools": tools, "max_tokens": 4}, chat=True)
    assert e.value.param == "tools"


def test_a_prompt_far_past_the_context_is_refused_before_tokenizing(server, engine, monkeypatch):
    def never(text):
        raise AssertionError("tokenized")

    monkeypatch.setattr(engine.tokenizer, "encode", never)
    for chat, body in ((False, {"prompt": "word " * 2_000_000}),
                       (True, {"messages": [{"role": "user", "content": "word " * 2_000_000}]})):
        with pytest.raises(RequestError, match=r"characters, at least \d+ tokens\) is longer than this server's "
                                               r"context 512") as e:
            server[0].plan(dict(body, max_tokens=4), chat=chat)
        assert e.value.code == "context_length_exceeded"


def test_model_retrieval_and_unknown_paths_answer_in_openai_form(server):
    base = server[1]
    r = httpx.get(base + "/v1/models/" + MODEL)
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"
    r = httpx.get(base + "/v1/models/other/model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and "GET /v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(base + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_stop_prefix_equals_the_plain_search_on_random_strings():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(0, 12)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randrange(1, 7))) for _ in range(rng.randrange(1, 4))]
        plain = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
                    default=0)
        assert _stop_prefix(text, stops) == plain, (text, stops)
    long = " " * 40_000
    t0 = time.perf_counter()
    assert _stop_prefix(" " * 32_000, [long + "x"] * 4) == 32_000
    assert time.perf_counter() - t0 < 0.5  # linear, not quadratic, in the stop strings' length


def test_a_stop_string_in_a_later_choice_ends_that_choice_at_once(server, engine, monkeypatch):
    """n=2: choice 1 writes the stop string in its first block, choice 0 never does; choice 1's job stops after its
    first blocks instead of running to max_tokens while choice 0 is read."""
    srv, base = server
    seen = {}

    def text_of(ids):
        return "Sunlight STOP here" if seen.get("choice") == 1 else "Sunlight scatters"

    tok = engine.tokenizer
    decode = tok.decode
    _no_eos(engine, monkeypatch)
    # The two choices differ by seed (seed + i): tell them apart by their first token.
    firsts = {}

    def fake(ids, skip_special_tokens=False):
        ids = list(ids)
        key = ids[0] if ids else None
        seen["choice"] = firsts.setdefault(key, len(firsts)) if key is not None else 0
        return text_of(ids)

    monkeypatch.setattr(tok, "decode", fake)
    before = srv.scheduler.snapshot()
    body = {"prompt": "The sky", "n": 2, "max_tokens": 20 * CANVAS, "stop": "STOP", "max_denoising_steps": 1}
    r = _post(base, "/v1/completions", body)
    assert r.status_code == 200, r.text
    reasons = sorted(c["finish_reason"] for c in r.json()["choices"])
    assert reasons == ["length", "stop"], r.json()
    deadline = time.time() + 30
    while srv.scheduler.snapshot()["active"]:
        assert time.time() < deadline
        time.sleep(0.01)
    blocks = srv.scheduler.snapshot()["blocks_total"] - before["blocks_total"]
    assert blocks <= 20 + 3, blocks  # 40 if the stopped choice had run to max_tokens
    monkeypatch.setattr(tok, "decode", decode)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_written_after_the_stop_string_is_not_part_of_the_answer(server, engine, monkeypatch, stream):
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    answer = "Sure STOP " + call + " more"
    # Eight characters per token: the stop string and the whole call are in the first block.
    _fake_text(engine, monkeypatch, lambda n: answer[:8 * n])
    body = {"messages": USER, "max_tokens": 2 * CANVAS, "stop": ["STOP"]}
    if stream:
        text, finish, usage = _streamed(server[1], "/v1/chat/completions", body)
    else:
        r = _post(server[1], "/v1/chat/completions", body)
        text, finish, usage = _whole(r)
        assert not r.json()["choices"][0]["message"].get("tool_calls")
    assert (text, finish) == ("Sure", "stop")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stop_string_ending_in_white_space_is_seen_when_written(server, engine, monkeypatch, path):
    text = "Para one.\n\n\n\n   \n\nPara two and more text"
    _fake_text(engine, monkeypatch, lambda n: text[:n])  # one character per token
    body = {"prompt": "The sky"} if "chat" not in path else {"messages": USER}
    for max_tokens in (11, 40):
        got = _whole(_post(server[1], path, dict(body, max_tokens=max_tokens, stop="\n\n")))
        assert got == ("Para one.", "stop", {"prompt_tokens": got[2]["prompt_tokens"], "completion_tokens": 11,
                                             "total_tokens": got[2]["prompt_tokens"] + 11})
        assert _streamed(server[1], path, dict(body, max_tokens=max_tokens, stop="\n\n")) == got


def test_a_failure_to_decode_the_answer_is_an_openai_500_and_cancels_the_job(server, engine, monkeypatch):
    srv, base = server

    def broken(ids, skip_special_tokens=False):
        raise dgemma.DgemmaError("injected decoding failure")

    _no_eos(engine, monkeypatch)
    monkeypatch.setattr(engine.tokenizer, "decode", broken)
    before = srv.scheduler.snapshot()
    r = _post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 10 * CANVAS})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "injected decoding failure" in r.json()["error"]["message"]
    deadline = time.time() + 30
    while srv.scheduler.snapshot()["active"]:
        assert time.time() < deadline
        time.sleep(0.01)
    assert srv.scheduler.snapshot()["blocks_total"] - before["blocks_total"] < 10


def test_usage_counts_to_a_stop_string_the_streaming_view_holds_back(server, engine, monkeypatch):
    """After a tool-call opening that never closes (shown as text at the end) and in a stop string ending with a
    marker's first character, usage still counts the tokens up to the stop string."""
    for answer, stop, used in (("Sure <|tool_call>call:f{a:1} STOP and more", "STOP", 33),
                               ("Sure, the end< and more", "end<", 14)):
        _fake_text(engine, monkeypatch, lambda n, a=answer: a[:n])  # one character per token
        body = {"messages": USER, "max_tokens": 3 * CANVAS, "stop": [stop]}
        whole = _whole(_post(server[1], "/v1/chat/completions", body))
        assert whole[1] == "stop" and whole[2]["completion_tokens"] == used, whole
        assert _streamed(server[1], "/v1/chat/completions", body) == whole


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_in_one_of_several_choices_fails_the_request(server, engine, monkeypatch, stream):
    """n=3 with the engine failing for one choice: the non-streamed request is a 500, the stream ends with the
    error and [DONE]; either way every job is cancelled."""
    srv, base = server
    model = engine.model
    rows, one = model.denoise_hidden_rows, model.denoise_hidden
    calls = {"n": 0}

    def flaky(canvas, caches, softs, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("injected decoder failure")
        return rows(canvas, caches, softs, **kwargs)

    def single(canvas, cache, soft=None, *args):
        if cache.length > 0 and calls["n"] >= 3 and int(canvas[0, 0]) % 3 == 0:
            raise RuntimeError("injected decoder failure")
        return one(canvas, cache, soft, *args)

    monkeypatch.setattr(model, "denoise_hidden_rows", flaky)
    monkeypatch.setattr(model, "denoise_hidden", single)
    _no_eos(engine, monkeypatch)
    body = {"model": MODEL, "prompt": "The sky", "n": 3, "max_tokens": 20 * CANVAS, "max_denoising_steps": 2,
            "seed": 1, "stream": stream}
    if stream:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2] and "injected decoder failure" in lines[-2]
    else:
        r = httpx.post(base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 500 and "injected decoder failure" in r.json()["error"]["message"], r.text
    deadline = time.time() + 30
    while srv.scheduler.snapshot()["active"]:
        assert time.time() < deadline
        time.sleep(0.01)


def test_tokenizer_decode_and_encode_give_the_librarys_results(engine):
    import random

    tok = engine.tokenizer
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 40))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == tok._tok.decode(ids, skip_special_tokens=skip)
        text = tok.decode(ids)
        assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids
