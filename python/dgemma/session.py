"""Multi-turn chat over one KV cache: each turn encodes only what the cache does not already hold."""

from __future__ import annotations

import contextlib
import json
import threading

from .chat import check_tools
from .errors import CacheFullError, DgemmaError
from .engine import Engine, check_generate_arguments

DEFAULT_CONTEXT = 32_768

# generate() arguments a session sets itself, so send() refuses them (with why).
_SESSION_ARGUMENTS = {
    "cache": "the session keeps the conversation in its own cache",
    "capacity": "the session sizes its own cache (eng.chat(context=...))",
    "attention_mask": "a session's turns are never padded",
    "thinking": "set it for the whole conversation with eng.chat(thinking=...)",
    "tools": "set them for the whole conversation with eng.chat(tools=...)",
    "pixel_values": "pass images as content parts of the message",
    "image_position_ids": "pass images as content parts of the message",
    "mm_token_type_ids": "pass images as content parts of the message",
    "pixel_values_videos": "pass videos as content parts of the message",
    "video_position_ids": "pass videos as content parts of the message",
}


def _copied(value):
    """``value`` with its dicts and lists copied, all the way down; other objects (strings, bytes, images, arrays)
    shared."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


class ChatSession:
    """A conversation with an engine.

    >>> chat = eng.chat(system="Be brief.", thinking=True)
    >>> reply = chat.send("Why is the sky blue?")
    >>> reply.text, reply.thinking
    """

    def __init__(self, engine, *, system: str | None = None, tools: list[dict] | None = None,
                 thinking: bool = False, context: int | None = None, max_new_tokens: int | None = None):
        from .prompts import check_thinking

        if tools is not None:
            check_tools(tools)
        check_thinking(thinking)
        cfg = engine.config
        for name, value in (("context", context), ("max_new_tokens", max_new_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise DgemmaError(f"{name} must be a positive integer or None, got {value!r:.80}")
        if max_new_tokens is not None and max_new_tokens > cfg.max_position_embeddings:
            raise DgemmaError(f"max_new_tokens {max_new_tokens} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")
        self.engine = engine
        try:
            self.tools = _copied(tools)  # the caller's list may change after this; the session's must not
        except RecursionError:
            raise DgemmaError("tools are nested too deeply (dicts and lists inside each other)") from None
        self.thinking = thinking
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.context = min(DEFAULT_CONTEXT if context is None else context, cfg.max_position_embeddings)
        settings = engine.generation_settings
        self.max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        # None: each turn's budget as generate resolves it (the engine's max_new_tokens, or what a max_length of
        # generation_config.json leaves); set: the session's max_new_tokens unless the call gives a budget.
        self._budget_set = max_new_tokens is not None
        # Room to roll back one answer's committed blocks (see KVCache.truncate): the longest answer a turn may give.
        longest = self.max_new_tokens if self._budget_set or settings.max_length is None else settings.max_length
        longest = min(longest, self.context)  # longer rollbacks only cost ring memory: a turn re-encodes instead
        self.budget = -(-longest // cfg.canvas_length) * cfg.canvas_length
        self.cache = None
        self.cached_ids: list[int] = []
        # A digest of each image and video frame the cache holds, in order: two pictures of one size have the same
        # placeholder ids, so the ids alone cannot tell that an image in the history changed.
        self.cached_media: dict[str, list[bytes]] = {"image": [], "video": []}
        self.reencoded_tokens = 0  # tokens encoded in the last turn (the new part of the conversation)
        self._busy = threading.Lock()

    def _turn_budget(self, conversation: int) -> int | None:
        """The reply's max_new_tokens when the call gives no budget: the session's own when it was given one; else,
        with a max_length in generation_config.json, what it leaves after the ``conversation``'s tokens within the
        session's context, in whole canvases (generate rounds the last canvas up; a max_length at the context's end,
        e.g. max_position_embeddings, left every turn past it); else the engine's (None: generate's own)."""
        settings, cfg = self.engine.generation_settings, self.engine.config
        if self._budget_set:
            return self.max_new_tokens
        if settings.max_length is None:
            return None
        left = min(settings.max_length, self.context) - conversation
        c = cfg.canvas_length
        return left // c * c if left >= c else None  # less than a canvas left: generate explains why not

    def _new_cache(self):
        return self.engine.new_cache(1, self.context, rollback=self.budget)

    def send(self, message: str | dict, *, max_image_tokens: int = 280, **generate_kwargs):
        """Add a user turn (a string) or any message dict (e.g. a tool result, or content parts with images)
        and generate the reply.

        Only the tokens the cache does not already hold are encoded: the cache is rolled back to the
        longest common prefix of what it holds and the newly rendered conversation (an image is never
        split: its tokens are kept whole or encoded again with its pixels). Where that is not possible
        (history rewritten further back than one answer), the conversation is re-encoded.
        """
        taken = sorted(_SESSION_ARGUMENTS & generate_kwargs.keys())
        if taken:
            raise DgemmaError(f"ChatSession.send does not take {taken[0]}=: {_SESSION_ARGUMENTS[taken[0]]}")
        check_generate_arguments(generate_kwargs, "ChatSession.send")
        if not self._busy.acquire(blocking=False):
            raise DgemmaError("this ChatSession is already generating a reply (in another thread, or from a stream "
                              "callback): a session is one conversation, one turn at a time; use one session per "
                              "thread")
        try:
            return self._send(message, max_image_tokens, generate_kwargs)
        finally:
            self._busy.release()

    def _send(self, message, max_image_tokens: int, generate_kwargs: dict):
        """:meth:`send` under the session's lock. The session (messages, cache, cached ids) changes only when
        the reply is complete: an exception anywhere (a stream callback's included) leaves it as it was."""
        from .prompts import render_chat

        if isinstance(message, str):
            message = {"role": "user", "content": message}
        # A copy of the dicts and lists: the caller may change its message after this turn (images stay shared).
        try:
            candidate = self.messages + [_copied(message)]
        except RecursionError:
            raise DgemmaError("the message is nested too deeply (dicts and lists inside each other)") from None
        rows, images = render_chat(self.engine, [candidate], tools=self.tools, thinking=self.thinking,
                                   max_image_tokens=max_image_tokens)
        ids = rows[0]
        budget = self._turn_budget(len(ids))
        if budget is not None and "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = budget
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        cfg = self.engine.config
        spans = {"image": _image_spans(ids, cfg.image_token_id) if "pixel_values" in images else [],
                 "video": _image_spans(ids, cfg.video_token_id) if "pixel_values_videos" in images else []}
        for start, end in spans["image"] + spans["video"]:  # never split an image or a video frame
            if start < common < end:
                common = start
        media = _media_digests(images)
        for kind in ("image", "video"):  # re-encode from the first cached picture whose pixels changed
            for k, (start, _) in enumerate(spans[kind]):
                if start >= common:
                    break
                cached = self.cached_media[kind]
                if k >= len(cached) or cached[k] != media[kind][k]:
                    common = start
                    break
        if self.cache is None or common == 0 or common < self.cache.min_length:  # (0: nothing to keep)
            cache, common = None, 0
        else:
            cache = self.cache
        new_ids = ids[common:]
        if not new_ids:
            raise DgemmaError("the new message adds no tokens to the conversation")
        if cache is None:
            cache, transaction = self._new_cache(), contextlib.nullcontext()
        else:
            transaction = cache.transaction()
        with transaction:
            if cache is self.cache:
                cache.truncate(common)
            result = self._generate(cache, candidate, ids, common, new_ids, spans, images, generate_kwargs)
            self.cache = cache
            self.cached_media = media
        return result

    def _generate(self, cache, candidate, ids, common, new_ids, spans, images, generate_kwargs):
        from .prompts import mm_token_types

        extra = {}
        for kind, pixels, positions in (("image", "pixel_values", "image_position_ids"),
                                        ("video", "pixel_values_videos", "video_position_ids")):
            cached = sum(1 for start, _ in spans[kind] if start < common)  # images / frames already encoded
            if len(spans[kind]) > cached:
                extra[pixels], extra[positions] = images[pixels][cached:], images[positions][cached:]
        if extra:
            extra["mm_token_type_ids"] = mm_token_types([new_ids], self.engine.config)
        # Ids through the engine's own generate (no re-rendering), then parsed as a chat reply.
        try:
            result = Engine.generate(self.engine, [new_ids], cache=cache, **extra, **generate_kwargs)
        except CacheFullError as e:
            raise CacheFullError(
                f"the conversation and its reply need {e.length + e.new_tokens} positions ({common} kept, "
                f"{len(new_ids)} new, the rest the reply's canvases) but this session's context is {self.context}: "
                f"start the session with eng.chat(context=...) (up to max_position_embeddings "
                f"{self.engine.config.max_position_embeddings}) or drop turns from chat.messages",
                length=e.length, new_tokens=e.new_tokens, capacity=e.capacity) from None
        self.engine.attach_text(result, chat=True)
        kept = cache.length - common
        cached_ids = ids[:common] + new_ids + result.new_tokens[0, : kept - len(new_ids)].tolist()
        reply = result.responses[0].as_message() if result.responses else {"role": "assistant", "content": ""}
        # Nothing below can fail: the session changes all at once.
        self.reencoded_tokens = len(new_ids)
        self.cached_ids = cached_ids
        self.messages = candidate + [reply]
        return result

    def send_tool_result(self, name: str, result, **generate_kwargs):
        """Send a tool's result back as a ``tool`` turn and generate the model's follow-up."""
        if not isinstance(name, str):
            raise DgemmaError(f"send_tool_result: name must be the tool's name (a string), got {name!r:.80}")
        if isinstance(result, str):
            content = result
        else:
            try:
                content = json.dumps(result)
            except (TypeError, ValueError, RecursionError) as e:
                raise DgemmaError(f"send_tool_result: result must be a string or JSON-serialisable (dicts, lists, "
                                  f"strings, numbers, booleans, None), got {type(result).__name__} ({e})") from None
        return self.send({"role": "tool", "name": name, "content": content}, **generate_kwargs)


def _media_digests(images: dict) -> dict[str, list[bytes]]:
    """A digest of each image's and each video frame's pixels and patch positions (render_chat's inputs), its
    padding (patches at position -1, as many as the largest picture of the conversation needs) left out."""
    import hashlib

    out = {}
    for kind, pixels, positions in (("image", "pixel_values", "image_position_ids"),
                                    ("video", "pixel_values_videos", "video_position_ids")):
        out[kind] = []
        if pixels in images:
            for p, q in zip(images[pixels], images[positions]):
                real = (q >= 0).all(dim=-1)
                h = hashlib.sha256(p[real].detach().contiguous().cpu().numpy().tobytes())
                h.update(q[real].detach().contiguous().cpu().numpy().tobytes())
                out[kind].append(h.digest())
    return out


def _image_spans(ids: list[int], image_id: int | None) -> list[tuple[int, int]]:
    """[start, end) of each run of image (or video frame) soft tokens, widened by the begin/end-of-image token
    around it."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            spans.append((max(i - 1, 0), min(j + 1, len(ids))))
            i = j
        else:
            i += 1
    return spans
