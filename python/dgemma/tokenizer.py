"""The checkpoint's tokenizer (``tokenizer.json``, via the ``tokenizers`` library) and its special tokens."""

from __future__ import annotations

import functools
import os

from .config import MAX_CONFIG_BYTES, read_json_file
from .errors import CheckpointError, DgemmaError


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def check_text(text, what: str = "text") -> None:
    """Refuse what the tokenizer cannot encode: a non-string, or a string with an unpaired surrogate
    (not valid Unicode text; e.g. half of an emoji's UTF-16 pair)."""
    if not isinstance(text, str):
        raise DgemmaError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DgemmaError(f"{what} has an unpaired surrogate (U+{ord(text[e.start]):04X}) at index {e.start}: "
                          f"expected valid Unicode text") from None


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no tokenizer.json; text input needs the checkpoint's tokenizer files "
                                  f"(or pass token ids)")
        try:
            with open(file, "rb") as f:  # read here: the library cannot open a path that is not UTF-8
                data = f.read()
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
        try:
            self._tok = _HFTokenizer.from_buffer(data)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise CheckpointError(f"{file}: not a valid tokenizer ({e})") from None
        self.config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            self.config = _read_config(cfg_file)
        check_template_file(os.path.join(path, "chat_template.jinja"))
        self.bos_token = _token_text(self.config.get("bos_token")) or "<bos>"
        self.eos_token = _token_text(self.config.get("eos_token")) or "<eos>"
        self.pad_token = _token_text(self.config.get("pad_token")) or "<pad>"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` exactly as written: special tokens in the text are recognised, none are added."""
        check_text(text)
        # encode_batch gives the same ids as encode and lets other threads run meanwhile (encode holds the GIL:
        # a server's other clients would wait for a long prompt).
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one vocabulary entry spells (an entry is never shorter than the text it covers)."""
        return max((len(k) for k in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def fewest_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of a text of ``chars`` characters, at no cost: a token covers at most
        ``longest_token`` characters (with a margin of 4x for normalisers that shorten a text, e.g. by composing
        characters)."""
        return chars // (4 * self.longest_token)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        # decode_batch gives decode's text and lets other threads run meanwhile (see encode).
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]


def _read_config(file: str) -> dict:
    """``tokenizer_config.json``: a JSON object, with ``add_bos_token`` (when set) a JSON boolean."""
    config = read_json_file(file, CheckpointError)
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise CheckpointError(f"{file}: add_bos_token = {add_bos!r:.40}, expected true or false")
    return config


def check_template_file(file: str) -> None:
    """A ``chat_template.jinja`` that is there must be readable UTF-8 text (checked with the tokenizer files, so
    that a corrupt one is a checkpoint error before any turn is rendered)."""
    if not os.path.isfile(file):
        return
    try:
        if os.path.getsize(file) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{file}: more than the limit of {MAX_CONFIG_BYTES} bytes for a chat template")
        with open(file, "rb") as f:
            f.read().decode("utf-8")
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
