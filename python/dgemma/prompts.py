"""Turning ``generate``'s inputs (ids, text, a batch of texts, chat messages) into padded id batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import check_attention_mask
from .errors import DgemmaError


@dataclass(slots=True)
class Prompt:
    ids: torch.Tensor  # [B, T], left-padded
    attention_mask: torch.Tensor | None  # [B, T] bool, None when nothing is padded
    is_chat: bool


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


def prepare(engine, inputs, *, attention_mask=None, thinking: bool = False, tools=None) -> Prompt:
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
        template = engine.chat_template
        rows = [tok.encode(template.render(conv, tools=tools, thinking=thinking)) for conv in inputs]
        prompt = left_pad(rows, engine.config.pad_token_id or 0)
        prompt.is_chat = True
    else:
        raise DgemmaError("inputs mixes strings and chat messages; pass one kind per call")
    prompt.ids = engine.token_ids(prompt.ids, "input_ids")
    if prompt.attention_mask is not None:
        prompt.attention_mask = prompt.attention_mask.to(engine.device)
    return prompt
