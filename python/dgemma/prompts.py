"""Turning ``generate``'s inputs (ids, text, a batch of texts, chat messages with images) into padded id
batches, and the images' pixel inputs.

Chat messages follow the transformers chat-template convention: ``content`` is a string or a list of parts
``{"type": "text", "text": ...}`` and ``{"type": "image", "image": <path | bytes | PIL image | array>}``
(``"path"`` is accepted for ``"image"``). The checkpoint's chat template writes one image placeholder per
image part; each becomes ``<|image>`` + one ``<|image|>`` per soft token + ``<image|>``, as Gemma4Processor
does (:mod:`dgemma.vision_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .engine import check_attention_mask
from .errors import DgemmaError


@dataclass(slots=True)
class Prompt:
    ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor | None  # [B, T] bool, None when nothing is padded
    is_chat: bool
    images: dict = field(default_factory=dict)  # pixel_values, image_position_ids, mm_token_type_ids (chat images)


def image_parts(messages: list[dict]) -> list:
    """The images of a conversation's content parts, in order (video parts are refused by name)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise DgemmaError(f"messages[{i}]['content'][{j}] must be a dict with a 'type', got {part!r:.80}")
            kind = part["type"]
            if kind == "image":
                value = part.get("image", part.get("path", part.get("url")))
                if value is None:
                    raise DgemmaError(f"messages[{i}]['content'][{j}] is an image part without an 'image' value")
                out.append(value)
            elif kind == "video":
                raise DgemmaError(f"messages[{i}]['content'][{j}] is a video: DiffusionGemma's encoder takes images "
                                  f"only (transformers 5.23 fills image placeholders alone); pass frames as images")
            elif kind != "text":
                raise DgemmaError(f"messages[{i}]['content'][{j}] has type {kind!r}, expected 'text' or 'image'")
    return out


def render_chat(engine, conversations: list[list[dict]], *, tools=None, thinking: bool = False,
                max_image_tokens: int = 280) -> tuple[list[list[int]], dict]:
    """Token ids of each rendered conversation, image placeholders expanded, and the images' model inputs
    (``pixel_values``, ``image_position_ids``; empty without images)."""
    tok, template = engine.tokenizer, engine.chat_template
    texts = [template.render(conv, tools=tools, thinking=thinking) for conv in conversations]
    images = [image_parts(conv) for conv in conversations]
    if not any(images):
        return [tok.encode(t) for t in texts], {}
    from .vision_inputs import VisionTokens, expand_image_tokens, preprocess_images

    tokens = VisionTokens.from_tokenizer(tok)
    if tokens.image_id != engine.config.image_token_id:
        raise DgemmaError(f"the tokenizer's {tokens.image!r} is id {tokens.image_id} but the model's image_token_id "
                          f"is {engine.config.image_token_id}")
    flat = [img for row in images for img in row]
    inputs = preprocess_images(flat, max_soft_tokens=max_image_tokens)
    counts = list(inputs.num_soft_tokens_per_image)
    rows = []
    for i, (text, row) in enumerate(zip(texts, images)):
        found = text.count(tokens.image)
        if found != len(row):
            raise DgemmaError(f"conversation {i} has {len(row)} image(s) but its rendered chat template holds {found} "
                              f"{tokens.image!r} placeholder(s): the checkpoint's template must write one per image")
        rows.append(tok.encode(expand_image_tokens(text, counts[:len(row)], tokens=tokens)))
        counts = counts[len(row):]
    return rows, {"pixel_values": inputs.pixel_values, "image_position_ids": inputs.image_position_ids}


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def left_pad(rows: list[list[int]], pad_id: int) -> Prompt:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return Prompt(ids, None if bool(mask.all()) else mask, False)


def prepare(engine, inputs, *, attention_mask=None, thinking: bool = False, tools=None,
            max_image_tokens: int = 280) -> Prompt:
    """Ids [B, T] (+ mask) for any accepted input form; text needs the checkpoint's tokenizer."""
    if isinstance(inputs, torch.Tensor) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], list)
                                            and inputs[0] and isinstance(inputs[0][0], int)):
        ids = engine.token_ids(inputs, "input_ids")
        mask = None if attention_mask is None else check_attention_mask(attention_mask, ids)
        if tools is not None or thinking:
            raise DgemmaError("thinking= and tools= apply to chat messages, not to token ids")
        return Prompt(ids, mask, False)
    if attention_mask is not None:
        raise DgemmaError("attention_mask is only accepted with token-id inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if _is_messages(inputs):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise DgemmaError(f"inputs must be token ids, a string, a list of strings or chat messages; "
                          f"got {type(inputs).__name__}")
    tok = engine.tokenizer
    if all(isinstance(x, str) for x in inputs):
        if tools is not None or thinking:
            raise DgemmaError("thinking= and tools= apply to chat messages; pass messages instead of plain text")
        rows = []
        for i, text in enumerate(inputs):
            if not text:
                raise DgemmaError(f"prompt {i} is empty")
            ids = tok.encode(text)
            if engine.add_bos and engine.bos_token_id is not None and (not ids or ids[0] != engine.bos_token_id):
                ids = [engine.bos_token_id] + ids
            rows.append(ids)
        prompt = left_pad(rows, engine.config.pad_token_id or 0)
    elif all(_is_messages(x) for x in inputs):
        rows, images = render_chat(engine, inputs, tools=tools, thinking=thinking, max_image_tokens=max_image_tokens)
        prompt = left_pad(rows, engine.config.pad_token_id or 0)
        prompt.is_chat = True
        if images:
            images["mm_token_type_ids"] = (prompt.ids == engine.config.image_token_id).long()
            prompt.images = images
    else:
        raise DgemmaError("inputs mixes strings and chat messages; pass one kind per call")
    prompt.ids = engine.token_ids(prompt.ids, "input_ids")
    if prompt.attention_mask is not None:
        prompt.attention_mask = prompt.attention_mask.to(engine.device)
    return prompt
