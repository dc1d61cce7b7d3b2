"""The text front end: the checkpoint's tokenizer and chat template around the engine on token ids.

:class:`TextEngine` is what :func:`dgemma.load` returns: an :class:`~dgemma.engine.Engine` whose
``generate`` also takes a string, a list of strings (left-padded into a batch) or chat messages, and
whose results carry decoded ``texts`` (and, for chat, parsed ``responses``: thinking, tool calls).
"""

from __future__ import annotations

import os

from .cache import KVCache
from .chat import ChatTemplate, load_chat_template, parse_response
from .engine import Engine, check_generate_arguments
from .errors import CheckpointError, DgemmaError
from .generation import GenerationResult
from .prompts import Prompt, prepare
from .tokenizer import Tokenizer


class TextEngine(Engine):
    """An engine with its checkpoint's tokenizer and chat template (loaded on first use)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer: Tokenizer | None = None
        self._chat_template: ChatTemplate | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            if self.path is None:
                raise DgemmaError("this engine has no checkpoint directory, so no tokenizer: pass token ids")
            tok = Tokenizer(self.path)
            if tok.vocab_size > self.config.vocab_size:
                raise CheckpointError(f"{os.path.join(self.path, 'tokenizer.json')} has {tok.vocab_size} token ids but "
                                      f"config.json's vocab_size is {self.config.vocab_size}: text could encode to ids "
                                      f"the model has no embedding for")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def add_bos(self) -> bool:
        return bool(self.tokenizer.config.get("add_bos_token", True))

    @property
    def chat_template_file(self) -> str | None:
        """The file the chat template comes from (``chat_template.jinja``, else ``tokenizer_config.json``)."""
        if self.path is None:
            return None
        file = os.path.join(self.path, "chat_template.jinja")
        return file if os.path.isfile(file) else os.path.join(self.path, "tokenizer_config.json")

    @property
    def chat_template(self) -> ChatTemplate:
        """The checkpoint's own chat template (``chat_template.jinja`` or ``tokenizer_config.json``)."""
        if self._chat_template is None:
            tok = self.tokenizer
            file = self.chat_template_file
            try:
                source = load_chat_template(self.path, tok.config)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if source is None:
                raise DgemmaError(f"{self.path}: the checkpoint has no chat template "
                                  f"(chat_template.jinja or tokenizer_config.json's chat_template)")
            if not source.strip():
                raise CheckpointError(f"{file}: the chat template is empty")
            self._chat_template = ChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)
        return self._chat_template

    def chat(self, *, system: str | None = None, tools: list[dict] | None = None, thinking: bool = False,
             context: int | None = None, max_new_tokens: int | None = None):
        """A multi-turn :class:`~dgemma.session.ChatSession` reusing one KV cache across turns."""
        from .session import ChatSession

        return ChatSession(self, system=system, tools=tools, thinking=thinking, context=context,
                           max_new_tokens=max_new_tokens)

    def generate(self, inputs, *, attention_mask=None, thinking: bool = False, tools: list[dict] | None = None,
                 max_image_tokens: int = 280, stream=None, **kwargs) -> GenerationResult:
        """:meth:`Engine.generate` for token ids ``[B, T]``, a string, a list of strings (left-padded into a
        batch), chat messages (``[{"role": ..., "content": ...}, ...]``) or a list of conversations.

        Chat content may hold image parts (``{"type": "image", "image": path | bytes | PIL image | array}``);
        each image takes ``max_image_tokens`` soft tokens at most (70, 140, 280, 560 or 1120).
        ``thinking`` and ``tools`` are passed to the chat template (chat inputs only). The result's
        ``texts`` hold each row's decoded new text (up to the first end-of-sequence id) when the
        checkpoint has a tokenizer; for chat inputs ``responses`` hold the parsed replies.
        """
        check_generate_arguments(kwargs, "generate")
        prompt = prepare(self, inputs, attention_mask=attention_mask, thinking=thinking, tools=tools,
                         max_image_tokens=max_image_tokens, continuing=_continuing(kwargs))
        _check_no_pixels(prompt, kwargs)
        result = super().generate(prompt.ids, attention_mask=prompt.attention_mask, stream=stream,
                                  **prompt.images, **kwargs)
        self.attach_text(result, chat=prompt.is_chat)
        return result

    def generate_stream(self, inputs, *, attention_mask=None, thinking: bool = False, tools=None,
                        max_image_tokens: int = 280, **kwargs):
        """:meth:`generate` as an iterator of stream events, then the :class:`GenerationResult`."""
        check_generate_arguments(kwargs, "generate_stream", stream=False)
        prompt = prepare(self, inputs, attention_mask=attention_mask, thinking=thinking, tools=tools,
                         max_image_tokens=max_image_tokens, continuing=_continuing(kwargs))
        _check_no_pixels(prompt, kwargs)
        events = super().generate_stream(prompt.ids, attention_mask=prompt.attention_mask, **prompt.images,
                                         **kwargs)
        return self._with_text(events, prompt)

    def _with_text(self, events, prompt: Prompt):
        # Values sent in (hidden states answering a DecoderPass) go through to the engine's generator, and
        # closing this one closes it at once (its cache transaction rolls back then, not at collection).
        sent = None
        try:
            while True:
                try:
                    item = events.send(sent)
                except StopIteration:
                    return
                if isinstance(item, GenerationResult):
                    self.attach_text(item, chat=prompt.is_chat)
                sent = yield item
        finally:
            events.close()

    def attach_text(self, result: GenerationResult, *, chat: bool) -> None:
        """Set ``result.texts`` (and for chat ``result.responses``) from its new tokens; a checkpoint
        without tokenizer files leaves the result as ids only."""
        if self.path is None:
            return
        try:
            tok = self.tokenizer
        except DgemmaError:
            return  # no tokenizer files: ids only
        texts, responses = [], []
        # The text ends at the first end-of-sequence id, generation's or the model's own.
        ends = self.end_ids(result.eos_token_ids)
        pad = result.pad_token_id
        for row in result.new_tokens.tolist():
            cut = next((i for i, x in enumerate(row) if x in ends), len(row))
            ids = [x for x in row[:cut] if x != pad]
            if chat:  # a reply goes back into the conversation: vision tokens (input only) are not its text
                ids = [x for x in ids if x not in self.config.vision_token_ids]
                resp = parse_response(tok.decode(ids))
                responses.append(resp)
                texts.append(resp.text)
            else:
                texts.append(tok.decode(ids, skip_special_tokens=True))
        result.texts, result.responses = texts, responses


def _continuing(kwargs: dict) -> bool:
    """Whether a call's ``cache=`` already holds tokens (its prompt follows them)."""
    cache = kwargs.get("cache")
    return isinstance(cache, KVCache) and cache.length > 0


def _check_no_pixels(prompt: Prompt, kwargs: dict) -> None:
    """Chat messages with images or videos bring their own pixel inputs; the same keywords passed too are refused."""
    given = sorted(prompt.images.keys() & kwargs.keys())
    if given:
        raise DgemmaError(f"{given[0]}= with chat messages that attach images or videos: their pixels come from the "
                          f"messages' content parts")
