"""Chat front end: the checkpoint's own chat template, thinking, and Gemma 4 tool calls.

The template is rendered in a sandboxed jinja2 environment. Model output is split into its
thinking channel (``<|channel>thought\\n…<channel|>``), its text, and its tool calls
(``<|tool_call>call:NAME{key:<|"|>value<|"|>,…}<tool_call|>``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime

from .errors import CheckpointError, DgemmaError

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
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "<bos>", eos_token: str = "<eos>"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DgemmaError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise CheckpointError(f"chat template does not parse: {e}") from None
        self._template_error = TemplateError
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               thinking: bool = False) -> str:
        check_messages(messages)
        if tools is not None:
            check_tools(tools)
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=thinking, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except self._template_error as e:
            raise DgemmaError(f"chat template failed to render: {e}") from None


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
        if not isinstance(required, list) or any(r not in props for r in required):
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


def parse_response(text: str) -> Response:
    """Split decoded model output into thinking, text and tool calls."""
    thinking = None
    if THOUGHT_OPEN in text:
        before, _, rest = text.partition(THOUGHT_OPEN)
        thought, closed, after = rest.partition(THOUGHT_CLOSE)
        thinking = thought.strip()
        text = before + (after if closed else "")
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    calls = []
    while CALL_OPEN in text:
        before, _, rest = text.partition(CALL_OPEN)
        body, closed, after = rest.partition(CALL_CLOSE)
        calls.append(parse_tool_call(body))
        text = before + after
    return Response(text=text.strip(), thinking=thinking, tool_calls=calls)


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


class _ArgParser:
    """Gemma 4's argument syntax: JSON with unquoted keys and strings delimited by <|"|>."""

    def __init__(self, s: str, pos: int = 0):
        self.s, self.pos = s, pos

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
            self.pos = m.end()
            return json.loads(m.group(0))
        m = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null").match(self.s, self.pos)
        if not m:
            raise self.error("expected a value")
        self.pos = m.end()
        return json.loads(m.group(0))

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
