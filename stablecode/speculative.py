"""Single-sequence decoding with prompt-lookup speculation and prefix reuse.

Prompt lookup (no draft model): code repeats itself, so the tokens that followed the most recent
earlier occurrence of the last few tokens are a good guess for what comes next. The guesses and the
current token go through the model in one forward pass (k+1 rows cost about what one row costs,
since decoding is bound by reading the weights); the longest prefix of the guesses that matches
what greedy decoding picks is accepted, plus the model's own token after it. Slots written for
rejected guesses are simply overwritten later: the KV cache does not track lengths.
"""

from __future__ import annotations

from typing import Iterator

import torch

from stablecode.generate import Sequence
from stablecode.model import GPTNeoX
from stablecode.prefix_cache import PrefixCache

DEFAULT_DRAFT_TOKENS = 8
MAX_NGRAM = 3
# A single matching token guesses poorly: measured on the nano model and stdlib code, n >= 2 kept
# nearly all accepted tokens (2.49 vs 2.59 per pass) while verifying far fewer wrong guesses.
MIN_NGRAM = 2


def propose_draft(tokens: list[int], max_tokens: int = DEFAULT_DRAFT_TOKENS, max_ngram: int = MAX_NGRAM,
                  min_ngram: int = MIN_NGRAM) -> list[int]:
    """The continuation of the most recent earlier match of the longest suffix n-gram (n = max_ngram..min_ngram)."""
    if max_tokens <= 0:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        pattern = tokens[-n:]
        first = pattern[0]
        # Most recent occurrence first: nearby code is the better guess.
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == pattern:
                return tokens[start + n:start + n + max_tokens]
    return []


def draft_tokens_option(speculative: bool | int | None) -> int:
    """How many tokens to draft for a `speculative=` option: False/0/None → 0, True → the default."""
    if speculative is None or speculative is False:
        return 0
    if speculative is True:
        return DEFAULT_DRAFT_TOKENS
    if not isinstance(speculative, int) or speculative < 0:
        raise ValueError(f"speculative must be a bool or a number of draft tokens >= 0, got {speculative!r}")
    return speculative


@torch.inference_mode()
def generate_one(model: GPTNeoX, sequence: Sequence, prefix_cache: PrefixCache | None = None,
                 draft_tokens: int = 0) -> Iterator[str]:
    """Complete one sequence, yielding visible text pieces.

    prefix_cache: reuse (and keep) the KV cache of recent prompts. draft_tokens: verify up to this
    many prompt-lookup guesses per forward pass (greedy decoding only; the output is the same).
    """
    if draft_tokens and not sequence.sampling.greedy:
        raise ValueError("speculative decoding needs greedy decoding (temperature 0)")
    from stablecode.kernels import DECODE_MAX_ROWS

    draft_tokens = min(draft_tokens, DECODE_MAX_ROWS - 1)  # keep verification on the decode kernels
    device = model.rotary_cos.device
    prompt = sequence.prompt_ids
    valid = 0  # leading tokens of prompt + generated whose keys/values are in the cache
    if prefix_cache is None:
        capacity = min(len(prompt) + sequence.max_new_tokens + draft_tokens, model.config.max_position_embeddings)
        model.setup_kv_cache(1, capacity)
    try:
        if prefix_cache is not None:
            logits = prefix_cache.prefill(model, prompt, sequence.max_new_tokens)
            capacity = prefix_cache.capacity
        else:
            last = torch.tensor([[len(prompt) - 1]], device=device)
            logits = model(torch.tensor([prompt], device=device), input_pos=0, logit_positions=last)[0, -1]
        valid = len(prompt)  # every prompt slot is written now
        if sequence.finished:  # max_new_tokens 0: the prompt is cached all the same
            return
        piece = sequence.append(sequence.choose(logits))
        if piece:
            yield piece
        while not sequence.finished:
            position = sequence.position  # slot of the newest token, not yet in the cache
            tokens = prompt + sequence.generated_ids
            room = min(draft_tokens, capacity - position - 1,
                       sequence.max_new_tokens - len(sequence.generated_ids) - 1)
            draft = propose_draft(tokens, room) if room > 0 else []
            inputs = torch.tensor([[tokens[-1]] + draft], device=device)
            all_logits = model(inputs, input_pos=position)[0]
            for i in range(len(draft) + 1):
                token = sequence.choose(all_logits[i])
                piece = sequence.append(token)
                valid = position + i + 1  # inputs[0..i] are the tokens greedy decoding chose
                if piece:
                    yield piece
                if sequence.finished or i == len(draft) or token != draft[i]:
                    break
    finally:
        if prefix_cache is not None:
            prefix_cache.release(model, (prompt + sequence.generated_ids)[:valid])
        else:
            model.clear_kv_cache()
