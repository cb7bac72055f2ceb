"""Time of a greedy 60-token completion with the embedded model (issue 12's first-contact target: <= 0.5 s).

Loads the model once (the load time is printed too), warms up with one completion, then times
`Completer.complete(prompt, max_new_tokens=60, temperature=0)` on a few real prompts; prints the
CPU, the tokens each completion produced and the median wall time.
Usage: python scripts/nano/latency.py [--model DIR] [--repeats 5]   (through /work/timing.sh)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stablecode.machine import describe_cpu

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n    \"\"\"Every .py file under root.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {describe_cpu()}")
    started = time.perf_counter()
    from stablecode import Completer

    completer = Completer(args.model)
    print(f"import + load: {time.perf_counter() - started:.2f} s ({completer.model_dir})")
    completer.complete(PROMPTS[0], max_new_tokens=60, temperature=0.0)
    for prompt in PROMPTS:
        times, tokens = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            completion = completer.complete(prompt, max_new_tokens=60, temperature=0.0)
            times.append(time.perf_counter() - t)
            tokens = len(completer.tokenizer.encode(completion.text))
        print(f"{prompt.splitlines()[0]!r:45} {tokens:3d} tokens  median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f})")


if __name__ == "__main__":
    main()
