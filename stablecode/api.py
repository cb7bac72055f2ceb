"""The Python API: load a model and its tokenizer once, then complete code."""

from __future__ import annotations

import os
from typing import Iterator

import torch

from stablecode.checkpoint import load_model
from stablecode.registry import resolve_model_dir
from stablecode.generate import Completion, Sequence, generate
from stablecode.prefix_cache import PrefixCache
from stablecode.sampling import SamplingParams
from stablecode.speculative import draft_tokens_option, generate_one
from stablecode.tokenizer import load_tokenizer


class Completer:
    """Code completion with one model: `Completer(path).complete("def fib(n):").text`.

    `model` is a checkpoint directory or an embedded model name; None means the embedded default.
    `prefix_cache`: keep the KV cache of this many recent prompts (True: one) so that a prompt
    extending or editing one of them runs only its new tokens (single-prompt calls).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, quantize: str | None = None, progress: bool = False,
                 prefix_cache: bool | int = False):
        self.model_dir = resolve_model_dir(model)
        self.model = load_model(self.model_dir, dtype=dtype, device=device, quantize=quantize, progress=progress)
        self.prefix_cache = PrefixCache(entries=int(prefix_cache)) if prefix_cache else None
        self.tokenizer = load_tokenizer(self.model_dir)
        self.config = self.model.config
        self.device = self.model.rotary_cos.device

    def sequence(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, stop: list[str] | tuple[str, ...] | None = None,
                 seed: int | None = None) -> Sequence:
        """A prepared (tokenized, context-fitted) sequence for `prompt`."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        return Sequence(self.tokenizer.encode(prompt), self.tokenizer, self.config.max_position_embeddings,
                        max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=tuple(stop or ()),
                        device=self.device)

    def complete(self, prompt: str, **options) -> Completion:
        """Complete one prompt. Options: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed,
        speculative (greedy only: True or a number of prompt-lookup tokens to verify per step)."""
        return self.complete_batch([prompt], **options)[0]

    def complete_batch(self, prompts: list[str], **options) -> list[Completion]:
        """Complete several prompts in one batch (seed i+k for prompt k when a seed is given)."""
        seed = options.pop("seed", None)
        draft_tokens = draft_tokens_option(options.pop("speculative", False))
        sequences = [self.sequence(p, seed=None if seed is None else seed + i, **options)
                     for i, p in enumerate(prompts)]
        for _ in self._generate(sequences, draft_tokens):
            pass
        return [s.result() for s in sequences]

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yield the completion's text piece by piece as it is generated."""
        draft_tokens = draft_tokens_option(options.pop("speculative", False))
        for _, piece in self._generate([self.sequence(prompt, **options)], draft_tokens):
            yield piece

    def _generate(self, sequences: list[Sequence], draft_tokens: int) -> Iterator[tuple[int, str]]:
        if len(sequences) == 1 and (self.prefix_cache is not None or draft_tokens):
            for piece in generate_one(self.model, sequences[0], self.prefix_cache, draft_tokens):
                yield 0, piece
        elif draft_tokens:
            raise ValueError("speculative decoding completes one prompt at a time")
        else:
            yield from generate(self.model, sequences)
