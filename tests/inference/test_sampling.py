"""Choosing the next token: greedy, temperature, top-k (ties), top-p, repetition penalty, explicit seeds."""

import math

import pytest
import torch

from stablecode.inference.sampling import (NUCLEUS_CANDIDATES, SamplingParams, apply_repetition_penalty, filter_top_k,
                                 nucleus, sample_token)


def draws(logits, params, n=400, seed=0) -> set[int]:
    generator = torch.Generator().manual_seed(seed)
    return {sample_token(logits, params, generator) for _ in range(n)}


def test_greedy_is_argmax_in_any_dtype():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert sample_token(logits.to(dtype), SamplingParams()) == 1


def test_top_k_with_ties_selects_exactly_k_by_index():
    # Five tokens tie for the top: a ">= k-th value" mask would let all five through.
    logits = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.0])
    filtered = filter_top_k(logits, 2)
    assert torch.isfinite(filtered).sum() == 2
    assert set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist()) <= {0, 1, 2, 3, 4}
    chosen = draws(logits, SamplingParams(temperature=1.0, top_k=2))
    assert len(chosen) == 2 and chosen <= {0, 1, 2, 3, 4}
    assert filter_top_k(logits, 0) is logits and filter_top_k(logits, 100) is logits


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    kept = lambda p: set(nucleus(logits, p)[1].tolist())  # noqa: E731
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.9) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-6) == {1}  # always at least the most likely token
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.75)) == {1, 3}
    # Renormalised over what is kept: 0.5 / 0.8 and 0.3 / 0.8.
    kept_probs, kept_ids = nucleus(logits, 0.75)
    assert kept_ids.tolist() == [1, 3]
    assert math.isclose((kept_probs[0] / kept_probs.sum()).item(), 0.625, rel_tol=1e-5)


def test_top_k_then_top_p():
    logits = torch.tensor([4.0, 3.9, 3.8, 0.0, -1.0])
    assert draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.99)) == {0, 1}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = draws(logits, SamplingParams(temperature=0.05), n=200)
    hot = draws(logits, SamplingParams(temperature=5.0), n=200)
    assert cold == {0} and hot == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert apply_repetition_penalty(logits, torch.tensor([0]), 1.0) is logits
    # Greedy picks token 2 once token 0 has been seen with a strong enough penalty.
    params = SamplingParams(repetition_penalty=2.5)
    assert sample_token(logits, params, previous_ids=torch.tensor([0])) == 2
    assert sample_token(logits, params, previous_ids=torch.tensor([3])) == 0


def test_same_seed_same_draws_and_global_rng_untouched():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=42)

    def run():
        generator = params.make_generator()
        return [sample_token(logits, params, generator) for _ in range(50)]

    torch.manual_seed(0)
    first = run()
    torch.manual_seed(123)  # a different global seed changes nothing
    assert run() == first
    state = torch.random.get_rng_state()
    other = SamplingParams(temperature=1.0, seed=43)
    generator = other.make_generator()
    assert [sample_token(logits, other, generator) for _ in range(50)] != first
    assert torch.equal(torch.random.get_rng_state(), state)


def test_no_seed_draws_differ_between_generators():
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(50_000)
    picks = [sample_token(logits, params, params.make_generator()) for _ in range(5)]
    assert len(set(picks)) > 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0)])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def reference_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Probabilities after top-p by sorting the whole vocabulary: the textbook definition."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    remove = probs.cumsum(-1) - probs >= p
    remove[0] = False
    kept = torch.zeros_like(probs).scatter(0, order, probs.masked_fill(remove, 0.0))
    return kept / kept.sum()


def test_top_p_over_the_top_candidates_or_the_whole_vocabulary_matches_the_full_sort():
    # Confident distributions are settled among the top 64 tokens, flat ones need the whole
    # vocabulary: both must keep exactly the textbook set with the same renormalised probabilities.
    generator = torch.Generator().manual_seed(0)
    sizes = []
    for scale, p in [(8.0, 0.95), (4.0, 0.9), (8.0, 0.5), (0.5, 0.95), (0.01, 0.3)]:
        logits = torch.randn(8192, generator=generator) * scale
        probs, token_ids = nucleus(logits, p)
        reference = reference_top_p(logits, p)
        assert set(token_ids.tolist()) == set(torch.nonzero(reference).flatten().tolist())
        torch.testing.assert_close(probs / probs.sum(), reference[token_ids])
        sizes.append(len(token_ids))
    assert min(sizes) <= NUCLEUS_CANDIDATES < max(sizes)  # both paths were taken
    chosen = draws(torch.tensor([5.0, 4.0, 0.0] + [-10.0] * 100), SamplingParams(temperature=1.0, top_p=0.9))
    assert chosen == {0, 1}
