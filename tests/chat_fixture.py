"""A small real tokenizer with the Gemma 4 control tokens, and a chat template in the Gemma 4 turn
format, written beside a tiny random checkpoint."""

from __future__ import annotations

import json
import os

from dgemma.random_checkpoint import write_random_checkpoint

CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
           "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", '<|"|>']
TURN_END = CONTROL.index("<turn|>")

CORPUS = [
    "The sky is blue because air scatters short wavelengths of sunlight more than long ones.",
    "What is the weather in Paris today? It is sunny and 21 degrees.",
    "call:get_weather{city:Paris,unit:celsius} response:get_weather{temperature:21}",
    "thought The user asks about the sky. I should answer briefly.",
    "model user system Hello! How can I help you today? 0123456789 {}[]:,.\"'-_",
] * 4

# Gemma 4 turn format: <|turn>ROLE\n...<turn|>\n; thinking switched on by <|think|> in the system turn;
# tool declarations in the system turn, calls as <|tool_call>call:NAME{...}<tool_call|>, results as
# <|tool_response>response:NAME{...}<tool_response|>.
TEMPLATE = (
    "{{ bos_token }}"
    "{% set first = messages[0] if messages else none %}"
    "{% if enable_thinking or tools or (first and first.role == 'system') %}"
    "{{ '<|turn>system\\n' }}"
    "{% if enable_thinking %}{{ '<|think|>' }}{% endif %}"
    "{% if first and first.role == 'system' %}{{ first.content }}{% endif %}"
    "{% for tool in tools or [] %}{{ '<|tool>' + (tool | tojson) + '<tool|>' }}{% endfor %}"
    "{{ '<turn|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% if m.role not in ['user', 'assistant', 'tool'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "{% if m.role == 'tool' %}"
    "{{ '<|tool_response>response:' + m.name + m.content + '<tool_response|>' }}"
    "{% else %}"
    "{{ '<|turn>' + ('model' if m.role == 'assistant' else 'user') + '\\n' + (m.content or '') }}"
    "{% for call in m.tool_calls or [] %}"
    "{{ '<|tool_call>call:' + call.function.name + (call.function.arguments | tojson) + '<tool_call|>' }}"
    "{% endfor %}"
    "{{ '<turn|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


# Gemma 4's vision tokens (begin of image, image soft token, end of image, video soft token).
VISION_TOKENS = ["<|image>", "<|image|>", "<image|>", "<|video|>"]
BOI, IMAGE, EOI = (len(CONTROL) + i for i in range(3))

# The same turn format with content parts: an image part is written as one <|image|> placeholder.
MULTIMODAL_TEMPLATE = TEMPLATE.replace(
    "(m.content or '')",
    "((m.content or '') if m.content is string else (m.content | map(attribute='text', default='<|image|>') "
    "| join('')))")


def build_tokenizer(vocab_size: int = 320, *, vision: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CONTROL + (VISION_TOKENS if vision else []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


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
                           config_overrides=dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI))
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
