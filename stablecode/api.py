"""The Python API: load a model and its tokenizer once, then complete code."""

from __future__ import annotations

import os
from contextlib import closing
from typing import Iterator

import torch

from stablecode.checkpoint import load_model
from stablecode.inference.engine import DEFAULT_PREFIX_CACHE_MB, Engine, Failed, TokenEvent
from stablecode.inference.request import Completion, Request
from stablecode.inference.sampling import SamplingParams
from stablecode.inference.speculation import draft_tokens_option
from stablecode.registry import resolve_model_dir
from stablecode.tokenizer import load_tokenizer


class Completer:
    """Code completion with one model: `Completer(path).complete("def fib(n):").text`.

    `model` is a checkpoint directory or an embedded model name; None means the embedded default.
    Every call goes through one `stablecode.inference.engine.Engine`, so a prompt that extends or
    edits an earlier one runs only its new tokens (`prefix_cache_mb` of memory keeps prefixes
    beyond the engine's `max_batch` rows; 0 turns reuse off), and greedy completions verify
    prompt-lookup guesses (`speculative`: "auto" — on where measured to pay on this machine —,
    True, False or a number of draft tokens per step). `kv_cache_dtype="int8"` halves the KV cache
    (`stablecode.kv_cache.KVCache`).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, quantize: str | None = None, progress: bool = False,
                 max_batch: int = 8, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 speculative: bool | int | str = "auto", kv_cache_dtype: str = "auto"):
        self.model_dir = resolve_model_dir(model)
        self.model = load_model(self.model_dir, dtype=dtype, device=device, quantize=quantize, progress=progress)
        self.tokenizer = load_tokenizer(self.model_dir, vocab_size=self.model.config.vocab_size)
        self.config = self.model.config
        self.device = self.model.device
        self.engine = Engine(self.model, max_batch=max_batch, prefix_cache_mb=prefix_cache_mb,
                             speculative=speculative, kv_cache_dtype=kv_cache_dtype)

    def request(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, repetition_penalty: float = 1.0, stop: list[str] | tuple[str, ...] | None = None,
                seed: int | None = None, speculative: bool | int | None = None, token_healing: bool = True) -> Request:
        """A prepared (tokenized, context-fitted) request for `prompt`.

        speculative: None uses the engine's setting; True, False or a number of draft tokens.
        token_healing: let the model re-choose the prompt's last token (a prompt ending in "\n" then
        continues indented, as code does); off for token-exact parity with plain decoding."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        return Request(self.tokenizer.encode(prompt), self.tokenizer, self.config.max_position_embeddings,
                       max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=tuple(stop or ()),
                       device=self.device, speculative=None if speculative is None else draft_tokens_option(speculative),
                       token_healing=token_healing)

    def complete(self, prompt: str, **options) -> Completion:
        """Complete one prompt. Options: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed,
        speculative (greedy requests: True, False or a number of prompt-lookup tokens to verify per step),
        token_healing (default True)."""
        return self.complete_batch([prompt], **options)[0]

    def complete_batch(self, prompts: list[str], **options) -> list[Completion]:
        """Complete several prompts together (seed i+k for prompt k when a seed is given)."""
        seed = options.pop("seed", None)
        requests = [self.request(p, seed=None if seed is None else seed + i, **options) for i, p in enumerate(prompts)]
        for _ in self.generate(requests):
            pass
        return [request.result() for request in requests]

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yield the completion's text piece by piece as it is generated."""
        for _, piece in self.generate([self.request(prompt, **options)]):
            yield piece

    def generate(self, requests: list[Request]) -> Iterator[tuple[int, str]]:
        """Run prepared requests, yielding (index, text piece) as text becomes visible."""
        with closing(self.engine.run(requests)) as events:  # stopping early frees the rows at once
            for index, event in events:
                if isinstance(event, TokenEvent) and event.text:
                    yield index, event.text
                elif isinstance(event, Failed):
                    raise RuntimeError(event.message)
