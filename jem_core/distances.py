"""Distances between distributions, as used by the OOD analysis and the sample-quality score.

- `histogram_kl(p, q)`: KL(p ‖ q) of two histograms on the same bins (the paper's OOD number).
- `auroc(positive, negative)`: area under the ROC curve of a score that should be higher for
  `positive` (rank formula, ties count one half).
- `frechet_distance(a, b)`: ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between Gaussians fitted to two
  feature sets (the formula of FID; which features are used decides what it measures).
- `kernel_distance(a, b)`: unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³
  (the estimator of KID).

Pure torch, float64, no SciPy.
"""
from __future__ import annotations

import torch

# Probability given to an empty bin before renormalising, so KL stays finite for disjoint histograms.
# With it two disjoint histograms score about ln(1e10) ≈ 23 minus the entropy of p.
KL_EPSILON = 1e-10


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def histogram_kl(p_counts, q_counts, epsilon: float = KL_EPSILON) -> float:
    """KL(p ‖ q) = Σ p_i ln(p_i / q_i) of two histograms (counts or probabilities) on the same bins."""
    p, q = _as_float64(p_counts), _as_float64(q_counts)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"histograms need the same 1-D shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("a histogram is empty")
    p = p / p.sum() + epsilon
    q = q / q.sum() + epsilon
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def auroc(positive, negative) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie): the area under the ROC curve."""
    pos, neg = _as_float64(positive).flatten(), _as_float64(negative).flatten()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Tied scores share the mean of their ranks.
    unique, inverse = torch.unique(sorted_scores, return_inverse=True)
    rank_sum = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    rank_count = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(scores))
    ranks[order] = (rank_sum / rank_count)[inverse]
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def gaussian_fit(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of features (N, D)."""
    x = _as_float64(features)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError("need a (N ≥ 2, D) feature matrix")
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b) -> float:
    """‖μa − μb‖² + Tr(Σa) + Tr(Σb) − 2 Tr((Σa^½ Σb Σa^½)^½)  (the last trace equals Tr((Σa Σb)^½))."""
    mean_a, cov_a, mean_b, cov_b = map(_as_float64, (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance_gaussians(*gaussian_fit(features_a), *gaussian_fit(features_b))


def kernel_distance(features_a, features_b, degree: int = 3) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / D + 1)^degree; 0 in expectation for equal distributions."""
    a, b = _as_float64(features_a), _as_float64(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError("need two (N ≥ 2, D) feature matrices with the same D")
    dims = a.shape[1]
    k_aa = (a @ a.T / dims + 1) ** degree
    k_bb = (b @ b.T / dims + 1) ** degree
    k_ab = (a @ b.T / dims + 1) ** degree
    n, m = len(a), len(b)
    return float((k_aa.sum() - k_aa.trace()) / (n * (n - 1)) + (k_bb.sum() - k_bb.trace()) / (m * (m - 1))
                 - 2 * k_ab.mean())
