#!/usr/bin/env python
"""This tree's CPU kernels against another revision's, in one process, round by round.

On a shared VM the speed of the same code drifts by tens of percent from one minute to the next,
so two runs minutes apart cannot show a 5-15% change. This script builds the base revision's
`stablecode/kernels/cpu_kernels.cpp` under a module name of its own, loads the model once, and
alternates the two libraries (every kernel call goes through `kernels.loaded()`) step by step over
rounds of decode steps after a prompt, and once a round over whole prompts with --prompt-tokens. It prints each round's
figures, the ratio within each round and their median, and whether both gave the same logits.
The two revisions' kernels must take the same arguments. With --passes instead of --model it times
the linear kernels alone: every layer of the 3B's shape (random weights, read cold from memory), M
activation rows a call, for each M given, as a multiple of the base's one-row pass (bf16: 16 layers,
the same bytes as 32 of int8).

    /work/timing.sh python scripts/bench/kernel_ab.py --model /tmp/bench/int8 --base HEAD~1
    /work/timing.sh python scripts/bench/kernel_ab.py --passes int8 --rows 1,3,9 --base HEAD~1
    python scripts/bench/kernel_ab.py --model DIR --base main --context 64 --steps 2 --rounds 2   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from stablecode import kernels, load_model
from stablecode.inference.engine import PREFILL_CHUNK
from stablecode.kernels import build
from stablecode.kv_cache import KVCache
from stablecode.machine import describe_cpu, keep_freed_memory

REPO = Path(__file__).resolve().parents[2]
KERNEL_SOURCE = "stablecode/kernels/cpu_kernels.cpp"


def base_source(revision: str) -> str:
    """The kernels' source at `revision` of this repository."""
    result = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{KERNEL_SOURCE}"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cannot read {KERNEL_SOURCE} at {revision!r}: {result.stderr.strip()}")
    return result.stdout


