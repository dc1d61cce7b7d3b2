"""Chat front end: the checkpoint's own chat template, thinking, and Gemma 4 tool calls.

The template is rendered in a sandboxed jinja2 environment. Model output is split into its
thinking channel (``<|channel>thought\\n…<channel|>``), its text, and its tool calls
(``<|tool_call>call:NAME{key:<|"|>value<|"|>,…}<tool_call|>``).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from .errors import CheckpointError, DgemmaError

# Bounds of one chat-template rendering (a checkpoint's template is code from the checkpoint): wall-clock
# seconds, and characters of output (also the largest string or list a template may build). Real templates
# render in milliseconds and a conversation's text is far below the size limit. Per template:
# ChatTemplate(time_limit_s=..., max_output_chars=...).
RENDER_TIME_LIMIT_S = 10.0
RENDER_MAX_CHARS = 8 << 20
_MAX_POWER_BITS = 1 << 16  # the largest integer ``a ** b`` may produce in a template, in bits

ROLES = ("system", "user", "assistant", "model", "tool")
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>thought\n", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>call:", "<tool_call|>"
STRING_DELIM = '<|"|>'
END_MARKERS = ("<turn|>", "<|tool_response>", "<eos>")


def load_chat_template(path: str, tokenizer_config: dict | None = None) -> str | None:
    """The checkpoint's template: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``."""
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    tpl = (tokenizer_config or {}).get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


class _TemplateLimit(Exception):
    """A chat template went over a limit (turned into a DgemmaError by :meth:`ChatTemplate.render`)."""


class _RenderTimeout(BaseException):
    """Raised asynchronously in a rendering thread that ran past its deadline (a BaseException, so that
    no ``except Exception`` on the way swallows it)."""


def _text_size(value, limit: int) -> int:
    """The characters ``value`` writes as text (``str()``, ``join``, ``tojson``), counted until past ``limit``: a
    template can build a list holding itself twice at every level (``ns.l = [ns.l, ns.l]``: small in memory,
    exponential as text), so the walk stops as soon as the count passes the limit."""
    size, stack = 0, [value]
    while stack and size <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            size += len(v)
        elif isinstance(v, dict):
            size += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            size += 2 + 2 * len(v)
            stack.extend(v)
        else:
            size += 24  # a number, None, a bool, an object's repr: a few characters
    return size


def _code_generator_class():
    from jinja2.compiler import CodeGenerator

    class LimitedCodeGenerator(CodeGenerator):
        """``a ~ b`` through the environment's checked concatenation (jinja2 compiles it to a plain join, which the
        sandbox never sees)."""

        def visit_Concat(self, node, frame):
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    return LimitedCodeGenerator


def _environment_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with checks on the operations that can build huge values in one step (``*``,
        ``**``, ``+``, ``%``, ``~``, ``format``, ``join``, ``replace``, and any value written as text) and a
        deadline check on every call and operator."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])
        code_generator_class = _code_generator_class()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.limits = threading.local()

        def check_deadline(self):
            deadline = getattr(self.limits, "deadline", None)
            if deadline is not None and time.monotonic() > deadline:
                raise _TemplateLimit(f"rendering took longer than the time limit of {self.limits.seconds:g} s")

        def check_size(self, n: int, what: str):
            limit = getattr(self.limits, "max_chars", RENDER_MAX_CHARS)
            if n > limit:
                raise _TemplateLimit(f"{what} of {n} items exceeds the output-size limit of {limit} characters")

        def check_text(self, value, what: str):
            """``value`` written as text stays within the size limit."""
            self.check_size(_text_size(value, getattr(self.limits, "max_chars", RENDER_MAX_CHARS)), what)

        def checked_concat(self, parts):
            self.check_deadline()
            self.check_text(list(parts), "a concatenation (~)")
            return "".join(map(str, parts))

        def check_replace(self, text, old, new):
            if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
                count = text.count(old) if old else len(text) + 1
                self.check_size(len(text) + count * (len(new) - len(old)), "a replacement")

        def check_format(self, fmt):
            if isinstance(fmt, str):
                for width in re.findall(r"\d{4,}", fmt):
                    self.check_size(int(width), "a format width")

        def call_binop(self, context, operator, left, right):
            self.check_deadline()
            seqs = (str, list, tuple, bytes)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, seqs) and isinstance(n, int):
                        self.check_size(len(seq) * max(n, 0), "a repeated string or list")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    if right * abs(left).bit_length() > _MAX_POWER_BITS:
                        raise _TemplateLimit(f"{left!r:.20} ** {right!r:.20} is too large a number")
            elif operator == "+":
                if isinstance(left, seqs) and isinstance(right, seqs):
                    self.check_size(len(left) + len(right), "a concatenation")
            elif operator == "%":
                self.check_format(left)
                self.check_text([left, right], "a % formatting")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            if getattr(value, "__name__", None) in ("format", "format_map"):
                self.check_format(getattr(value, "__self__", None))
            return super().wrap_str_format(value)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            __self.check_deadline()
            name = getattr(__obj, "__name__", None)
            for a in args:
                if isinstance(a, int) and not isinstance(a, bool) and a > 10**6 and \
                        name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
                    __self.check_size(a, "a padded string")
            # A str method (the sandbox wraps str.format: the method is the wrapper's __wrapped__).
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):
                if name == "join" and args:
                    __self.check_text([owner, *args], "a join")
                elif name in ("format", "format_map"):
                    __self.check_text([owner, *args, *kwargs.values()], "a format")
                elif name == "replace" and len(args) >= 2:
                    __self.check_replace(owner, args[0], args[1])
            return super().call(__context, __obj, *args, **kwargs)

    return LimitedEnvironment


