#!/usr/bin/env python
"""Prompt attention at the 3B shape: the prompt attention kernel against PyTorch's SDPA, on this CPU.

The numbers behind `ops.use_prefill_attention`'s choice (docs/performance.md). One layer, 32 heads
of 80 dims, bf16 queries, keys and values, 2 threads: a whole causal prompt of T tokens, and an
engine chunk of 512 queries at the end of a longer prompt (SDPA then takes the chunk's mask, as the
engine gives it). Prints the best time of each, the ratio and the error of each against fp32 math.

    /work/timing.sh python scripts/bench/attention.py
    python scripts/bench/attention.py --lengths 256 --chunks 128:256 --min-time 0.05   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from stablecode import kernels
from stablecode.kernels import ops
from stablecode.machine import describe_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm import best_time  # noqa: E402  (a sibling script)


def case(queries: int, keys: int, heads: int, head_dim: int, min_time: float) -> dict:
    """Queries at slots keys-queries..keys-1 over keys 0..keys-1 (a whole prompt when they are equal)."""
    torch.manual_seed(0)
    start = keys - queries
    q = torch.randn(1, heads, queries, head_dim).bfloat16()
    k = torch.randn(1, heads, keys, head_dim).bfloat16()
    v = torch.randn(1, heads, keys, head_dim).bfloat16()
    slots = torch.arange(keys)
    mask = torch.zeros(queries, keys).masked_fill(slots[None, :] > (start + torch.arange(queries))[:, None],
                                                  float("-inf")).bfloat16()
    if start == 0:
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    row = {"queries": queries, "keys": keys, "sdpa_ms": 1e3 * best_time(sdpa, min_time),
           "sdpa_error": (sdpa().float() - reference).abs().max().item()}
    library = kernels.loaded()
    if library is not None and library.bf16_attention_available():
        def ours():
            return ops.prefill_attention(q, k, v, start)
        row["kernel_ms"] = 1e3 * best_time(ours, min_time)
        row["kernel_error"] = (ours().float() - reference).abs().max().item()
        row["sdpa_over_kernel"] = row["sdpa_ms"] / row["kernel_ms"]
    flops = 4 * heads * head_dim * (queries * start + queries * (queries + 1) / 2)  # the causal half
    row["sdpa_gflops"] = flops / row["sdpa_ms"] / 1e6
    row["engine_uses"] = "kernel" if ops.use_prefill_attention(q, k) else "SDPA"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,4000", help="whole causal prompts (tokens)")
    parser.add_argument("--chunks", default="512:2048,512:4000", help="QUERIES:KEYS engine chunks")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per case")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.load()
    print(describe_cpu())
    print(f"torch {torch.__version__}, {args.threads} threads; SDPA on AMX tiles: {ops.sdpa_on_tiles()}")
    shapes = [(int(t), int(t)) for t in args.lengths.split(",") if t]
    shapes += [tuple(int(n) for n in c.split(":")) for c in args.chunks.split(",") if c]
    rows = []
    print(f"{'queries':>8} {'keys':>6} {'SDPA ms':>9} {'kernel ms':>10} {'SDPA/kernel':>12} {'SDPA GFLOP/s':>13}"
          f" {'err SDPA':>9} {'err kernel':>10}")
    for queries, keys in shapes:
        row = case(queries, keys, args.heads, args.head_dim, args.min_time)
        rows.append(row)
        print(f"{queries:>8} {keys:>6} {row['sdpa_ms']:>9.2f} {row.get('kernel_ms', float('nan')):>10.2f}"
              f" {row.get('sdpa_over_kernel', float('nan')):>11.2f}x {row['sdpa_gflops']:>13.0f}"
              f" {row['sdpa_error']:>9.2e} {row.get('kernel_error', float('nan')):>10.2e}", flush=True)
    print("the engine uses:", rows[0]["engine_uses"] if rows else "-")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": describe_cpu(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
