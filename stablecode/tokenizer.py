"""The tokenizer that sits next to the weights (`tokenizer.json`), through Hugging Face `tokenizers`."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from stablecode.errors import TokenizerError
from stablecode.registry import require_regular_file, resolve_model_dir

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Byte-level BPE tokenizer: `encode(text) -> ids`, `decode(ids) -> text` (special tokens dropped)."""

    def __init__(self, backend: HFTokenizer, source: str = "tokenizer.json"):
        self.backend = backend
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special)
        eos = backend.token_to_id(EOS_TOKEN)
        self.eos_id = 0 if eos is None else eos
        self._token_texts: list[str] | None = None
        self._extensions: dict[str, list[int]] = {}  # tokens_starting_with, per text: editors repeat a few

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{path}: tokenizer.json not found (it must sit next to the weights)")
        require_regular_file(path, TokenizerError)
        try:
            return cls(HFTokenizer.from_file(str(path)), source=str(path))
        except Exception as e:  # the Rust library raises a plain Exception for bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def tokens_starting_with(self, text: str) -> list[int]:
        """Ids of the ordinary (not special) tokens whose text starts with `text`."""
        found = self._extensions.get(text)
        if found is None:
            if self._token_texts is None:
                self._token_texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)],
                                                              skip_special_tokens=False)
            found = [i for i, t in enumerate(self._token_texts) if t.startswith(text) and i not in self.special_ids]
            if len(self._extensions) >= 4096:  # a bound on memory; the scan takes a few ms at 49k tokens
                self._extensions.clear()
            self._extensions[text] = found
        return list(found)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path: str | os.PathLike | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a tokenizer.json file, a cached Hub id or an embedded
    model name. With `vocab_size` (the model's), a tokenizer that can produce ids the model has no
    embedding for is refused here, not by an IndexError in the middle of a request."""
    if path is not None and Path(path).is_file():
        tokenizer = Tokenizer.from_file(path)
    else:
        tokenizer = Tokenizer.from_file(resolve_model_dir(path))
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model's "
                             f"vocabulary is {vocab_size:,}; they do not belong together")
    return tokenizer


class IncrementalDecoder:
    """Turns tokens arriving one at a time into text pieces.

    Decodes a short window of recent tokens and emits only the new suffix, holding it back while
    it ends in an incomplete UTF-8 sequence, so no character is ever broken, dropped or repeated.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. bytes that never completed a character)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