# The filters that write their input as text (containers included).
_TEXT_FILTERS = frozenset(["join", "tojson", "string", "pprint", "format", "urlencode", "xmlattr", "indent",
                           "wordwrap", "center", "truncate", "title", "capitalize", "upper", "lower", "trim",
                           "striptags", "escape", "e", "forceescape", "safe", "urlize"])


def _limited_filter(env, f, name: str):
    """Filter ``f`` with the deadline checked and integer arguments (widths, counts) bounded by the
    output-size limit: ``center(10**9)`` or ``batch(10**9)`` would build a huge value in one call."""
    import functools

    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    @functools.wraps(f)  # keeps jinja2's pass_context / pass_environment marks
    def limited(*args, **kwargs):
        env.check_deadline()
        values = [a for a in (*args, *kwargs.values()) if not isinstance(a, (Context, EvalContext)) and a is not env]
        for a in values:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > 4096:
                env.check_size(abs(a), f"a '{name}' argument")
        # What a filter that writes its input as text makes is bounded by that input's text (a self-nesting list is
        # small in memory, huge as text). Only those filters: the walk costs the input's size, and a template may
        # ask messages|length once per message.
        if name in _TEXT_FILTERS:
            env.check_text(values, f"the '{name}' filter's input")
        if name == "sum" and len(values) >= 2 and isinstance(values[-1], (list, tuple)):
            env.check_size(sum(len(v) for v in values[0] if isinstance(v, (list, tuple))), "a sum of lists")
        if name == "replace" and len(values) >= 3:
            env.check_replace(*values[:3])
        return f(*args, **kwargs)

    return limited


