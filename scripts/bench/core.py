"""Prefill and decode speed, ours vs transformers' GPTNeoXForCausalLM, same weights, dtype and threads.

    python scripts/bench/core.py                      # 3B preset, random weights, bf16 and fp32
    python scripts/bench/core.py --dtypes bfloat16 --new-tokens 16

Each (engine, dtype) runs in its own subprocess, one after the other, so two 11 GB fp32 models are
never in memory together and each engine's peak RSS is its own. Both engines generate greedily
through their own generation API (ours: `stablecode.inference.engine.Engine`; theirs: `model.generate`
with a streamer), 1 + N new tokens for a P-token prompt, EOS ignored:

- prefill: time from the generation call to the first new token (the P-token forward pass);
- decode: N / time from the first to the last new token (N single-token steps).

The random checkpoint is written once with `stablecode init` (bf16 on disk) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "starcoder-49k" / "tokenizer.json"
PRESET = "stablecode-completion-alpha-3b-4k"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux


def ensure_checkpoint(directory: Path, preset: str, tokenizer: Path) -> None:
    """Write a random bf16 checkpoint of `preset` with `stablecode init` unless one is there."""
    if (directory / "config.json").exists():
        return
    if not tokenizer.is_file():
        sys.exit(f"bench: tokenizer {tokenizer} not found; pass --tokenizer FILE (a 49,152-token tokenizer.json)")
    print(f"bench: writing a random {preset} checkpoint to {directory} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "stablecode.cli", "init", "--preset", preset, "--out", str(directory),
                    "--tokenizer", str(tokenizer), "--dtype", "bfloat16"], check=True)


def prompt_ids(vocab_size: int, length: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return torch.randint(1, vocab_size, (length,), generator=generator).tolist()  # 0 is EOS


def run_ours(args) -> dict:
    import torch

    from stablecode.checkpoint import load_model
    from stablecode.inference.engine import Engine
    from stablecode.inference.request import Request
    from stablecode.tokenizer import load_tokenizer

    start = time.perf_counter()
    model = load_model(args.checkpoint, dtype=args.dtype)
    load_s, load_rss = time.perf_counter() - start, peak_rss_gib()
    tokenizer = load_tokenizer(args.checkpoint)
    context = model.config.max_position_embeddings

    engine = Engine(model, max_batch=1, prefix_cache_mb=0, speculative=False)

    class TimedSequence(Request):
        """Records when each new token is chosen (the end of the forward pass that produced it)."""

        def append(self, token_id: int) -> str:
            self.times.append(time.perf_counter())
            return super().append(token_id)

    def run(ids: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        sequence = TimedSequence(ids, tokenizer, context, max_new_tokens=new_tokens, eos_ids=frozenset())
        sequence.times = [time.perf_counter()]
        for _ in engine.run([sequence]):
            pass
        return sequence.times, sequence.generated_ids

    run(prompt_ids(model.config.vocab_size, 16), 4)  # warm-up: allocator, oneDNN primitives
    times, tokens = run(prompt_ids(model.config.vocab_size, args.prompt_tokens), 1 + args.new_tokens)
    return dict(load_s=load_s, load_peak_rss_gib=load_rss, times=times, tokens=tokens)


def run_transformers(args) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM
    from transformers.generation.streamers import BaseStreamer

    start = time.perf_counter()
    model = GPTNeoXForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype).eval()
    load_s, load_rss = time.perf_counter() - start, peak_rss_gib()

    class TimedStreamer(BaseStreamer):
        """generate() calls put() with the prompt first, then once per new token."""

        def __init__(self):
            self.times, self.tokens, self.calls = [], [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())
                self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    def run(ids: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        streamer = TimedStreamer()
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
        return [start] + streamer.times, streamer.tokens

    run(prompt_ids(model.config.vocab_size, 16), 4)
    times, tokens = run(prompt_ids(model.config.vocab_size, args.prompt_tokens), 1 + args.new_tokens)
    return dict(load_s=load_s, load_peak_rss_gib=load_rss, times=times, tokens=tokens,
                attention=model.config._attn_implementation)


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.engine == "ours" else run_transformers(args)
    times = result.pop("times")
    result.update(
        engine=args.engine, dtype=args.dtype, threads=torch.get_num_threads(),
        prefill_s=times[1] - times[0],
        decode_tokens_per_s=(len(times) - 2) / (times[-1] - times[1]),
        peak_rss_gib=peak_rss_gib(),
    )
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint directory (default: a random one in the temp dir, written with "
                             "`stablecode init` if absent)")
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--engines", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the first token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", dest="engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        worker(args)
        return

    if args.checkpoint is None:
        args.checkpoint = Path(tempfile.gettempdir()) / f"stablecode-{args.preset}-random-bf16"
    ensure_checkpoint(args.checkpoint, args.preset, args.tokenizer)
    results = []
    for dtype in args.dtypes:
        for engine in args.engines:
            print(f"bench: {engine} {dtype} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--worker", engine, "--dtype", dtype, "--checkpoint",
                       str(args.checkpoint), "--prompt-tokens", str(args.prompt_tokens),
                       "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results.append(result)
            print(f"bench:   prefill {result['prefill_s']:.2f} s, decode {result['decode_tokens_per_s']:.2f} tok/s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)

    print(f"\n{args.preset}, random weights, prompt {args.prompt_tokens} tokens, {args.new_tokens} decode steps, "
          f"{args.threads} threads, greedy\n")
    print("| dtype | engine | prefill (s) | decode (tok/s) | decode vs transformers | load (s) | peak RSS after load (GiB) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        peer = next((p for p in results if p["dtype"] == r["dtype"] and p["engine"] == "transformers"), None)
        ratio = f"{r['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}x" if peer else "-"
        print(f"| {r['dtype']} | {r['engine']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.2f} | {ratio} | "
              f"{r['load_s']:.1f} | {r['load_peak_rss_gib']:.2f} | {r['peak_rss_gib']:.2f} |")
    for dtype in args.dtypes:
        pair = [r for r in results if r["dtype"] == dtype]
        if len(pair) == 2:
            same = sum(a == b for a, b in zip(pair[0]["tokens"], pair[1]["tokens"]))
            print(f"\n{dtype}: {same}/{len(pair[0]['tokens'])} generated tokens identical between the engines")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
