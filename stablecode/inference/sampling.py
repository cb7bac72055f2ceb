"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty.

Randomness comes only from an explicit `torch.Generator` per sequence, so concurrent requests
never disturb each other and the same seed gives the same output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device="cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return generator


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits divided, negative multiplied."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    scores = logits.gather(-1, previous_ids)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, previous_ids, scores)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    # Select by index: a ">= k-th value" mask would let tied logits through.
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 previous_ids: torch.Tensor | None = None) -> int:
    """Pick one token from logits [vocab] (any float dtype)."""
    logits = logits.float()
    if previous_ids is not None:
        logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k(logits / params.temperature, params.top_k)
    if params.top_p < 1.0:
        probs, token_ids = nucleus(logits, params.top_p)
        return int(token_ids[torch.multinomial(probs, 1, generator=generator)])
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


NUCLEUS_CANDIDATES = 64


def nucleus(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p of logits [vocab]: the smallest set of most likely tokens whose probability reaches p
    (at least one), as (probabilities, token ids), most likely first; sample from them renormalised.

    Code models are confident, so the set is nearly always a few tokens: it is looked for among the
    top NUCLEUS_CANDIDATES first, and the whole vocabulary is sorted only when they fall short.
    """
    log_total = torch.logsumexp(logits, dim=-1)
    candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    while True:
        values, token_ids = torch.topk(logits, candidates)
        probs = (values - log_total).exp()
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        if candidates == logits.shape[-1] or before[-1] >= p:
            keep = max(1, int((before < p).sum()))
            return probs[:keep], token_ids[:keep]
        candidates = logits.shape[-1]
