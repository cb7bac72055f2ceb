"""Full-size parity: our 3B logits vs transformers' GPTNeoXForCausalLM on the same random weights.

    python scripts/bench/check_full_size.py                 # fp32 and bf16, 256-token prompt
    python scripts/bench/check_full_size.py --dtypes float32 --tokens 64

The 3B preset is written once with `stablecode init` (bf16 on disk, 5.5 GB) and reused. Each
(engine, dtype) loads it in its own subprocess, one after the other, and saves its logits to disk,
so at most one model (11 GB in fp32) is in memory at a time and the whole check fits in 24 GB.
bf16 weights upcast to fp32 exactly, so the fp32 runs compare the same network bit for bit.
Our run also decodes the last tokens one at a time through the KV cache and compares them with
the full forward pass. Peak RSS per run comes from getrusage (the bf16 load should stay near 5.5 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "stablecode-completion-alpha-3b-4k"
CACHED_STEPS = 8


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux


def input_ids(vocab_size: int, length: int):
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(7))


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.engine == "ours":
        from stablecode.checkpoint import load_model
        from stablecode.kv_cache import KVCache

        model = load_model(args.checkpoint, dtype=args.dtype)
    else:
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype).eval()
    load_s, load_rss = time.perf_counter() - start, peak_rss_gib()
    ids = input_ids(model.config.vocab_size, args.tokens)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids) if args.engine == "ours" else model(ids).logits
    forward_s = time.perf_counter() - start
    result = dict(engine=args.engine, dtype=args.dtype, load_s=load_s, load_peak_rss_gib=load_rss,
                  forward_s=forward_s)
    if args.engine == "ours":
        # The KV-cache path: prefill all but the last tokens, then one token per step.
        prefix = args.tokens - CACHED_STEPS
        with torch.inference_mode():
            cache = KVCache.for_model(model, 1, args.tokens)
            model(ids[:, :prefix], cache=cache, input_pos=0)
            steps = torch.cat([model(ids[:, t:t + 1], cache=cache, input_pos=t) for t in range(prefix, args.tokens)], dim=1)
        result["cached_vs_full_max_abs_diff"] = (steps.float() - logits[:, prefix:].float()).abs().max().item()
    torch.save(logits.float(), args.out)
    result["peak_rss_gib"] = peak_rss_gib()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint directory (default: a random 3B one in the temp dir, written with "
                             "`stablecode init` if absent)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", dest="engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        worker(args)
        return

    import torch

    begin = time.perf_counter()
    if args.checkpoint is None:
        args.checkpoint = Path(tempfile.gettempdir()) / f"stablecode-{PRESET}-random-bf16"
    if not (args.checkpoint / "config.json").exists():
        print(f"check: writing a random {PRESET} checkpoint to {args.checkpoint} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "stablecode.cli", "init", "--preset", PRESET, "--out",
                        str(args.checkpoint), "--dtype", "bfloat16"], check=True)
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.dtypes:
            for engine in ("ours", "transformers"):
                print(f"check: {engine} {dtype} ...", file=sys.stderr, flush=True)
                out = Path(scratch) / f"{engine}-{dtype}.pt"
                stdout = subprocess.run(
                    [sys.executable, __file__, "--worker", engine, "--dtype", dtype, "--checkpoint",
                     str(args.checkpoint), "--tokens", str(args.tokens), "--threads", str(args.threads),
                     "--out", str(out)], check=True, stdout=subprocess.PIPE, text=True).stdout
                result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
                results[engine, dtype] = result
                logits[engine, dtype] = torch.load(out)
                print(f"check:   load {result['load_s']:.1f} s, forward {result['forward_s']:.1f} s, "
                      f"peak RSS after load {result['load_peak_rss_gib']:.2f} GiB, peak {result['peak_rss_gib']:.2f} GiB",
                      file=sys.stderr, flush=True)

    name = json.loads((args.checkpoint / "config.json").read_text()).get("stablecode_name", args.checkpoint.name)
    print(f"\n{name}, random weights from {args.checkpoint}, {args.tokens} tokens, {args.threads} threads\n")
    print("| dtype | engine | load (s) | forward (s) | peak RSS after load (GiB) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for (engine, dtype), r in results.items():
        print(f"| {dtype} | {engine} | {r['load_s']:.1f} | {r['forward_s']:.1f} | {r['load_peak_rss_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} |")
    print()
    for dtype in args.dtypes:
        ours, theirs = logits["ours", dtype], logits["transformers", dtype]
        diff = (ours - theirs).abs().max().item()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        line = f"{dtype}: max abs diff of logits {diff:.3g}, same argmax at {agree:.2%} of positions"
        if dtype != "float32" and ("ours", "float32") in logits:
            exact = logits["ours", "float32"]
            line += (f"; distance to fp32: ours {(ours - exact).abs().max().item():.3g}, "
                     f"transformers {(theirs - exact).abs().max().item():.3g}")
        print(line)
        print(f"{dtype}: KV-cache decoding of the last {CACHED_STEPS} tokens vs full forward, max abs diff "
              f"{results['ours', dtype]['cached_vs_full_max_abs_diff']:.3g}")
    print(f"\ntotal time {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
