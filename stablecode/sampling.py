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


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    remove = cumulative - probs >= p  # mass before this token already reaches p
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_indices, sorted_logits)


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
        nucleus = _small_nucleus(logits, params.top_p)
        if nucleus is not None:
            probs, token_ids = nucleus
            return int(token_ids[torch.multinomial(probs, 1, generator=generator)])
        logits = filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


NUCLEUS_CANDIDATES = 64


def _small_nucleus(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-p set and its probabilities when it lies within the top NUCLEUS_CANDIDATES tokens.

    Code models are confident: the nucleus is nearly always a few tokens, and finding it among
    the top 64 costs a fraction of sorting the whole vocabulary. None when it is larger.
    """
    if logits.shape[-1] <= NUCLEUS_CANDIDATES:
        return None
    values, token_ids = torch.topk(logits, NUCLEUS_CANDIDATES)
    probs = (values - torch.logsumexp(logits, dim=-1)).exp()
    cumulative = probs.cumsum(dim=-1)
    if not cumulative[-1] >= p:  # the same rule as filter_top_p: mass before a token reaches p
        return None
    keep = int((cumulative - probs < p).sum())
    return probs[:keep], token_ids[:keep]
