#!/usr/bin/env python
"""Prompt GEMM candidates at the 3B layer shapes, in one table on this machine.

Every candidate computes one projection y = x W^T (+ bias) for M activation rows:
fp32 and bf16 F.linear (oneDNN), PyTorch's dynamic quantized linear under each quantized engine
(fbgemm, x86, onednn, qnnpack), torch._int_mm (oneDNN s8 x s8 -> s32), oneDNN's qlinear_pointwise
(the op torch.compile's x86 int8 path calls), torchao's int8 dynamic-activation layer, and our own
layers (stablecode.quantize) on the path they take for M rows.

"full" times include the activation quantization and rescale a layer needs; "GEMM" times only the
int8 product. GOP/s counts 2*M*N*K operations. Peaks: the fastest fp32, bf16 and int8 GEMM found.

    /work/timing.sh python scripts/bench/gemm.py                 # M = 512 and M = 1
    python scripts/bench/gemm.py --m 64 --shapes 256x512 --min-time 0.05   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from stablecode.machine import cpu_flags, describe_cpu

SHAPES = {"qkv": (2560, 7680), "dense": (2560, 2560), "h_to_4h": (2560, 10240), "4h_to_h": (10240, 2560)}


def best_time(fn, min_time: float, max_reps: int = 50) -> float:
    fn()  # warm up: prepacking, oneDNN primitive creation
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token): (q, scale[M, 1])."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 127.0
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def candidates(K: int, N: int, M: int, only: set[str] | None):
    """(name, kind, callable) for every candidate that works here; kind: fp32, bf16, int8, int4."""
    torch.manual_seed(0)
    w = torch.randn(N, K) * K ** -0.5
    b = torch.randn(N) * 0.01
    x = torch.randn(M, K)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    wq_scale = w.abs().amax(dim=1) / 127.0
    wq = torch.round(w / wq_scale[:, None]).clamp(-127, 127).to(torch.int8)
    wq_t = wq.t().contiguous()  # [K, N] for _int_mm

    out = []

    def add(name, kind, fn):
        if only is None or any(o in name for o in only):
            out.append((name, kind, fn))

    add("fp32 F.linear", "fp32", lambda: F.linear(x, w, b))
    add("bf16 F.linear", "bf16", lambda: F.linear(xb, wb, bb))

    for engine in torch.backends.quantized.supported_engines:
        def make(engine=engine):
            torch.backends.quantized.engine = engine
            qw = torch.quantize_per_channel(w, wq_scale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qw, b)

            def run():
                torch.backends.quantized.engine = engine
                return torch.ops.quantized.linear_dynamic(x, packed, False)
            return run
        try:
            fn = make()
            fn()
            add(f"dynamic quantized linear ({engine})", "int8", fn)
        except Exception as e:  # an engine this build lists but cannot run
            print(f"  skip dynamic quantized linear ({engine}): {str(e).splitlines()[0]}", file=sys.stderr)

    if M > 16:
        xq, xs = quantize_rows(x)
        add("torch._int_mm GEMM only, B [K,N]", "int8", lambda: torch._int_mm(xq, wq_t))
        add("torch._int_mm GEMM only, B = W.t() view", "int8", lambda: torch._int_mm(xq, wq.t()))

        def int_mm_full():
            q, s = quantize_rows(x)
            return torch._int_mm(q, wq.t()).float().mul_(s).mul_(wq_scale).add_(b)
        add("torch._int_mm full (quantize, GEMM, rescale)", "int8", int_mm_full)

    try:
        packed_w = torch.ops.onednn.qlinear_prepack(wq, [M, K])
        w_scales, w_zps = wq_scale.float(), torch.zeros(N, dtype=torch.int32)
        x_scale = float(x.abs().max()) / 127.0
        xu8 = (torch.round(x / x_scale) + 128).clamp(0, 255).to(torch.uint8)

        def qlinear():
            return torch.ops.onednn.qlinear_pointwise(xu8, x_scale, 128, packed_w, w_scales, w_zps, b, 1.0, 0,
                                                      torch.float32, "none", [], "")
        qlinear()
        add("onednn qlinear_pointwise GEMM only (u8 x s8, per-tensor x)", "int8", qlinear)
    except Exception as e:
        print(f"  skip onednn qlinear_pointwise: {str(e).splitlines()[0]}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        layer = torch.nn.Linear(K, N)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        with torch.inference_mode():
            layer(x)
        add("torchao Int8DynamicActivationInt8Weight (eager)", "int8", lambda: layer(x))
    except Exception as e:
        print(f"  skip torchao: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)

    from stablecode import kernels
    from stablecode import quantize as Q
    from stablecode.kernels import ops

    kernels.load()

    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    i8 = Q.Int8Linear.from_linear(lin)
    i4 = Q.Int4Linear.from_linear(lin)
    i8f, i4f = Q.Int8Linear.from_linear(lin), Q.Int4Linear.from_linear(lin)
    i8f.prompt_precision = i4f.prompt_precision = "float"
    path = f"{ops.prompt_isa()} int8" if M > ops.DECODE_MAX_ROWS and ops.use_prompt_kernels(x, N) else \
        "decode kernel" if M <= ops.DECODE_MAX_ROWS else "dequantize + float GEMM"
    add(f"ours Int8Linear ({path}), fp32 input", "int8", lambda: i8(x))
    add(f"ours Int8Linear ({path}), bf16 input", "int8", lambda: i8(xb))
    add(f"ours Int4Linear ({path}), bf16 input", "int4", lambda: i4(xb))
    library = kernels.loaded()
    if M > ops.DECODE_MAX_ROWS and ops.prompt_isa() == "amx" and "avx512_vnni" in cpu_flags():
        add("ours prompt GEMM forced to avx512-vnni (the path of VNNI CPUs without AMX), bf16 input", "int8",
            lambda: library.prompt_int8_linear(xb, wq, wq_scale, bb, "avx512-vnni"))
    if M > ops.DECODE_MAX_ROWS and ops.prompt_isa() in ("amx", "avx512-vnni"):
        add("ours prompt GEMM forced to avx2 (the path of AVX2-only CPUs), bf16 input", "int8",
            lambda: library.prompt_int8_linear(xb, wq, wq_scale, bb, "avx2"))
        add("ours int4 prompt GEMM forced to avx2 (the path of AVX2-only CPUs), bf16 input", "int4",
            lambda: library.prompt_int4_linear(xb, i4.weight, i4.scale, i4.min, i4.group_size, bb, "avx2"))
    if M > ops.DECODE_MAX_ROWS:
        add("ours Int8Linear prompt_precision=float (dequantize + bf16 GEMM)", "int8", lambda: i8f(xb))
        add("ours Int4Linear prompt_precision=float (dequantize + bf16 GEMM)", "int4", lambda: i4f(xb))
    bl = torch.nn.Linear(K, N).to(torch.bfloat16)
    with torch.no_grad():
        bl.weight.copy_(wb)
        bl.bias.copy_(bb)
    bl.__class__ = Q.Bf16Linear
    add("ours Bf16Linear, bf16 input", "bf16", lambda: bl(xb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="512,1", help="comma-separated row counts")
    parser.add_argument("--shapes", default=None, help="KxN,... (default: the 3B layer shapes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--only", default=None, help="comma-separated substrings of candidate names")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = ({name: tuple(int(v) for v in name.split("x")) for name in args.shapes.split(",")}
              if args.shapes else SHAPES)
    only = set(args.only.split(",")) if args.only else None
    print(f"# {describe_cpu()}; {args.threads} threads")
    results = []
    with torch.inference_mode():
        for M in (int(m) for m in args.m.split(",")):
            for shape, (K, N) in shapes.items():
                for name, kind, fn in candidates(K, N, M, only):
                    seconds = best_time(fn, args.min_time)
                    results.append(dict(M=M, shape=shape, K=K, N=N, name=name, kind=kind, seconds=seconds,
                                        gops=2 * M * N * K / seconds / 1e9))
                    print(f"  M={M} {shape} {name}: {seconds * 1e3:.2f} ms, {results[-1]['gops']:.0f} GOP/s",
                          file=sys.stderr, flush=True)
    print(report(results))
    from stablecode import kernels

    library = kernels.load()
    if library is not None:  # the multiply-add ceilings from registers, each instruction set this CPU has
        for isa in ("amx", "avx512-vnni", "avx2"):
            try:
                ops_per_s, timed = max(library.int8_peak(20_000_000, isa) for _ in range(3))
            except RuntimeError:  # not on this CPU
                continue
            if timed:
                print(f"int8 multiply-add from registers ({timed}): {ops_per_s / 1e9:.0f} GOP/s")
    if args.output:
        args.output.write_text(json.dumps(dict(cpu=describe_cpu(), threads=args.threads, results=results), indent=2))


def report(results: list[dict]) -> str:
    lines = []
    for M in sorted({r["M"] for r in results}, reverse=True):
        rows = [r for r in results if r["M"] == M]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        # int4 layers are measured against the int8 peak: their products run in int8.
        peak = {kind: max(r["gops"] for r in rows if r["kind"] == kind) for kind in {r["kind"] for r in rows}}
        peak["int4"] = peak.get("int8", peak.get("int4"))
        lines += ["", f"M = {M}: GOP/s per shape (ms), and the mean fraction of the best GEMM of its kind",
                  "| candidate | " + " | ".join(shapes) + " | of peak |", "|---" * (len(shapes) + 2) + "|"]
        for name in dict.fromkeys(r["name"] for r in rows):
            cells, fractions = [], []
            for shape in shapes:
                r = next((r for r in rows if r["name"] == name and r["shape"] == shape), None)
                cells.append(f"{r['gops']:.0f} ({r['seconds'] * 1e3:.1f})" if r else "")
                if r:
                    fractions.append(r["gops"] / peak[r["kind"]])
            kind = next(r["kind"] for r in rows if r["name"] == name)
            of = "int8" if kind == "int4" else kind
            lines.append(f"| {name} [{kind}] | " + " | ".join(cells) +
                         f" | {100 * sum(fractions) / len(fractions):.0f}% of {of} |")
        lines.append("peaks (best single shape): " + ", ".join(f"{k} {v:.0f} GOP/s" for k, v in sorted(peak.items())
                                                               if k != "int4"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
