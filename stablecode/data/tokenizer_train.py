"""`stablecode tokenizer train`: a StarCoder-style byte-level BPE for models smaller than the 3B.

Same construction as StarCoder's tokenizer: no normalizer; pre-tokenization splits every digit
on its own, then byte-level (GPT-2 regex, no prefix space); ByteLevel decoder; StarCoder's 19
special tokens first, so `<|endoftext|>` is id 0. Trained on the training split only: files held
out by `is_validation` at the given fraction are never read, so a model evaluated on them is
evaluated on text its tokenizer never saw either.
"""

from __future__ import annotations

import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stablecode.atomic import atomic_write_text
from stablecode.data import DataError
from stablecode.data.starcoder import DataMix, iter_documents, language_files

STARCODER_SPECIAL_TOKENS = (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
)


def new_tokenizer() -> HFTokenizer:
    """An untrained StarCoder-style byte-level BPE tokenizer."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(data_dir: str | Path, out: str | Path, vocab_size: int = 8192,
                    validation_fraction: float = 0.02, mix: DataMix | None = None, max_bytes: int | None = None,
                    min_frequency: int = 2, progress: bool = False, log=None) -> HFTokenizer:
    """Train on the training split of a starcoderdata-layout folder and write `out` (tokenizer.json).

    `max_bytes` stops reading after that much text (the trainer keeps word counts in memory).
    """
    out = Path(out)
    if out.is_dir():
        out = out / "tokenizer.json"
    minimum = len(STARCODER_SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab size must be at least {minimum} (special tokens + 256 bytes), got {vocab_size}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    mix = mix or DataMix()
    language_files(data_dir, mix)  # a missing or empty corpus fails here, before training starts
    read = {"documents": 0, "bytes": 0}

    def texts():
        for docs in iter_documents(data_dir, mix, split="train", validation_fraction=validation_fraction):
            batch = [d.content for d in docs]
            read["documents"] += len(batch)
            read["bytes"] += sum(len(t.encode("utf-8")) for t in batch)
            yield batch
            if max_bytes is not None and read["bytes"] >= max_bytes:
                return

    started = time.monotonic()
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(STARCODER_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts(), trainer)
    if read["documents"] == 0:
        raise DataError(f"{data_dir}: empty corpus: no training documents (validation fraction {validation_fraction})")
    atomic_write_text(out, tok.to_str(pretty=True))
    if log:
        log(f"trained a {tok.get_vocab_size()}-token tokenizer on {read['documents']:,} files "
            f"({read['bytes']:,} bytes) in {time.monotonic() - started:.1f}s; wrote {out}")
    return tok
