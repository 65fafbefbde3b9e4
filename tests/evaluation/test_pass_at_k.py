import math

import pytest

from megaphi.evaluation.pass_at_k import mean_pass_at_k, pass_at_k


def binomial_pass_at_k(n, c, k):
    # Independent reference: exact integer binomials from the definition.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),  # pass@1 = c/n
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
        (10, 0, 5, 0.0),
        (10, 6, 5, 1.0),  # n - c < k: every 5-subset has a correct one
        (4, 1, 2, 0.5),  # C(3,2)/C(4,2) = 3/6
        (20, 5, 10, 1 - 3003 / 184756),  # C(15,10)/C(20,10), by hand
    ],
)
def test_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_exact_binomials_on_a_grid_and_large_n():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(binomial_pass_at_k(n, c, k), abs=1e-12)
    # Large n, where the binomials themselves overflow floats.
    assert pass_at_k(2000, 7, 100) == pytest.approx(binomial_pass_at_k(2000, 7, 100), rel=1e-10)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)


def test_mean_over_problems_skips_k_larger_than_n():
    result = mean_pass_at_k([(4, 1), (4, 4), (4, 0)], ks=[1, 2, 10])
    assert set(result) == {"pass@1", "pass@2"}
    assert result["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert result["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
