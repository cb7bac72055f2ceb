#!/usr/bin/env python
"""GPU benchmark of the 3B shape (random bf16 weights), run by scripts/bench/gpu.sh on a machine with
an NVIDIA GPU, in one go of a few minutes:

1. parity: our model against transformers' GPTNeoXForCausalLM, both bf16 on the GPU, same weights:
   logits error relative to their spread and argmax agreement on a 128-token prompt;
2. decode at batch 1 after a 512-token prompt: eager, and the decode step under torch.compile;
3. decode throughput at batch 32 through the inference engine (greedy, 64 new tokens each);
4. prefill of 2,048 tokens;
5. HBM: achieved bandwidth of a device copy and of batch-1 decode (weight bytes x tok/s) against the
   card's peak (from its name; "unknown" for cards not in the table).

Without a CUDA device it refuses with exit status 2 and one line saying so. `--device cpu` with a
small `--preset` runs the same steps on the CPU (a smoke test of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Peak HBM/GDDR bandwidth by card name (vendor datasheets), GB/s.
PEAK_GB_S = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "GH200": 4000,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
             "L40S": 864, "L40": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "V100": 900, "T4": 320}

NO_GPU_EXIT = 2


def peak_bandwidth(name: str) -> float | None:
    for key in sorted(PEAK_GB_S, key=len, reverse=True):  # the most specific name first
        if key in name:
            return float(PEAK_GB_S[key])
    return None


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_model(preset: str, device):
    import torch

    from stablecode import GPTNeoX, ModelConfig
    from stablecode.model import init_weights

    config = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = GPTNeoX(config)
    model = model.to_empty(device=device)
    model.reset_rotary_tables()
    init_weights(model, torch.Generator(device=device).manual_seed(0))
    return model.to(torch.bfloat16).eval()


def parity(model, device, tokens: int) -> dict:
    """Our logits against transformers' on the same weights (its module names are ours)."""
    import torch
    import transformers

    hf_config = transformers.GPTNeoXConfig(**model.config.to_hf_dict())
    with torch.device(device):
        reference = transformers.GPTNeoXForCausalLM(hf_config).to(torch.bfloat16).eval()
    head = "embed_out.weight" if hasattr(reference, "embed_out") else "lm_head.weight"  # renamed in transformers 5
    state = {(head if k == "embed_out.weight" else k): v for k, v in model.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"transformers' model does not take our weights: missing {missing}, unexpected {unexpected}")
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ours = model(ids)[0].float()
        theirs = reference(ids).logits[0].float()
    spread = (theirs.max() - theirs.min()).item()
    result = dict(tokens=tokens, max_abs_error_of_spread=((ours - theirs).abs().max().item() / spread),
                  mean_abs_error_of_spread=((ours - theirs).abs().mean().item() / spread),
                  argmax_agreement=(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item())
    del reference
    return result


def decode(model, device, prompt: int, new_tokens: int, compiled: bool) -> float:
    """Greedy tok/s at batch 1 after a `prompt`-token prefill (the step compiled or eager)."""
    import torch

    from stablecode.kv_cache import KVCache

    cache = KVCache.for_model(model, 1, prompt + new_tokens + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)

    def step(token, position):
        return model(token, cache=cache, input_pos=position)[:, -1]

    run = torch.compile(step, dynamic=True) if compiled else step
    with torch.inference_mode():
        logits = model(ids, cache=cache, input_pos=0, logit_positions=torch.tensor([[prompt - 1]], device=device))
        token = logits[:, -1].argmax(-1, keepdim=True)
        for warm in range(3):  # compilation and first-call costs stay out of the timing
            run(token, prompt + warm)

        def loop():
            nonlocal token
            for i in range(new_tokens):
                token = run(token, prompt + i).argmax(-1, keepdim=True)
        seconds = timed(loop, device)
    return new_tokens / seconds


def prefill(model, device, tokens: int) -> float:
    import torch

    from stablecode.kv_cache import KVCache

    cache = KVCache.for_model(model, 1, tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3)).to(device)
    last = torch.tensor([[tokens - 1]], device=device)
    with torch.inference_mode():
        model(ids[:, :64], cache=cache, input_pos=0, logit_positions=last[:, :1] * 0 + 63)  # warm up
        return timed(lambda: model(ids, cache=cache, input_pos=0, logit_positions=last), device)


def engine_batch(model, device, rows: int, prompt: int, new_tokens: int) -> dict:
    """Total generated tok/s of `rows` greedy requests at once through the inference engine."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from stablecode.inference.engine import Engine, Finished
    from stablecode.inference.request import Request
    from stablecode.tokenizer import Tokenizer

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}  # random weights: any ids will do
    tokenizer = Tokenizer(HFTokenizer(WordLevel(vocab, unk_token="t0")))
    engine = Engine(model, max_batch=rows, prefix_cache_mb=0, speculative=False)
    generator = torch.Generator().manual_seed(4)
    requests = [Request(torch.randint(0, model.config.vocab_size, (prompt,), generator=generator).tolist(), tokenizer,
                        model.config.max_position_embeddings, max_new_tokens=new_tokens, device=device,
                        eos_ids=frozenset()) for _ in range(rows)]
    synchronize(device)
    start = time.perf_counter()
    finished = sum(1 for _, event in engine.run(requests) if isinstance(event, Finished))
    synchronize(device)
    seconds = time.perf_counter() - start
    return dict(rows=rows, finished=finished, generated=rows * new_tokens, seconds=seconds,
                tok_s=rows * new_tokens / seconds)


def copy_bandwidth(device, gigabytes: float = 2.0) -> float:
    """GB/s moved (read + write) by a device-to-device copy."""
    import torch

    source = torch.empty(int(gigabytes * 1e9 / 2), dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(timed(lambda: target.copy_(source), device) for _ in range(5))
    return 2 * source.numel() * 2 / seconds / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stablecode-completion-alpha-3b-4k")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode measurement")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("scripts/bench/gpu.sh: no CUDA GPU is visible here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}); nothing was run", file=sys.stderr)
        return NO_GPU_EXIT
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bandwidth(name) if device.type == "cuda" else None
    results: dict = dict(device=name, torch=torch.__version__, preset=args.preset, peak_gb_s=peak)
    print(f"# {name}; torch {torch.__version__}; peak bandwidth {peak or 'unknown'} GB/s", flush=True)

    def report(key, value):
        results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)

    model = build_model(args.preset, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report("weight_bytes", weight_bytes)
    report("parity", parity(model, device, 128))
    report("copy_gb_s", copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.1))
    eager = decode(model, device, args.prompt_tokens, args.new_tokens, compiled=False)
    report("decode_batch1_eager", dict(tok_s=eager, weight_gb_s=eager * weight_bytes / 1e9))
    if not args.no_compile:
        compiled = decode(model, device, args.prompt_tokens, args.new_tokens, compiled=True)
        report("decode_batch1_compiled", dict(tok_s=compiled, weight_gb_s=compiled * weight_bytes / 1e9))
    best = max(results.get("decode_batch1_compiled", {}).get("tok_s", 0), eager)
    if peak:
        report("decode_batch1_of_roofline", best * weight_bytes / 1e9 / peak)
    report("engine_batch", engine_batch(model, device, args.batch, args.prompt_tokens // 4, args.new_tokens))
    seconds = prefill(model, device, args.prefill_tokens)
    report("prefill", dict(tokens=args.prefill_tokens, seconds=seconds, tok_s=args.prefill_tokens / seconds))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
