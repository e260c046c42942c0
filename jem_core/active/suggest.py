"""Where to label next: every patch of a raster scored by how unfamiliar it is to the model (high
energy E(x)) and how unsure its classification is (high predictive entropy); the best-scoring
patches are picked greedily with a minimum spacing, so the suggestions spread over the scene."""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import JEMError, ProgressFn, StopFn, no_progress
from ..metrics import predict_logits
from ..model_file import LoadedModel, as_loaded
from ..raster_io import require_crs
from ..windowing import iter_patches
from .patches import PatchReader, PatchWindow, RasterInput, open_patch_reader

# The attributes a suggestion layer carries, with their type (int, real or text), in column order; the
# CLI (OGR) and the QGIS algorithm both write these, then an empty class field for the analyst.
SUGGESTION_FIELDS: list[tuple[str, str]] = [
    ("rank", "int"), ("score", "real"), ("unfamiliarity", "real"), ("uncertainty", "real"), ("neg_energy", "real"),
    ("entropy", "real"), ("margin", "real"), ("predicted_class", "text"), ("confidence", "real")]


@dataclass
class Suggestion:
    """A patch worth labelling, with the scores that put it there (higher score = label it sooner)."""

    rank: int
    x: float  # patch centre, raster CRS
    y: float
    bounds: tuple[float, float, float, float]  # patch footprint (xmin, ymin, xmax, ymax), raster CRS
    row: int
    col: int
    score: float  # mean of the two percentiles below, in [0, 1]
    unfamiliarity: float  # percentile of E(x) among the raster's patches (1 = least familiar)
    uncertainty: float  # percentile of the predictive entropy (1 = most unsure)
    neg_energy: float  # −E(x) = logsumexp f(x)
    entropy: float  # nats
    margin: float  # p(top class) − p(second class)
    predicted_class: str
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def uncertainty_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row −E(x), predictive entropy, top-2 margin, predicted index and confidence."""
    probs = logits.softmax(1)
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    return {"neg_energy": torch.logsumexp(logits, 1),
            "entropy": -(probs * probs.clamp_min(1e-12).log()).sum(1),
            "margin": top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0],
            "predicted": probs.argmax(1), "confidence": top[:, 0]}


def percentile_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value scaled to [0, 1] (ties share the lower rank); 1 = largest."""
    if len(values) < 2:
        return torch.ones_like(values, dtype=torch.float64)
    order = values.double().argsort()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    return ranks / (len(values) - 1)


