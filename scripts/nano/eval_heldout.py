"""The embedded model on the held-out packages: bits per byte next to `xz -9e`, and single-line FIM.

- bits/byte: every held-out file scored whole (context windows of the model's length, each new
  window keeping the previous half as context), after an EOS as the training data has it; total
  nats / ln 2 / UTF-8 bytes: comparable across tokenizers. xz -9e compresses all the files concatenated (its best case).
- FIM: one line of a function body masked; the prompt is
  `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` (up to 1,200 characters of prefix and 600 of
  suffix), greedy until the first newline; exact match on stripped lines, as SantaCoder scores
  single-line infilling. The previous-line baseline is scored on the same lines.
Usage: python scripts/nano/eval_heldout.py --model DIR --heldout ~/.cache/stablecode/corpus/tree/heldout
       [--fim-lines 500] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stablecode import Completer
from stablecode.eval.lines import take_round_robin


def held_out_files(root: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8")) for p in files]


def windows(ids: list[int], context: int) -> list[tuple[list[int], int]]:
    """(window, first scored position) covering ids[1:]: full windows, each after the first keeping the
    previous half as context, so every token is predicted once with at least half a window before it."""
    out, scored, start = [], 1, 0
    while scored < len(ids):
        end = min(len(ids), start + context + 1)
        out.append((ids[start:end], scored - start))
        scored = end
        start = max(end - 1 - context // 2, 0)
    return out


@torch.inference_mode()
def bits_per_byte(completer: Completer, files: list[tuple[str, str]], batch_size: int = 8) -> dict:
    model, tokenizer = completer.model, completer.tokenizer
    context = completer.config.max_position_embeddings
    eos = completer.config.eos_token_id
    pieces = []
    for _, text in files:  # each file after an EOS, as the training stream has it
        pieces.extend(windows([eos] + tokenizer.encode(text), context))
    pieces.sort(key=lambda p: len(p[0]))  # similar lengths together: little padding
    nats, tokens = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start:start + batch_size]
        width = max(len(w) for w, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        weights = torch.zeros(len(batch), width - 1)
        for row, (window, first) in enumerate(batch):
            ids[row, :len(window)] = torch.tensor(window)
            weights[row, first - 1:len(window) - 1] = 1.0  # right padding: causal, so it changes nothing before it
        logits = model(ids[:, :-1].to(completer.device)).float().cpu()
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(weights)
        nats += float((losses * weights).sum())
        tokens += int(weights.sum())
    text_bytes = sum(len(text.encode("utf-8")) for _, text in files)
    joined = "".join(text for _, text in files).encode("utf-8")
    xz = len(lzma.compress(joined, preset=9 | lzma.PRESET_EXTREME)) * 8 / len(joined)
    bpb = nats / math.log(2) / text_bytes
    return {"files": len(files), "bytes": text_bytes, "tokens": tokens, "nats_per_token": nats / tokens,
            "bits_per_byte": bpb, "xz_9e_bits_per_byte": xz, "ratio_to_xz": bpb / xz}


def fim_examples(files: list[tuple[str, str]], count: int, seed: int = 0) -> list[dict]:
    """Lines inside function bodies (indented below a `def`), one random line per file per round."""
    rng = random.Random(seed)
    pools = []
    for name, text in files:
        lines = text.split("\n")
        offsets, offset = [], 0
        for line in lines:
            offsets.append(offset)
            offset += len(line) + 1
        candidates, in_def, def_indent = [], False, 0
        for i, line in enumerate(lines):
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            match = re.match(r"\s*(async\s+)?def\s", line)
            if match:
                in_def, def_indent = True, indent
                continue
            if stripped and indent <= def_indent and in_def:
                in_def = False
            if in_def and stripped and indent > def_indent and len(stripped) > 3 and not stripped.startswith("#"):
                previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                candidates.append({"source": name, "line": i + 1, "prefix": text[:offsets[i]],
                                   "middle": line, "suffix": text[offsets[i] + len(line):], "previous": previous})
        if candidates:
            rng.shuffle(candidates)
            pools.append(candidates)
    rng.shuffle(pools)
    return take_round_robin(pools, count)


def fim_exact_match(completer: Completer, examples: list[dict], batch_size: int = 8) -> dict:
    prompts = [f"<fim_prefix>{e['prefix'][-1200:]}<fim_suffix>{e['suffix'][:600]}<fim_middle>" for e in examples]
    predictions = []
    for start in range(0, len(prompts), batch_size):
        for completion in completer.complete_batch(prompts[start:start + batch_size], max_new_tokens=48,
                                                   temperature=0.0, stop=["\n"]):
            predictions.append(completion.text.split("\n", 1)[0])
    hits = [p.strip() == e["middle"].strip() for p, e in zip(predictions, examples)]
    baseline = [e["previous"].strip() == e["middle"].strip() for e in examples]
    return {"lines": len(examples), "exact_match": 100 * sum(hits) / len(hits),
            "baseline_previous_line": 100 * sum(baseline) / len(baseline),
            "examples": [{"source": e["source"], "line": e["line"], "target": e["middle"], "prediction": p,
                          "exact_match": h} for e, p, h in zip(examples, predictions, hits)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--heldout", required=True, type=Path, help="held-out tree (scripts/nano/corpus.sh)")
    parser.add_argument("--fim-lines", type=int, default=500, help="0: skip the FIM evaluation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    completer = Completer(args.model, dtype="float32")
    files = held_out_files(args.heldout)
    report = {"model": str(completer.model_dir), "bits_per_byte": bits_per_byte(completer, files)}
    if args.fim_lines:
        if not completer.config.fim:
            report["fim"] = "the model was not trained for fill-in-the-middle"
        else:
            report["fim"] = fim_exact_match(completer, fim_examples(files, args.fim_lines))
    report["seconds"] = round(time.perf_counter() - started, 1)
    summary = {k: v for k, v in report.items() if k != "fim"}
    if isinstance(report.get("fim"), dict):
        summary["fim"] = {k: v for k, v in report["fim"].items() if k != "examples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
