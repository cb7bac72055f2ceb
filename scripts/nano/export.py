"""Install a trained nano run as the embedded default model, stablecode/models/stablecode-nano/.

Writes the bf16 weights, the tokenizer, the training config, the loss curve and a training manifest
(every file and licence that went in, and the held-out files), then the attribution index is built
by scripts/nano/build_index.sh. Usage: python scripts/nano/export.py [RUN_DIR] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stablecode.checkpoint import load_model, save_checkpoint
from stablecode.registry import EMBEDDED_MODELS_DIR

ROOT = Path(__file__).resolve().parents[2]


def training_manifest(corpus: Path, packed: Path) -> dict:
    corpus_manifest = json.loads((corpus / "manifest.json").read_text())
    held_out = set()
    for line in (packed / "validation_files.tsv").read_text().splitlines():
        if line.strip():
            held_out.add(line.split("\t")[-1])
    files = corpus_manifest["files"]
    trained = [f for f in files if f["path"] not in held_out]
    licences: dict[str, int] = {}
    for f in trained:
        licences[f["license"]] = licences.get(f["license"], 0) + 1
    return {
        "source": corpus_manifest["source"],
        "repository": corpus_manifest.get("repo_name"),
        "licences": licences,
        "training_files": [{k: f[k] for k in ("path", "sha256", "language", "license", "bytes")} for f in trained],
        "held_out_files": sorted(held_out),
        "training_tokens_available": json.loads((packed / "index.json").read_text())["splits"]["train"]["num_tokens"],
        "rebuild": "scripts/nano/data.sh && stablecode train --config configs/nano.json && "
                   "python scripts/nano/export.py && scripts/nano/build_index.sh",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=ROOT / "runs" / "nano")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: RUN/final")
    parser.add_argument("--corpus", type=Path, default=ROOT / "work" / "nano" / "corpus")
    parser.add_argument("--packed", type=Path, default=ROOT / "work" / "nano" / "packed")
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODELS_DIR / "stablecode-nano")
    args = parser.parse_args()

    checkpoint = args.checkpoint or args.run / "final"
    model = load_model(checkpoint, dtype=torch.bfloat16)
    history = torch.load(next(iter(sorted((args.run / "checkpoints").glob("step-*"))[-1:])) / "training_state.pt",
                         weights_only=True)["history"]
    summary = {"steps": history["step"][-1], "tokens_seen": history["tokens_seen"],
               "train_seconds": round(history["train_seconds"], 1),
               "tokens_per_second": round(history["tokens_seen"] / history["train_seconds"], 1),
               "final_train_loss": history["loss"][-1],
               "validation": dict(zip(history["val_step"], history["val_loss"]))}
    extra = {
        "train_config.json": (checkpoint / "train_config.json").read_bytes(),
        "training_manifest.json": json.dumps(training_manifest(args.corpus, args.packed), indent=1).encode(),
        "training_summary.json": json.dumps(summary, indent=2).encode(),
    }
    if (args.run / "loss.png").exists():
        extra["loss.png"] = (args.run / "loss.png").read_bytes()
    save_checkpoint(model, args.out, tokenizer_file=checkpoint / "tokenizer.json", extra_files=extra)
    print(f"installed {checkpoint} as {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
