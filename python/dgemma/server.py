"""``dgemma serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, Server-Sent Events).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
and ``GET /metrics`` (Prometheus text format). Requests run on a :class:`~dgemma.scheduler.Scheduler`
(block-level scheduling, one KV cache and one seeded random stream per request).

DiffusionGemma's own options are extra body fields: ``max_denoising_steps``, ``entropy_bound``,
``t_max``, ``t_min``, ``stability_threshold``, ``confidence_threshold``, ``max_image_tokens``,
``thinking`` (or ``chat_template_kwargs: {"enable_thinking": true}``) and ``stream_drafts`` (with
``stream``: also send each denoising step's argmax canvas as ``choices[i].delta.draft``). Bad requests
get OpenAI-style JSON errors (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status; a
failure inside the engine gets one of type ``server_error`` with status 500.
"""


import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass

from .chat import Response, check_tools, parse_response_lenient
from .errors import DgemmaError
from .prompts import check_max_image_tokens
from .scheduler import Job, Scheduler

SAMPLER_FIELDS = {"max_denoising_steps": int, "entropy_bound": float, "t_max": float, "t_min": float,
                  "stability_threshold": int, "confidence_threshold": float}
MAX_N = 16


class RequestError(Exception):
    """A bad request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- request parsing --------------------------------------------------------------------------------


def _field(body: dict, name: str, kind, default=None, *, low=None, high=None):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(f"'{name}' must be an integer, got {v!r}", param=name)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise RequestError(f"'{name}' must be a finite number, got {v!r}", param=name)
    if kind is bool and not isinstance(v, bool):
        raise RequestError(f"'{name}' must be true or false, got {v!r}", param=name)
    if kind is str and not isinstance(v, str):
        raise RequestError(f"'{name}' must be a string, got {v!r}", param=name)
    if low is not None and v < low or high is not None and v > high:
        raise RequestError(f"'{name}' = {v!r} is out of range [{low}, {high}]", param=name)
    return float(v) if kind is float else v


def _object(body: dict, name: str) -> dict:
    v = body.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError(f"'{name}' must be an object, got {v!r:.60}", param=name)
    return v


def _flag(options: dict, name: str, where: str, default: bool = False) -> bool:
    v = options.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{where}.{name}' = {v!r:.60}: expected true or false", param=where)
    return v


def _loads(raw) -> tuple[object, str | None]:
    """``json.loads(raw)`` and ``None``, or ``None`` and why ``raw`` is not valid JSON (bad syntax or
    encoding, nesting deeper than Python's recursion limit, an integer longer than Python's digit limit)."""
    try:
        return json.loads(raw), None
    except RecursionError:
        return None, "nested too deeply"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, str(e)
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"a number too long: {e}"


def _unicode_error(s: str) -> str | None:
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"an unpaired surrogate (U+{ord(s[e.start]):04X}) at index {e.start}"


def check_text(body) -> None:
    """Every string in a request (keys too) must be Unicode text: JSON's escapes can spell an unpaired
    surrogate (``"\\ud800"``), which no tokenizer accepts (nor the UTF-8 encoding of an answer that quotes
    it). Checked here for the whole body, so that the error names the field."""
    stack = [(body, "")]
    while stack:
        v, path = stack.pop()
        bad = None
        if isinstance(v, dict):
            for k, x in v.items():
                bad = _unicode_error(k) if isinstance(k, str) else None
                if bad:
                    bad = f"a key in {path or 'the request body'} has {bad}"
                    break
                stack.append((x, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, str):
            bad = _unicode_error(v)
            if bad:
                bad = f"{path or 'the request body'} has {bad}"
        if bad:
            raise RequestError(f"{bad}: expected valid Unicode text",
                               param=path.split(".")[0].split("[")[0] or None)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


def _tool_arguments(call: dict, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}",
                           param="messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args, bad = _loads(args) if args.strip() else ({}, None)
        if bad:
            raise RequestError(f"{where}: arguments are not valid JSON ({bad})", param="messages")
    if not isinstance(args, dict):
        raise RequestError(f"{where}: arguments must be a JSON object", param="messages")
    return {"name": fn["name"], "arguments": args}


def chat_messages(raw) -> list[dict]:
    """OpenAI chat messages to the chat template's form: tool-call arguments as objects, tool results
    named after their call, text/image content parts."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            role = m.get("role") if isinstance(m, dict) else m
            raise RequestError(f"messages[{i}] has role {role!r}, expected system, user, assistant or tool",
                               param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image_url":
                    url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) else None
                    parts.append({"type": "image", "image": _data_url_bytes(url, f"messages[{i}].content[{j}]")})
                else:
                    raise RequestError(f"messages[{i}].content[{j}] must be a text or image_url part",
                                       param="messages")
            content = parts
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        msg = {"role": role, "content": content if content is not None else ""}
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RequestError(f"messages[{i}].tool_calls must be a list", param="messages")
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                args = _tool_arguments(call, f"messages[{i}].tool_calls[{j}]")
                if isinstance(call.get("id"), str):
                    names[call["id"]] = args["name"]
                calls.append({"type": "function", "function": args})
            msg["tool_calls"] = calls
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise RequestError(f"messages[{i}].tool_call_id must be a string, got {call_id!r:.60}",
                                   param="messages")
            name = m.get("name") or names.get(call_id)
            if not isinstance(name, str):
                raise RequestError(f"messages[{i}] is a tool result without a 'name' or a known 'tool_call_id'",
                                   param="messages")
            msg["name"] = name
            if not isinstance(msg["content"], str):
                msg["content"] = json.dumps(msg["content"])
        out.append(msg)
    return out


