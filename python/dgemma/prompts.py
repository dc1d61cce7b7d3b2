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


# The model card's limit: video as frames at 1 fps, up to 60 seconds.
MAX_VIDEO_SECONDS = 60.0


def media_parts(messages: list[dict]) -> tuple[list, list]:
    """(images, videos) of a conversation's content parts, each in order."""
    images, videos = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise DgemmaError(f"messages[{i}]['content'][{j}] must be a dict with a 'type', got {part!r:.80}")
            kind = part["type"]
            if kind in ("image", "video"):
                value = part.get(kind, part.get("path", part.get("url")))
                if value is None:
                    raise DgemmaError(f"messages[{i}]['content'][{j}] is {'an image' if kind == 'image' else 'a video'}"
                                      f" part without an {kind!r} value")
                (images if kind == "image" else videos).append(value)
            elif kind != "text":
                raise DgemmaError(f"messages[{i}]['content'][{j}] has type {kind!r}, expected 'text', 'image' or "
                                  f"'video'")
    return images, videos


def image_parts(messages: list[dict]) -> list:
    """The images of a conversation's content parts, in order."""
    return media_parts(messages)[0]


def render_chat(engine, conversations: list[list[dict]], *, tools=None, thinking: bool = False,
                max_image_tokens: int = 280) -> tuple[list[list[int]], dict]:
    """Token ids of each rendered conversation, image and video placeholders expanded, and their model inputs
    (``pixel_values``/``image_position_ids``, ``pixel_values_videos``/``video_position_ids``; empty without
    any). Videos are decoded at 1 frame per second (at most 60 frames) with 70 soft tokens per frame, as
    Gemma4Processor does by default; each frame is written ``mm:ss <|image>`` + its tokens + ``<image|>``."""
    from .tokenizer import check_text

    check_thinking(thinking)
    check_max_image_tokens(max_image_tokens)
    tok, template = engine.tokenizer, engine.chat_template
    _check_message_text(conversations, tok)
    texts = [template.render(conv, tools=tools, thinking=thinking) for conv in conversations]
    for i, text in enumerate(texts):
        where = "" if len(texts) == 1 else f" for conversation {i}"
        if not text.strip():
            raise DgemmaError(f"the chat template ({getattr(engine, 'chat_template_file', None) or 'the checkpoint'}) "
                              f"rendered nothing{where}: it must write the conversation's turns")
        check_text(text, f"the rendered chat prompt{where}")
    media = [media_parts(conv) for conv in conversations]
    _check_placeholders(texts, media, tok)
    if not any(images or videos for images, videos in media):
        return [tok.encode(t) for t in texts], {}
    from .vision_inputs import VisionTokens, expand_image_tokens, expand_video_tokens, load_video, \
        preprocess_images, preprocess_video

    tokens = VisionTokens.from_tokenizer(tok)
    cfg = engine.config
    for what, token_id, config_id in (("image", tokens.image_id, cfg.image_token_id),
                                      ("video", tokens.video_id, cfg.video_token_id)):
        if any(m[0 if what == "image" else 1] for m in media) and token_id != config_id:
            raise DgemmaError(f"the tokenizer's {what} token is id {token_id} but the model's {what}_token_id is "
                              f"{config_id}")
    flat = [img for images, _ in media for img in images]
    # The model's patch and pooling sizes (Gemma 4's processors use 16 and 3, the vision tower's defaults).
    sizes = dict(patch_size=cfg.vision.patch_size, pooling_kernel_size=cfg.vision.pooling_kernel_size) \
        if cfg.vision is not None else {}
    inputs = preprocess_images(flat, max_soft_tokens=max_image_tokens, **sizes) if flat else None
    if inputs is not None:
        _check_grid(inputs.image_position_ids, cfg, "image", f"max_image_tokens={max_image_tokens}")
    counts = list(inputs.num_soft_tokens_per_image) if flat else []
    video_inputs = []
    rows = []
    for i, (text, (images, videos)) in enumerate(zip(texts, media)):
        if images:
            text = expand_image_tokens(text, counts[:len(images)], tokens=tokens)
            counts = counts[len(images):]
        if videos:
            # A video past MAX_VIDEO_SECONDS is refused from its header, before any frame is decoded.
            loaded = [load_video(v, max_seconds=MAX_VIDEO_SECONDS) for v in videos]
            prepared = preprocess_video(loaded, **sizes)
            _check_grid(prepared.video_position_ids, cfg, f"conversation {i}'s video frame", "its size")
            text = expand_video_tokens(text, prepared, tokens=tokens)
            video_inputs.append(prepared)
        rows.append(tok.encode(text))
    out = {}
    if inputs is not None:
        out.update(pixel_values=inputs.pixel_values, image_position_ids=inputs.image_position_ids)
    if video_inputs:
        out.update(_frames(video_inputs))
    return rows, out


