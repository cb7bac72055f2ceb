"""How /overlap's lookup cost grows with the document: each size's time as a ratio to the smallest
one's, in the same run (linear cost: the ratio follows the size ratio).

    python scripts/bench/overlap.py [--index DIR] [--sizes 125000,250000,500000,1000000]

Documents: "mixed" (200 characters of a training file, then 100 new ones, repeated), "copied"
(training files back to back) and "fresh" (no training text). Default index: the embedded model's.
"""

from __future__ import annotations

import argparse
import random
import time

from stablecode.machine import describe_cpu


def documents(attributor, size: int, rng: random.Random) -> dict[str, str]:
    files = [attributor.source_text(i) for i in range(attributor.num_sources)]
    corpus = "".join(files)

    def fresh(n: int) -> str:
        return "".join(rng.choice("abcdefgh ij\n") for _ in range(n))

    mixed = []
    while sum(map(len, mixed)) < size:
        start = rng.randrange(len(corpus) - 200)
        mixed.append(corpus[start:start + 200] + fresh(100))
    return {"mixed": "".join(mixed)[:size], "copied": (corpus * (1 + size // len(corpus)))[:size],
            "fresh": fresh(size)}


def main() -> None:
    from stablecode.attribution import Attributor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=None)
    parser.add_argument("--sizes", default="125000,250000,500000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    attributor = Attributor(args.index)
    print(f"CPU: {describe_cpu()}\nindex: {attributor}")
    base: dict[str, float] = {}
    print(f"{'document':8s} {'characters':>11s} {'seconds':>8s} {'x size':>7s} {'x time':>7s} spans")
    for size in sizes:
        for kind, document in documents(attributor, size, random.Random(size)).items():
            started = time.perf_counter()
            spans = attributor.overlap(document)["spans"]
            seconds = time.perf_counter() - started
            base.setdefault(kind, seconds)
            print(f"{kind:8s} {size:>11,} {seconds:8.2f} {size / sizes[0]:7.1f} {seconds / base[kind]:7.1f} "
                  f"{len(spans)}", flush=True)


if __name__ == "__main__":
    main()
