"""A complete tiny DiffusionGemma checkpoint to try dgemma without the real weights.

:func:`write_demo_checkpoint` writes what a released checkpoint holds — ``config.json``,
``generation_config.json``, safetensors weights, ``tokenizer.json``, ``tokenizer_config.json`` and
``chat_template.jinja`` — at the tiny preset's shapes with random weights and a small byte-level BPE
tokenizer trained on the spot. ``dgemma generate``, ``dgemma chat`` and :func:`dgemma.load` accept it;
its replies are random text, but every stage (template, tokenizer, encoder, denoising, EOS handling,
decoding) runs as it does on the real model.
"""

from __future__ import annotations

import json
import os

from . import __version__

# Gemma 4's control tokens, in its order (pad 0, eos 1, bos 2, unk 3), then its vision tokens.
CONTROL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
                  "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>",
                  '<|"|>']
VISION_TOKENS = ["<|image>", "<|image|>", "<image|>", "<|video|>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TURN_END_ID = CONTROL_TOKENS.index("<turn|>")
# begin-of-image, image placeholder, end-of-image: the ids the demo's config names for its vision tower.
IMAGE_TOKEN_IDS = tuple(len(CONTROL_TOKENS) + VISION_TOKENS.index(t) for t in ("<|image>", "<|image|>", "<image|>"))
VIDEO_TOKEN_ID = len(CONTROL_TOKENS) + VISION_TOKENS.index("<|video|>")

# The files write_demo_checkpoint writes; a directory holding only these may be overwritten.
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja")

# Enough text for a few hundred merges, including the words the chat template and replies use.
_CORPUS = [
    "The sky is blue because air scatters the short wavelengths of sunlight more than the long ones.",
    "Hello! How can I help you today? Tell me what you would like to know.",
    "Once upon a time there was a small robot who wanted to learn how to write poems.",
    "The weather in Paris today is sunny with a high of 21 degrees and a light wind.",
    "To make tea, boil water, pour it over the leaves and wait three to five minutes.",
    "Water freezes at 0 degrees Celsius and boils at 100 degrees at sea level.",
    "A block diffusion model drafts a whole block of text and refines it over a few steps.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "Python, C++ and CUDA: def main(): return 0 {} [] () <> = + - * / % , . ; : ! ? ' \" _",
    "user model system thought call response: Why? Because. Yes, no, maybe; thank you.",
    "Mixture-of-experts layers route every token to a few of many small feed-forward networks.",
    "Good morning, good evening, good night. See you tomorrow, and have a nice day!",
]
_MERGE_TARGET = 512  # the tiny preset's vocabulary size; training may stop a little short of it

# Gemma 4's turn format: <|turn>ROLE\n ... <turn|>\n; thinking switched on by <|think|> in the system
# turn; tools declared in the system turn; calls written as <|tool_call>call:NAME{...}<tool_call|> and
# results as <|tool_response>response:NAME{...}<tool_response|>; an image part is one <|image|>
# placeholder, which dgemma expands to the image's soft tokens.
CHAT_TEMPLATE = (
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
    "{{ '<|turn>' + ('model' if m.role == 'assistant' else 'user') + '\\n' }}"
    "{% if m.content is string or not m.content %}{{ m.content or '' }}{% else %}"
    "{% for part in m.content %}{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type == 'video' %}{{ '<|video|>' }}{% else %}{{ '<|image|>' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% for call in m.tool_calls or [] %}"
    "{{ '<|tool_call>call:' + call.function.name + (call.function.arguments | tojson) + '<tool_call|>' }}"
    "{% endfor %}"
    "{{ '<turn|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = _MERGE_TARGET, *, corpus: list[str] | None = None,
                    special_tokens: list[str] | None = None):
    """A byte-level BPE tokenizer (any text encodes) with Gemma 4's control and vision tokens at ids 0…19
    (or ``special_tokens``), trained on ``corpus`` (default: a few sentences of everyday text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = CONTROL_TOKENS + VISION_TOKENS if special_tokens is None else special_tokens
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    return tok


def _prefer_words(path: str, tok) -> None:
    """Shrink the (tied) embedding rows of single bytes and of control tokens other than the EOS ids.

    Logits are the final hidden state against these rows, so random weights then pick whole BPE pieces
    of the corpus and reply in a word salad instead of raw bytes (some of them terminal control codes)
    and stray control tokens; EOS keeps its weight, so replies still end at random."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    emb = tensors[key]
    keep = {EOS_ID, TURN_END_ID}
    for piece, i in tok.get_vocab().items():
        if i not in keep and (i < len(CONTROL_TOKENS) + len(VISION_TOKENS) or len(piece) == 1):
            emb[i] *= 0.1
    save_file(tensors, file, metadata={"format": "pt"})


def write_demo_checkpoint(path: str | os.PathLike, *, seed: int = 0, canvas_length: int = 32,
                          max_new_tokens: int = 64, max_denoising_steps: int = 8) -> str:
    """Write the tiny demo checkpoint into ``path`` (created if needed) and return the path.

    The generation defaults (``max_new_tokens``, ``max_denoising_steps``) are kept small so that a
    reply takes about a second on a CPU; EOS is ``<eos>`` or ``<turn|>``, as on the released model. It has a
    tiny vision tower, so chat messages may hold images."""
    from .random_checkpoint import TINY_VISION, write_random_checkpoint

    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    for i, t in enumerate(CONTROL_TOKENS + VISION_TOKENS):
        assert tok.token_to_id(t) == i, t
    path = write_random_checkpoint(path, "tiny", seed=seed, canvas_length=canvas_length, vocab_size=vocab,
                                   pad_token_id=PAD_ID, eos_token_id=[EOS_ID, TURN_END_ID], bos_token_id=BOS_ID,
                                   vision=TINY_VISION, image_token_ids=IMAGE_TOKEN_IDS, video_token_id=VIDEO_TOKEN_ID)
    _prefer_words(path, tok)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["dgemma_version"] = __version__  # which dgemma wrote it, as transformers records its own
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": config["text_config"]["max_position_embeddings"]}, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, TURN_END_ID], "pad_token_id": PAD_ID,
                   "max_new_tokens": max_new_tokens, "max_denoising_steps": max_denoising_steps,
                   "dgemma_version": __version__}, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return path