def build_base(source: str):
    """`source` compiled as its own module (cached beside the kernels by its hash), loaded."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    name = f"stablecode_kernels_ab_{digest}"  # its own name: Python would hand back a loaded module of the same one
    directory = build.cache_dir() / f"ab-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cpu_kernels.cpp"
    path.write_text(source)
    print(f"building the base kernels in {directory} (about a minute the first time)", file=sys.stderr)
    return load(name=name, sources=[str(path)], extra_cflags=build._flags(build.simd_level()),
                build_directory=str(directory), verbose=False)


@contextlib.contextmanager
def kernels_from(name: str, library):
    """Every kernel call in the block goes to `library` (None: PyTorch's own ops)."""
    saved = build._library
    build._library = library
    try:
        yield
    except TypeError as e:
        if "incompatible function arguments" not in str(e):  # pybind's words, with both signatures
            raise
        signatures = str(e).split("Invoked with")[0].strip()  # what follows lists every tensor passed
        raise SystemExit(f"the {name} kernels take other arguments than the model passes; an A/B needs "
                         f"revisions whose kernels have the same signatures.\n{signatures}") from None
    finally:
        build._library = saved


def _step(model, cache, position: int, token: int) -> tuple[float, torch.Tensor]:
    """Seconds of one decode step, and its logits."""
    start = time.perf_counter()
    logits = model(torch.tensor([[token]]), cache=cache, input_pos=position)
    return time.perf_counter() - start, logits


def _prompt(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Seconds to run `ids` as a prompt in the engine's chunks, and the last position's logits."""
    cache = KVCache.for_model(model, 1, len(ids))
    start = time.perf_counter()
    for begin in range(0, len(ids), PREFILL_CHUNK):
        chunk = ids[begin:begin + PREFILL_CHUNK]
        logits = model(torch.tensor([chunk]), cache=cache, input_pos=begin, logit_positions=torch.tensor([[len(chunk) - 1]]))
    return time.perf_counter() - start, logits


def measure(model, libraries: dict[str, object], context: int = 512, steps: int = 12, rounds: int = 6,
            prompt_tokens: int = 0) -> dict:
    """Alternate `libraries` (name → kernels module, None for PyTorch's ops; the first is the base).

    Each library decodes on a cache of its own, filled by it with the same `context` tokens. The
    libraries take turns step by step (in alternating order), so a drift of the machine's speed
    falls on both alike; a round's figure is its `steps` steps together. Prompts, with
    `prompt_tokens`, take turns once per round."""
    names = list(libraries)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (max(context, prompt_tokens),), generator=generator).tolist()
    figures = {name: {"decode_tok_s": [], "prompt_s": []} for name in names}
    logits = {}
    with torch.inference_mode():
        caches = {}
        for name in names:
            caches[name] = KVCache.for_model(model, 1, context + steps)
            with kernels_from(name, libraries[name]):
                model(torch.tensor([ids[:context]]), cache=caches[name], input_pos=0,
                      logit_positions=torch.tensor([[context - 1]]))
        for round_ in range(rounds):
            seconds = dict.fromkeys(names, 0.0)
            for step in range(steps):
                for name in (names if step % 2 == 0 else names[::-1]):
                    with kernels_from(name, libraries[name]):
                        took, last = _step(model, caches[name], context + step, 5 + step)
                    seconds[name] += took
                    if round_ == 0 and step == steps - 1:
                        logits[f"{name} decode"] = last
            for name in names:
                figures[name]["decode_tok_s"].append(steps / seconds[name])
            for name in (names if round_ % 2 == 0 else names[::-1]) if prompt_tokens else ():
                with kernels_from(name, libraries[name]):
                    took, last = _prompt(model, ids[:prompt_tokens])
                figures[name]["prompt_s"].append(took)
                logits.setdefault(f"{name} prompt", last)
    base, other = names[0], names[-1]
    result = {"rounds": rounds, "context": context, "steps": steps, "prompt_tokens": prompt_tokens, "figures": figures,
              "decode_ratio": [o / b for o, b in zip(figures[other]["decode_tok_s"], figures[base]["decode_tok_s"])],
              "same_logits": all(torch.equal(logits[f"{base} {kind}"], logits[f"{other} {kind}"])
                                 for kind in ("decode", "prompt") if f"{base} {kind}" in logits)}
    if prompt_tokens:
        result["prompt_speedup"] = [b / o for o, b in zip(figures[other]["prompt_s"], figures[base]["prompt_s"])]
    return result


LAYER_SHAPES = [(7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240)]  # the 3B's four matrices a layer


def weight_passes(kind: str, layers: int = 32) -> list:
    """(in_features, f(library, x) -> y) for each weight of `layers` layers of the 3B's shape, kind
    int8, int4 or bf16, each also as KIND-avx2 (the AVX2 loop on any CPU)."""
    from stablecode import quantize as Q

    isa = "avx2" if kind.endswith("-avx2") else ""
    calls = []
    for _ in range(layers):
        for n, k in LAYER_SHAPES:
            if kind.startswith("int8"):
                q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
                scale, sums = torch.rand(n) * 0.01, Q.int8_row_sums(q)
                calls.append((k, lambda lib, x, q=q, scale=scale, sums=sums: lib.int8_linear(x, q, scale, sums, None, isa)))
            elif kind.startswith("int4"):
                packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
                scale, minimum = (torch.rand(n, k // 64) * 0.01).half(), (-torch.rand(n, k // 64) * 0.1).half()
                calls.append((k, lambda lib, x, p=packed, s=scale, m=minimum: lib.int4_linear(x, p, s, m, 64, None, isa)))
            elif kind.startswith("bf16"):
                w = torch.randn(n, k, dtype=torch.bfloat16)
                calls.append((k, lambda lib, x, w=w: lib.bf16_linear(x, w, None, isa)))
            else:
                raise ValueError(f"unknown weight kind {kind!r} (int8, int4, bf16, each also with -avx2)")
    return calls


def measure_passes(calls: list, libraries: dict[str, object], rows: list[int], rounds: int) -> dict:
    """Seconds per pass over `calls` (`weight_passes`) with M rows, libraries taking turns each round;
    whether every library gave the same last output."""
    inputs = {}
    times = {name: {m: [] for m in rows} for name in libraries}
    outputs = {}
    names = list(libraries)
    for r in range(rounds):
        for m in rows:
            for name in (names if r % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                for k, call in calls:
                    y = call(libraries[name], inputs.setdefault((m, k), torch.randn(m, k, dtype=torch.bfloat16)))
                times[name][m].append(time.perf_counter() - start)
                outputs[(name, m)] = y
    same = all(torch.equal(outputs[(names[0], m)], outputs[(n, m)]) for n in names for m in rows)
    return {"rows": rows, "rounds": rounds, "pass_s": times, "same_outputs": same}


def report_passes(result: dict, names: list[str]) -> str:
    one_row = statistics.median(result["pass_s"][names[0]][result["rows"][0]])
    lines = [f"passes over the 3B's weights, medians of {result['rounds']} rounds, as a multiple of "
             f"{names[0]} at {result['rows'][0]} row(s)"]
    for m in result["rows"]:
        lines.append(f"  {m:2d} rows: " + "  ".join(
            f"{n} {statistics.median(result['pass_s'][n][m]) * 1000:7.1f} ms "
            f"({statistics.median(result['pass_s'][n][m]) / one_row:.2f}x)" for n in names))
    lines.append("same outputs: " + ("yes" if result["same_outputs"] else "NO (the kernels compute different values)"))
    return "\n".join(lines)


def report(result: dict, names: list[str]) -> str:
    base, other = names
    lines = [f"decode: {result['steps']} steps after {result['context']} tokens, {result['rounds']} rounds, "
             f"{other} / {base} within each round"]
    for i, ratio in enumerate(result["decode_ratio"]):
        lines.append(f"  round {i + 1}: {base} {result['figures'][base]['decode_tok_s'][i]:.2f} tok/s, "
                     f"{other} {result['figures'][other]['decode_tok_s'][i]:.2f} tok/s, ratio {ratio:.3f}")
    lines.append(f"  median ratio {statistics.median(result['decode_ratio']):.3f} "
                 f"(rounds {min(result['decode_ratio']):.3f}-{max(result['decode_ratio']):.3f})")
    if result["prompt_tokens"]:
        speedup = result["prompt_speedup"]
        lines.append(f"prompt of {result['prompt_tokens']} tokens: {base} median "
                     f"{statistics.median(result['figures'][base]['prompt_s']):.2f} s, {other} "
                     f"{statistics.median(result['figures'][other]['prompt_s']):.2f} s, speed-up median "
                     f"{statistics.median(speedup):.3f} (rounds {min(speedup):.3f}-{max(speedup):.3f})")
    lines.append("same logits: " + ("yes" if result["same_logits"] else "NO (the kernels compute different values)"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="checkpoint directory (e.g. cpu.py's /tmp/bench/int8)")
    target.add_argument("--passes", choices=["int8", "int8-avx2", "int4", "int4-avx2", "bf16", "bf16-avx2"],
                        help="time the linear kernels alone over the 3B's weights of this kind")
    parser.add_argument("--rows", default="1,3,9", help="with --passes: activation rows per call, comma-separated")
    parser.add_argument("--base", required=True, help="git revision whose kernels this tree's are compared against")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=12, help="decode steps per round and library")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="also time a prompt of this many tokens each round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    for name in ("context", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        parser.error(f"--rows must be comma-separated row counts of at least 1, not {args.rows!r}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    base = build_base(base_source(args.base))
    current = kernels.load()
    if current is None:
        raise SystemExit("this tree's kernels did not build (see the warning above)")
    names = [f"base {args.base}", "this tree"]
    if args.passes:
        calls = weight_passes(args.passes, layers=16 if args.passes.startswith("bf16") else 32)
        print(describe_cpu())
        result = measure_passes(calls, dict(zip(names, (base, current))), rows, args.rounds)
        print(report_passes(result, names))
        if args.output:
            args.output.write_text(json.dumps(result, indent=1))
        return
    model = load_model(args.model)
    print(describe_cpu())
    result = measure(model, dict(zip(names, (base, current))), args.context, args.steps, args.rounds, args.prompt_tokens)
    print(report(result, names))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
