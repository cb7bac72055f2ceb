#!/usr/bin/env python
"""CPU inference benchmark: our bf16 / int8 / int4 engines next to transformers and CTranslate2.

One run, one machine, the same prompt and thread count for every engine. Each engine runs in its
own subprocess (one model in memory at a time; peak RSS read from ru_maxrss), in this order:
cold load time (weights in the page cache), prefill of the prompt, then greedy decode tok/s.
Also: prefix-reuse time to first token (TTFT) for a long prompt and one-keystroke edits, and
prompt-lookup speculative decoding on real code (CPython stdlib files).

    python scripts/bench/cpu.py --work work/bench                     # the 3B shape, random weights
    python scripts/bench/cpu.py --work work/smoke --preset tiny-49k   # a quick smoke run

Needs `pip install -e .[bench]` for the CTranslate2 engine. Results: a table on stdout and
--work/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "starcoder-49k" / "tokenizer.json"
ENGINES = ["ours-bf16", "ours-int8", "ours-int4", "torch-int8", "torch-int4", "transformers-bf16", "ct2-int8"]


# ---- helpers used by the workers ---------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's from before exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir()
               if f.suffix in (".safetensors", ".bin") or f.name == "model.bin")


def prompt_ids(count: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`count` token ids of real code when the StarCoder tokenizer is at hand, else random ids."""
    if TOKENIZER.exists():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(TOKENIZER)).encode(stdlib_code(200_000)).ids
        ids = [i for i in ids if i < vocab_size]
        if len(ids) >= count:
            return ids[:count]
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, vocab_size) for _ in range(count)]


def stdlib_code(chars: int, skip: int = 0) -> str:
    """Real Python: CPython standard library files, concatenated."""
    text, files = "", sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    for file in files[skip:]:
        text += file.read_text(encoding="utf-8", errors="replace")
        if len(text) >= chars:
            break
    return text[:chars]


def warm_page_cache(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass


# ---- workers (one engine each, in its own process) ---------------------------------------------

def worker_ours(args) -> dict:
    import torch

    from stablecode import load_model
    from stablecode.kv_cache import KVCache

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - start
    ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    decode = []
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, args.prompt_tokens + args.new_tokens)
        start = time.perf_counter()
        last = torch.tensor([[len(ids) - 1]])
        logits = model(torch.tensor([ids]), cache=cache, input_pos=0, logit_positions=last)[0, -1]
        prefill_s = time.perf_counter() - start
        first = int(logits.argmax())
        for _ in range(args.repeats):  # each repeat decodes again from the cached prompt
            token = first
            start = time.perf_counter()
            for step in range(args.new_tokens - 1):
                logits = model(torch.tensor([[token]]), cache=cache, input_pos=args.prompt_tokens + step)[0, -1]
                token = int(logits.argmax())
            decode.append((args.new_tokens - 1) / (time.perf_counter() - start))
    return dict(load_s=load_s, prefill_s=prefill_s, decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.model)))


def worker_transformers(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
    decode = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        prompt_cache, first = out.past_key_values, int(out.logits[0, -1].argmax())
        for _ in range(args.repeats):  # each repeat decodes again from a copy of the prompt's cache
            cache, token = copy.deepcopy(prompt_cache), first
            start = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            decode.append((args.new_tokens - 1) / (time.perf_counter() - start))
    return dict(load_s=load_s, prefill_s=prefill_s, decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.source)))


def worker_ct2(args) -> dict:
    import ctranslate2

    start = time.perf_counter()
    generator = ctranslate2.Generator(args.model, device="cpu", compute_type="int8", intra_threads=args.threads,
                                      inter_threads=1)
    load_s = time.perf_counter() - start
    vocabulary = json.loads((Path(args.model) / "vocabulary.json").read_text())
    tokens = [vocabulary[i] for i in prompt_ids(args.prompt_tokens, len(vocabulary))]
    prefill, decode = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        steps = generator.generate_tokens(tokens, max_length=args.new_tokens, min_length=args.new_tokens,
                                          sampling_topk=1)
        next(steps)
        first = time.perf_counter()
        count = sum(1 for _ in steps)
        decode.append(count / (time.perf_counter() - first))
        prefill.append(first - start)
    return dict(load_s=load_s, prefill_s=statistics.median(prefill), decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.model)))


