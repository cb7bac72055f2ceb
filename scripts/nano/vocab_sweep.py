"""Bytes per token of a BPE tokenizer cut to smaller vocabularies, on held-out files.

A byte-level BPE learns its merges in order of frequency, so the first K ids of a tokenizer trained
to a larger size are (up to ties) the tokenizer that training to K would give: one training run
measures every size. Usage:
python scripts/nano/vocab_sweep.py TOKENIZER.json HELDOUT_CORPUS_DIR 4096 8192 12288 16384
"""

from __future__ import annotations

import json
import sys

from tokenizers import Tokenizer as HFTokenizer

from stablecode.data.starcoder import DataMix, iter_documents


def truncated(tokenizer_json: dict, size: int) -> HFTokenizer:
    data = json.loads(json.dumps(tokenizer_json))
    model = data["model"]
    base = len(model["vocab"]) - len(model["merges"])  # special tokens + byte alphabet
    model["merges"] = model["merges"][:size - base]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < size}
    return HFTokenizer.from_str(json.dumps(data))


def main() -> None:
    path, corpus, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    source = json.loads(open(path).read())
    texts = [d.content for batch in iter_documents(corpus, DataMix(("python",))) for d in batch]
    total = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} held-out files, {total:,} bytes")
    for size in sizes:
        tok = truncated(source, size)
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        print(f"vocab {size:6d}: {tokens:,} tokens, {total / tokens:.3f} bytes/token")


if __name__ == "__main__":
    main()
