"""Classification and calibration metrics, pure tensor functions (no plotting)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import check_stop
from .model_file import LoadedModel


@torch.no_grad()
def predict_logits(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int = 256,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Logits (N, classes) for raw pixels (N, bands, H, W) in the model's value range, on its device."""
    device = next(loaded.model.parameters()).device
    loaded.model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        check_stop(should_stop)
        batch = loaded.normalise(pixels[start:start + batch_size].to(device))
        out.append(loaded.model(batch).float().cpu())
    return torch.cat(out) if out else torch.empty(0, loaded.spec.num_classes)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)| over equal-width confidence bins."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    bin_index = torch.bucketize(confidence.double(), edges[1:-1], right=True)
    ece = 0.0
    for b in range(bins):
        members = bin_index == b
        if members.any():
            ece += members.double().mean().item() * abs(correct[members].mean().item()
                                                         - confidence[members].double().mean().item())
    return ece


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin accuracy, mean confidence and count, for the reliability diagram."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    bin_index = torch.bucketize(confidence.double(), edges[1:-1], right=True)
    accuracy, mean_confidence, counts = [], [], []
    for b in range(bins):
        members = bin_index == b
        counts.append(int(members.sum()))
        accuracy.append(correct[members].mean().item() if members.any() else 0.0)
        mean_confidence.append(confidence[members].double().mean().item() if members.any() else 0.0)
    return {"edges": edges.tolist(), "accuracy": accuracy, "confidence": mean_confidence, "count": counts}


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class, columns: predicted class."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy, confusion matrix, NLL, ECE and mean −E(x) as a JSON-ready dict."""
    probs = logits.softmax(1)
    predicted = probs.argmax(1)
    confusion = confusion_matrix(predicted, labels, len(class_names))
    per_class_total = confusion.sum(1)
    per_class = {name: (confusion[i, i].item() / per_class_total[i].item()) if per_class_total[i] else None
                 for i, name in enumerate(class_names)}
    return {
        "count": len(labels),
        "accuracy": (predicted == labels).double().mean().item() if len(labels) else 0.0,
        "nll": F.cross_entropy(logits, labels).item() if len(labels) else 0.0,
        "ece": expected_calibration_error(probs, labels),
        "mean_neg_energy": torch.logsumexp(logits, 1).mean().item() if len(labels) else 0.0,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
        "reliability": reliability_bins(probs, labels),
    }