def _check_grid(positions: torch.Tensor, cfg, what: str, budget: str) -> None:
    """Refuse images whose patch grid reaches past the vision tower's position table (a very elongated image on a
    checkpoint with few positions), naming the image rather than the tensor the model would refuse."""
    if cfg.vision is None:
        return
    size = cfg.vision.position_embedding_size
    for j, reach in enumerate(positions.amax(dim=(1, 2)).tolist()):
        if reach >= size:
            raise DgemmaError(f"{what} {j} is too elongated for this model: at {budget} its patch grid reaches "
                              f"position {reach}, past the vision tower's {size} positions (position_embedding_size);"
                              f" crop it or give it fewer soft tokens")


def _frames(videos: list) -> dict:
    """The frames of several VideoInputs in order, padded to one patch count (padding at position -1)."""
    patches = max(v.pixel_values_videos.shape[1] for v in videos)
    pixels, positions = [], []
    for v in videos:
        extra = patches - v.pixel_values_videos.shape[1]
        pixels.append(torch.nn.functional.pad(v.pixel_values_videos, (0, 0, 0, extra)))
        positions.append(torch.nn.functional.pad(v.video_position_ids, (0, 0, 0, extra), value=-1))
    return {"pixel_values_videos": torch.cat(pixels), "video_position_ids": torch.cat(positions)}


def mm_token_types(ids, cfg):
    """transformers' mm_token_type_ids for ``ids`` (a tensor or nested lists): 1 on image placeholders, 2 on
    video placeholders, 0 elsewhere."""
    ids = torch.as_tensor(ids)
    types = torch.zeros_like(ids, dtype=torch.long)
    if cfg.image_token_id is not None:
        types[ids == cfg.image_token_id] = 1
    if cfg.video_token_id is not None:
        types[ids == cfg.video_token_id] = 2
    return types


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def check_thinking(thinking) -> None:
    if not isinstance(thinking, bool):
        raise DgemmaError(f"thinking must be True or False, got {thinking!r:.40}")


def check_max_image_tokens(value) -> None:
    """``max_image_tokens`` must be one of the image processor's soft-token budgets, with or without images."""
    from .vision_inputs import SUPPORTED_SOFT_TOKENS

    if isinstance(value, bool) or value not in SUPPORTED_SOFT_TOKENS:
        raise DgemmaError(f"max_image_tokens={value!r:.40} is not supported (the soft tokens per image, the image "
                          f"processor's max_soft_tokens); expected one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")


# The vision tokens message text may not spell: the template writes one image (video) placeholder per image (video)
# part, which becomes <|image> + one <|image|> per soft token + <image|>; typed as text, they would be taken for
# (or miscount) the attached images and videos.
_VISION_TOKENS = (("<|image|>", "the placeholder of an image"), ("<|video|>", "the placeholder of a video"),
                  ("<|image>", "the start-of-image marker"), ("<image|>", "the end-of-image marker"))


def vision_tokens(tokenizer) -> list[tuple[str, str]]:
    """The vision tokens (text, what it is) that ``tokenizer`` encodes as special tokens."""
    lookup = getattr(tokenizer, "token_id", None)
    if lookup is None:
        return []
    return [(text, what) for text, what in _VISION_TOKENS if lookup(text) is not None]


def _check_placeholders(texts: list[str], media: list[tuple[list, list]], tokenizer) -> None:
    """Each rendered conversation holds exactly one image (video) placeholder per attached image (video): the
    template writes them for content parts; one spelled anywhere else (a tool's or tool call's name, a tool
    definition) would be taken for an image the conversation does not attach."""
    spelled = {text for text, _ in vision_tokens(tokenizer)}
    for i, (text, (images, videos)) in enumerate(zip(texts, media)):
        for what, placeholder, given in (("image", "<|image|>", images), ("video", "<|video|>", videos)):
            found = text.count(placeholder) if placeholder in spelled else len(given)
            if found != len(given):
                raise DgemmaError(f"conversation {i} has {len(given)} {what}(s) but its rendered chat prompt holds "
                                  f"{found} {placeholder!r} placeholder(s): the template must write one per {what}, "
                                  f"and no other text (tool names, tool calls, tool definitions) may spell it")


def check_prompt_text(text: str, where: str, vision: list[tuple[str, str]]) -> None:
    """Refuse text the tokenizer cannot encode, or that spells one of ``vision`` (:func:`vision_tokens`): images
    and videos come as content parts with their pixels; a placeholder typed as text would be embedded without
    them (or miscount the attached ones)."""
    from .tokenizer import check_text

    check_text(text, where)
    for token, what in vision:
        if token in text:
            raise DgemmaError(f"{where} contains {token!r}, {what}: prompt text may not spell the vision tokens; "
                              f"attach images and videos as chat content parts, not as text")


