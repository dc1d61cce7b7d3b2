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
from .scheduler import Job, QueueFullError, Scheduler

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


# OpenAI fields the diffusion sampler cannot honour: refused unless at the value that asks for nothing (clients
# often send those), so that a request never silently gets less than it asked for.
UNSUPPORTED = {
    "logprobs": ((None, False, 0), "log-probabilities are not returned"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned"),
    "logit_bias": ((None, {}), "logit biases are not supported"),
    "presence_penalty": ((None, 0), "penalties are not supported (the sampler draws whole canvases at once)"),
    "frequency_penalty": ((None, 0), "penalties are not supported (the sampler draws whole canvases at once)"),
    "response_format": ((None, {"type": "text"}), "structured output (JSON modes, schemas) is not supported"),
    "best_of": ((None, 1), "best_of is not supported; use n"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
}


def _asks_nothing(v, accepted: tuple) -> bool:
    """Whether ``v`` is one of the ``accepted`` no-op values: None, a bool (as itself), a number (as any int or
    float equal to it, never a bool: True == 1 in Python), or a JSON object or string (equal)."""
    for a in accepted:
        if a is None or isinstance(a, bool):
            if v is a:
                return True
        elif isinstance(a, int):
            if not isinstance(v, bool) and isinstance(v, (int, float)) and v == a:
                return True
        elif v == a:
            return True
    return False


def _check_unsupported(body: dict) -> None:
    for name, (accepted, why) in UNSUPPORTED.items():
        v = body.get(name)
        if not _asks_nothing(v, accepted):
            raise RequestError(f"'{name}' = {v!r:.60}: {why}", param=name)
    # Accepted for compatibility and checked, not used: the denoising schedule (t_max, t_min) sets the temperature.
    _field(body, "temperature", float, None, low=0, high=2)
    _field(body, "top_p", float, None, low=0, high=1)


def _sampler_field(message: str) -> str | None:
    """The sampler field a GenerationSettings error names first (its message starts with it), if any."""
    return next((name for name in ("max_new_tokens", *SAMPLER_FIELDS) if message.startswith(name)), None)


def _strings(value):
    """Every string in a JSON value (the text of messages, names, arguments), however deeply nested."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


# The longest stop string taken: each is matched against the end of every block's text of every choice.
MAX_STOP_CHARS = 1000


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise RequestError(f"a stop string of {len(long)} characters: expected at most {MAX_STOP_CHARS}", param="stop")
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
            if isinstance(msg["content"], list):  # a tool's result as content parts: their text
                if any(part["type"] != "text" for part in msg["content"]):
                    raise RequestError(f"messages[{i}] is a tool result with an image part: tool results are text",
                                       param="messages")
                msg["content"] = "".join(part["text"] for part in msg["content"])
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
        from .loading import check_max_context

        check_max_context(cfg, max_context)
        self.max_context = max_context or cfg.max_position_embeddings
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
            raise RequestError(str(e), param=_sampler_field(str(e))) from None
        _check_unsupported(body)
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
            # The tools are written into the prompt too (4 MB of them took 5 s to render and tokenize).
            chars = sum(len(v) for m in messages for v in _strings(m)) + sum(len(v) for v in _strings(tools))
            self.check_length(chars, "messages")
            if tools is not None:
                try:
                    check_tools(tools)
                except DgemmaError as e:
                    raise RequestError(str(e), param="tools") from None
            choice = body.get("tool_choice", "auto")
            if choice not in ("auto", "none"):
                raise RequestError(f"'tool_choice' = {choice!r:.80}: only 'auto' (the model decides whether to call a "
                                   f"tool) and 'none' are supported; a call cannot be forced", param="tool_choice")
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
            from .prompts import check_prompt_text, vision_tokens

            self.check_length(len(prompt), "prompt")
            try:
                check_prompt_text(prompt, "prompt", vision_tokens(eng.tokenizer))
            except DgemmaError as e:
                raise RequestError(str(e), param="prompt") from None
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

    def check_length(self, chars: int, param: str) -> None:
        """Refuse a prompt of ``chars`` characters that is certainly longer than the context, before the work of
        tokenizing it (the exact check follows the tokenizer)."""
        fewest = self.engine.tokenizer.fewest_tokens(chars)
        if fewest > self.max_context:
            raise RequestError(f"the prompt ({chars} characters, at least {fewest} tokens) is longer than this "
                               f"server's context {self.max_context}", param=param, code="context_length_exceeded")

    # -- results --------------------------------------------------------------------------------

    def ends(self) -> set:
        """The ids an answer ends at: generation's end-of-sequence ids and the model's own."""
        return self.engine.end_ids()

    def response_of(self, tokens: list[int], chat: bool) -> Response:
        """The answer in ``tokens`` (cut at the first end-of-sequence id): for chat, split into thinking, text and
        tool calls, where a tool call that does not parse stays in the text as the model wrote it (the server
        answers whatever the model wrote; the Python API raises instead)."""
        if chat:
            return parse_response_lenient(_decode(self, tokens, self.ends(), self.engine.pad_token_id))
        return Response(text=_decode(self, tokens, self.ends(), self.engine.pad_token_id, skip_special_tokens=True))

    @staticmethod
    def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    @staticmethod
    def tool_calls(response: Response) -> list[dict]:
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}}
                for c in response.tool_calls]

    def usage(self, prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def metrics(self) -> str:
        s = self.scheduler.snapshot()
        lines = []

        def metric(name, kind, help_, value):
            lines.extend([f"# HELP dgemma_{name} {help_}", f"# TYPE dgemma_{name} {kind}", f"dgemma_{name} {value}"])

        # A request with n choices is n generations: the request counters count generations.
        metric("queue_length", "gauge", "Generations waiting for a slot (one per choice of a request).",
               s["queue_length"])
        metric("active_requests", "gauge", "Generations holding a slot (batch occupancy).", s["active"])
        metric("max_batch", "gauge", "Slots.", s["max_batch"])
        metric("requests_total", "counter", "Generations accepted (a request with n choices counts n).",
               s["requests_total"])
        metric("requests_finished_total", "counter", "Generations answered (stopped at a stop string included).",
               s["requests_finished"])
        metric("requests_cancelled_total", "counter", "Generations cancelled (client gone).", s["requests_cancelled"])
        metric("requests_failed_total", "counter", "Generations that failed.", s["requests_failed"])
        metric("generated_tokens_total", "counter", "Tokens generated: each answer's up to its end of sequence "
               "and its max_tokens (padding and the rest of the last canvas not counted; an answer a stop string "
               "ended counts the blocks it ran).", s["tokens_total"])
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


# The largest request body read (413 past it: OpenAI's limit for a request with images), and how long its upload may
# take (408 past it: a client that stalls mid-body held its connection, and a server's shutdown, indefinitely).
MAX_BODY_BYTES = 50 << 20
BODY_SECONDS = 120.0
# Threads that turn request bodies into plans (JSON, chat templates, tokenizing, images): apart from the threads that
# decode answers, so a burst of costly requests cannot hold back the blocks of answers being streamed.
PARSE_THREADS = 2


async def _read_body(request, limit: int, seconds: float) -> bytes:
    """The request's body, at most ``limit`` bytes, arrived within ``seconds`` (RequestError 413 / 408)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                           status=413, code="request_too_large")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body is over {limit} bytes; this server takes at most {limit}",
                                   status=413, code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {seconds:g} s ({size} bytes came)", status=408,
                           code="request_timeout") from None
    return b"".join(chunks)


def create_app(server: OpenAIServer, *, max_body_bytes: int = MAX_BODY_BYTES, body_seconds: float = BODY_SECONDS):
    """The FastAPI application around ``server`` (its scheduler starts and stops with the app)."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        # Made per start: an app started again (a test client entered twice) gets a fresh pool.
        app.state.parsers = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="dgemma-parse")
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()
            app.state.parsers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dgemma", lifespan=lifespan)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # Unknown paths and methods answer in OpenAI's error form too.
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {e.detail}", "type": kind,
                                       "param": None, "code": None}}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    def parse(raw: bytes, chat: bool) -> Plan:
        """The request's plan from its body (in a worker thread: JSON, templates, tokenizing and images take a
        while on a large request, and the event loop serves every other client meanwhile)."""
        body, bad = _loads(raw)
        if bad:
            raise RequestError(f"the request body is not valid JSON ({bad})")
        check_text(body)
        return server.plan(body, chat=chat)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "dgemma"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != server.model_name:
            return error(RequestError(f"the model {model!r} does not exist; this server serves "
                                      f"{server.model_name!r}", param="model", status=404, code="model_not_found"))
        return model_card()

    async def run(request: Request, chat: bool):
        try:
            raw = await _read_body(request, max_body_bytes, body_seconds)
            plan = await asyncio.get_running_loop().run_in_executor(request.app.state.parsers, parse, raw, chat)
        except RequestError as e:
            return error(e)
        except DgemmaError as e:
            return error(RequestError(str(e)))
        except Exception as e:  # noqa: BLE001 - a bug while planning is the server's failure, not the client's
            return error(_internal(f"the request could not be prepared: {type(e).__name__}: {e}"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        events: asyncio.Queue = asyncio.Queue()  # every choice's events, tagged with its index
        choices = []
        try:  # before any answer: a full queue is a 503 for streamed requests too
            for i, k in enumerate(plan.kwargs):
                choices.append(_Choice(server, plan, k, i, events))
        except RequestError as e:
            for c in choices:
                c.job.cancel()
            return error(e)
        if plan.stream:
            return StreamingResponse(_stream(server, request, plan, rid, choices, events),
                                     media_type="text/event-stream")
        answers: list = [None] * len(choices)
        try:
            while any(a is None for a in answers):
                # A client that hangs up before its answer cancels its jobs (for a streamed one, _stream does).
                i, kind, payload = await _next_event(events, request)
                c = choices[i]
                if c.done:
                    continue
                # Decoding a long answer takes a while: in a worker thread, while the loop serves other clients.
                if kind == "block":
                    await asyncio.to_thread(c.add, payload.tokens[0].tolist())
                elif kind in ("done", "stopped") or kind == "error" and c.stopped:
                    answers[i] = await asyncio.to_thread(c.finish, payload if kind == "done" else None)
                elif kind == "error":
                    raise _job_error(payload)
        except RequestError as e:
            for c in choices:
                c.job.cancel()
            return error(e)
        except _Disconnected:
            for c in choices:
                c.job.cancel()
            # Nobody reads this answer; nginx's "client closed request" status, for the access log.
            return error(RequestError("the client closed the connection before the answer", status=499,
                                      kind="client_closed_request"))
        except asyncio.CancelledError:
            for c in choices:
                c.job.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - decoding the answer failed: the server's failure
            for c in choices:
                c.job.cancel()
            return error(_internal(f"the answer could not be decoded: {type(e).__name__}: {e}"))
        out, completion = [], 0
        for i, (response, text, reason, tokens) in enumerate(answers):
            completion += tokens
            if chat:
                msg = {"role": "assistant", "content": text, "reasoning_content": response.thinking}
                if response.tool_calls:
                    msg["tool_calls"] = server.tool_calls(response)
                out.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": None})
            else:
                out.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": out, "usage": server.usage(len(plan.ids), completion)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


# How often a request waiting for its jobs checks that its client is still connected (seconds), at the least: it
# also checks after every event.
DISCONNECT_POLL_S = 0.25


class _Disconnected(Exception):
    """The client of a non-streamed request hung up before its answer."""


async def _next_event(queue: asyncio.Queue, request) -> tuple[str, object]:
    """The next event of a job, checking that the client is still there after each event and every
    DISCONNECT_POLL_S while none comes (a job waiting for a slot, or one long block, sends nothing for a while)."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if await request.is_disconnected():
            raise _Disconnected
        if event is not None:
            return event


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


