"""Prefix reuse in the engine: a prompt that extends or edits any recent one runs only its new
tokens, with the same output; it works at batch > 1 and keeps prefixes under a memory budget (LRU)."""

import copy

import pytest

from stablecode import Completer
from stablecode.inference.engine import Engine
from stablecode.inference.prefix_cache import common_prefix_length
from stablecode.kv_cache import KVCache

BASE = ("import os\n\ndef add(a, b):\n    return a + b\n\nclass Foo:\n    def __init__(self):\n"
        "        self.x = 1\n\nfor i in range(10):\n    print(i)\n")
OTHER = "héllo wörld ünïcode ✓ 日本語\n" * 3
FILES = [BASE, OTHER, "class Bar:\n    pass\n" * 4, "for k in range(3):\n    x = k * 2\n" * 3]


def variant(completer: Completer, **engine_options) -> Completer:
    other = copy.copy(completer)
    other.engine = Engine(completer.model, kv_cache_dtype=completer.engine.kv_cache_dtype, **engine_options)
    return other


@pytest.fixture(scope="module", params=[(None, "auto"), ("int8", "auto"), (None, "int8")],
                ids=["float", "int8-weights", "int8-kv-cache"])
def plain(tiny_checkpoint, request):
    """int8 weights: prompts run through the int8 prompt GEMMs (where the CPU has them) and the few
    new tokens of a reuse through the decode kernels, which give the same bits. An int8 KV cache:
    prefixes are copied and stored with their scales."""
    quantize, kv_cache_dtype = request.param
    return Completer(tiny_checkpoint, prefix_cache_mb=0, quantize=quantize, kv_cache_dtype=kv_cache_dtype)


@pytest.fixture
def cached(plain):
    return variant(plain)  # one model: any difference comes from the cache alone


def check_same(plain, cached, prompt, **options):
    expected = plain.complete(prompt, **options)
    got = cached.complete(prompt, **options)
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, expected.finish_reason)
    assert expected.cached_prompt_tokens == 0
    return got


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([5], [6]) == 0
    long = list(range(1000))
    for cut in (1, 2, 499, 500, 998, 999):
        assert common_prefix_length(long, long[:cut] + [-1] + long[cut + 1:]) == cut


def test_extending_and_editing_reuse_the_prefix(plain, cached):
    tokens = cached.tokenizer.encode
    first = check_same(plain, cached, BASE, max_new_tokens=8)
    assert first.cached_prompt_tokens == 0

    # Typing one more character: only the last token (re-tokenized) and the new one run.
    extended = BASE + "x"
    got = check_same(plain, cached, extended, max_new_tokens=8)
    assert got.cached_prompt_tokens >= len(tokens(BASE)) - 1
    assert got.prompt_tokens - got.cached_prompt_tokens <= 2

    # A one-character edit in the middle: everything before the edit is reused.
    middle = BASE.index("class")
    edited = extended[:middle] + "#" + extended[middle:]
    got = check_same(plain, cached, edited, max_new_tokens=8)
    assert got.cached_prompt_tokens >= len(tokens(extended[:middle])) - 1
    assert got.cached_prompt_tokens <= common_prefix_length(tokens(edited), tokens(extended))

    # The same prompt again: only its last token runs (its logits are needed).
    got = check_same(plain, cached, edited, max_new_tokens=8)
    assert got.cached_prompt_tokens == got.prompt_tokens - 1

    # Accepting the completion: the generated tokens were cached too (all but the last, never fed).
    in_cache = (tokens(edited) + got.token_ids)[:-1]
    accepted = edited + got.text
    again = check_same(plain, cached, accepted, max_new_tokens=8)
    assert again.cached_prompt_tokens == min(common_prefix_length(in_cache, tokens(accepted)),
                                             len(tokens(accepted)) - 1)
    assert again.cached_prompt_tokens > len(tokens(edited))


