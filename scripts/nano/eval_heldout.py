"""Held-out loss of a model on packed validation data, next to what `xz -9` achieves on the same text.

Reports nats per token and bits per byte over every validation sequence (the files the model never
saw), and xz's bits per byte on exactly the text those tokens decode to.
Usage: python scripts/nano/eval_heldout.py [--model stablecode-nano] [--data work/nano/packed]
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from stablecode.checkpoint import load_model
from stablecode.data.packing import PackedTokens
from stablecode.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stablecode-nano")
    parser.add_argument("--data", default="work/nano/packed")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    model = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    tokenizer = load_tokenizer(args.model)
    data = PackedTokens(args.data, "validation")
    started = time.perf_counter()
    total_nats, total_tokens = 0.0, 0
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(data), args.batch_size):
            batch = np.stack([np.asarray(data[i], dtype=np.int64) for i in range(start, min(len(data), start + args.batch_size))])
            tokens = torch.from_numpy(batch)
            logits = model(tokens[:, :-1]).float()
            total_nats += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
            total_tokens += tokens[:, 1:].numel()
            # The predicted tokens of each window, decoded: consecutive windows share one token.
            pieces.extend(batch[:, 1:].tolist())
    text = tokenizer.decode([t for seq in pieces for t in seq])
    text_bytes = text.encode("utf-8")
    xz_bits = len(lzma.compress(text_bytes, preset=9 | lzma.PRESET_EXTREME)) * 8
    figures = {
        "model": str(args.model), "quantize": args.quantize, "dtype": args.dtype,
        "validation_sequences": len(data), "tokens": total_tokens, "bytes": len(text_bytes),
        "nats_per_token": total_nats / total_tokens,
        "bits_per_byte": total_nats / math.log(2) / len(text_bytes),
        "xz_9e_bits_per_byte": xz_bits / len(text_bytes),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
