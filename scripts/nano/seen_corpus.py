"""The text a training run has actually read, as a starcoderdata-layout corpus for `stablecode index build`.

The run's data order is a function of the step alone (stablecode.train.loop.BatchSampler), so the
sequences of steps 0..N-1 are known exactly. Each sequence is cut at its EOS tokens into the pieces
of the files it holds, decoded without special tokens (a FIM-rearranged file reads as its prefix,
suffix and middle, each contiguous) and written as one row attributed to that file, with its
package and licence from the corpus manifest. The attribution index of the shipped model is built
from this: what the model saw, not the whole corpus it could have seen.
Usage: python scripts/nano/seen_corpus.py --checkpoint DIR --corpus ~/.cache/stablecode/corpus --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stablecode.data.packing import PackedTokens
from stablecode.data.sources import SCHEMA
from stablecode.data.starcoder import DataMix, iter_documents
from stablecode.tokenizer import Tokenizer
from stablecode.train.loop import BatchSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    config = json.loads((args.checkpoint / "train_config.json").read_text())
    steps = torch.load(args.checkpoint / "training_state.pt", weights_only=True, map_location="cpu")["step"]
    data = PackedTokens(config["data"], "train")
    index = data.index
    tokenizer = Tokenizer.from_file(Path(config["data"]) / "tokenizer.json")
    global_batch = config["micro_batch_size"] * config["grad_accum_steps"]
    sampler = BatchSampler(len(data), global_batch, config["seed"])
    seen = sorted({int(i) for step in range(steps) for i in sampler.indices(step)})

    # Document k of the training stream is the k-th training file in pack order.
    eos_positions = np.flatnonzero(data.tokens(0, data.num_tokens) == index["eos_id"])
    manifest = {f["path"]: f for f in json.loads((args.corpus / "starcoder-train" / "manifest.json").read_text())["files"]}
    keys = [d.key for batch in iter_documents(index["data_dir"], DataMix(tuple(index["mix"]["languages"])),
                                              split="train", validation_fraction=index["validation_fraction"])
            for d in batch]
    if len(keys) != len(eos_positions):
        raise SystemExit(f"{len(keys)} training files but {len(eos_positions)} EOS tokens: not this pack's corpus")

    rows, seq_len = [], data.seq_len
    for i in seen:
        start, stop = i * seq_len, i * seq_len + seq_len + 1
        cuts = eos_positions[(eos_positions >= start) & (eos_positions < stop)]
        bounds = [start, *[int(c) + 1 for c in cuts], stop]
        for low, high in zip(bounds, bounds[1:]):
            if high <= low:
                continue
            document = int(np.searchsorted(eos_positions, low))  # the file whose EOS comes next
            text = tokenizer.decode(data.tokens(low, high).tolist())
            if not text.strip() or document >= len(keys):
                continue
            f = manifest.get(keys[document], {})
            rows.append({"content": text, "max_stars_repo_name": f"pypi/{f.get('package', '?')}",
                         "max_stars_repo_path": keys[document], "max_stars_count": None,
                         "id": f"{keys[document]}#tokens{low}-{high}", "language": "python",
                         "license": f.get("license"), "path": keys[document], "sha256": f.get("sha256"),
                         "size": len(text.encode("utf-8"))})
    out = args.out / "python"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / "train-00000-of-00001.parquet",
                   compression="zstd", row_group_size=4096)
    total = sum(r["size"] for r in rows)
    print(f"{steps} steps: {len(seen):,} sequences, {len(rows):,} file pieces, {total:,} bytes of text -> {out}")


if __name__ == "__main__":
    main()