def _data_url_bytes(url, where: str) -> bytes:
    import base64

    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RequestError(f"{where}: images must be sent inline as data:<type>;base64,<data> URLs "
                           f"(the server does not fetch remote URLs)", param="messages")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (ValueError, TypeError):
        raise RequestError(f"{where}: the image's base64 data is malformed", param="messages") from None


@dataclass
class Plan:
    """A validated request: the prompt ids, pixel inputs and per-choice generate arguments."""

    ids: list[int]
    images: dict
    kwargs: list[dict]  # one per choice
    chat: bool
    stream: bool
    usage_in_stream: bool
    drafts: bool
    stops: list[str]
    tools: bool


class OpenAIServer:
    """Request handling independent of the web framework (tested directly and through HTTP)."""

    def __init__(self, engine, *, model_name: str, max_batch: int = 8, max_context: int | None = None,
                 max_queue: int = 1024):
        self.engine = engine
        self.model_name = model_name
        cfg = engine.config
        self.max_context = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())

    # -- planning -------------------------------------------------------------------------------

    def plan(self, body, *, chat: bool) -> Plan:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                               param="model", status=404, code="model_not_found")
        eng = self.engine
        settings = eng.generation_settings
        max_tokens = _field(body, "max_completion_tokens", int, None, low=1) or _field(
            body, "max_tokens", int, settings.max_new_tokens, low=1)
        n = _field(body, "n", int, 1, low=1, high=MAX_N)
        seed = _field(body, "seed", int, None, low=0, high=2**63 - 1)
        kwargs = {"max_new_tokens": max_tokens}
        for name, kind in SAMPLER_FIELDS.items():
            v = _field(body, name, kind, None)
            if v is not None:
                kwargs[name] = v
        try:
            settings.updated(**kwargs)
        except DgemmaError as e:
            raise RequestError(str(e)) from None
        stream = _field(body, "stream", bool, False)
        include_usage = _flag(_object(body, "stream_options"), "include_usage", "stream_options")
        drafts = _field(body, "stream_drafts", bool, False)
        budget = _field(body, "max_image_tokens", int, 280)
        try:
            check_max_image_tokens(budget)
        except DgemmaError as e:
            raise RequestError(str(e), param="max_image_tokens") from None
        images: dict = {}
        tools_given = False
        if chat:
            messages = chat_messages(body.get("messages"))
            tools = body.get("tools")
            if tools is not None:
                try:
                    check_tools(tools)
                except DgemmaError as e:
                    raise RequestError(str(e), param="tools") from None
            choice = body.get("tool_choice", "auto")
            if choice not in ("auto", "none", "required") and not isinstance(choice, dict):
                raise RequestError(f"'tool_choice' must be 'auto', 'none', 'required' or a function, got {choice!r}",
                                   param="tool_choice")
            if choice == "none":
                tools = None
            tools_given = bool(tools)
            kw = _object(body, "chat_template_kwargs")
            thinking = _field(body, "thinking", bool, _flag(kw, "enable_thinking", "chat_template_kwargs"))
            from .prompts import render_chat

            try:
                rows, images = render_chat(eng, [messages], tools=tools, thinking=thinking, max_image_tokens=budget)
            except DgemmaError as e:
                raise RequestError(str(e), param="messages") from None
            ids = rows[0]
            if images:
                images["mm_token_type_ids"] = [[int(t == eng.config.image_token_id) for t in ids]]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
            ids = eng.tokenizer.encode(prompt)
            if eng.add_bos and eng.bos_token_id is not None and (not ids or ids[0] != eng.bos_token_id):
                ids = [eng.bos_token_id] + ids
        c = eng.config.canvas_length
        total = len(ids) + -(-max_tokens // c) * c
        if total > self.max_context:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens {max_tokens} (rounded up to whole "
                               f"{c}-token canvases) needs {total} positions, more than this server's context "
                               f"{self.max_context}", param="max_tokens", code="context_length_exceeded")
        per_choice = []
        for i in range(n):
            k = dict(kwargs)
            if seed is not None:
                k["seed"] = seed + i
            per_choice.append(k)
        return Plan(ids, images, per_choice, chat, stream, include_usage, drafts and stream,
                    _stops(body), tools_given)

    # -- results --------------------------------------------------------------------------------

    def text_of(self, result, chat: bool) -> Response:
        """The answer of a finished request: for chat, split into thinking, text and tool calls. A tool call
        that does not parse stays in the text as the model wrote it (the server answers whatever the model
        wrote; the Python API raises instead)."""
        try:
            self.engine.attach_text(result, chat=chat)
        except DgemmaError:
            if not chat:
                raise
            ends = set(result.eos_token_ids) | set(self.engine.config.eos_token_ids)
            text = _decode(self, result.new_tokens[0].tolist(), ends, result.pad_token_id)
            return parse_response_lenient(text)
        if chat:
            return result.responses[0]
        return Response(text=result.texts[0] if result.texts else "")

    @staticmethod
    def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def finish_reason(self, result, response: Response, stopped: bool) -> str:
        if response.tool_calls:
            return "tool_calls"
        if stopped:
            return "stop"
        eos = set(result.eos_token_ids) | set(self.engine.config.eos_token_ids)
        return "stop" if any(t in eos for t in result.new_tokens[0].tolist()) else "length"

    @staticmethod
    def tool_calls(response: Response) -> list[dict]:
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                for c in response.tool_calls]

    def usage(self, prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def completion_tokens(result) -> int:
        pad = result.pad_token_id
        return int((result.new_tokens[0] != pad).sum()) if pad is not None else int(result.new_tokens.shape[1])

    def metrics(self) -> str:
        s = self.scheduler.snapshot()
        lines = []

        def metric(name, kind, help_, value):
            lines.extend([f"# HELP dgemma_{name} {help_}", f"# TYPE dgemma_{name} {kind}", f"dgemma_{name} {value}"])

        metric("queue_length", "gauge", "Requests waiting for a slot.", s["queue_length"])
        metric("active_requests", "gauge", "Requests holding a slot (batch occupancy).", s["active"])
        metric("max_batch", "gauge", "Slots.", s["max_batch"])
        metric("requests_total", "counter", "Requests accepted.", s["requests_total"])
        metric("requests_finished_total", "counter", "Requests answered.", s["requests_finished"])
        metric("requests_cancelled_total", "counter", "Requests cancelled (client gone).", s["requests_cancelled"])
        metric("requests_failed_total", "counter", "Requests that failed.", s["requests_failed"])
        metric("generated_tokens_total", "counter", "Tokens generated.", s["tokens_total"])
        metric("block_seconds_total", "counter", "Seconds spent denoising blocks.", f"{s['block_seconds_total']:.6f}")
        metric("blocks_total", "counter", "Blocks denoised.", s["blocks_total"])
        rate = s["tokens_total"] / max(time.time() - self.created, 1e-9)
        metric("tokens_per_second", "gauge", "Generated tokens per second since start.", f"{rate:.3f}")
        step = s["block_seconds_total"] / s["blocks_total"] if s["blocks_total"] else 0.0
        metric("block_latency_seconds", "gauge", "Mean seconds per block.", f"{step:.6f}")
        metric("decoder_passes_total", "counter", "Batched decoder passes (one per scheduling round with steps).",
               s["decoder_passes_total"])
        metric("decoder_rows_total", "counter", "Canvases denoised by those passes (requests per pass, summed).",
               s["decoder_rows_total"])
        rows = s["decoder_rows_total"] / s["decoder_passes_total"] if s["decoder_passes_total"] else 0.0
        metric("decoder_batch_mean", "gauge", "Mean canvases per decoder pass (batch occupancy).", f"{rows:.3f}")
        latency = s["step_seconds_total"] / s["decoder_passes_total"] if s["decoder_passes_total"] else 0.0
        metric("step_latency_seconds", "gauge", "Mean seconds per batched decoder pass.", f"{latency:.6f}")
        return "\n".join(lines) + "\n"


# -- the web app ------------------------------------------------------------------------------------


def create_app(server: OpenAIServer):
    """The FastAPI application around ``server`` (its scheduler starts and stops with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    app = FastAPI(title="dgemma", lifespan=lifespan)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request: Request):
        body, bad = _loads(await request.body())
        if bad:
            raise RequestError(f"the request body is not valid JSON ({bad})")
        check_text(body)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dgemma"}]}

    async def run(request: Request, chat: bool):
        try:
            plan = server.plan(await body_of(request), chat=chat)
        except RequestError as e:
            return error(e)
        except DgemmaError as e:
            return error(RequestError(str(e)))
        except Exception as e:  # noqa: BLE001 - a bug while planning is the server's failure, not the client's
            return error(_internal(f"the request could not be prepared: {type(e).__name__}: {e}"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if plan.stream:
            return StreamingResponse(_stream(server, request, plan, rid), media_type="text/event-stream")
        jobs = []
        try:
            for k in plan.kwargs:
                jobs.append(_submit(server, plan, k))
            results = []
            for job, queue in jobs:
                while True:
                    # A client that hangs up before its answer cancels its jobs (for a streamed one, _stream does).
                    kind, payload = await _next_event(queue, request)
                    if kind == "done":
                        results.append(payload)
                        break
                    if kind == "error":
                        raise _job_error(payload)
        except RequestError as e:
            for job, _ in jobs:
                job.cancel()
            return error(e)
        except _Disconnected:
            for job, _ in jobs:
                job.cancel()
            # Nobody reads this answer; nginx's "client closed request" status, for the access log.
            return error(RequestError("the client closed the connection before the answer", status=499,
                                      kind="client_closed_request"))
        except asyncio.CancelledError:
            for job, _ in jobs:
                job.cancel()
            raise
        choices, completion = [], 0
        for i, result in enumerate(results):
            try:
                response = server.text_of(result, chat)
            except DgemmaError as e:
                return error(_internal(f"the answer could not be decoded: {e}"))
            text, stopped = server.apply_stop(response.text, plan.stops)
            completion += server.completion_tokens(result)
            reason = server.finish_reason(result, response, stopped)
            if chat:
                msg = {"role": "assistant", "content": text, "reasoning_content": response.thinking}
                if response.tool_calls:
                    msg["tool_calls"] = server.tool_calls(response)
                choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": choices, "usage": server.usage(len(plan.ids), completion)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


# How often a non-streamed request waiting for its jobs checks that its client is still connected (seconds).
DISCONNECT_POLL_S = 0.25


class _Disconnected(Exception):
    """The client of a non-streamed request hung up before its answer."""


async def _next_event(queue: asyncio.Queue, request) -> tuple[str, object]:
    """The next event of a job, checking every DISCONNECT_POLL_S that the client is still there (a job waiting
    for a slot, or one long block, sends nothing for a while)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Disconnected from None


def _internal(message: str) -> RequestError:
    """A failure of the server (not of the request): HTTP 500."""
    return RequestError(message, status=500, kind="server_error")


def _job_error(payload) -> RequestError:
    """The answer to a job's ``"error"`` event: 4xx for a request the engine refused, 5xx for a failure inside
    it (:class:`~dgemma.scheduler.JobError`'s status)."""
    status = getattr(payload, "status", 400)
    if status >= 500:
        return RequestError(str(payload), status=status, kind="server_error")
    return RequestError(str(payload), status=status)


def _submit(server: OpenAIServer, plan: Plan, kwargs: dict, drafts: bool = False):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind, payload):
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    job = Job(ids=plan.ids, emit=emit, kwargs=kwargs, images=plan.images, drafts=drafts)
    try:
        server.scheduler.submit(job)
    except DgemmaError as e:
        raise RequestError(str(e), status=503, kind="server_error") from None
    return job, queue


