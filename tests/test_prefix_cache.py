"""Prefix reuse: a prompt that extends or edits a recent one runs only its new tokens, same output."""

import pytest
import torch

from stablecode import Completer
from stablecode.prefix_cache import PrefixCache, common_prefix_length

BASE = ("import os\n\ndef add(a, b):\n    return a + b\n\nclass Foo:\n    def __init__(self):\n"
        "        self.x = 1\n\nfor i in range(10):\n    print(i)\n")


@pytest.fixture(scope="module")
def completers(tiny_checkpoint):
    plain = Completer(tiny_checkpoint)
    cached = Completer(tiny_checkpoint, prefix_cache=True)
    cached.model = plain.model  # one model: any difference comes from the cache alone
    return plain, cached


def check_same(plain, cached, prompt, **options):
    expected = plain.complete(prompt, **options)
    got = cached.complete(prompt, **options)
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, expected.finish_reason)
    return got


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([5], [6]) == 0


def test_extending_and_editing_reuse_the_prefix(completers):
    plain, cached = completers
    cache = cached.prefix_cache
    cached.prefix_cache.clear()
    tokens = cached.tokenizer.encode
    check_same(plain, cached, BASE, max_new_tokens=8)
    assert cache.reused_tokens == 0 and cache.prefilled_tokens == len(tokens(BASE))

    # Typing one more character: only the last token (re-tokenized) and the new one run.
    extended = BASE + "x"
    check_same(plain, cached, extended, max_new_tokens=8)
    assert cache.reused_tokens >= len(tokens(BASE)) - 1
    assert cache.prefilled_tokens == len(tokens(extended)) - cache.reused_tokens <= 2

    # A one-character edit in the middle: everything before the edit is reused.
    middle = BASE.index("class")
    edited = extended[:middle] + "#" + extended[middle:]
    check_same(plain, cached, edited, max_new_tokens=8)
    assert cache.reused_tokens >= len(tokens(extended[:middle])) - 1
    assert cache.prefilled_tokens == len(tokens(edited)) - cache.reused_tokens

    # The same prompt again: only its last token runs (its logits are needed).
    check_same(plain, cached, edited, max_new_tokens=8)
    assert cache.prefilled_tokens == 1

    # Accepting the completion: the generated tokens were cached too (all but the last, never fed).
    result = check_same(plain, cached, edited, max_new_tokens=8)
    in_cache = (tokens(edited) + result.token_ids)[:-1]
    accepted = edited + result.text
    check_same(plain, cached, accepted, max_new_tokens=8)
    assert cache.reused_tokens == min(common_prefix_length(in_cache, tokens(accepted)), len(tokens(accepted)) - 1)
    assert cache.reused_tokens > len(tokens(edited))


def test_sampling_streaming_and_speculation_with_the_cache(completers):
    plain, cached = completers
    for options in (dict(temperature=0.8, top_p=0.9, seed=3), dict(repetition_penalty=1.2), dict(stop=["\n"])):
        check_same(plain, cached, BASE, max_new_tokens=12, **options)
        check_same(plain, cached, BASE + "def", max_new_tokens=12, **options)
    expected = plain.complete(BASE + "  ", max_new_tokens=16)
    assert "".join(cached.stream(BASE + "  ", max_new_tokens=16)) == expected.text
    got = cached.complete(BASE + "  ", max_new_tokens=16, speculative=True)
    assert got.token_ids == expected.token_ids and cached.prefix_cache.prefilled_tokens == 1
    # Batches take the batched path (no reuse) and still work; the model is left clean.
    batch = cached.complete_batch([BASE, "x"], max_new_tokens=4)
    assert [c.token_ids for c in batch] == [c.token_ids for c in plain.complete_batch([BASE, "x"], max_new_tokens=4)]
    assert cached.model.kv_cache_size is None


def test_several_entries_keep_several_files(tiny_checkpoint):
    completer = Completer(tiny_checkpoint, prefix_cache=2)
    other = "héllo wörld ünïcode ✓ 日本語\n" * 3
    for prompt in (BASE, other):
        completer.complete(prompt, max_new_tokens=2)
        assert completer.prefix_cache.reused_tokens == 0
    for prompt in (BASE + "a", other + "b"):
        completer.complete(prompt, max_new_tokens=2)
        assert completer.prefix_cache.reused_tokens >= len(completer.tokenizer.encode(prompt)) - 3
    # With one entry, alternating files evict each other.
    single = Completer(tiny_checkpoint, prefix_cache=1)
    single.model = completer.model
    for prompt in (BASE, other, BASE):
        single.complete(prompt, max_new_tokens=2)
        assert single.prefix_cache.reused_tokens == 0


def test_cache_limits_and_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="at least one entry"):
        PrefixCache(entries=0)
    completer = Completer(tiny_checkpoint)
    completer.prefix_cache = PrefixCache(max_seq_len=64)
    long_prompt = BASE * 3
    with pytest.raises(ValueError, match="exceed the prefix cache"):
        completer.complete(long_prompt, max_new_tokens=8)
    assert completer.model.kv_cache_size is None
    short = completer.complete("def f(x):", max_new_tokens=8)
    assert short.completion_tokens == 8 and completer.prefix_cache.capacity == 64


def test_an_error_mid_generation_forgets_the_entry(tiny_checkpoint):
    completer = Completer(tiny_checkpoint, prefix_cache=True)
    completer.complete(BASE, max_new_tokens=4)
    stream = completer.stream(BASE + "x", max_new_tokens=50)
    next(stream)
    stream.close()  # a client that disconnects: generation stops, the cache keeps what is valid
    assert completer.model.kv_cache_size is None
    completer.complete(BASE + "x", max_new_tokens=4)
    assert completer.prefix_cache.reused_tokens >= len(completer.tokenizer.encode(BASE)) - 1


def test_a_new_model_invalidates_the_entries(tiny_checkpoint):
    completer = Completer(tiny_checkpoint, prefix_cache=True)
    completer.complete(BASE, max_new_tokens=2)
    completer.model = completer.model.to(torch.bfloat16)
    completer.complete(BASE, max_new_tokens=2)
    assert completer.prefix_cache.reused_tokens == 0  # float32 keys mean nothing to a bfloat16 model
