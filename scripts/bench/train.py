"""Training-step throughput: stablecode's training step against transformers' GPTNeoXForCausalLM, same run.

Same config, same weights, batch, sequence length and threads; forward + cross-entropy + backward +
AdamW step. stablecode's step is the one `stablecode train` runs: bf16 autocast, fused AdamW and,
with --compile, torch.compile of the model and its loss together (`next_token_loss`). transformers
runs eagerly with the same precision and optimizer (and compiled too with --compile-transformers). The engines alternate step by step so
machine noise hits them alike. Prints the CPU, the measured bf16/fp32 GEMM peaks, tokens/s of each,
model FLOPs utilisation against the peak of the precision used, and the ratio.
Usage: python scripts/bench/train.py [--model configs/nano/model.json] [--batch 8] [--seq-len 512]
       [--steps 6] [--precision bf16] [--compile] [--compile-transformers]
Run it through /work/timing.sh (it needs both cores, and pauses the background training run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stablecode import kernels
from stablecode.checkpoint import hf_state_dict
from stablecode.config import ModelConfig
from stablecode.machine import describe_cpu
from stablecode.model import GPTNeoX, init_weights
from stablecode.train.loop import measure_peak_flops, next_token_loss, training_flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/nano/model.json", help="preset name or config.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile stablecode's model")
    parser.add_argument("--compile-transformers", action="store_true", help="torch.compile transformers' model too")
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    config = (ModelConfig.from_json_file(args.model) if args.model.endswith(".json")
              else ModelConfig.from_preset(args.model))
    print(f"CPU: {describe_cpu()}")
    kernels.load()  # as training does: the training attention kernel where the CPU has AVX-512
    print(f"attention in training: {'stablecode kernel' if kernels.train_attention_available() else 'SDPA'}")
    peaks = {name: measure_peak_flops(torch.device("cpu"), dtype) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print("measured GEMM peak (1024^3 matmul, %d threads): fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s"
          % (args.threads, peaks["fp32"] / 1e9, peaks["bf16"] / 1e9))
    torch.manual_seed(0)
    ours = GPTNeoX(config)
    init_weights(ours)
    theirs = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict()))
    head = "lm_head.weight" if hasattr(theirs, "lm_head") else "embed_out.weight"
    theirs.load_state_dict({head if k == "embed_out.weight" else k: v.clone() for k, v in hf_state_dict(ours).items()},
                           strict=False)
    data = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = data[:, :-1], data[:, 1:]
    loss_ours = torch.compile(next_token_loss) if args.compile else next_token_loss
    forward_theirs = torch.compile(theirs) if args.compile_transformers else theirs

    def step_ours():
        loss_ours(ours, inputs, targets, args.precision == "bf16").backward()

    def step_theirs():
        with autocast:
            logits = forward_theirs(input_ids=inputs).logits
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    name_ours = "stablecode" + (" (compiled)" if args.compile else "")
    name_theirs = "transformers" + (" (compiled)" if args.compile_transformers else "")
    engines = {name_ours: (ours, step_ours), name_theirs: (theirs, step_theirs)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                  for name, (model, _) in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    first: dict[str, float] = {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    warmup = 2
    for step in range(args.steps + warmup):
        for name, (model, run) in engines.items():
            model.train()
            started = time.perf_counter()
            run()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            if step == 0:
                first[name] = elapsed  # compilation, allocator and kernel warm-up
            elif step >= warmup:
                times[name].append(elapsed)
    tokens = args.batch * args.seq_len
    flops = training_flops_per_token(config, args.seq_len)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{args.model} ({config.num_parameters:,} parameters), batch {args.batch} x {args.seq_len}, "
          f"{args.precision}, {args.threads} threads, median of {args.steps} steps after {warmup} warm-up steps")
    for name, rate in rates.items():
        print(f"  {name:<26} {rate:10,.0f} tokens/s   MFU {rate * flops / peaks[args.precision]:6.1%}"
              f"   first step {first[name]:.1f} s")
    print(f"  ratio {name_ours} / {name_theirs}: {rates[name_ours] / rates[name_theirs]:.2f}")


if __name__ == "__main__":
    main()