def worker_prefix(args) -> dict:
    """TTFT of a long prompt and one-keystroke edits (typing at the end), with and without prefix reuse."""
    import torch

    from stablecode import Completer

    torch.set_num_threads(args.threads)
    from stablecode.inference.engine import Engine

    completer = Completer(args.model)
    tokenizer = completer.tokenizer
    text = stdlib_code(40_000, skip=20)
    ids = tokenizer.encode(text)[:args.long_prompt_tokens]
    prompt = tokenizer.decode(ids)
    edits = [prompt + "abcdefghijklmnopqrstuvwxyz"[:i + 1] for i in range(args.edits)]

    prefilled = 0

    def ttft(completer, text):
        nonlocal prefilled
        start = time.perf_counter()
        result = completer.complete(text, max_new_tokens=1)
        prefilled = result.prompt_tokens - result.cached_prompt_tokens
        return time.perf_counter() - start

    first = ttft(completer, prompt)
    with_reuse = [ttft(completer, e) for e in edits]
    prefilled_last = prefilled
    completer.engine = Engine(completer.model, prefix_cache_mb=0)  # the same model without reuse
    without = [ttft(completer, e) for e in edits[:args.edits_without_reuse]]
    # With no edits measured without reuse, the first request (a full prefill) stands for them.
    return dict(prompt_tokens=len(tokenizer.encode(prompt)), first_s=first, edits=len(with_reuse),
                ttft_reuse_median_s=statistics.median(with_reuse), ttft_reuse_max_s=max(with_reuse),
                prefilled_tokens_last_edit=prefilled_last, edits_without=len(without),
                ttft_plain_median_s=statistics.median(without) if without else first, peak_rss=peak_rss_bytes())