def _run_with_deadline(fn, seconds: float):
    """``fn()``, interrupted by :class:`_RenderTimeout` if it runs past ``seconds`` (CPython: the exception is
    raised in this thread between two bytecodes, so it stops any loop of template code; a single call into
    C is not interrupted, which the size checks bound)."""
    set_async = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    if set_async is None:
        return fn()
    tid = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire():
        with lock:
            if not state["done"]:
                state["fired"] = True
                set_async(ctypes.c_ulong(tid), ctypes.py_object(_RenderTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:
                set_async(ctypes.c_ulong(tid), None)  # withdraw it if it has not been raised yet
        timer.cancel()


def _printable(env, value):
    """What ``{{ value }}`` writes, checked first: a container's text may be far larger than the container."""
    if not isinstance(value, str):
        env.check_text(value, "a printed value")
    return value


class ChatTemplate:
    """A checkpoint's jinja2 chat template, rendered in a sandbox within a time limit and an output-size
    limit (``time_limit_s`` / ``max_output_chars``; default :data:`RENDER_TIME_LIMIT_S` and
    :data:`RENDER_MAX_CHARS`, read at each render). A template that exceeds either gets a
    :class:`DgemmaError` naming the limit."""

    def __init__(self, source: str, *, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 time_limit_s: float | None = None, max_output_chars: int | None = None):
        from jinja2 import TemplateError

        if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                         or not 0 < time_limit_s < float("inf")):
            raise DgemmaError(f"time_limit_s = {time_limit_s!r:.40}, expected a positive number of seconds")
        if max_output_chars is not None and (isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int)
                                             or max_output_chars <= 0):
            raise DgemmaError(f"max_output_chars = {max_output_chars!r:.40}, expected a positive integer")
        self.time_limit_s, self.max_output_chars = time_limit_s, max_output_chars

        def raise_exception(message):
            raise DgemmaError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = _environment_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                   finalize=lambda value: _printable(env, value))
        env.filters["tojson"] = tojson
        env.filters = {name: _limited_filter(env, f, name) for name, f in env.filters.items()}
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        if not isinstance(source, str):
            raise CheckpointError(f"chat template must be a string, got {type(source).__name__}")
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise CheckpointError(f"chat template does not parse: {e}") from None
        except (RecursionError, MemoryError):
            raise CheckpointError("chat template does not parse: nested too deeply or too large") from None
        self._env = env
        self._template_error = TemplateError
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               thinking: bool = False) -> str:
        check_messages(messages)
        if tools is not None:
            check_tools(tools)
        seconds = self.time_limit_s if self.time_limit_s is not None else RENDER_TIME_LIMIT_S
        max_chars = self.max_output_chars if self.max_output_chars is not None else RENDER_MAX_CHARS
        limits = self._env.limits
        context = dict(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                       enable_thinking=thinking, bos_token=self.bos_token, eos_token=self.eos_token)

        def run() -> str:
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > max_chars:
                    raise _TemplateLimit(f"its output exceeds the output-size limit of {max_chars} characters")
                parts.append(chunk)
                self._env.check_deadline()
            return "".join(parts)

        limits.deadline, limits.seconds, limits.max_chars = time.monotonic() + seconds, seconds, max_chars
        hint = "(dgemma.chat.RENDER_TIME_LIMIT_S / RENDER_MAX_CHARS, or ChatTemplate(time_limit_s=, max_output_chars=))"
        try:
            return _run_with_deadline(run, seconds)
        except _RenderTimeout:
            raise DgemmaError(f"chat template rendering took longer than the time limit of {seconds:g} s "
                              f"{hint}") from None
        except _TemplateLimit as e:
            raise DgemmaError(f"chat template stopped: {e} {hint}") from None
        except self._template_error as e:
            raise DgemmaError(f"chat template failed to render: {e}") from None
        except RecursionError:
            raise DgemmaError("chat template failed to render: recursion too deep") from None
        except MemoryError:
            raise DgemmaError(f"chat template failed to render: out of memory (output-size limit {max_chars} "
                              f"characters) {hint}") from None
        except DgemmaError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError) as e:
            raise DgemmaError(f"chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
            limits.deadline = None


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise DgemmaError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DgemmaError(f"messages[{i}] must be a dict with a 'role', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DgemmaError(f"messages[{i}] has unknown role {m['role']!r}, expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DgemmaError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")


def check_tools(tools) -> None:
    """Tools are JSON-schema function declarations: {"type": "function", "function": {"name", "parameters"}}
    (or the bare inner object)."""
    if not isinstance(tools, list):
        raise DgemmaError(f"tools must be a list of function declarations, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict):
            raise DgemmaError(f"tools[{i}] must be a dict declaring a function, got {t!r:.80}")
        if isinstance(t, dict) and "type" in t and t["type"] != "function":
            raise DgemmaError(f"tools[{i}] has type {t['type']!r}, expected 'function'")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise DgemmaError(f"tools[{i}] has invalid function name {name!r} (expected an identifier)")
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise DgemmaError(f"tools[{i}] ({name}): 'parameters' must be a JSON schema of type 'object'")
        props = params.get("properties", {})
        if not isinstance(props, dict):
            raise DgemmaError(f"tools[{i}] ({name}): 'parameters.properties' must be an object")
        for pname, schema in props.items():
            if not isinstance(schema, dict):
                raise DgemmaError(f"tools[{i}] ({name}): property {pname!r} must be a schema object")
        required = params.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) or r not in props for r in required):
            raise DgemmaError(f"tools[{i}] ({name}): 'required' must list declared properties, got {required!r}")


# -- parsing model output ---------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    text: str
    thinking: str | None = None
    tool_calls: list[dict] = field(default_factory=list)

    def as_message(self) -> dict:
        """The assistant turn for the history: thinking is dropped, tool calls kept."""
        msg = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": c} for c in self.tool_calls]
        return msg


def _split_thinking(text: str) -> tuple[str, str | None]:
    """(the text without its thinking and cut at the first end marker, the thinking or None)."""
    thinking = None
    if THOUGHT_OPEN in text:
        before, _, rest = text.partition(THOUGHT_OPEN)
        thought, closed, after = rest.partition(THOUGHT_CLOSE)
        thinking = thought.strip()
        text = before + (after if closed else "")
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text, thinking


def parse_response(text: str, *, strip: bool = True) -> Response:
    """Split decoded model output into thinking, text and tool calls (the text stripped of surrounding white
    space unless ``strip`` is False)."""
    text, thinking = _split_thinking(text)
    calls = []
    while CALL_OPEN in text:
        before, _, rest = text.partition(CALL_OPEN)
        body, closed, after = rest.partition(CALL_CLOSE)
        calls.append(parse_tool_call(body))
        text = before + after
    return Response(text=text.strip() if strip else text, thinking=thinking, tool_calls=calls)


def parse_response_lenient(text: str, *, partial: bool = False, strip: bool = True) -> Response:
    """:func:`parse_response` that never raises: for servers, which must answer whatever the model wrote.

    Output that :func:`parse_response` accepts gives the same :class:`Response`. A tool call that does not
    parse stays in the text as the model wrote it. With ``partial`` (``text`` is the output so far, more is
    coming) the text stops before a tool call that is not closed yet and before a trailing piece of a
    marker (``<|tool_call>call:``, ``<|channel>thought``, an end marker): those are held back until the
    output shows what they are, so the text so far is a prefix of the final text."""
    if not partial:
        try:
            return parse_response(text, strip=strip)
        except DgemmaError:
            pass
    text, thinking = _split_thinking(text)
    calls, kept = [], []
    while True:
        before, found, rest = text.partition(CALL_OPEN)
        kept.append(before)
        if not found:
            break
        body, closed, text = rest.partition(CALL_CLOSE)
        if not closed and partial:
            break  # still being written
        try:
            calls.append(parse_tool_call(body))
        except DgemmaError:
            kept.append(CALL_OPEN + body + closed)
    text = "".join(kept)
    if partial:
        for marker in (CALL_OPEN, THOUGHT_OPEN, *END_MARKERS):
            for k in range(len(marker) - 1, 0, -1):
                if text.endswith(marker[:k]):
                    text = text[:-k]
                    break
    return Response(text=text.strip() if strip else text, thinking=thinking, tool_calls=calls)


def parse_tool_call(body: str) -> dict:
    """``NAME{key:value,…}`` -> {"name": NAME, "arguments": {...}} with typed values."""
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*", body)
    if not m:
        raise DgemmaError(f"malformed tool call {body[:60]!r}: expected a function name")
    parser = _ArgParser(body, m.end())
    args = parser.value() if parser.peek() == "{" else {}
    if not isinstance(args, dict):
        raise DgemmaError(f"malformed tool call {body[:60]!r}: arguments must be an object")
    parser.skip_ws()
    if parser.pos != len(body):
        raise DgemmaError(f"malformed tool call {body[:60]!r}: unexpected text after the arguments")
    return {"name": m.group(1), "arguments": args}


# The deepest nesting of lists and objects a tool call's arguments may have (deeper ones are malformed: the parser
# recursed into a RecursionError on a model's `[[[...` ). Far beyond any function's parameters.
MAX_ARGUMENT_DEPTH = 64


class _ArgParser:
    """Gemma 4's argument syntax: JSON with unquoted keys and strings delimited by <|"|>. Numbers are finite JSON
    numbers (Infinity would not be valid JSON in the OpenAI form; an integer past Python's digit limit is refused)."""

    def __init__(self, s: str, pos: int = 0):
        self.s, self.pos = s, pos
        self.depth = 0

    def error(self, what: str):
        return DgemmaError(f"malformed tool call arguments at offset {self.pos}: {what} in {self.s[:80]!r}")

    def skip_ws(self):
        while self.pos < len(self.s) and self.s[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def expect(self, ch: str):
        if self.peek() != ch:
            raise self.error(f"expected {ch!r}")
        self.pos += 1

    def value(self):
        if self.depth >= MAX_ARGUMENT_DEPTH:
            raise self.error(f"lists and objects nested deeper than {MAX_ARGUMENT_DEPTH}")
        self.depth += 1
        try:
            return self._value()
        finally:
            self.depth -= 1

    def _value(self):
        c = self.peek()
        if self.s.startswith(STRING_DELIM, self.pos):
            end = self.s.find(STRING_DELIM, self.pos + len(STRING_DELIM))
            if end < 0:
                raise self.error("unterminated string")
            out = self.s[self.pos + len(STRING_DELIM):end]
            self.pos = end + len(STRING_DELIM)
            return out
        if c == "{":
            return self.obj()
        if c == "[":
            self.pos += 1
            items = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        if c == '"':  # a plain JSON string is accepted too
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(self.s, self.pos)
            if not m:
                raise self.error("unterminated string")
            try:
                out = json.loads(m.group(0))
            except ValueError as e:  # an invalid escape (\q)
                raise self.error(f"invalid string ({e})") from None
            self.pos = m.end()
            return out
        m = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null").match(self.s, self.pos)
        if not m:
            raise self.error("expected a value")
        try:
            v = json.loads(m.group(0))
        except ValueError as e:  # an integer past Python's int-string digit limit
            raise self.error(f"number not readable ({e})") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise self.error(f"number {m.group(0)[:40]!r} is not finite")
        self.pos = m.end()
        return v

    def obj(self) -> dict:
        self.expect("{")
        out = {}
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            self.skip_ws()
            if self.s.startswith(STRING_DELIM, self.pos) or self.peek() == '"':
                key = self.value()
            else:
                m = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*").match(self.s, self.pos)
                if not m:
                    raise self.error("expected a key")
                key, self.pos = m.group(0), m.end()
            self.expect(":")
            out[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return out