def _check_message_text(conversations, tokenizer=None) -> None:
    """Refuse message text the tokenizer cannot encode (an unpaired surrogate), or that spells one of its vision
    tokens (images and videos are content parts, never text), naming the message; the rendered prompt is
    checked again as a whole (tools, names, and what the template adds)."""
    vision = vision_tokens(tokenizer) if tokenizer is not None else []

    def check(text: str, where: str) -> None:
        check_prompt_text(text, where, vision)

    for c, conv in enumerate(conversations):
        prefix = "" if len(conversations) == 1 else f"conversation {c}: "
        for i, m in enumerate(conv):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                check(content, f"{prefix}messages[{i}]['content']")
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    text = part.get("text") if isinstance(part, dict) else None
                    if isinstance(text, str):
                        check(text, f"{prefix}messages[{i}]['content'][{j}]['text']")


def _kind(x) -> str | None:
    """'text', 'chat' or 'ids' for one element of a batch of inputs, None for anything else."""
    if isinstance(x, str):
        return "text"
    if _is_messages(x):
        return "chat"
    if isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        return "ids"
    return None


def _describe(x) -> str:
    """What an input is, for error messages: 'str', 'list of float', 'empty list', 'Tensor' ..."""
    if isinstance(x, list):
        if not x:
            return "an empty list"
        kinds = sorted({type(i).__name__ for i in x})
        return f"a list of {' and '.join(kinds)}"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


_ACCEPTED = ("token ids (a [batch, length] tensor or lists of ints), a string, a list of strings, chat messages "
             "(a list of dicts) or a list of conversations")


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
            max_image_tokens: int = 280, continuing: bool = False) -> Prompt:
    """Ids [B, T] (+ mask) for any accepted input form; text needs the checkpoint's tokenizer.

    ``continuing``: the ids follow tokens a cache already holds, so text gets no beginning-of-sequence token
    (it would sit mid-sequence), and chat messages, which the template renders from the conversation's start,
    are refused."""
    check_thinking(thinking)
    check_max_image_tokens(max_image_tokens)
    if isinstance(inputs, torch.Tensor) or (isinstance(inputs, list) and inputs
                                            and all(_kind(x) == "ids" for x in inputs)):
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
        raise DgemmaError(f"inputs must be {_ACCEPTED}; got {_describe(inputs)}")
    if _kind(inputs) == "ids":
        raise DgemmaError("inputs is a flat list of ints: token ids are [batch, length]; pass one prompt's ids "
                          "as [ids]")
    kinds = [_kind(x) for x in inputs]
    if None in kinds:
        i = kinds.index(None)
        raise DgemmaError(f"inputs[{i}] is {_describe(inputs[i])}; inputs must be {_ACCEPTED}")
    if len(set(kinds)) > 1:
        names = {"text": "strings", "chat": "chat messages", "ids": "token ids"}
        raise DgemmaError(f"inputs mixes {' and '.join(names[k] for k in sorted(set(kinds)))}; pass one kind per call")
    tok = engine.tokenizer
    if all(isinstance(x, str) for x in inputs):
        if tools is not None or thinking:
            raise DgemmaError("thinking= and tools= apply to chat messages; pass messages instead of plain text")
        rows = []
        vision = vision_tokens(tok)
        for i, text in enumerate(inputs):
            if not text:
                raise DgemmaError(f"prompt {i} is empty")
            check_prompt_text(text, "text" if len(inputs) == 1 else f"inputs[{i}]", vision)
            ids = tok.encode(text)
            if (engine.add_bos and not continuing and engine.bos_token_id is not None
                    and (not ids or ids[0] != engine.bos_token_id)):
                ids = [engine.bos_token_id] + ids
            rows.append(ids)
        prompt = left_pad(rows, engine.config.pad_token_id or 0)
    elif all(_is_messages(x) for x in inputs):
        if continuing:
            raise DgemmaError("chat messages with a cache that already holds tokens: the chat template renders a "
                              "conversation from its start, so it would be encoded twice; continue a conversation "
                              "with eng.chat() (a ChatSession keeps its cache), or pass the new text or token ids")
        rows, images = render_chat(engine, inputs, tools=tools, thinking=thinking, max_image_tokens=max_image_tokens)
        prompt = left_pad(rows, engine.config.pad_token_id or 0)
        prompt.is_chat = True
        if images:
            images["mm_token_type_ids"] = mm_token_types(prompt.ids, engine.config)
            prompt.images = images
    else:  # unreachable: every kind is checked above
        raise DgemmaError(f"inputs must be {_ACCEPTED}; got {_describe(inputs)}")
    prompt.ids = engine.token_ids(prompt.ids, "input_ids")
    if prompt.attention_mask is not None:
        prompt.attention_mask = prompt.attention_mask.to(engine.device)
    return prompt
