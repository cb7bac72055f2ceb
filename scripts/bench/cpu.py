#!/usr/bin/env python
"""CPU inference benchmark: our bf16 / int8 / int4 engines next to transformers, CTranslate2 and llama.cpp.

One run, one machine, the same prompt and thread count for every engine. Each engine runs in its
own subprocess (one model in memory at a time; peak RSS from VmHWM), in this order: cold load
time (weights in the page cache), prefill of each --prefill-tokens length (ours in the engine's
chunks of PREFILL_CHUNK tokens), then greedy decode tok/s after --prompt-tokens of context.
Before the engines: the machine's measured peaks (fp32/bf16 GEMM, our int8 prompt GEMM, plain
streaming read), against which prompt GOP/s and decode GB/s are reported.
llama.cpp (--llamacpp DIR with build/bin/llama-bench and model-{q8_0,q4_0,bf16}.gguf, made by
scripts/bench/llamacpp.sh) runs through llama-bench with the same lengths and threads.
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

from stablecode.machine import machine_facts

ROOT = Path(__file__).resolve().parents[2]
# ../shared beside the checkout (a worktree under /work/wt/<name> finds it one level further up).
TOKENIZER = next((p / "shared" / "tokenizers" / "starcoder-49k" / "tokenizer.json" for p in (ROOT.parent, ROOT.parent.parent)
                  if (p / "shared" / "tokenizers" / "starcoder-49k" / "tokenizer.json").exists()),
                 ROOT.parent / "shared" / "tokenizers" / "starcoder-49k" / "tokenizer.json")
# ours-int8-kv8: the int8 weights with an int8 KV cache (--kv-cache int8).
ENGINES = ["ours-bf16", "ours-int8", "ours-int4", "ours-int8-float", "ours-int8-kv8", "torch-int8", "torch-int4",
           "transformers-bf16", "ct2-int8", "llamacpp-q8_0", "llamacpp-q4_0", "llamacpp-bf16"]


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


def warm_page_cache(path: Path) -> None:
    for file in (path.iterdir() if path.is_dir() else [path]):
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass


# ---- workers (one engine each, in its own process) ---------------------------------------------

def prefill_lengths(args) -> list[int]:
    """The prefill lengths, longest first, ending with --prompt-tokens (decode continues after it)."""
    lengths = sorted({int(t) for t in args.prefill_tokens.split(",")} - {args.prompt_tokens}, reverse=True)
    return lengths + [args.prompt_tokens]


# Every engine runs one short prompt before the timings (llama-bench does its own warm-up run), as a
# server does before it says it is ready: first-touch costs (weights paged in, thread pools, scratch
# allocations) count in load_s, not in the first prefill.
WARMUP_TOKENS = 64


def worker_ours(args) -> dict:
    import torch

    from stablecode import kernels, load_model
    from stablecode import quantize as Q
    from stablecode.inference.engine import PREFILL_CHUNK
    from stablecode.kv_cache import KVCache
    from stablecode.machine import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the inference engine's heap setting, so prompts run as they do there
    start = time.perf_counter()
    model = load_model(args.model)
    kernels.load()  # as the inference engine does before its first pass (STABLECODE_KERNELS=torch: none)
    if args.prompt_precision:
        Q.set_prompt_precision(model, args.prompt_precision)
    lengths = prefill_lengths(args)
    ids = prompt_ids(max(lengths), model.config.vocab_size)
    prefill, decode = {}, []
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, max(lengths) + args.new_tokens, kv_cache_dtype=args.kv_cache)
        model(torch.tensor([ids[:WARMUP_TOKENS]]), cache=cache, input_pos=0, logit_positions=torch.tensor([[0]]))
        load_s = time.perf_counter() - start
        for length in lengths:  # in the engine's chunks, as a long prompt runs there
            start = time.perf_counter()
            for begin in range(0, length, PREFILL_CHUNK):
                chunk = ids[begin:min(begin + PREFILL_CHUNK, length)]
                last = torch.tensor([[len(chunk) - 1]])
                logits = model(torch.tensor([chunk]), cache=cache, input_pos=begin, logit_positions=last)[0, -1]
            prefill[length] = time.perf_counter() - start
        first = int(logits.argmax())
        for _ in range(args.repeats):  # each repeat decodes again from the cached prompt
            token = first
            start = time.perf_counter()
            for step in range(args.new_tokens - 1):
                logits = model(torch.tensor([[token]]), cache=cache, input_pos=args.prompt_tokens + step)[0, -1]
                token = int(logits.argmax())
            decode.append((args.new_tokens - 1) / (time.perf_counter() - start))
    return dict(load_s=load_s, prefill_s=prefill, decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.model)),
                kv_bytes=cache.nbytes)


def worker_transformers(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    lengths = prefill_lengths(args)
    ids = prompt_ids(max(lengths), model.config.vocab_size)
    prefill, decode = {}, []
    with torch.inference_mode():
        model(torch.tensor([ids[:WARMUP_TOKENS]]), use_cache=True, logits_to_keep=1)
        load_s = time.perf_counter() - start
        for length in lengths:
            start = time.perf_counter()
            out = model(torch.tensor([ids[:length]]), use_cache=True, logits_to_keep=1)
            prefill[length] = time.perf_counter() - start
        prompt_cache, first = out.past_key_values, int(out.logits[0, -1].argmax())
        for _ in range(args.repeats):  # each repeat decodes again from a copy of the prompt's cache
            cache, token = copy.deepcopy(prompt_cache), first
            start = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            decode.append((args.new_tokens - 1) / (time.perf_counter() - start))
    return dict(load_s=load_s, prefill_s=prefill, decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.source)))


def worker_ct2(args) -> dict:
    import ctranslate2

    start = time.perf_counter()
    generator = ctranslate2.Generator(args.model, device="cpu", compute_type="int8", intra_threads=args.threads,
                                      inter_threads=1)
    vocabulary = json.loads((Path(args.model) / "vocabulary.json").read_text())
    lengths = prefill_lengths(args)
    tokens = [vocabulary[i] for i in prompt_ids(max(lengths), len(vocabulary))]
    next(generator.generate_tokens(tokens[:WARMUP_TOKENS], max_length=1, sampling_topk=1))
    load_s = time.perf_counter() - start
    prefill, decode = {}, []
    for length in lengths:  # time to the first generated token
        start = time.perf_counter()
        next(generator.generate_tokens(tokens[:length], max_length=1, sampling_topk=1))
        prefill[length] = time.perf_counter() - start
    for _ in range(args.repeats):
        steps = generator.generate_tokens(tokens[:args.prompt_tokens], max_length=args.new_tokens,
                                          min_length=args.new_tokens, sampling_topk=1)
        next(steps)
        first = time.perf_counter()
        count = sum(1 for _ in steps)
        decode.append(count / (time.perf_counter() - first))
    return dict(load_s=load_s, prefill_s=prefill, decode_tok_s=statistics.median(decode),
                peak_rss=peak_rss_bytes(), weight_bytes=weight_bytes(Path(args.model)))


def worker_llamacpp(args) -> dict:
    """llama-bench on one gguf file: prompt processing at each length, then decode after --prompt-tokens."""
    model = Path(args.model)
    bench = Path(args.llamacpp) / "src" / "build" / "bin" / "llama-bench"
    lengths = prefill_lengths(args)

    def run_bench(*options) -> list[dict]:
        command = [str(bench), "-m", str(model), "-t", str(args.threads), "-r", str(args.repeats), "-o", "json",
                   *(["--repack", "0"] if args.llamacpp_no_repack else []), *options]
        print("$", " ".join(command), file=sys.stderr, flush=True)
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

    prefill = {}
    for row in run_bench("-p", ",".join(str(n) for n in lengths), "-n", "0"):
        prefill[int(row["n_prompt"])] = row["n_prompt"] / row["avg_ts"]
    decode = run_bench("-p", "0", "-n", str(args.new_tokens), "-d", str(args.prompt_tokens))[0]["avg_ts"]
    return dict(load_s=float("nan"), prefill_s=prefill, decode_tok_s=decode, peak_rss=None,
                weight_bytes=model.stat().st_size)


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
    """Greedy tok/s with and without prompt lookup (speculative=True: 8 guesses) on real code
    prompts, each prompt's prefill done beforehand (the same output, checked)."""
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
        # The prompt runs once first: both variants then reuse it (prefix reuse), so neither pays its
        # prefill and the order of the two does not favour the second.
        completer.complete(prompt, max_new_tokens=1)
        row = {}
        for name, speculative in (("plain", False), ("speculative", True))[::1 if skip % 2 == 0 else -1]:
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
           "llamacpp": worker_llamacpp,
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


