"""Prompt-lookup speculation in the engine: same greedy output as plain decoding, fewer forward
passes, every row of a batch verified in one pass, sampling rows left alone."""

import copy

import pytest

from stablecode import Completer
from stablecode.inference.engine import Engine
from stablecode.inference.speculation import draft_tokens_option, propose_draft

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
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls, handle


def variant(completer: Completer, **engine_options) -> Completer:
    """The same model and tokenizer behind another engine: differences come from the engine alone."""
    other = copy.copy(completer)
    other.engine = Engine(completer.model, **engine_options)
    return other


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_speculative_greedy_output_is_identical(tiny_checkpoint, quantize):
    fast = Completer(tiny_checkpoint, quantize=quantize, prefix_cache_mb=0, speculative=True)
    plain = variant(fast, speculative=False, prefix_cache_mb=0)
    calls, handle = count_forward_passes(fast.model)
    try:
        saved_passes = 0
        for prompt in PROMPTS:
            expected = plain.complete(prompt, max_new_tokens=48)
            calls.clear()
            got = fast.complete(prompt, max_new_tokens=48)
            assert got.text == expected.text and got.token_ids == expected.token_ids, prompt
            assert got.finish_reason == expected.finish_reason
            # One prefill plus at most one pass per new token; fewer when guesses are accepted.
            assert len(calls) <= 1 + len(got.token_ids)
            saved_passes += 1 + len(got.token_ids) - len(calls)
            streamed = "".join(fast.stream(prompt, max_new_tokens=48, speculative=4))
            assert streamed == expected.text
            assert fast.complete(prompt, max_new_tokens=48, speculative=False).token_ids == expected.token_ids
        # A random tiny model falls into loops, so prompt lookup finds and verifies real guesses.
        assert saved_passes > 20
    finally:
        handle.remove()
    stats = fast.engine.stats()
    assert 0 < stats["accepted_draft_tokens"] <= stats["drafted_tokens"]


def test_every_row_of_a_batch_speculates_in_one_pass(tiny_checkpoint):
    fast = Completer(tiny_checkpoint, prefix_cache_mb=0, speculative=True)
    plain = variant(fast, speculative=False, prefix_cache_mb=0)
    alone = [plain.complete(p, max_new_tokens=40).token_ids for p in PROMPTS]
    calls, handle = count_forward_passes(fast.model)
    try:
        batched = fast.complete_batch(PROMPTS, max_new_tokens=40)
    finally:
        handle.remove()
    assert [c.token_ids for c in batched] == alone
    stats = fast.engine.stats()
    assert stats["max_rows_in_step"] == len(PROMPTS) and stats["accepted_draft_tokens"] > 0
    # Passes carrying more tokens than rows verified guesses of several rows at once.
    assert max(calls) > len(PROMPTS)
    assert len(calls) < len(PROMPTS) + max(len(t) for t in alone)


def test_sampling_rows_do_not_speculate(tiny_checkpoint):
    fast = Completer(tiny_checkpoint, prefix_cache_mb=0, speculative=True)
    plain = variant(fast, speculative=False, prefix_cache_mb=0)
    options = dict(max_new_tokens=30, temperature=0.8, top_k=20, seed=5)
    expected = plain.complete_batch(PROMPTS[:3], **options)
    got = fast.complete_batch(PROMPTS[:3], **options)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert fast.engine.stats()["drafted_tokens"] == 0
    # Mixed with greedy rows: the greedy ones speculate, the sampled one is as it is alone.
    mixed = fast.generate([fast.request(PROMPTS[0], **options), fast.request(PROMPTS[1], max_new_tokens=30)])
    list(mixed)
    assert fast.engine.stats()["drafted_tokens"] > 0


