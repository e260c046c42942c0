"""Label agreement: how well the labelled patches a model was retrained on back each mapped class.

A retrained map goes wrong mostly in whole tiles of one land cover that the head reads, with confidence,
as a labelled class, so p(y|x) alone ranks those errors poorly.  A second reading that does not come from
the head: in the network's own pooled features, how close a patch lies to the labelled places of each class
(the trust score of Jiang et al., NeurIPS 2018, as a distribution over the classes).  A labelled place is
one annotated window with its ring of shifted copies (`jem retrain --label-shift`); it counts once, by its
nearest copy, so a class is backed by several labels rather than by the copies of one:

    D_a(x) = min over place a's patches of the cosine distance from x's features to theirs
    d_k(x) = mean of D_a(x) over the AGREEMENT_PLACES nearest places a of class k (all when it has fewer)
    q_k(x) = d_k(x)^-s / Σ_j d_j(x)^-s          s = AGREEMENT_SHARPNESS

`jem retrain` stores the labelled patches' features and places in the model file (LabelledFeatures); a map
made with such a model has as confidence p(y|x) · q_y(x) of the mapped class y (averaged over the
confidence box), a model without them p(y|x) alone.  On two sets of six default retrains of the scene
benchmark this ranked wrong pixels below right ones with an AUROC of 0.824 and 0.808, against 0.775 and
0.770 for the boxed p(y|x) alone (docs/labelling.md).  A class with no labelled patch (a starting model's
class kept with --keep-model-classes) is as far as can be (d = 2) and so gets little agreement.

A patch's log q up to a constant, −s · log d_k, is averaged over the patches covering a cell like the
logits are (mapping._run), so the cell's q is the softmax of that mean.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import JEMError

if TYPE_CHECKING:  # model_file imports this module
    from .model_file import LoadedModel

# Two sets of six retrains, exploratory (docs/labelling.md): the 2 nearest places at sharpness 4 0.826 / 0.814;
# sharpness 2 0.820 / 0.808; the nearest place 0.813 / 0.791; 3 places 0.821 / 0.812; the 5 nearest patches,
# places ignored (the form before), 0.808 / 0.794 at sharpness 2
AGREEMENT_SHARPNESS = 4.0
AGREEMENT_PLACES = 2  # labelled places per class the distance averages over
MAX_LABELLED_FEATURES = 8192  # a file holds at most this many (an even draw per class beyond it)
FARTHEST = 2.0  # the largest cosine distance: a class without labelled patches
NEAREST = 1e-4  # distances are clamped here, so a patch on a labelled one gets a finite score
FEATURE_BATCH = 256


@dataclass
class LabelledFeatures:
    """The labelled patches' pooled features (N, D), unit length, their classes (N,) in head order and
    their places (N,): patches of one annotated window (its shifted copies) share a place, numbered 0…P−1."""

    features: torch.Tensor
    labels: torch.Tensor
    places: torch.Tensor
    classes: int
    sharpness: float = AGREEMENT_SHARPNESS  # not stored: a file is read with the current value

    def to_payload(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.float().cpu(), "labels": self.labels.long().cpu(),
                "places": self.places.long().cpu()}

    @classmethod
    def from_payload(cls, payload: object, classes: int, dimensions: int, source: str) -> "LabelledFeatures":
        """Checked: a malformed entry is one JEMError naming the file.  An entry without places (a model
        retrained before the places were stored) reads as one place per patch."""
        fix = "the file is damaged. Retrain the model, or use an earlier copy of it."
        if not isinstance(payload, dict) or not {"features", "labels"} <= payload.keys():
            raise JEMError(f"The labelled features in {source} are not readable: {fix}")
        features, labels = payload["features"], payload["labels"]
        places = payload.get("places", torch.arange(len(labels)) if isinstance(labels, torch.Tensor) else None)
        if not (isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor)
                and isinstance(places, torch.Tensor)
                and features.ndim == 2 and features.shape[1] == dimensions and labels.shape == features.shape[:1]
                and places.shape == labels.shape and features.is_floating_point()
                and not labels.is_floating_point() and not places.is_floating_point()
                and bool(torch.isfinite(features).all()) and len(labels)
                and int(labels.min()) >= 0 and int(labels.max()) < classes and one_class_per_place(labels, places)):
            raise JEMError(f"The labelled features in {source} do not fit its network ({dimensions} features, "
                           f"{classes} classes): {fix}")
        return cls(F.normalize(features.float(), dim=1), labels.long(), numbered(places), classes)

    def to(self, device: torch.device) -> "LabelledFeatures":
        return replace(self, features=self.features.to(device), labels=self.labels.to(device),
                       places=self.places.to(device))

    def log_agreement(self, features: torch.Tensor) -> torch.Tensor:
        """(N, classes) −s · log d_k for pooled features (N, D): log q_k up to a per-patch constant."""
        distances = 1 - F.normalize(features.float(), dim=1) @ self.features.T  # (N, labelled patches)
        place_count = int(self.places.max()) + 1
        by_place = distances.new_full((len(features), place_count), FARTHEST)
        by_place.scatter_reduce_(1, self.places.expand(len(features), -1), distances, "amin")
        place_labels = torch.zeros(place_count, dtype=self.labels.dtype, device=self.labels.device)
        place_labels[self.places] = self.labels
        nearest = torch.full((len(features), self.classes), FARTHEST, device=features.device)
        for k in self.labels.unique().tolist():
            of_class = by_place[:, place_labels == k]
            nearest[:, k] = of_class.topk(min(AGREEMENT_PLACES, of_class.shape[1]), 1, largest=False)[0].mean(1)
        return -self.sharpness * torch.log(nearest.clamp(NEAREST, FARTHEST))


def one_class_per_place(labels: torch.Tensor, places: torch.Tensor) -> bool:
    """Whether the places are ≥ 0 and every place's patches share one class."""
    if len(places) == 0 or int(places.min()) < 0:
        return False
    pairs = torch.unique(torch.stack([places.long(), labels.long()]), dim=1)
    return pairs.shape[1] == len(torch.unique(places))


