"""Pseudo-labels for consistency training (JEM + consistency): which unlabelled images count, and the loss.

FixMatch keeps the weak view's prediction as a label when its confidence passes a fixed threshold
(0.95).  A calibrated JEM trained on a few labels is rarely that sure, so with a fixed threshold the
pseudo-label mask stays near 0 and the term never fires.  The self-adaptive threshold of FreeMatch
(Wang et al., ICLR 2023) follows the model instead: a global level τ, the running mean of the weak
views' top probability, scaled per class by the running mean probability of that class relative to
the most predicted one, so rarely predicted classes get a lower bar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Weight of the running means' past: ~100 iterations of memory, short enough for minutes-long runs.
EMA_MOMENTUM = 0.99


class SelfAdaptiveThreshold:
    """FreeMatch's class-wise thresholds τ · p̃_c / max p̃, from running means over the weak views."""

    def __init__(self, classes: int, device: torch.device) -> None:
        self.level = torch.tensor(1.0 / classes, device=device)
        self.class_means = torch.full((classes,), 1.0 / classes, device=device)

    def update(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Fold a batch of weak-view probabilities (N, C) in; the threshold of each of its predictions."""
        self.level = EMA_MOMENTUM * self.level + (1 - EMA_MOMENTUM) * probabilities.max(1).values.mean()
        self.class_means = EMA_MOMENTUM * self.class_means + (1 - EMA_MOMENTUM) * probabilities.mean(0)
        per_class = self.level * self.class_means / self.class_means.max()
        return per_class[probabilities.argmax(1)]


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float | None,
                     adaptive: SelfAdaptiveThreshold | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the strong view towards the weak view's argmax where its confidence passes the threshold
    (fixed, or `adaptive`'s when threshold is None), averaged over the whole unlabelled batch; also the
    fraction of images that passed (the mask rate)."""
    probabilities = weak_logits.detach().softmax(1)
    confidence, pseudo = probabilities.max(1)
    bar = adaptive.update(probabilities) if threshold is None and adaptive is not None else threshold
    mask = (confidence >= bar).float()
    loss = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
    return loss, mask.mean()