async def _stream(server: OpenAIServer, request, plan: Plan, rid: str):
    """Server-Sent Events: a chunk per committed block (and per draft with stream_drafts), the final
    chunk with finish_reason, usage when asked, then [DONE]. A client that goes away cancels its jobs."""
    chat = plan.chat
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    tok = server.engine.tokenizer

    def chunk(i, delta=None, finish=None, usage=None, text=None, draft=None):
        if chat:
            choice = {"index": i, "delta": dict(delta or {}, **({"draft": draft} if draft else {})),
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            if draft:
                choice["draft"] = draft
        body = {"id": rid, "object": obj, "created": created, "model": server.model_name,
                "choices": [] if usage is not None else [choice]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def error_chunk(message: str) -> str:
        return f"data: {json.dumps(_internal(message).body())}\n\n"

    jobs = []
    try:
        for k in plan.kwargs:
            jobs.append(_submit(server, plan, k, plan.drafts))
    except RequestError as e:
        for job, _ in jobs:
            job.cancel()
        yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    completion = 0
    try:
        for i, (job, queue) in enumerate(jobs):
            if chat:
                yield chunk(i, {"role": "assistant", "content": ""})
            tokens: list[int] = []
            sent = ""
            while True:
                kind, payload = await queue.get()
                if await request.is_disconnected():
                    raise asyncio.CancelledError
                if kind == "draft":
                    draft = tok.decode(payload.tokens[0].tolist(), skip_special_tokens=True)
                    yield chunk(i, draft={"block": payload.block, "step": payload.step, "text": draft})
                    continue
                if kind == "block":
                    tokens += payload.tokens[0].tolist()
                    try:
                        text = _visible_text(server, tokens, chat)
                    except DgemmaError as e:
                        yield error_chunk(f"the answer could not be decoded: {e}")
                        break
                    text, _ = server.apply_stop(text, plan.stops)
                    if text.startswith(sent) and len(text) > len(sent):
                        yield chunk(i, {"content": text[len(sent):]}) if chat else chunk(i, text=text[len(sent):])
                        sent = text
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(_job_error(payload).body())}\n\n"
                    break
                result = payload
                try:
                    response = server.text_of(result, chat)
                except DgemmaError as e:
                    yield error_chunk(f"the answer could not be decoded: {e}")
                    break
                text, stopped = server.apply_stop(response.text, plan.stops)
                delta: dict = {}
                if text.startswith(sent) and len(text) > len(sent):
                    delta["content"] = text[len(sent):]
                if chat and response.thinking:
                    delta["reasoning_content"] = response.thinking
                if chat and response.tool_calls:
                    delta["tool_calls"] = [dict(c, index=j) for j, c in enumerate(server.tool_calls(response))]
                completion += server.completion_tokens(result)
                reason = server.finish_reason(result, response, stopped)
                yield chunk(i, delta, reason) if chat else chunk(i, finish=reason, text=delta.get("content", ""))
                break
        if plan.usage_in_stream:
            yield chunk(0, usage=server.usage(len(plan.ids), completion))
        yield "data: [DONE]\n\n"
    finally:
        for job, _ in jobs:
            job.cancel()


def _decode(server: OpenAIServer, tokens: list[int], ends: set, pad, *, skip_special_tokens: bool = False) -> str:
    """``tokens`` as text, cut at the first end-of-sequence id, without padding."""
    cut = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    ids = [t for t in tokens[:cut] if t != pad]
    return server.engine.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _visible_text(server: OpenAIServer, tokens: list[int], chat: bool) -> str:
    """The answer text so far (chat: without the thinking, cut at the end of the turn, and without a tool
    call still being written: it shows at the end, as a call or, if it does not parse, as text)."""
    eng = server.engine
    ends = set(eng.eos_token_ids) | set(eng.config.eos_token_ids)
    if chat:
        return parse_response_lenient(_decode(server, tokens, ends, eng.pad_token_id), partial=True).text
    return _decode(server, tokens, ends, eng.pad_token_id, skip_special_tokens=True)


def listen_sockets(host: str, port: int) -> list:
    """Sockets bound to ``host``:``port`` as uvicorn would bind them (every address ``host`` resolves to, with
    SO_REUSEADDR), not yet listening; a host that does not resolve or a port that cannot be bound (in use, a
    privileged port) raises a DgemmaError naming it. Bound before the weights load, so that a server that
    could never listen fails in a second, not after loading a model."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise DgemmaError(f"host {host!r} is not an address to listen on ({why}); expected an IP address or a "
                          f"host name of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    socks, unavailable = [], host
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], None, i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:  # e.g. ::1 of "localhost" without IPv6, as asyncio skips it
                    socks.pop().close()
                    unavailable = address[0]
                    continue
                why = {errno.EADDRINUSE: f"port {port} is already in use",
                       errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(
                           e.errno, e.strerror or str(e))
                raise DgemmaError(f"cannot listen on {host}:{port}: {why}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise DgemmaError(f"cannot listen on {host}:{port}: {unavailable} is not an address of this machine")
    return socks


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_context: int | None = None, served_model_name: str | None = None, device=None, dtype=None,
          quantization=None, log_level: str = "info") -> None:
    """Load ``model`` and serve it until interrupted. The host and port are bound first: one that cannot be
    listened on raises a DgemmaError before any weights load."""
    import logging
    import os

    try:
        import uvicorn
    except ImportError:
        raise DgemmaError("dgemma serve needs FastAPI and uvicorn: pip install 'dgemma[serve]'") from None
    from .loading import load

    socks = listen_sockets(host, port)
    try:
        eng = load(model, device=device, dtype=dtype, quantization=quantization, max_batch=max_batch,
                   max_context=max_context)
        name = served_model_name or os.path.basename(os.path.normpath(model))
        app = create_app(OpenAIServer(eng, model_name=name, max_batch=max_batch, max_context=max_context))

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:  # uvicorn logs where it listens only for the sockets it binds itself
                    where = f"[{host}]" if ":" in host else host
                    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                            where, port)

        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=socks)
    finally:
        for sock in socks:
            sock.close()
