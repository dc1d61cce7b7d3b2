"""The checkpoint's tokenizer (``tokenizer.json``, via the ``tokenizers`` library) and its special tokens."""

from __future__ import annotations

import json
import os

from .errors import CheckpointError


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: no tokenizer.json; text input needs the checkpoint's tokenizer files "
                                  f"(or pass token ids)")
        try:
            self._tok = _HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise CheckpointError(f"{file}: not a valid tokenizer ({e})") from None
        self.config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    self.config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
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
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