def test_sampling_streaming_and_speculation_with_the_cache(plain, cached):
    for options in (dict(temperature=0.8, top_p=0.9, seed=3), dict(repetition_penalty=1.2), dict(stop=["\n"])):
        check_same(plain, cached, BASE, max_new_tokens=12, **options)
        assert check_same(plain, cached, BASE + "def", max_new_tokens=12, **options).cached_prompt_tokens > 0
    expected = plain.complete(BASE + "  ", max_new_tokens=16)
    assert "".join(cached.stream(BASE + "  ", max_new_tokens=16)) == expected.text
    got = cached.complete(BASE + "  ", max_new_tokens=16, speculative=True)
    assert got.token_ids == expected.token_ids and got.cached_prompt_tokens == got.prompt_tokens - 1


def test_reuse_at_batch_greater_than_one(plain, cached):
    prompts = [BASE, OTHER, FILES[2]]
    expected = plain.complete_batch(prompts, max_new_tokens=6)
    first = cached.complete_batch(prompts, max_new_tokens=6)
    assert [c.token_ids for c in first] == [c.token_ids for c in expected]
    # Each file typed on, all at once: every row starts from its own file's earlier prompt.
    typed = [p + "y" for p in prompts]
    got = cached.complete_batch(typed, max_new_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.complete_batch(typed, max_new_tokens=6)]
    for completion, prompt in zip(got, prompts):
        assert completion.cached_prompt_tokens >= len(cached.tokenizer.encode(prompt)) - 1
    # The same new prompt three times in one batch: it runs through the model once, the others copy it.
    fresh = FILES[3]
    same = cached.complete_batch([fresh] * 3, max_new_tokens=6)
    assert len({tuple(c.token_ids) for c in same}) == 1
    assert sorted(c.cached_prompt_tokens for c in same)[1:] == [same[0].prompt_tokens - 1] * 2
    assert cached.engine.stats()["max_rows_in_step"] == 3


def test_switching_files_keeps_them_in_the_store(plain):
    one_row = variant(plain, max_batch=1)
    for prompt in (BASE, OTHER):
        assert one_row.complete(prompt, max_new_tokens=2).cached_prompt_tokens == 0
    for prompt in (BASE + "a", OTHER + "b"):  # the other file was copied out before its row was reused
        got = one_row.complete(prompt, max_new_tokens=2)
        assert got.cached_prompt_tokens >= len(one_row.tokenizer.encode(prompt)) - 3
    assert one_row.engine.stats()["kv_cache_rows"] == 1


def test_lru_eviction_under_the_budget(plain):
    tokens = [len(plain.tokenizer.encode(f)) + 2 for f in FILES]  # + the completion's tokens kept in the row
    bytes_per_token = KVCache.for_model(plain.model, 1, 1, kv_cache_dtype=plain.engine.kv_cache_dtype).bytes_per_token
    budget = (max(tokens[0], tokens[1]) + max(tokens[1], tokens[2]) + 1) * bytes_per_token  # two files, not three
    small = variant(plain, max_batch=1, prefix_cache_mb=budget / 2**20)
    for prompt in FILES:  # each new file pushes the previous one out of the row into the store
        assert small.complete(prompt, max_new_tokens=2).cached_prompt_tokens == 0
    stats = small.engine.stats()
    assert stats["prefix_cache_evictions"] >= 1 and stats["prefix_cache_bytes"] <= budget
    assert stats["prefix_cache_prefixes"] == 2
    # The least recently used file (the first) is gone, the last one stored is kept.
    assert small.complete(FILES[0] + "z", max_new_tokens=2).cached_prompt_tokens == 0
    assert small.complete(FILES[2] + "z", max_new_tokens=2).cached_prompt_tokens > 0


def test_no_reuse_with_a_zero_budget(plain):
    plain.complete(BASE, max_new_tokens=2)
    assert plain.complete(BASE, max_new_tokens=2).cached_prompt_tokens == 0
    assert plain.engine.stats()["reused_tokens"] == 0


def test_a_new_dtype_invalidates_the_store(tiny_checkpoint):
    import torch

    completer = Completer(tiny_checkpoint)
    completer.complete(BASE, max_new_tokens=2)
    completer.model = completer.model.to(torch.bfloat16)
    completer.engine = Engine(completer.model)
    assert completer.complete(BASE, max_new_tokens=2).cached_prompt_tokens == 0
