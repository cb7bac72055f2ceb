"""Training-step throughput: our GPTNeoX against transformers' GPTNeoXForCausalLM, same run.

Same config (the nano preset by default), same weights, batch, sequence length, precision and
threads; forward + cross-entropy + backward + AdamW step; the two models alternate so machine noise
hits both alike. Prints tokens/s for each and the ratio.
Usage: python scripts/bench/train.py [--preset stablecode-nano] [--batch 2] [--seq-len 1024] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stablecode.checkpoint import hf_state_dict
from stablecode.config import ModelConfig
from stablecode.model import GPTNeoX, init_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stablecode-nano")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = GPTNeoX(config)
    init_weights(ours)
    theirs = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict()))
    head = "lm_head.weight" if hasattr(theirs, "lm_head") else "embed_out.weight"
    theirs.load_state_dict({head if k == "embed_out.weight" else k: v.clone() for k, v in hf_state_dict(ours).items()},
                           strict=False)
    data = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = data[:, :-1], data[:, 1:]

    def step_ours(model, optimizer):
        logits = model(inputs)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    def step_theirs(model, optimizer):
        logits = model(input_ids=inputs).logits
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()

    engines = {"stablecode": (ours, step_ours), "transformers": (theirs, step_theirs)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for step in range(args.steps + 1):
        for name, (model, run) in engines.items():
            model.train()
            started = time.perf_counter()
            with autocast:
                run(model, optimizers[name])
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step > 0:  # the first step warms allocators and kernels
                times[name].append(time.perf_counter() - started)
    tokens = args.batch * args.seq_len
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{args.preset} ({config.num_parameters:,} parameters), batch {args.batch} x {args.seq_len}, "
          f"{args.precision}, {args.threads} threads, median of {args.steps} steps")
    for name, rate in rates.items():
        print(f"  {name:<13} {rate:10,.0f} tokens/s")
    print(f"  ratio stablecode / transformers: {rates['stablecode'] / rates['transformers']:.2f}")


if __name__ == "__main__":
    main()
