"""Install a checkpoint of the nano run as the embedded default model, stablecode/models/stablecode-nano/.

Writes the bf16 weights, config (with its `stablecode_fim` flag), tokenizer, training config, loss
curve, training summary and the training manifest: every file of the corpus (package, version,
path, licence, sha256, bytes) marked as trained on, or held out, and every package dropped with
the reason. The attribution index is built afterwards by scripts/nano/build_index.sh (the model
directory is replaced as a whole here).
With --require-better HELDOUT_TREE (the recipe's default use) it installs the checkpoint only when
its bits per byte on those held-out files are below the installed model's, both measured here.
Usage: python scripts/nano/export.py [--run DIR] [--checkpoint DIR] [--corpus DIR] [--out DIR]
       [--require-better ~/.cache/stablecode/corpus/tree/heldout]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stablecode.checkpoint import load_model, save_checkpoint
from stablecode.registry import EMBEDDED_MODELS_DIR
from stablecode.train.checkpoints import latest_checkpoint

HOME = Path.home() / ".cache" / "stablecode"
RECIPE = ("scripts/nano/corpus.sh && scripts/nano/train.sh --foreground && "
          "RUN=nano-fim CONFIG=configs/nano-fim.json scripts/nano/train.sh --foreground && "
          "python scripts/nano/export.py --run ~/.cache/stablecode/runs/nano-fim "
          "--require-better ~/.cache/stablecode/corpus/tree/heldout && "
          "RUN=nano-wide CONFIG=configs/nano-wide.json scripts/nano/train.sh --foreground && "
          "RUN=nano-wide CONFIG=configs/nano-wide.json scripts/nano/train.sh --foreground --max-steps 12000 --lr 0.0004 && "
          "RUN=nano-wide CONFIG=configs/nano-wide.json scripts/nano/train.sh --foreground --max-steps 17500 --lr 0.0003 && "
          "python scripts/nano/export.py --run ~/.cache/stablecode/runs/nano-wide "
          "--require-better ~/.cache/stablecode/corpus/tree/heldout && scripts/nano/evaluate.sh")


def training_manifest(corpus: Path) -> dict:
    train = json.loads((corpus / "starcoder-train" / "manifest.json").read_text())
    heldout = json.loads((corpus / "starcoder-heldout" / "manifest.json").read_text())
    decisions = json.loads((corpus / "tree" / "decisions.json").read_text())
    packed = corpus / "packed"
    validation = {line.split("\t")[-1] for line in (packed / "validation_files.tsv").read_text().splitlines() if line}
    keys = ("package", "version", "path", "license", "sha256", "bytes")
    files, licences = [], {}
    for f in train["files"]:
        key = f["path"]  # the file id the pack split on
        split = "validation" if key in validation else "train"
        files.append({k: f.get(k) for k in keys} | {"split": split})
        if split == "train":
            licences[f["license"]] = licences.get(f["license"], 0) + 1
    files += [{k: f.get(k) for k in keys} | {"split": "heldout-package"} for f in heldout["files"]]
    index = json.loads((packed / "index.json").read_text())
    return {
        "recipe": RECIPE,
        "split_meaning": {"train": "in the training split", "validation": "held out by the pack (1% of files)",
                          "heldout-package": "configs/nano/heldout-packages.txt: evaluation set, never trained on"},
        "licences_of_training_files": dict(sorted(licences.items(), key=lambda kv: -kv[1])),
        "packages_kept": [{k: d[k] for k in ("name", "version", "license", "reason")} for d in decisions["kept"]],
        "packages_dropped": [{k: d[k] for k in ("name", "version", "reason")} for d in decisions["dropped"]],
        "duplicates_removed": decisions["duplicates"],
        "training_tokens_available": index["splits"]["train"]["num_tokens"],
        "fim": index["fim"],
        "files": files,
    }


def heldout_bits_per_byte(model_dir: Path, heldout: Path) -> float:
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_heldout", Path(__file__).with_name("eval_heldout.py"))
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    from stablecode import Completer

    completer = Completer(model_dir, dtype="float32")
    return evaluation.bits_per_byte(completer, evaluation.held_out_files(heldout))["bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=HOME / "runs" / "nano-main")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the run's newest complete one")
    parser.add_argument("--corpus", type=Path, default=HOME / "corpus")
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODELS_DIR / "stablecode-nano")
    parser.add_argument("--require-better", type=Path, default=None, metavar="HELDOUT_TREE",
                        help="install only if it beats the installed model on these held-out files (bits/byte)")
    args = parser.parse_args()

    checkpoint = args.checkpoint or latest_checkpoint(args.run / "checkpoints")
    if checkpoint is None:
        raise SystemExit(f"no complete checkpoint in {args.run / 'checkpoints'}")
    if args.require_better is not None and (args.out / "config.json").exists():
        candidate, installed = heldout_bits_per_byte(checkpoint, args.require_better), \
            heldout_bits_per_byte(args.out, args.require_better)
        print(f"held-out bits/byte: {checkpoint} {candidate:.4f}, installed {args.out} {installed:.4f}")
        if candidate >= installed:
            raise SystemExit("not installed: the checkpoint does not beat the installed model")
    model = load_model(checkpoint, dtype=torch.bfloat16)
    history = torch.load(checkpoint / "training_state.pt", weights_only=True, map_location="cpu")["history"]
    summary = {"checkpoint": checkpoint.name, "steps": history["step"][-1], "tokens_seen": history["tokens_seen"],
               "tokens_before": history.get("tokens_before", 0), "init_from": history.get("init_from"),
               "train_seconds": round(history["train_seconds"], 1),
               "tokens_per_second": round(history["tokens_seen"] / history["train_seconds"], 1),
               "final_train_loss": history["loss"][-1],
               "validation": dict(zip(map(str, history["val_step"]), history["val_loss"])),
               "parameters": model.config.num_parameters, "fim": model.config.fim}
    extra = {
        "train_config.json": (checkpoint / "train_config.json").read_bytes(),
        "training_manifest.json": json.dumps(training_manifest(args.corpus), separators=(",", ":")).encode(),
        "training_summary.json": json.dumps(summary, indent=2).encode(),
    }
    if (args.run / "loss.png").exists():
        extra["loss.png"] = (args.run / "loss.png").read_bytes()
    save_checkpoint(model, args.out, tokenizer_file=checkpoint / "tokenizer.json", extra_files=extra)
    print(f"installed {checkpoint} as {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