def priority(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unfamiliarity (high E(x)), uncertainty (high entropy) percentiles and their mean, the score."""
    unfamiliarity = percentile_rank(-scores["neg_energy"])
    uncertainty = percentile_rank(scores["entropy"])
    return {"unfamiliarity": unfamiliarity, "uncertainty": uncertainty, "score": (unfamiliarity + uncertainty) / 2}


def spread_selection(score: torch.Tensor, positions: torch.Tensor, count: int, min_distance: float,
                     groups: torch.Tensor | None = None) -> list[int]:
    """Greedy, best score first, each pick at least min_distance from every one taken.

    groups (e.g. each candidate's predicted class): the picks go round the groups, each taking its best
    remaining candidate in turn, so every class of the map gets labels instead of the few it confuses most.
    """
    keys = groups.tolist() if groups is not None else [0] * len(score)
    queues: dict[int, deque[int]] = {}
    for index in score.argsort(descending=True).tolist():
        queues.setdefault(keys[index], deque()).append(index)
    turn = sorted(queues, key=lambda key: -float(score[queues[key][0]]))
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for key in turn:
            queue = queues[key]
            while queue:
                index = queue.popleft()
                if not chosen or torch.cdist(positions[index][None].double(),
                                             positions[chosen].double()).min() >= min_distance:
                    chosen.append(index)
                    break
            if len(chosen) == count:
                break
    return chosen


def suggest(model: LoadedModel | str | Path, raster: RasterInput, count: int, *, min_distance: float | None = None,
            stride: int | None = None, bands: Sequence[str] | None = None, stretch: str = "auto",
            balance_classes: bool = True, labelled: Sequence[tuple[float, float]] = (), batch_size: int = 64,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> list[Suggestion]:
    """The `count` patches of the raster most worth labelling, spread over the scene, best first.

    Patches come from windowing.iter_patches (the land-cover map's grid; patches with nodata are
    skipped).  min_distance: least spacing between suggested patch centres, in raster pixels;
    default half the side of the square each suggestion would get if the scene were split evenly
    (√(width·height / count) / 2), and at least one patch.  stride: patch grid step, a divisor of
    the patch size (default: the patch size, i.e. non-overlapping patches).  balance_classes: take the
    suggestions in turns from each predicted class (spread_selection's groups).  labelled: points (x, y)
    in the raster's CRS that are labelled already (the annotations of the last retrain): no suggestion
    overlaps the patch centred on one, so a second round does not ask for the same patch twice.
    """
    if count < 1:
        raise JEMError(f"COUNT must be at least 1 (got {count}).")
    loaded = as_loaded(model)
    progress = progress or no_progress
    size = loaded.meta.image_size
    windows: list[PatchWindow] = []
    logits: list[torch.Tensor] = []
    with ExitStack() as stack:
        reader = open_patch_reader(stack, [raster], size, bands, loaded.meta, stretch)
        source = reader.sources[0]
        require_crs(source, "the suggestions could not be placed on the ground")
        for batch in iter_patches(source, size, stride, batch_size=batch_size, stretch=reader.stretches[0],
                                  should_stop=should_stop):
            windows += [PatchWindow(0, *batch.grid.patch_window(int(r), int(c))[1::-1])
                        for r, c in zip(batch.rows, batch.cols)]
            logits.append(predict_logits(loaded, torch.from_numpy(batch.pixels), should_stop=should_stop))
            progress((int(batch.rows[-1]) + 1) / batch.grid.patch_rows, f"scored {len(windows)} patches")
        if not windows:
            raise JEMError(f"'{source.description}' has no patch without nodata to score. Check the raster.")
        scores = uncertainty_scores(torch.cat(logits))
        ranks = priority(scores)
        positions = torch.tensor([[w.row + size / 2, w.col + size / 2] for w in windows])
        open_patches = not_labelled(positions, labelled_centres(reader, labelled), size)
        if not open_patches.any():
            raise JEMError(f"Every patch of '{source.description}' overlaps a labelled one: there is nothing left "
                           "to suggest. Map the raster, or suggest on another one.")
        spacing = min_distance if min_distance is not None else \
            max(float(size), math.sqrt(source.width * source.height / count) / 2)
        candidates = open_patches.nonzero().flatten()
        picked = spread_selection(ranks["score"][candidates], positions[candidates], count, spacing,
                                  scores["predicted"][candidates] if balance_classes else None)
        chosen = candidates[picked].tolist()
        return [make_suggestion(rank, index, windows[index], reader, scores, ranks, loaded.meta.class_names)
                for rank, index in enumerate(chosen, start=1)]


def labelled_centres(reader: PatchReader, points: Sequence[tuple[float, float]]) -> torch.Tensor:
    """(K, 2) row/col centres, on the reading's pixel grid, of the patches labelled at these points
    (points off the raster are left out)."""
    half = reader.patch_size / 2
    windows = [reader.locate(x, y) for x, y in points]
    return torch.tensor([[w.row + half, w.col + half] for w in windows if w is not None],
                        dtype=torch.float64).reshape(-1, 2)


def not_labelled(positions: torch.Tensor, labelled: torch.Tensor, size: int) -> torch.Tensor:
    """For each patch centre, True unless its size-px patch overlaps a labelled one."""
    if len(labelled) == 0:
        return torch.ones(len(positions), dtype=torch.bool)
    apart = torch.cdist(positions.double(), labelled, p=float("inf"))  # the larger of the row and column gaps
    return (apart >= size).all(1)


def make_suggestion(rank: int, index: int, window: PatchWindow, reader: PatchReader,
                    scores: dict[str, torch.Tensor], ranks: dict[str, torch.Tensor],
                    class_names: list[str]) -> Suggestion:
    bounds = reader.footprint(window)
    return Suggestion(rank=rank, x=(bounds[0] + bounds[2]) / 2, y=(bounds[1] + bounds[3]) / 2, bounds=bounds,
                      row=window.row, col=window.col, score=float(ranks["score"][index]),
                      unfamiliarity=float(ranks["unfamiliarity"][index]),
                      uncertainty=float(ranks["uncertainty"][index]),
                      neg_energy=float(scores["neg_energy"][index]), entropy=float(scores["entropy"][index]),
                      margin=float(scores["margin"][index]),
                      predicted_class=class_names[int(scores["predicted"][index])],
                      confidence=float(scores["confidence"][index]))