def test_speculative_respects_stop_strings_and_limits(tiny_checkpoint):
    fast = Completer(tiny_checkpoint, prefix_cache_mb=0, speculative=True)
    plain = variant(fast, speculative=False, prefix_cache_mb=0)
    prompt = PROMPTS[1]
    for options in (dict(max_new_tokens=7), dict(max_new_tokens=40, stop=["\n"]), dict(max_new_tokens=1),
                    dict(max_new_tokens=30, repetition_penalty=1.3)):
        expected = plain.complete(prompt, **options)
        got = fast.complete(prompt, speculative=15, **options)
        assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids,
                                                                 expected.finish_reason)


def test_speculative_at_the_end_of_the_context(tiny_checkpoint):
    fast = Completer(tiny_checkpoint, prefix_cache_mb=0, speculative=True)
    plain = variant(fast, speculative=False, prefix_cache_mb=0)
    context = fast.config.max_position_embeddings
    ids = fast.tokenizer.encode(PROMPTS[1] * 40)
    assert len(ids) > context
    expected = plain.complete(PROMPTS[1] * 40, max_new_tokens=20)
    got = fast.complete(PROMPTS[1] * 40, max_new_tokens=20)
    assert got.token_ids == expected.token_ids and got.truncated_prompt_tokens == expected.truncated_prompt_tokens
    assert got.prompt_tokens + got.completion_tokens == context


def test_auto_speculation_is_decided_by_measured_pass_costs(tiny_checkpoint):
    completer = Completer(tiny_checkpoint)  # "auto"
    expected = variant(completer, speculative=False, prefix_cache_mb=0).complete(PROMPTS[0], max_new_tokens=20)
    assert completer.complete(PROMPTS[0], max_new_tokens=20).token_ids == expected.token_ids
    stats = completer.engine.stats()
    timing = stats["speculation_calibration"]
    assert timing["plain_pass_s"] > 0
    # Draft lengths tried longest first, stopping at the first whose pass costs at most 1.5 plain ones.
    tried = [(int(count), took) for count, took in timing["drafted_pass_s"].items()]
    assert [count for count, _ in tried] == [8, 4, 2][:len(tried)] and all(took > 0 for _, took in tried)
    pays = [count for count, took in tried if took <= 1.5 * timing["plain_pass_s"]]
    assert pays == [] and len(tried) == 3 or pays == [tried[-1][0]]
    assert stats["speculative_tokens"] == (pays[0] if pays else 0)


def test_auto_speculation_falls_back_to_shorter_drafts_where_long_ones_cost_too_much(tiny_checkpoint, monkeypatch):
    """A pass's cost grows with its rows, as 4-bit decoding's does on two cores: 1 + 8 tokens cost 1.7
    plain passes, 1 + 4 tokens 1.4, so "auto" drafts 4 tokens, and greedy output is still the plain one.
    The engine's clock is a model of that cost (no real timing), so the decision is deterministic."""
    from stablecode.inference import engine as engine_module

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            return cls.now

    completer = Completer(tiny_checkpoint)
    model_forward = completer.engine.model.forward

    def forward(ids, *args, **kwargs):
        Clock.now += 0.020 + 0.002 * ids.shape[0]  # a fixed cost, and a tenth of it per row
        return model_forward(ids, *args, **kwargs)

    monkeypatch.setattr(engine_module, "time", Clock)
    monkeypatch.setattr(completer.engine.model, "forward", forward)
    expected = variant(completer, speculative=False, prefix_cache_mb=0).complete(PROMPTS[0], max_new_tokens=20)
    assert completer.complete(PROMPTS[0], max_new_tokens=20).token_ids == expected.token_ids
    stats = completer.engine.stats()
    assert list(stats["speculation_calibration"]["drafted_pass_s"]) == ["8", "4"]
    assert stats["speculative_tokens"] == 4 == engine_module.CALIBRATED_DRAFT_TOKENS[1]


def test_speculative_option_is_checked(tiny_checkpoint):
    completer = Completer(tiny_checkpoint)
    with pytest.raises(ValueError, match="speculative"):
        completer.complete("x", speculative=-2)
    with pytest.raises(ValueError, match="speculative"):
        Completer.__init__(completer, tiny_checkpoint, speculative="yes")
