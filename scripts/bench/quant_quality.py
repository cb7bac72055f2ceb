#!/usr/bin/env python
"""Quality of int8 / int4 quantization against the float model.

Trained checkpoint (e.g. the embedded stablecode-nano): mean next-token loss and perplexity on
real code (CPython standard library files) for float, int8 and int4 at several group sizes.
Any checkpoint (e.g. the 3B shape with random weights): logits error against float on the same
text: max / mean abs error relative to the logits' spread, and argmax agreement.

--prompts says how the quantized layers multiply the windows: through the decode kernels
(activations int8 per token, summed exactly in int32; the path that picks
tokens; the default), the prompt GEMMs (activations int8 per token, AMX-INT8 or AVX-512 VNNI
CPUs) or dequantized float weights; several give the
loss delta that activation quantization adds on its own. --kv-caches runs the windows through a
KV cache too (`auto`: the model's dtype; `int8`: int8 keys and values with a scale per row, which
attention reads back dequantized), for the loss delta an int8 cache adds. A checkpoint with a
training manifest (the embedded model) is evaluated on the files its training held out.

    python scripts/bench/quant_quality.py --model stablecode-nano --tokens 20000
    python scripts/bench/quant_quality.py --model stablecode-nano --group-sizes 64 --prompts float,int8,decode
    python scripts/bench/quant_quality.py --model work/bench/bf16 --tokens 256 --windows 1
    python scripts/bench/quant_quality.py --model stablecode-nano --group-sizes 64 --kv-caches auto,int8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stablecode import load_model, load_tokenizer
from stablecode import quantize as Q
from stablecode.kernels import ops
from stablecode.kv_cache import KVCache
from stablecode.registry import resolve_model_dir


def held_out_ids(directory: Path, tokenizer, count: int) -> list[int] | None:
    """Token ids of the files a trained checkpoint's training manifest says were held out, or None."""
    manifest = directory / "training_manifest.json"
    if not manifest.exists():
        return None
    spec = json.loads(manifest.read_text())
    if "source" not in spec or "held_out_files" not in spec:  # a manifest of another layout: stdlib instead
        return None
    source = Path(spec["source"])
    if not source.is_dir():
        return None
    ids: list[int] = []
    for name in spec["held_out_files"]:
        ids += tokenizer.encode((source / name).read_text(encoding="utf-8", errors="replace")) + [tokenizer.eos_id]
        if len(ids) >= count:
            break
    return ids[:count]


def stdlib_ids(tokenizer, count: int, skip: int = 100) -> list[int]:
    """Token ids of CPython standard-library files (the `skip` first files sorted by name are left out)."""
    ids: list[int] = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip:]:
        ids += tokenizer.encode(file.read_text(encoding="utf-8", errors="replace")) + [tokenizer.eos_id]
        if len(ids) >= count:
            break
    return ids[:count]


@torch.inference_mode()
def evaluate(model, windows: list[torch.Tensor], kv_cache: str = "none") -> tuple[float, torch.Tensor]:
    """Mean next-token loss over the windows, and the logits of the first window; kv_cache "none"
    runs each window on its own, "auto" / "int8" through a KV cache of that kind."""
    total, count, first = 0.0, 0, None
    for ids in windows:
        if kv_cache == "none":
            logits = model(ids[None])[0].float()
        else:
            cache = KVCache.for_model(model, 1, ids.numel(), kv_cache_dtype=kv_cache)
            logits = model(ids[None], cache=cache, input_pos=0)[0].float()
        if first is None:
            first = logits
        total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return total / count, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or embedded model name")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=None, help="at most this many windows")
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--prompts", default="decode",
                        help="comma-separated ways the quantized layers multiply the windows: decode (the "
                             "decode kernels: activations int8 per token), int8 (the prompt GEMMs, activations int8 per token, where the CPU has "
                             "AMX-INT8 or AVX-512 VNNI), float (dequantized weights)")
    parser.add_argument("--kv-caches", default="none",
                        help="comma-separated: none (no cache), auto (a cache of the model's dtype), int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    held_out = held_out_ids(directory, tokenizer, args.tokens)
    ids = torch.tensor(held_out if held_out is not None else stdlib_ids(tokenizer, args.tokens))
    windows = [w for w in ids.split(args.window) if w.numel() > 1][:args.windows]
    print(f"{directory}: {sum(w.numel() for w in windows)} tokens of CPython stdlib code "
          f"({'the files its training held out' if held_out is not None else 'stdlib files'}) in "
          f"{len(windows)} windows of {args.window}", file=sys.stderr)

    rows = []
    prompts = args.prompts.split(",")
    methods = [("int8", "int8", None)] + [(f"int4 g{g}", "int4", int(g)) for g in args.group_sizes.split(",")]
    variants = [("float", None, None, None)] + [
        (f"{name}, {how} activations" if len(prompts) > 1 else name, method, group_size, how)
        for name, method, group_size in methods for how in prompts]
    kv_caches = args.kv_caches.split(",")
    variants = [(name + ("" if kv == "none" else f", {kv} KV cache"), method, group_size, how, kv)
                for name, method, group_size, how in variants for kv in kv_caches]
    reference = None
    decode_rows = ops.DECODE_MAX_ROWS
    for name, method, group_size, how, kv_cache in variants:
        model = load_model(directory)
        if method:
            Q.quantize_model(model, method, **({"group_size": group_size} if group_size else {}))
            # decode: every row through the decode kernels; otherwise prompts take the prompt path.
            ops.DECODE_MAX_ROWS = 1 << 30 if how == "decode" else decode_rows
            Q.set_prompt_precision(model, "float" if how == "float" else "int8")
        start = time.perf_counter()
        loss, logits = evaluate(model, windows, kv_cache)
        elapsed = time.perf_counter() - start
        row = dict(variant=name, loss=loss, perplexity=math.exp(loss), seconds=elapsed)
        if reference is None:
            reference = logits
        else:
            spread = reference.std().item()
            error = (logits - reference).abs()
            row.update(max_abs_error=error.max().item(), mean_abs_error=error.mean().item(),
                       relative_error=((logits - reference).norm() / (reference - reference.mean()).norm()).item(),
                       spread=spread, argmax_agreement=(logits.argmax(-1) == reference.argmax(-1)).float().mean().item())
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del model

    print("| variant | mean loss | perplexity | Δ loss | rel. logits error | max abs error | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["loss"]
    for r in rows:
        extra = (f"{r['relative_error']:.4f} | {r['max_abs_error']:.3f} | {100 * r['argmax_agreement']:.1f}%"
                 if "relative_error" in r else "— | — | —")
        print(f"| {r['variant']} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['loss'] - base:+.4f} | {extra} |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