def numbered(places: torch.Tensor) -> torch.Tensor:
    """The places renumbered 0…P−1 in order (a draw may have left gaps)."""
    return torch.unique(places.long(), return_inverse=True)[1]


@torch.no_grad()
def labelled_features(loaded: LoadedModel, pixels: torch.Tensor, labels: torch.Tensor,
                      places: torch.Tensor | None = None, seed: int = 0) -> LabelledFeatures:
    """The pooled features of labelled patches (raw pixels (N, bands, H, W) in the model's value range, as
    metrics.predict_logits takes them), by the model in eval mode; at most MAX_LABELLED_FEATURES, drawn
    evenly over the classes beyond that.  places: each patch's labelled place (SceneDataset.places; None:
    one place per patch)."""
    places = torch.arange(len(labels)) if places is None else places
    keep = even_draw(labels, MAX_LABELLED_FEATURES, seed)
    device = next(loaded.model.parameters()).device
    loaded.model.eval()
    batches = (loaded.normalise(pixels[keep[start:start + FEATURE_BATCH]].to(device))
               for start in range(0, len(keep), FEATURE_BATCH))
    features = torch.cat([loaded.model.logits_and_features(batch)[1].float().cpu() for batch in batches])
    return LabelledFeatures(F.normalize(features, dim=1), labels[keep].long(), numbered(places[keep]),
                            loaded.spec.num_classes)


def even_draw(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Indexes of at most `limit` labels: all of them when they fit, else as even a share per class as
    the rarer classes allow (seeded)."""
    if len(labels) <= limit:
        return torch.arange(len(labels))
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(labels.numpy() == c)) for c in np.unique(labels.numpy())]
    share, left = {}, limit
    for index, group in sorted(enumerate(groups), key=lambda item: len(item[1])):  # rarest first
        share[index] = min(len(group), left // (len(groups) - len(share)))
        left -= share[index]
    return torch.from_numpy(np.sort(np.concatenate([group[:share[i]] for i, group in enumerate(groups)])))
