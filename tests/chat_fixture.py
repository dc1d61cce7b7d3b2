"""A small real tokenizer with the Gemma 4 control tokens, and a chat template in the Gemma 4 turn
format, written beside a tiny random checkpoint."""

from __future__ import annotations

import json
import os

from dgemma.demo import CHAT_TEMPLATE, CONTROL_TOKENS, VISION_TOKENS
from dgemma.demo import build_tokenizer as build_demo_tokenizer
from dgemma.random_checkpoint import write_random_checkpoint

CONTROL = list(CONTROL_TOKENS)
TURN_END = CONTROL.index("<turn|>")

CORPUS = [
    "The sky is blue because air scatters short wavelengths of sunlight more than long ones.",
    "What is the weather in Paris today? It is sunny and 21 degrees.",
    "call:get_weather{city:Paris,unit:celsius} response:get_weather{temperature:21}",
    "thought The user asks about the sky. I should answer briefly.",
    "model user system Hello! How can I help you today? 0123456789 {}[]:,.\"'-_",
] * 4

# Gemma 4's turn format, the demo checkpoint's template (content parts: an image is one <|image|>).
TEMPLATE = CHAT_TEMPLATE
# Gemma 4's vision tokens (begin of image, image soft token, end of image, video soft token).
BOI, IMAGE, EOI, VIDEO = (len(CONTROL) + i for i in range(4))
MULTIMODAL_TEMPLATE = CHAT_TEMPLATE


def build_tokenizer(vocab_size: int = 320, *, vision: bool = False):
    return build_demo_tokenizer(vocab_size, corpus=CORPUS,
                                special_tokens=CONTROL + (VISION_TOKENS if vision else []))


def write_chat_checkpoint(path, *, seed: int = 0, with_template: bool = True, canvas_length: int = 16) -> str:
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    path = write_random_checkpoint(path, "tiny", seed=seed, canvas_length=canvas_length, vocab_size=vocab,
                                   eos_token_id=[1, TURN_END])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, TURN_END], "pad_token_id": 0, "max_new_tokens": 32,
                   "max_denoising_steps": 6, "sampler_config": {"entropy_bound": 0.5,
                                                                "_cls_name": "EntropyBoundSamplerConfig"}}, f)
    if with_template:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(TEMPLATE)
    return path


def write_multimodal_checkpoint(path, *, seed: int = 0, bidirectional: bool = True) -> str:
    """A transformers-written random DiffusionGemma with a vision tower, the tokenizer above with Gemma 4's
    vision tokens (their ids are the config's image/boi/eoi ids) and the chat template with image parts."""
    from hf_checkpoints import build_hf_model

    tok = build_tokenizer(vision=True)
    assert tok.token_to_id("<|image|>") == IMAGE
    model = build_hf_model("odd", seed=seed, canvas_length=8,
                           text_overrides=dict(vocab_size=tok.get_vocab_size(),
                                               use_bidirectional_attention="vision" if bidirectional else None),
                           config_overrides=dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
                                                 video_token_id=VIDEO))
    model.save_pretrained(path)
    path = os.fspath(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [1, TURN_END], "pad_token_id": 0, "max_new_tokens": 16, "max_denoising_steps": 5}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(MULTIMODAL_TEMPLATE)
    return path
