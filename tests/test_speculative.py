"""Prompt-lookup speculative decoding: same greedy output as plain decoding, fewer forward passes."""

import pytest
import torch

from stablecode import Completer
from stablecode.speculative import draft_tokens_option, propose_draft

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in range(",
    "class Foo:\n    def __init__(self):\n        self.x = 1\n        self.x = 1\n        self.x",
    "héllo wörld ünïcode ✓ 日本語\n",
    "x",
]


def test_propose_draft_takes_the_most_recent_longest_match():
    assert propose_draft([1, 2, 3, 4, 1, 2], 8) == [3, 4, 1, 2]
    assert propose_draft([1, 2, 9, 7, 2, 5, 1, 2], 2) == [9, 7]  # the longer [1, 2] beats the more recent [2]
    assert propose_draft([5, 6, 7, 5, 6, 8, 5, 6], 3) == [8, 5, 6]  # the most recent [5, 6] wins
    assert propose_draft([1, 2, 3, 4], 8) == []  # no earlier occurrence of any suffix
    assert propose_draft([7], 8) == [] and propose_draft([], 8) == []
    assert propose_draft([1, 2, 1, 2], 0) == []
    assert propose_draft([4, 9, 3, 9], 8) == []  # one matching token is too weak a guess by default
    assert propose_draft([4, 9, 3, 9], 8, min_ngram=1) == [3, 9]


def test_draft_tokens_option():
    assert draft_tokens_option(False) == 0 and draft_tokens_option(None) == 0
    assert draft_tokens_option(True) > 0 and draft_tokens_option(5) == 5
    with pytest.raises(ValueError, match="speculative"):
        draft_tokens_option(-1)
    with pytest.raises(ValueError, match="speculative"):
        draft_tokens_option("yes")


def count_forward_passes(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    return calls, handle


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_speculative_greedy_output_is_identical(tiny_checkpoint, quantize):
    completer = Completer(tiny_checkpoint, quantize=quantize)
    calls, handle = count_forward_passes(completer.model)
    try:
        saved_passes = 0
        for prompt in PROMPTS:
            plain = completer.complete(prompt, max_new_tokens=48)
            calls.clear()
            fast = completer.complete(prompt, max_new_tokens=48, speculative=True)
            assert fast.text == plain.text and fast.token_ids == plain.token_ids, prompt
            assert fast.finish_reason == plain.finish_reason
            # One prefill plus at most one pass per new token; fewer when guesses are accepted.
            assert len(calls) <= 1 + len(fast.token_ids)
            saved_passes += 1 + len(fast.token_ids) - len(calls)
            streamed = "".join(completer.stream(prompt, max_new_tokens=48, speculative=4))
            assert streamed == plain.text
        # A random tiny model falls into loops, so prompt lookup finds and verifies real guesses.
        assert saved_passes > 20
    finally:
        handle.remove()
    assert completer.model.kv_cache_size is None  # the model is left clean for batched generation


def test_speculative_respects_stop_strings_and_limits(tiny_checkpoint):
    completer = Completer(tiny_checkpoint)
    prompt = PROMPTS[1]
    for options in (dict(max_new_tokens=7), dict(max_new_tokens=40, stop=["\n"]), dict(max_new_tokens=1),
                    dict(max_new_tokens=30, repetition_penalty=1.3)):
        plain = completer.complete(prompt, **options)
        fast = completer.complete(prompt, speculative=15, **options)
        assert (fast.text, fast.token_ids, fast.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)


def test_speculative_at_the_end_of_the_context(tiny_checkpoint):
    completer = Completer(tiny_checkpoint)
    context = completer.config.max_position_embeddings
    ids = completer.tokenizer.encode(PROMPTS[1] * 40)
    assert len(ids) > context
    plain = completer.complete(PROMPTS[1] * 40, max_new_tokens=20)
    fast = completer.complete(PROMPTS[1] * 40, max_new_tokens=20, speculative=True)
    assert fast.token_ids == plain.token_ids and fast.truncated_prompt_tokens == plain.truncated_prompt_tokens


def test_speculative_refuses_sampling_and_batches(tiny_checkpoint):
    completer = Completer(tiny_checkpoint)
    with pytest.raises(ValueError, match="greedy"):
        completer.complete("x", temperature=0.7, speculative=True)
    with pytest.raises(ValueError, match="one prompt at a time"):
        completer.complete_batch(["x", "y"], speculative=True)
    # Nothing is left behind by the refused calls.
    assert completer.model.kv_cache_size is None
    assert completer.complete("x", max_new_tokens=3).completion_tokens == 3