class _Choice:
    """One choice of a request: its job on the scheduler and its answer as the blocks arrive. The answer holds at
    most ``max_tokens`` tokens (the engine generates whole canvases); once a stop string shows in its text, the
    job is asked to stop and the answer is what came before it. Streamed and whole answers are built alike, so
    they are the same text. Its events go, tagged with its ``index``, to the request's queue ``events`` (shared
    by all choices, so that each one's stop is seen as soon as it is written)."""

    def __init__(self, server: OpenAIServer, plan: Plan, kwargs: dict, index: int, events: asyncio.Queue):
        self.server, self.plan, self.index = server, plan, index
        self.max_tokens = kwargs["max_new_tokens"]
        self.tokens: list[int] = []  # the answer's tokens so far
        self.sent = ""  # the text streamed so far
        self.stopped = False  # a stop string showed: the job was asked to stop
        self.done = False  # the answer is complete (or failed)
        loop = asyncio.get_running_loop()

        def emit(kind, payload):
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))

        self.job = Job(ids=plan.ids, emit=emit, kwargs=kwargs, images=plan.images, drafts=plan.drafts)
        try:
            server.scheduler.submit(self.job)
        except QueueFullError as e:
            raise RequestError(str(e), status=503, kind="server_error") from None
        except DgemmaError as e:
            raise RequestError(str(e)) from None

    def text(self, tokens: list[int], *, partial: bool) -> tuple[str, bool]:
        """The answer text of ``tokens`` cut at the first stop string, and whether one showed. ``partial``: more may
        come, so a trailing piece that may begin a stop string is held back too. A chat answer is shown without
        surrounding white space (as the whole answer is), but stop strings are looked for before that is taken
        off: one that ends in white space ("\\n\\n") is seen as soon as it is written."""
        text, hit = self.server.apply_stop(_answer_text(self.server, tokens, self.plan.chat, partial), self.plan.stops)
        if partial and not hit:
            text = text[:len(text) - _stop_prefix(text, self.plan.stops)]
        return (text.strip() if self.plan.chat else text), hit

    def add(self, tokens: list[int]) -> str:
        """Take a block's tokens; the text to stream now."""
        if self.stopped or self.done:
            return ""
        self.tokens += tokens[:self.max_tokens - len(self.tokens)]
        text, self.stopped = self.text(self.tokens, partial=True)
        if self.stopped:
            self.job.stop()
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            new, self.sent = text[len(self.sent):], text
            return new
        return ""

    def finish(self, result) -> tuple[Response, str, str, int]:
        """(the response, its text, the finish reason, the completion tokens) once the job has ended: ``result``
        is its GenerationResult, or None where it stopped early at a stop string."""
        self.done = True
        if result is not None and not self.stopped:
            self.tokens = result.new_tokens[0].tolist()[:self.max_tokens]
        ends = self.server.ends()
        eos = next((i for i, t in enumerate(self.tokens) if t in ends), None)
        used = len(self.tokens) if eos is None else eos + 1
        text, stopped = self.text(self.tokens[:used], partial=False)
        if stopped:
            # The tokens until the stop string was whole: the shortest prefix whose answer is this one, cut at this
            # stop string (a text grows with its tokens: bisect). Not what the streaming view shows, which holds
            # back an unclosed tool call and a trailing piece of a marker; and not just any stop string in the
            # prefix's text, which may be inside a tool call that closes later.
            low, high = 0, used
            while low < high:
                mid = (low + high) // 2
                if self.text(self.tokens[:mid], partial=False) == (text, True):
                    high = mid
                else:
                    low = mid + 1
            used = max(low, 1)
        # Thinking and tool calls as written before the stop string (nothing after it is part of the answer).
        response = self.server.response_of(self.tokens[:used], self.plan.chat)
        reason = "tool_calls" if response.tool_calls else "stop" if stopped or eos is not None else "length"
        return response, text, reason, used


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of ``text`` that begins some stop string (0 if none), in time linear in the
    stop strings' lengths (Knuth-Morris-Pratt over the text's last characters)."""
    best = 0
    for stop in stops:
        tail = text[-(len(stop) - 1):] if len(stop) > 1 else ""
        if not tail:
            continue
        # fail[q]: the longest proper prefix of stop[:q + 1] that ends it; only the first len(tail) + 1 characters
        # can take part in a match of the tail.
        pattern = stop[:len(tail) + 1]
        fail, k = [0] * len(pattern), 0
        for q in range(1, len(pattern)):
            while k and pattern[q] != pattern[k]:
                k = fail[k - 1]
            k += pattern[q] == pattern[k]
            fail[q] = k
        k = 0  # the longest prefix of stop that the tail read so far ends with (never all of it: the tail is shorter)
        for ch in tail:
            while k and ch != stop[k]:
                k = fail[k - 1]
            k += ch == stop[k]
        best = max(best, k)
    return best


async def _stream(server: OpenAIServer, request, plan: Plan, rid: str, choices: list[_Choice],
                  events: asyncio.Queue):
    """Server-Sent Events: a chunk per committed block (and per draft with stream_drafts) of each choice as it
    comes, each choice's final chunk with its finish_reason, usage when asked, then [DONE]. A client that goes
    away cancels its jobs."""
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

    completion = 0
    try:
        if chat:
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
        while not all(c.done for c in choices):
            i, kind, payload = await events.get()
            if await request.is_disconnected():
                raise asyncio.CancelledError
            c = choices[i]
            if c.done:
                continue
            if kind == "draft":
                if not c.stopped:  # a stopped answer's later canvases are past its end
                    draft = tok.decode(payload.tokens[0].tolist(), skip_special_tokens=True)
                    yield chunk(i, draft={"block": payload.block, "step": payload.step, "text": draft})
                continue
            # A failure ends the whole stream, as it fails the whole non-streamed request: the error, then [DONE]
            # (the finally cancels every job).
            if kind == "error" and not c.stopped:
                yield f"data: {json.dumps(_job_error(payload).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            try:  # decoding a long answer takes a while: in a worker thread, while the loop serves other clients
                if kind == "block":
                    new = await asyncio.to_thread(c.add, payload.tokens[0].tolist())
                    if new:
                        yield chunk(i, {"content": new}) if chat else chunk(i, text=new)
                    continue
                response, text, reason, tokens = await asyncio.to_thread(c.finish,
                                                                         payload if kind == "done" else None)
            except Exception as e:  # noqa: BLE001 - decoding the answer failed: the server's failure
                yield error_chunk(f"the answer could not be decoded: {type(e).__name__}: {e}")
                yield "data: [DONE]\n\n"
                return
            delta: dict = {}
            if text.startswith(c.sent) and len(text) > len(c.sent):
                delta["content"] = text[len(c.sent):]
            if chat and response.thinking:
                delta["reasoning_content"] = response.thinking
            if chat and response.tool_calls:
                delta["tool_calls"] = [dict(t, index=j) for j, t in enumerate(server.tool_calls(response))]
            completion += tokens
            yield chunk(i, delta, reason) if chat else chunk(i, finish=reason, text=delta.get("content", ""))
        if plan.usage_in_stream:
            yield chunk(0, usage=server.usage(len(plan.ids), completion))
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            c.job.cancel()


def _decode(server: OpenAIServer, tokens: list[int], ends: set, pad, *, skip_special_tokens: bool = False) -> str:
    """``tokens`` as text, cut at the first end-of-sequence id, without padding."""
    cut = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    # Vision tokens are input only: an answer holding one could not be sent back in a conversation.
    skip = server.engine.config.vision_token_ids
    ids = [t for t in tokens[:cut] if t != pad and t not in skip]
    return server.engine.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _answer_text(server: OpenAIServer, tokens: list[int], chat: bool, partial: bool) -> str:
    """The answer text of ``tokens`` (chat: without the thinking and tool calls, cut at the end of the turn, white
    space kept at its end). ``partial``: more may come, so what the next block may change is held back: a tool
    call still being written (it shows at the end, as a call or, if it does not parse, as text), the start of a
    marker, a character whose bytes the next block completes (the decoder writes U+FFFD for them)."""
    ends = server.ends()
    pad = server.engine.pad_token_id
    if chat:
        text = parse_response_lenient(_decode(server, tokens, ends, pad), partial=partial, strip=False).text.lstrip()
    else:
        text = _decode(server, tokens, ends, pad, skip_special_tokens=True)
    return text.rstrip("\ufffd") if partial else text


def listen_sockets(host: str, port: int) -> list:
    """Sockets bound to ``host``:``port`` as uvicorn would bind them (every address ``host`` resolves to, with
    SO_REUSEADDR), not yet listening; a host that does not resolve or a port that cannot be bound (in use, a
    privileged port) raises a DgemmaError naming it. Bound before the weights load, so that a server that
    could never listen fails in a second, not after loading a model."""
    import errno
    import socket

    if not isinstance(host, str) or not host.strip():
        # getaddrinfo takes "" as every interface: an unset variable must not expose the server to the network.
        raise DgemmaError(f"host {host!r} is empty; expected an IP address or a host name of this machine, e.g. "
                          f"127.0.0.1, or 0.0.0.0 for every interface")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
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


# How long a stopping server (SIGINT, SIGTERM) lets the generations it is running finish and their clients read
# them; then the connections still open are closed. Generations still waiting are answered 503 at once.
SHUTDOWN_SECONDS = 30.0


def web_server(server: OpenAIServer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               shutdown_seconds: float = SHUTDOWN_SECONDS, **app_options):
    """The uvicorn server of ``server``'s app (:func:`create_app`; ``app_options`` go there): ``.run(sockets=...)``
    serves until a stop signal. Stopping answers the waiting generations 503 at once (they were all generated
    first, one batch after another), lets the running ones finish for at most ``shutdown_seconds`` (a client
    stalled mid-request kept the server from ever exiting), then closes what is still open."""
    import logging

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn logs where it listens only for the sockets it binds itself
                where = f"[{host}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                        where, port)

        async def shutdown(self, sockets=None):
            server.scheduler.refuse_waiting("the server is shutting down")
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(create_app(server, **app_options), host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=shutdown_seconds))


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_context: int | None = None, served_model_name: str | None = None, device=None, dtype=None,
          quantization=None, log_level: str = "info") -> None:
    """Load ``model`` and serve it until interrupted. The host and port are bound first: one that cannot be
    listened on raises a DgemmaError before any weights load."""
    import importlib.util
    import os

    if any(importlib.util.find_spec(name) is None for name in ("uvicorn", "fastapi")):
        raise DgemmaError("dgemma serve needs FastAPI and uvicorn: pip install 'dgemma[serve]'")
    from .loading import load

    if served_model_name is not None and not served_model_name.strip():
        raise DgemmaError("--served-model-name '': expected the model id clients name, e.g. the checkpoint's name")
    socks = listen_sockets(host, port)
    try:
        eng = load(model, device=device, dtype=dtype, quantization=quantization, max_batch=max_batch,
                   max_context=max_context)
        name = os.path.basename(os.path.abspath(model)) if served_model_name is None else served_model_name
        web_server(OpenAIServer(eng, model_name=name, max_batch=max_batch, max_context=max_context), host=host,
                   port=port, log_level=log_level).run(sockets=socks)
    finally:
        for sock in socks:
            sock.close()
