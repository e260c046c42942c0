"""Metrics against values computed by hand: ECE, KL of histograms, AUROC, Fréchet and kernel distances."""
from __future__ import annotations

import math

import pytest
import torch

from jem_core.distances import (
    KL_EPSILON,
    auroc,
    frechet_distance,
    frechet_distance_gaussians,
    histogram_kl,
    kernel_distance,
)
from jem_core.metrics import expected_calibration_error, reliability_bins


def test_ece_by_hand():
    # Confidences 0.85, 0.85 (one right, one wrong) and 0.65, 0.65 (both right), 2 classes, 10 bins:
    # bin 8: |0.5 − 0.85| = 0.35, weight ½;  bin 6: |1.0 − 0.65| = 0.35, weight ½  →  ECE = 0.35.
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.35)
    # Both 0.85 images right: bin 8 contributes |1 − 0.85| · ½ = 0.075, total 0.075 + 0.175 = 0.25.
    assert expected_calibration_error(probs, torch.tensor([0, 0, 1, 1]), bins=10) == pytest.approx(0.25)
    bins = reliability_bins(probs, labels, bins=10)
    assert bins["count"][8] == 2 and bins["count"][6] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][8] == pytest.approx(0.5) and bins["confidence"][6] == pytest.approx(0.65)


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 4 images at confidence 0.75, 3 right: perfectly calibrated.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), bins=15) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_known_histograms():
    # p = (½, ½), q = (¼, ¾): KL = ½ ln 2 + ½ ln(2/3).
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert histogram_kl([5, 5], [1, 3]) == pytest.approx(expected, rel=1e-6)
    assert histogram_kl([2, 2], [10, 30]) == pytest.approx(expected, rel=1e-6)  # counts are normalised
    assert histogram_kl([1, 3], [5, 5]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)
    assert histogram_kl([3, 1, 0], [3, 1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_disjoint_histograms_is_finite_and_large():
    # All of p in a bin where q is empty: ≈ ln(1 / ε).
    value = histogram_kl([1, 0], [0, 1])
    assert value == pytest.approx(math.log(1 / KL_EPSILON), rel=1e-3)
    with pytest.raises(ValueError):
        histogram_kl([1, 2], [1, 2, 3])


def test_auroc_by_hand():
    # Pairs (pos > neg): 0.9 beats both, 0.8 beats both, 0.4 beats 0.3 only → 5 of 6.
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    assert auroc([0.5, 0.3], [0.9, 0.8, 0.4]) == pytest.approx(1 / 6)
    # Ties count one half: (1 vs 1) ½ + (1 vs 0) 1 + (2 vs 1) 1 + (2 vs 0) 1 = 3.5 of 4.
    assert auroc([1, 2], [1, 0]) == pytest.approx(3.5 / 4)
    assert auroc([1, 2, 3], [4, 5]) == 0.0 and auroc([4, 5], [1, 2, 3]) == 1.0


def test_auroc_matches_pairwise_count_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 20, (50,), generator=generator).double()
    neg = torch.randint(0, 20, (40,), generator=generator).double()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auroc(pos, neg) == pytest.approx(pairs.mean().item())


def test_frechet_distance_of_two_gaussians_by_hand():
    # N(0, I) vs N((1, 1), 4 I) in 2-D: ‖μ‖² = 2; Tr(I + 4I − 2·2I) = 2 → 4.
    assert frechet_distance_gaussians(torch.zeros(2), torch.eye(2), torch.ones(2), 4 * torch.eye(2)) == \
        pytest.approx(4.0)
    # Non-commuting covariances, 1-D check of the cross term: N(0, 1) vs N(3, 9): 9 + 1 + 9 − 2·3 = 13.
    assert frechet_distance_gaussians([0.0], [[1.0]], [3.0], [[9.0]]) == pytest.approx(13.0)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance_gaussians(torch.zeros(2), cov, torch.zeros(2), cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples_approaches_the_gaussian_value():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    b = 1 + 2 * torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_kernel_distance_by_hand_and_by_distribution():
    # 1-D, degree 1: k(x, y) = xy + 1.  a = (0, 2), b = (1, 3):
    # within-a off-diagonal mean: (0·2 + 1) = 1;  within-b: (1·3 + 1) = 4;
    # cross mean: (1 + 1 + 3 + 7)/4 = 3 → 1 + 4 − 6 = −1.
    assert kernel_distance([[0.0], [2.0]], [[1.0], [3.0]], degree=1) == pytest.approx(-1.0)
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 400, 8, generator=generator)
    same = kernel_distance(a, b)
    shifted = kernel_distance(a, b + 1.0)
    assert abs(same) < 0.05 and shifted > 10 * abs(same)