def worker_speculative(args) -> dict:
    """Greedy tok/s with and without prompt lookup on real code prompts (the same output, checked)."""
    import torch

    from stablecode import Completer

    torch.set_num_threads(args.threads)
    completer = Completer(args.model)
    tokenizer = completer.tokenizer
    results = []
    for skip in range(args.code_prompts):
        text = stdlib_code(6000, skip=40 + 7 * skip)
        ids = tokenizer.encode(text)[:args.code_prompt_tokens]
        prompt = tokenizer.decode(ids)
        row = {}
        for name, speculative in (("plain", False), ("speculative", True)):
            start = time.perf_counter()
            result = completer.complete(prompt, max_new_tokens=args.new_tokens, speculative=speculative)
            row[name] = (time.perf_counter() - start, result.token_ids)
        if row["plain"][1] != row["speculative"][1]:
            raise SystemExit("speculative output differs from plain greedy output")
        results.append((row["plain"][0], row["speculative"][0], len(row["plain"][1])))
    plain_s = sum(r[0] for r in results)
    spec_s = sum(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    return dict(prompts=len(results), tokens=tokens, plain_s=plain_s, speculative_s=spec_s,
                speedup=plain_s / spec_s)


def convert_ct2(args) -> None:
    """CTranslate2's transformers converter, with the config names it expects from transformers 4."""
    import transformers
    from ctranslate2.converters import TransformersConverter

    config = transformers.GPTNeoXConfig
    config.rotary_pct = property(lambda self: self.rope_parameters["partial_rotary_factor"])
    config.rotary_emb_base = property(lambda self: self.rope_parameters["rope_theta"])
    transformers.GPTNeoXForCausalLM.embed_out = property(lambda self: self.lm_head)  # renamed in transformers 5
    TransformersConverter(args.model, low_cpu_mem_usage=True).convert(str(args.output), quantization="int8",
                                                                       force=True)


WORKERS = {"ours": worker_ours, "torch": worker_ours, "transformers": worker_transformers, "ct2": worker_ct2,
           "prefix": worker_prefix, "speculative": worker_speculative}


# ---- the driver ------------------------------------------------------------------------------

def run(command: list[str], env=None) -> None:
    print("$", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env)


def prepare(work: Path, preset: str) -> dict[str, Path]:
    """Random bf16 checkpoint of the preset, its int8/int4 copies and a CTranslate2 int8 conversion."""
    dirs = {name: work / name for name in ("bf16", "int8", "int4", "ct2-int8")}
    if not (dirs["bf16"] / "config.json").exists():
        command = ["stablecode", "init", "--preset", preset, "--dtype", "bfloat16", "--out", str(dirs["bf16"])]
        if TOKENIZER.exists():
            command += ["--tokenizer", str(TOKENIZER)]
            # CTranslate2's converter reads the tokenizer through transformers.
        run(command)
        if TOKENIZER.exists():
            (dirs["bf16"] / "tokenizer_config.json").write_text(
                (TOKENIZER.parent / "tokenizer_config.json").read_text())
    for method in ("int8", "int4"):
        if not (dirs[method] / "config.json").exists():
            run(["stablecode", "quantize", "--model", str(dirs["bf16"]), "--out", str(dirs[method]),
                 "--method", method])
    if not (dirs["ct2-int8"] / "model.bin").exists():
        try:
            import ctranslate2  # noqa: F401

            run([sys.executable, __file__, "--worker", "convert-ct2", "--model", str(dirs["bf16"]),
                 "--output", str(dirs["ct2-int8"])])
        except ImportError:
            print("ctranslate2 is not installed (pip install -e .[bench]): skipping its engine", file=sys.stderr)
    return dirs


def run_worker(kind: str, model: Path, args, extra: list[str] = (), env_extra: dict | None = None) -> dict | None:
    output = args.work / f"{kind}-{model.name}.json"
    if args.resume and output.exists():  # finished by an earlier, interrupted run
        return json.loads(output.read_text())
    output.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--output", str(output),
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **(env_extra or {}))
    try:
        run(command, env=env)
    except subprocess.CalledProcessError as e:
        print(f"{kind} on {model}: failed ({e})", file=sys.stderr)
        return None
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--preset", default="stablecode-completion-alpha-3b-4k")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="decode measurements per engine (median); one prefill")
    parser.add_argument("--long-prompt-tokens", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--edits-without-reuse", type=int, default=20)
    parser.add_argument("--code-prompts", type=int, default=3)
    parser.add_argument("--code-prompt-tokens", type=int, default=400)
    parser.add_argument("--skip", default="", help="comma-separated: prefix, speculative")
    parser.add_argument("--resume", action="store_true", help="reuse engine results an interrupted run left in --work")
    parser.add_argument("--embedded", default=None, help="also measure this checkpoint (e.g. stablecode-nano)")
    # worker mode
    parser.add_argument("--worker", choices=sorted(WORKERS) + ["convert-ct2"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "convert-ct2":
            return convert_ct2(args)
        result = WORKERS[args.worker](args)
        args.output.write_text(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    dirs = prepare(args.work, args.preset)
    engines = [e for e in args.engines.split(",") if e]
    results: dict = {"machine": machine_facts(), "settings": {k: v for k, v in vars(args).items()
                                                              if k not in ("worker", "output", "model", "source")}}
    results["settings"]["work"] = str(args.work)
    results["read_gb_s"] = read_bandwidth(args.threads)
    where = {"ours-bf16": ("ours", dirs["bf16"]), "ours-int8": ("ours", dirs["int8"]),
             "ours-int4": ("ours", dirs["int4"]), "torch-int8": ("torch", dirs["int8"]),
             "torch-int4": ("torch", dirs["int4"]), "transformers-bf16": ("transformers", dirs["bf16"]),
             "ct2-int8": ("ct2", dirs["ct2-int8"])}
    for engine in engines:
        kind, model = where[engine]
        if not model.exists():
            continue
        warm_page_cache(model)
        extra = ["--source", str(dirs["bf16"])]
        env = None
        if kind == "torch":  # our layers on PyTorch's weight-only kernels (the prefill path is the same)
            env = {"STABLECODE_KERNELS": "torch"}
        results[engine] = run_worker(kind, model, args, extra, env)
        print(engine, results[engine], file=sys.stderr, flush=True)
    skip = set(args.skip.split(","))
    if "prefix" not in skip:
        results["prefix-int8"] = run_worker("prefix", dirs["int8"], args, [
            "--long-prompt-tokens", str(args.long_prompt_tokens), "--edits", str(args.edits),
            "--edits-without-reuse", str(args.edits_without_reuse)])
    if "speculative" not in skip:
        results["speculative-int8"] = run_worker("speculative", dirs["int8"], args, [
            "--code-prompts", str(args.code_prompts), "--code-prompt-tokens", str(args.code_prompt_tokens)])
    if args.embedded:
        from stablecode.registry import resolve_model_dir

        embedded = resolve_model_dir(args.embedded)
        results["embedded"] = run_worker("ours", embedded, args)
        results["embedded-speculative"] = run_worker("speculative", embedded, args, [
            "--code-prompts", str(args.code_prompts), "--code-prompt-tokens", str(args.code_prompt_tokens)])
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


def machine_facts() -> dict:
    import torch

    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": model, "cores": os.cpu_count(), "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")
                                                              if f in flags],
            "torch": torch.__version__, "load_average": os.getloadavg()}


def read_bandwidth(threads: int) -> float:
    """GB/s of a plain streaming read of 2 GiB (our AVX2 byte-sum kernel): the decode ceiling."""
    import torch

    from stablecode import kernels

    torch.set_num_threads(threads)
    ext = kernels.load()
    if ext is None:
        return float("nan")
    data = torch.ones(2 << 30, dtype=torch.uint8)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        ext.read_bytes(data)
        times.append(time.perf_counter() - start)
    return data.numel() / min(times) / 1e9


def report(results: dict) -> str:
    gb = 1e9
    lines = [f"machine: {results['machine']}", f"plain read: {results['read_gb_s']:.1f} GB/s", "",
             "| engine | weights | cold load | prefill | decode tok/s | weight GB/s | peak RSS (x weights) |",
             "|---|---|---|---|---|---|---|"]
    for engine in ENGINES:
        r = results.get(engine)
        if not r:
            continue
        lines.append(f"| {engine} | {r['weight_bytes'] / gb:.2f} GB | {r['load_s']:.1f} s | {r['prefill_s']:.1f} s | "
                     f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] * r['weight_bytes'] / gb:.1f} | "
                     f"{r['peak_rss'] / gb:.2f} GB ({r['peak_rss'] / r['weight_bytes']:.2f}x) |")
    if results.get("prefix-int8"):
        p = results["prefix-int8"]
        lines += ["", f"prefix reuse (int8, {p['prompt_tokens']}-token prompt, one-keystroke edits): first request "
                      f"{p['first_s']:.1f} s; TTFT median {p['ttft_reuse_median_s']:.2f} s (max "
                      f"{p['ttft_reuse_max_s']:.2f} s, {p['edits']} edits, {p['prefilled_tokens_last_edit']} tokens "
                      f"run) with reuse vs {p['ttft_plain_median_s']:.1f} s without ({p['edits_without']} edits): "
                      f"{p['ttft_plain_median_s'] / p['ttft_reuse_median_s']:.0f}x"]
    for key in ("speculative-int8", "embedded-speculative"):
        if results.get(key):
            s = results[key]
            lines.append(f"{key}: {s['prompts']} code prompts, {s['tokens']} tokens: {s['tokens'] / s['plain_s']:.2f} "
                         f"tok/s plain, {s['tokens'] / s['speculative_s']:.2f} tok/s speculative ({s['speedup']:.2f}x)")
    if results.get("embedded"):
        e = results["embedded"]
        lines.append(f"embedded model: prefill {e['prefill_s']:.2f} s, decode {e['decode_tok_s']:.1f} tok/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