def run_worker(kind: str, model: Path, args, extra: list[str] = (), env_extra: dict | None = None,
               name: str | None = None) -> dict | None:
    output = args.work / f"{name or kind + '-' + model.name}.json"
    if args.resume and output.exists():  # finished by an earlier, interrupted run
        return json.loads(output.read_text())
    output.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--output", str(output),
               "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--prefill-tokens", args.prefill_tokens, *extra]
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
    parser.add_argument("--prompt-tokens", type=int, default=512, help="context before the decode measurement")
    parser.add_argument("--prefill-tokens", default="512,2048", help="comma-separated prompt lengths to prefill")
    parser.add_argument("--llamacpp", type=Path, default=None,
                        help="llama.cpp directory made by scripts/bench/llamacpp.sh (adds its engines)")
    parser.add_argument("--llamacpp-no-repack", action="store_true",
                        help="llama-bench --repack 0 (its repacked AVX-512/AMX path died with SIGILL on one VM)")
    parser.add_argument("--report-only", action="store_true", help="only print the table of --work/results.json")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="decode measurements per engine (median); one prefill")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the engine list this many times in turn; figures are medians over rounds and "
                             "each ratio the median of the ratios within a round (this VM's speed drifts by tens "
                             "of percent over minutes, so engines compared should run close in time)")
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
    parser.add_argument("--prompt-precision", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "convert-ct2":
            return convert_ct2(args)
        result = WORKERS[args.worker](args)
        args.output.write_text(json.dumps(result))
        return

    if args.report_only:
        return print(report(json.loads((args.work / "results.json").read_text())))
    args.work.mkdir(parents=True, exist_ok=True)
    dirs = prepare(args.work, args.preset)
    engines = [e for e in args.engines.split(",") if e]
    previous = args.work / "results.json"
    results: dict = json.loads(previous.read_text()) if args.resume and previous.exists() else {}
    results.update({"machine": machine_facts(), "settings": {k: str(v) for k, v in vars(args).items()
                                                             if k not in ("worker", "output", "model", "source")}})
    results["linear_params"] = linear_params(dirs["bf16"])
    if not (args.resume and "peaks" in results):
        results["peaks"] = measure_peaks(args.threads)
        results["read_gb_s"] = read_bandwidth(args.threads)
    where = {"ours-bf16": ("ours", dirs["bf16"]), "ours-int8": ("ours", dirs["int8"]),
             "ours-int4": ("ours", dirs["int4"]), "ours-int8-float": ("ours", dirs["int8"]),
             "ours-int8-kv8": ("ours", dirs["int8"]),
             "torch-int8": ("torch", dirs["int8"]), "torch-int4": ("torch", dirs["int4"]),
             "transformers-bf16": ("transformers", dirs["bf16"]), "ct2-int8": ("ct2", dirs["ct2-int8"])}
    if args.llamacpp:
        for q in ("q8_0", "q4_0", "bf16"):
            where[f"llamacpp-{q}"] = ("llamacpp", args.llamacpp / f"model-{q}.gguf")
    missing = [e for e in engines if e not in where]
    for engine in missing:
        print(f"{engine}: not available in this run (llama.cpp needs --llamacpp)", file=sys.stderr)
    rounds: dict[str, list[dict]] = {}
    for round_number, engine in [(r, e) for r in range(args.rounds) for e in engines if e in where]:
        kind, model = where[engine]
        if not model.exists():
            continue
        warm_page_cache(model)
        extra = ["--source", str(dirs["bf16"])]
        if args.llamacpp:
            extra += ["--llamacpp", str(args.llamacpp)] + (["--llamacpp-no-repack"] if args.llamacpp_no_repack else [])
        if engine == "ours-int8-float":  # prompts through dequantize + float GEMM, for comparison
            extra += ["--prompt-precision", "float"]
        if engine == "ours-int8-kv8":  # the int8 weights with an int8 KV cache
            extra += ["--kv-cache", "int8"]
        env = None
        if kind == "torch":  # our layers on PyTorch's weight-only kernels (the prefill path is the same)
            env = {"STABLECODE_KERNELS": "torch"}
        name = engine if args.rounds == 1 else f"{engine}-round{round_number + 1}"
        # This VM's read rate drifts by half within minutes: each engine's decode is set against the
        # probe taken just before and just after it ran (the better of the two).
        read_before = read_bandwidth(args.threads)
        result = run_worker(kind, model, args, extra, env, name=name)
        if result is not None:
            result["read_gb_s"] = max(read_before, read_bandwidth(args.threads))
        print(name, result, file=sys.stderr, flush=True)
        if result is not None:
            rounds.setdefault(engine, []).append(result)
            results[engine] = merge_rounds(rounds[engine])
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
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
        results["embedded"] = run_worker("ours", embedded, args, name="embedded")
        results["embedded-speculative"] = run_worker("speculative", embedded, args, [
            "--code-prompts", str(args.code_prompts), "--code-prompt-tokens", str(args.code_prompt_tokens)])
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(report(json.loads(json.dumps(results))))  # as read back: prefill lengths are strings


def merge_rounds(runs: list[dict]) -> dict:
    """One engine's rounds as one result: median times and rates, the largest RSS, every round kept."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    merged["prefill_s"] = {n: statistics.median(r["prefill_s"][n] for r in runs) for n in runs[0]["prefill_s"]}
    merged["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
    merged["load_s"] = statistics.median(r["load_s"] for r in runs)
    rss = [r["peak_rss"] for r in runs if r.get("peak_rss")]
    merged["peak_rss"] = max(rss) if rss else None
    if all("read_gb_s" in r for r in runs):
        merged["read_gb_s"] = statistics.median(r["read_gb_s"] for r in runs)
    merged["rounds"] = [{"prefill_s": r["prefill_s"], "decode_tok_s": r["decode_tok_s"]} for r in runs]
    return merged


def linear_params(checkpoint: Path) -> int:
    """Weights a prompt token multiplies in the blocks' projections (the head runs for one position)."""
    config = json.loads((checkpoint / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    return config["num_hidden_layers"] * (4 * hidden * hidden + 2 * hidden * inner)


def measure_peaks(threads: int) -> dict:
    """GOP/s of the fastest GEMM of each kind found here (scripts/bench/gemm.py compares them all),
    at the 3B MLP shape with 512 rows: fp32 and bf16 F.linear, our int8 prompt GEMM; and the int8
    multiply-add ceiling from registers on the instruction set our prompt GEMMs use ("int8 registers":
    AMX tiles, VNNI or AVX2), the limit every int8 GEMM (ours, oneDNN's, llama.cpp's) is measured
    against."""
    import torch
    import torch.nn.functional as F

    from stablecode import kernels
    from stablecode import quantize as Q
    from stablecode.kernels import ops

    torch.set_num_threads(threads)
    M, K, N = 512, 2560, 10240
    x, w = torch.randn(M, K), torch.randn(N, K) * K ** -0.5
    q, scale = Q.quantize_int8(w)
    candidates = {"fp32": lambda: F.linear(x, w), "bf16": (lambda xb, wb: lambda: F.linear(xb, wb))(x.bfloat16(),
                                                                                                  w.bfloat16())}
    kernels.load()
    if ops.use_prompt_kernels(x, N):
        candidates["int8"] = (lambda xb: lambda: ops.prompt_int8_linear(xb, q, scale, None))(x.bfloat16())
    peaks = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fn()
            best = min(timed(fn) for _ in range(5))
            peaks[name] = 2 * M * N * K / best / 1e9
    library = kernels.build.loaded()
    if library is not None:
        ops_per_s, _ = max(library.int8_peak(20_000_000) for _ in range(3))
        if ops_per_s:
            peaks["int8 registers"] = ops_per_s / 1e9
    return peaks


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    machine, peaks = results["machine"], results.get("peaks", {})
    lengths = sorted({int(n) for engine in ENGINES if results.get(engine) for n in results[engine]["prefill_s"]})
    context = int(results["settings"].get("prompt_tokens", 512))
    int8_peak = peaks.get("int8 registers") or peaks.get("int8")
    lines = [f"CPU: {machine['cpu']}, {machine['cores']} cpus, flags: {' '.join(machine['flags'])}; "
             f"torch {machine['torch']}; load average at start {machine['load_average']}",
             "measured peaks: " + ", ".join(f"{k} {'' if k.endswith('registers') else 'GEMM '}{v:.0f} GOP/s"
                                            for k, v in peaks.items()) +
             f"; plain read {results['read_gb_s']:.1f} GB/s at the start", "",
             "| engine | weights | " + " | ".join(f"prefill {n}" for n in lengths) +
             f" | prompt GOP/s ({lengths[0] if lengths else ''}) | decode tok/s (after {context}) "
             "| weight GB/s (of the read probed beside it) | peak RSS / (weights + KV) |",
             "|---|---|" + "---|" * len(lengths) + "---|---|---|---|"]
    for engine in ENGINES:
        r = results.get(engine)
        if not r:
            continue
        prefill = {int(n): t for n, t in r["prefill_s"].items()}
        cells = [f"{prefill[n]:.2f} s" if n in prefill else "" for n in lengths]
        gops = 2 * lengths[0] * results["linear_params"] / prefill[lengths[0]] / 1e9 if lengths[0] in prefill else 0
        of_peak = f" ({100 * gops / int8_peak:.0f}% of int8 peak)" if int8_peak and gops else ""
        decode_gb_s = r["decode_tok_s"] * r["weight_bytes"] / gb
        rss = (f"{r['peak_rss'] / gb:.2f} GB ({r['peak_rss'] / (r['weight_bytes'] + r.get('kv_bytes', 0)):.2f}x)"
               if r.get("peak_rss") else "n/a")
        read = r.get("read_gb_s", results["read_gb_s"])
        lines.append(f"| {engine} | {r['weight_bytes'] / gb:.2f} GB | " + " | ".join(cells) +
                     f" | {gops:.0f}{of_peak} | {r['decode_tok_s']:.2f} | {decode_gb_s:.1f} "
                     f"({100 * decode_gb_s / read:.0f}% of {read:.1f}) | {rss} |")
    lines += ["", "prompt GOP/s: 2 x tokens x the blocks' projection weights / prefill time (everything else in the "
              "prefill counts against it)."]
    lines += ratios(results, lengths, context)
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
        prefill = ", ".join(f"{n} tokens {t:.2f} s" for n, t in e["prefill_s"].items())
        lines.append(f"embedded model: prefill {prefill}, decode {e['decode_tok_s']:.1f} tok/s")
    return "\n".join(lines)


def ratios(results: dict, lengths: list[int], context: int) -> list[str]:
    """The issue's target ratios, where both engines ran."""
    pairs = [("ours-int8", "ct2-int8"), ("ours-int8", "llamacpp-q8_0"), ("ours-int4", "llamacpp-q4_0"),
             ("ours-bf16", "llamacpp-bf16"), ("ours-bf16", "transformers-bf16"), ("ours-int8", "ours-int8-float"),
             ("ours-int8-kv8", "ours-int8")]
    lines = []
    for ours, peer in pairs:
        a, b = results.get(ours), results.get(peer)
        if not (a and b):
            continue
        # Within a round the two engines ran minutes apart: the ratio is taken there, then the median.
        paired = list(zip(a.get("rounds", [a]), b.get("rounds", [b])))

        def ratio(of) -> str:
            values = sorted(of(x, y) for x, y in paired)
            spread = f" (rounds {values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
            return f"{statistics.median(values):.2f}x{spread}"

        cells = [f"prefill {n}: " + ratio(lambda x, y: y["prefill_s"][str(n)] / x["prefill_s"][str(n)])
                 for n in lengths if str(n) in a["prefill_s"] and str(n) in b["prefill_s"]]
        cells.append("decode: " + ratio(lambda x, y: x["decode_tok_s"] / y["decode_tok_s"]))
        lines.append(f"{ours} vs {peer}: " + ", ".join(cells))
    return ([""] + lines) if lines else []


if __name__ == "__main__":
    main()
