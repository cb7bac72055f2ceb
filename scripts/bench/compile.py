"""Decode step, eager against `torch.compile`, for each weight format and kernel choice.

    python scripts/bench/compile.py --work work/bench [--formats bf16,int8,int4] [--tokens 32]

Each variant runs in its own process (the kernel choice, STABLECODE_KERNELS, is fixed per process):
our kernels or PyTorch's own weight-only ops, eager or with the whole model compiled by
`torch.compile` (the kernels are torch custom ops, so the graph keeps them and inductor fuses the
norms, rotary, attention glue, GELU and residual adds between them). The KV cache is filled with
random keys and values for `--context` positions instead of running a prefill: a decode step costs
the same either way. Timings are medians of per-token wall times after warm-up; compile time is
reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker(model_dir: str, compiled: bool, context: int, tokens: int, threads: int) -> dict:
    import torch

    from stablecode.checkpoint import load_model
    from stablecode.kv_cache import KVCache

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    cache = KVCache.for_model(model, 1, context + tokens + 8)
    generator = torch.Generator().manual_seed(0)
    cache.k[..., :context, :].copy_(torch.randn(cache.k[..., :context, :].shape, generator=generator))
    cache.v[..., :context, :].copy_(torch.randn(cache.v[..., :context, :].shape, generator=generator))
    step = torch.compile(model) if compiled else model
    token = torch.tensor([[17]])
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        # Two warm-up steps: the first compiles for a fixed position, the second for any position.
        for position in range(context, context + 2):
            step(token, cache=cache, input_pos=position)
        warmup = time.perf_counter() - start
        for position in range(context + 2, context + 2 + tokens):
            start = time.perf_counter()
            logits = step(token, cache=cache, input_pos=position)
            times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    median = statistics.median(times)
    return {"warmup_s": warmup, "median_step_ms": median * 1e3, "tokens_per_s": 1 / median,
            "min_step_ms": min(times) * 1e3, "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench",
                        help="holds bf16/, int8/, int4/ checkpoints (scripts/bench/cpu.py prepares them)")
    parser.add_argument("--formats", default="bf16,int8,int4")
    parser.add_argument("--kernels", default="native,torch", help="native (ours), torch (PyTorch's own ops)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.compiled, args.context, args.tokens, args.threads)))
        return

    results = []
    for fmt in args.formats.split(","):
        for kernel_choice in args.kernels.split(","):
            for mode in args.modes.split(","):
                command = [sys.executable, __file__, "--worker", "--model", str(args.work / fmt),
                           "--context", str(args.context), "--tokens", str(args.tokens),
                           "--threads", str(args.threads)] + (["--compiled"] if mode == "compiled" else [])
                env = dict(os.environ, STABLECODE_KERNELS=kernel_choice)
                run = subprocess.run(command, env=env, capture_output=True, text=True)
                row = {"format": fmt, "kernels": kernel_choice, "mode": mode, "load_average": os.getloadavg()[0]}
                if run.returncode != 0:
                    row["error"] = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
                else:
                    row.update(json.loads(run.stdout.strip().splitlines()[-1]))
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| weights | kernels | mode | decode tok/s | median step | warm-up (compile) |\n|---|---|---|---|---|---|")
    for row in results:
        if "error" in row:
            print(f"| {row['format']} | {row['kernels']} | {row['mode']} | failed: {row['error']} | | |")
        else:
            print(f"| {row['format']} | {row['kernels']} | {row['mode']} | {row['tokens_per_s']:.2f} | "
                  f"{row['median_step_ms']:.0f} ms | {row['warmup_s']:.1f} s |")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
