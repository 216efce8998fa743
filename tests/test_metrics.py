"""Hand-computed values for every metric formula of problems.metrics, edge cases included."""

import math

import numpy as np
import pytest
import torch

from locedit.problems.metrics import (
    erasure_score,
    essence_score,
    harmonic_mean,
    magnitude,
    neighborhood_score,
    overall_score,
    paraphrase_score,
    perplexity_change,
    rewrite_score,
    success,
)

approx = pytest.approx


@pytest.mark.parametrize(
    "p, p_star, expected",
    [
        (0.2, 0.6, 0.5),  # (0.6-0.2)/(1-0.2)
        (0.5, 0.5, 0.0),
        (0.5, 0.25, -0.5),  # (0.25-0.5)/0.5
        (0.0, 0.3, 0.3),  # p = 0: (0.3-0)/1
        (0.9, 1.0, 1.0),
        (1.0, 1.0, 0.0),  # p = 1: raw change p*-p
        (1.0, 0.5, -0.5),
    ],
)
def test_rewrite_score(p, p_star, expected):
    assert rewrite_score(p, p_star) == approx(expected)
    assert isinstance(rewrite_score(p, p_star), float)


@pytest.mark.parametrize(
    "p, p_star, expected",
    [
        (0.5, 0.1, 0.8),  # (0.5-0.1)/0.5
        (0.5, 0.9, 0.0),  # increase → clipped at 0
        (1.0, 0.0, 1.0),
        (0.04, 0.01, 0.75),
        (0.0, 0.0, 0.0),  # p = 0: nothing to erase
        (0.0, 0.3, 0.0),
    ],
)
def test_erasure_score(p, p_star, expected):
    assert erasure_score(p, p_star) == approx(expected)


def test_elementwise_tensors_and_arrays():
    p = torch.tensor([0.2, 1.0, 0.0])
    ps = torch.tensor([0.6, 0.5, 0.3])
    r = rewrite_score(p, ps)
    assert isinstance(r, torch.Tensor)
    assert r.tolist() == approx([0.5, -0.5, 0.3])
    assert erasure_score(p, ps).tolist() == approx([0.0, 0.5, 0.0])
    a = rewrite_score(np.array([0.2, 0.5]), np.array([0.6, 0.5]))
    assert isinstance(a, np.ndarray) and a.tolist() == approx([0.5, 0.0])
    # no NaN anywhere on a grid including p = 0 and p = 1
    grid = torch.tensor([0.0, 0.5, 1.0])
    pp, qq = torch.meshgrid(grid, grid, indexing="ij")
    for f in (rewrite_score, erasure_score):
        assert not torch.isnan(f(pp, qq)).any()
    assert not torch.isnan(neighborhood_score(pp, qq, mean=False)).any()


def test_paraphrase_score_averages_all_or_first():
    # scores: (0.6-0.2)/0.8 = 0.5 and (0.5-0.5)/0.5 = 0
    assert paraphrase_score([0.2, 0.5], [0.6, 0.5]) == approx(0.25)
    assert paraphrase_score([0.2, 0.5], [0.6, 0.5], first_only=True) == approx(0.5)
    # erasure form: (0.5-0.1)/0.5 = 0.8 and max(0, (0.2-0.4)/0.2) = 0
    assert paraphrase_score([0.5, 0.2], [0.1, 0.4], erase=True) == approx(0.4)
    assert math.isnan(paraphrase_score([], []))


@pytest.mark.parametrize(
    "p, p_star, expected",
    [
        (0.2, 0.4, 0.75),  # 1 - 0.2/(0.5+0.3)
        (0.9, 0.9, 1.0),
        (0.5, 1.0, 0.0),  # 1 - 0.5/0.5
        (0.0, 1.0, 0.0),  # 1 - 1/1
        (1.0, 0.0, 0.0),
        (0.8, 0.6, 1 - 0.2 / 0.8),
    ],
)
def test_neighborhood_score(p, p_star, expected):
    assert neighborhood_score([p], [p_star]) == approx(expected)


def test_neighborhood_score_mean_and_first():
    assert neighborhood_score([0.2, 0.9, 0.5], [0.4, 0.9, 1.0]) == approx((0.75 + 1.0 + 0.0) / 3)
    assert neighborhood_score([0.2, 0.9], [0.4, 0.9], first_only=True) == approx(0.75)
    assert neighborhood_score(torch.tensor([0.2]), torch.tensor([0.4]), mean=False).tolist() == approx([0.75])


def test_overall_and_harmonic():
    assert overall_score(0.9, 0.6, 0.3) == approx(0.6)
    assert overall_score(0.9, math.nan, 0.3) == approx(0.6)  # NaN (e.g. no paraphrases) ignored
    assert harmonic_mean(0.5, 1.0, 1.0) == approx(3 / (2 + 1 + 1))
    assert harmonic_mean(0.5, -0.2, 1.0) == 0.0  # clipped to 0 → 0
    assert harmonic_mean(1.5, 1.0) == approx(1.0)  # clipped to 1
    assert math.isnan(harmonic_mean(math.nan))


@pytest.mark.parametrize(
    "pre, post, expected",
    [(10.0, 12.0, 0.6), (10.0, 9.0, 1.0), (10.0, 15.0, 0.0), (10.0, 40.0, 0.0), (3.0, 3.5, 0.9)],
)
def test_essence_score(pre, post, expected):
    assert essence_score(pre, post) == approx(expected)
    assert perplexity_change(pre, post) == approx(post - pre)


def test_meng_success_and_magnitude():
    assert success(0.3, 0.2) == 1.0 and success(0.2, 0.3) == 0.0 and success(0.2, 0.2) == 0.0
    assert magnitude(0.3, 0.2) == approx(0.1)
    assert success(torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2])).tolist() == [1.0, 0.0]


def test_ngram_entropy_by_hand():
    """Meng et al.'s generation entropy: weighted (2/3, 4/3) mean of the bi- and tri-gram entropies in bits."""
    import math

    from locedit.problems.metrics import ngram_entropy

    # "a b a b": bigrams ab, ba, ab -> f = (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2)
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # a repetitive text has lower entropy than a varied one of the same length
    assert ngram_entropy("the cat " * 10) < ngram_entropy(" ".join(f"w{i}" for i in range(20)))
    assert math.isnan(ngram_entropy("one two"))  # no trigram
