"""Out-of-distribution analysis: is new imagery like the reference data?  Histograms, KL, AUROC.

Two familiarity scores per image, both higher for images like the reference (the training data):

  layers    −ln(squared Mahalanobis distance) of the image's layer statistics — the per-channel spatial
            mean and std of the network's stem and of every residual block (Lee et al. 2018 use such
            multi-layer features) — to a Gaussian fitted on the reference's (its covariance shrunk
            towards its diagonal by the amount of SHRINKAGE_GRID with the best held-out likelihood on the
            reference itself, so the compared sets never tune it).  Cross-fitted: the reference is cut
            into FOLDS parts, each scored by the Gaussian of the other parts, and every compared image
            by one of those Gaussians at random, so reference and in-domain images are scored alike.
            The default: on AID it ranks Sentinel-2 and Landsat patches below the held-out AID images
            (AUROC 0.90–0.97 for a 3-minute model), where −E(x) ranks them above
            (bench/ood_statistics.py, docs/science.md).
  energy    −E(x) = logsumexp_y f(x)[y], the JEM's unnormalised log-density: the paper's score, always
            computed and plotted beside the other.

The paper (Castillo-Navarro et al. 2022: EuroSAT test 0.27 vs 25–28 for Potsdam, OSCD, BigEarthNet)
compares histograms of −E(x) of the training data with those of other data; we do the same for both
scores and add a bootstrap interval, because a KL of two small histograms is mostly noise.

API (the QGIS algorithm `jem:ood` wraps it 1:1)
-----------------------------------------------
ood_analysis(model, reference, compare, *, json_path=None, plot_path=None, batch_size=256,
             device="auto", reference_split="train", statistic="layers", bins=50, stretch="auto",
             progress=None, should_stop=None) -> dict

  model            a model file path or a LoadedModel.
  reference        a class-folder dataset (path, or an in-memory SceneDataset) with the model's classes.
  reference_split  "train": the training split by the model's seed and fractions (the paper's reference,
                   the default); "test": its held-out test split; "all": every image.  A reference whose
                   classes are not the model's is always used whole ("all").  Fewer than
                   MIN_REFERENCE_IMAGES reference images are refused; fewer than FEW_IMAGES on either side
                   of a comparison give a line in result["warnings"] (a KL of small histograms is biased
                   upwards: a 48-image reference gave 5.3 for in-domain data).
  compare          a list of PATHs, each one of: a class-folder dataset (any classes), a folder of
                   images, or a raster (GeoTIFF, VRT, JPEG, ...) cut into non-overlapping patches of
                   the model's size (patches with nodata skipped; bands picked by the model's band
                   names when the raster has them).  Programmatic callers may also pass
                   (name, pixels) with pixels (N, bands, H, W) in the model's value range.
  statistic        which score the top-level KL and AUROC of each compared source report: "layers"
                   or "energy"; both are in result["statistics"].
  stretch          for rasters only, as in `jem map`: "auto" maps a non-8-bit raster to an 8-bit
                   model's range with a 2–98 % percentile stretch; "none" uses raw values.
  progress         progress(fraction, message); should_stop() polled between batches → Cancelled.

Returns (and writes as JSON) a dict: reference {name, source, split, count}; statistic; compare[name] →
{source, kind, count, and for the chosen statistic: mean, std, kl_to_reference, kl_interval, auroc,
auroc_interval}; warnings (lines); statistics[score] → {definition, reference {mean, std}, compare[name] {the same
numbers}, bins, histograms} for both scores; and the definitions:
  kl_to_reference  KL(compare ‖ reference) of the two histograms on `bins` equal-width bins over the
                   range of the pair, empty bins smoothed with ε = 1e-10, so disjoint histograms give
                   about 23.
  auroc            AUROC of the score separating reference (positive) from compare images:
                   0.5 = indistinguishable, 1.0 = every reference image scores above every compare one.
  *_interval       2.5 and 97.5 percentiles over BOOTSTRAP_ROUNDS resamples of both sets.
The plot shows both scores' histograms with KL and AUROC in the legends.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from . import JEMError, ProgressFn, check_stop, no_progress
from .data import (
    IMAGE_SUFFIXES,
    SceneDataset,
    check_band_count,
    list_class_folders,
    load_class_folder,
    read_image,
    training_split,
)
from .distances import KL_EPSILON, auroc, histogram_kl
from .files import atomic_write, check_output_folders, written_together
from .model_file import LoadedModel, as_loaded

CompareItem = Union[str, os.PathLike, tuple]
REFERENCE_SPLITS = ("train", "test", "all")
STATISTICS = ("layers", "energy")
# Measured on AID (bench/ood_statistics.py): the default ranks foreign sensors as less familiar.
DEFAULT_STATISTIC = "layers"
# Covariance shrinkage towards the diagonal, picked per reference by held-out likelihood: none for a
# large reference, more as it gets smaller relative to the number of statistics.
SHRINKAGE_GRID = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5)
FOLDS = 5  # cross-fitting: each Gaussian is fitted on 4/5 of the reference
MIN_REFERENCE_IMAGES = 20  # fewer are refused: each fold's Gaussian would rest on under 16 images
FEW_IMAGES = 200  # fewer (reference or compared) get a warning: the KL is biased upwards, the interval wide
BOOTSTRAP_ROUNDS = 200
DEFINITIONS = {
    "layers": "layer familiarity: −ln(squared Mahalanobis distance of the per-channel mean and std of the "
              "network's stem and block outputs to a Gaussian fitted on the reference, cross-fitted over "
              f"{FOLDS} parts of it; covariance shrinkage chosen by held-out likelihood on the reference)",
    "energy": "−E(x) = logsumexp_y f(x)[y], the JEM's unnormalised log-density (the paper's score)",
}
KL_DEFINITION = ("KL(compare ‖ reference) of the two histograms on shared equal-width bins over the pair's range, "
                 f"empty bins smoothed with {KL_EPSILON:g} (about 23 for disjoint histograms)")
AUROC_DEFINITION = "AUROC of the score, reference images positive, compare images negative"
INTERVAL_DEFINITION = f"2.5–97.5 % percentiles over {BOOTSTRAP_ROUNDS} bootstrap resamples of both sets"


@dataclass
class ScoreSet:
    """What the model makes of every image of one source: its layer statistics and −E(x)."""

    name: str
    kind: str
    source: str
    statistics: torch.Tensor
    energy: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def embed(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int,
          should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer statistics (N, D) and −E(x) (N,) of raw pixels in the model's value range, computed in float32."""
    device = next(loaded.model.parameters()).device
    loaded.model.eval()
    statistics, energy = [], []
    for start in range(0, len(pixels), batch_size):
        check_stop(should_stop)
        familiarity, layers = loaded.model.familiarity_and_statistics(
            loaded.normalise(pixels[start:start + batch_size].to(device)))
        energy.append(familiarity.double().cpu())
        statistics.append(layers.double().cpu())
    if not statistics:
        return torch.empty(0, 0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    return torch.cat(statistics), torch.cat(energy)


def shrunk_gaussian(fit: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the `fit` rows, the covariance shrunk towards its diagonal (plus a tiny
    ridge, so constant channels do not make it singular)."""
    mean = fit.mean(0)
    covariance = torch.cov((fit - mean).T).reshape(fit.shape[1], fit.shape[1])
    diagonal = covariance.diagonal()
    ridge = 1e-9 * (diagonal.mean() + 1e-12)
    return mean, (1 - shrinkage) * covariance + torch.diag(shrinkage * diagonal + ridge)


def squared_distances(gaussian: tuple[torch.Tensor, torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each query row to a (mean, covariance) Gaussian."""
    mean, covariance = gaussian
    centred = queries - mean
    return (centred * torch.linalg.solve(covariance, centred.T).T).sum(1)


def reference_folds(count: int, generator: torch.Generator, folds: int = FOLDS) -> torch.Tensor:
    """The fold (0 … folds − 1) of each of `count` reference rows, balanced and shuffled."""
    return torch.randperm(count, generator=generator) % folds


def held_out_log_likelihood(reference: torch.Tensor, fold_of: torch.Tensor, shrinkage: float) -> float:
    """Mean Gaussian log-likelihood (up to a constant) of each reference row under the fit of the other folds."""
    total = 0.0
    for fold in fold_of.unique():
        gaussian = shrunk_gaussian(reference[fold_of != fold], shrinkage)
        _, log_det = torch.linalg.slogdet(gaussian[1])
        total += float((-0.5 * (log_det + squared_distances(gaussian, reference[fold_of == fold]))).sum())
    return total / len(reference)


def choose_shrinkage(reference: torch.Tensor, fold_of: torch.Tensor) -> float:
    """The SHRINKAGE_GRID value whose Gaussians best predict the reference's own held-out folds."""
    return max(SHRINKAGE_GRID, key=lambda shrinkage: held_out_log_likelihood(reference, fold_of, shrinkage))


def cross_fitted_familiarity(reference: torch.Tensor, others: Sequence[torch.Tensor], generator: torch.Generator,
                             shrinkage: float | None = None,
                             folds: int = FOLDS) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Layer familiarity −ln(Mahalanobis²) of the reference and of every other set (the log makes the long
    tail of far-away images readable in a histogram; AUROC does not change), so that no image is scored by
    a Gaussian fitted on it: the reference is cut into `folds` parts, each part is scored by the Gaussian of
    the others, and each image of another set by the Gaussian of one of those complements, drawn at random.
    Also returns the shrinkage used (None: chosen on the reference's folds, choose_shrinkage)."""
    fold_of = reference_folds(len(reference), generator, folds)
    if shrinkage is None:
        shrinkage = choose_shrinkage(reference, fold_of)
    assignments = [torch.randint(folds, (len(other),), generator=generator) for other in others]
    scores = torch.empty(len(reference), dtype=torch.float64)
    scored_others = [torch.empty(len(other), dtype=torch.float64) for other in others]
    for fold in range(folds):
        gaussian = shrunk_gaussian(reference[fold_of != fold], shrinkage)  # fitted once per fold
        scores[fold_of == fold] = squared_distances(gaussian, reference[fold_of == fold])
        for other, assigned, result in zip(others, assignments, scored_others):
            result[assigned == fold] = squared_distances(gaussian, other[assigned == fold])
    return -scores.clamp_min(1e-12).log(), [-result.clamp_min(1e-12).log() for result in scored_others], shrinkage


def reference_indices(dataset: SceneDataset, loaded: LoadedModel, split: str) -> tuple[torch.Tensor, str]:
    """Which reference images to score, and the split actually used."""
    if split not in REFERENCE_SPLITS:
        raise JEMError(f"Unknown reference split '{split}'. Choose one of: {', '.join(REFERENCE_SPLITS)}.")
    everything = torch.arange(len(dataset))
    if split == "all":
        return everything, "all"
    if list(dataset.class_names) != list(loaded.meta.class_names):
        return everything, "all (its classes are not the model's, so the training split is unknown)"
    return getattr(training_split(dataset.labels, loaded.meta.train_config), split), split


def load_reference(reference: str | os.PathLike | SceneDataset, loaded: LoadedModel) -> SceneDataset:
    if isinstance(reference, SceneDataset):
        return reference
    root = Path(reference)
    same_classes = set(list_class_folders(root)) == set(loaded.meta.class_names)
    return load_class_folder(root, loaded.meta.image_size,
                             class_names=loaded.meta.class_names if same_classes else None)


def source_kind(path: Path) -> str:
    """'raster', 'class-folder' or 'image-folder' (JEMError for anything else)."""
    if path.is_file():
        return "raster"
    if not path.is_dir():
        raise JEMError(f"Compare path '{path}' does not exist. Give a class-folder dataset, a folder of images "
                       "or a raster file.")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir()) for p in entries):
        return "class-folder"
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return "image-folder"
    raise JEMError(f"'{path}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) nor class folders of images.")


def read_image_folder(path: Path, size: int, should_stop: Callable[[], bool] | None) -> torch.Tensor:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for file in files:
        check_stop(should_stop)
        pixels, _, _ = read_image(file, size)
        if images and pixels.shape[0] != images[0].shape[0]:
            raise JEMError(f"Image '{file}' has {pixels.shape[0]} bands but '{files[0]}' has {images[0].shape[0]}. "
                           "All images of a folder need the same bands.")
        images.append(pixels)
    return torch.from_numpy(np.stack(images))


def raster_embedding(path: Path, loaded: LoadedModel, batch_size: int, stretch: str, progress: ProgressFn,
                     should_stop: Callable[[], bool] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and −E(x) of every valid non-overlapping model-size patch of a raster (the mapping iterator)."""
    from .raster_io import choose_stretch, open_raster
    from .windowing import iter_patches

    parts = []
    with open_raster(path, expected_bands=loaded.meta.band_names, coarsen=loaded.meta.coarsen) as source:
        chosen = choose_stretch(source, loaded.meta.value_range, stretch)
        for batch in iter_patches(source, loaded.meta.image_size, batch_size=batch_size, stretch=chosen,
                                  should_stop=should_stop):
            parts.append(embed(loaded, torch.from_numpy(np.ascontiguousarray(batch.pixels)), batch_size))
            progress((int(batch.rows.max()) + 1) / batch.grid.patch_rows,
                     f"{path.name}: {sum(len(e) for _, e in parts)} patches")
    if not parts:
        raise JEMError(f"Raster '{path}' has no {loaded.meta.image_size} px patch without nodata; nothing to compare.")
    return torch.cat([f for f, _ in parts]), torch.cat([e for _, e in parts])


def score_compare(item: CompareItem, loaded: LoadedModel, batch_size: int, stretch: str, progress: ProgressFn,
                  should_stop: Callable[[], bool] | None) -> ScoreSet:
    if isinstance(item, tuple):
        name, pixels = item
        check_band_count(pixels, loaded.meta.band_names, name)
        return ScoreSet(name, "pixels", name, *embed(loaded, pixels, batch_size, should_stop))
    path = Path(item)
    kind = source_kind(path)
    if kind == "raster":
        return ScoreSet(path.name, kind, str(path), *raster_embedding(path, loaded, batch_size, stretch, progress,
                                                                      should_stop))
    if kind == "class-folder":
        pixels = load_class_folder(path, loaded.meta.image_size).images
    else:
        pixels = read_image_folder(path, loaded.meta.image_size, should_stop)
    check_band_count(pixels, loaded.meta.band_names, path)
    return ScoreSet(path.name, kind, str(path), *embed(loaded, pixels, batch_size, should_stop))


def unique_names(sets: Sequence[ScoreSet], taken: set[str]) -> None:
    for score_set in sets:
        name, n = score_set.name, 2
        while score_set.name in taken:
            score_set.name = f"{name} ({n})"
            n += 1
        taken.add(score_set.name)


def add_scores(reference: ScoreSet, others: Sequence[ScoreSet]) -> float:
    """Both familiarity scores of every set; the layer Gaussians are fitted on the reference.  Returns
    their covariance shrinkage."""
    layers, other_layers, shrinkage = cross_fitted_familiarity(
        reference.statistics, [s.statistics for s in others], torch.Generator().manual_seed(0))
    reference.scores = {"energy": reference.energy, "layers": layers}
    for s, scores in zip(others, other_layers):
        s.scores = {"energy": s.energy, "layers": scores}
    return shrinkage


def score_range(*scores: torch.Tensor) -> tuple[float, float]:
    """The histogram range of these scores (one unit wide when they are all equal)."""
    everything = torch.cat(scores)
    low, high = float(everything.min()), float(everything.max())
    return low, (high if high > low else low + 1.0)


def pair_numbers(reference: torch.Tensor, other: torch.Tensor, bins: int,
                 generator: torch.Generator) -> dict[str, Any]:
    """Mean, std, KL and AUROC of one compared set against the reference, with bootstrap intervals."""
    low, high = score_range(reference, other)

    def kl(ref: torch.Tensor, cmp: torch.Tensor) -> float:
        return histogram_kl(torch.histc(cmp, bins, low, high), torch.histc(ref, bins, low, high))

    kls, aurocs = [], []
    for _ in range(BOOTSTRAP_ROUNDS):
        ref = reference[torch.randint(len(reference), (len(reference),), generator=generator)]
        cmp = other[torch.randint(len(other), (len(other),), generator=generator)]
        kls.append(kl(ref, cmp))
        aurocs.append(auroc(ref, cmp))

    def interval(values: list[float]) -> list[float]:
        return [float(v) for v in np.percentile(values, (2.5, 97.5))]

    return {"mean": float(other.mean()), "std": float(other.std()) if len(other) > 1 else 0.0,
            "kl_to_reference": kl(reference, other), "kl_interval": interval(kls),
            "auroc": auroc(reference, other), "auroc_interval": interval(aurocs)}


def statistic_block(name: str, reference: ScoreSet, others: Sequence[ScoreSet], bins: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)  # the same intervals for the same data
    ref_scores = reference.scores[name]
    low, high = score_range(ref_scores, *[s.scores[name] for s in others])
    return {
        "definition": DEFINITIONS[name],
        "reference": {"mean": float(ref_scores.mean()), "std": float(ref_scores.std())},
        "compare": {s.name: pair_numbers(ref_scores, s.scores[name], bins, generator) for s in others},
        "bins": torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist(),
        "histograms": {s.name: torch.histc(s.scores[name], bins, low, high).long().tolist()
                       for s in [reference, *others]},
    }


def summarise(reference: ScoreSet, split: str, others: Sequence[ScoreSet], bins: int,
              statistic: str) -> dict[str, Any]:
    shrinkage = add_scores(reference, others)
    blocks = {name: statistic_block(name, reference, others, bins) for name in STATISTICS}
    blocks["layers"]["shrinkage"] = shrinkage
    chosen = blocks[statistic]
    return {
        "reference": {"name": reference.name, "source": reference.source, "split": split,
                      "count": len(reference.energy), **chosen["reference"]},
        "statistic": statistic,
        "score": DEFINITIONS[statistic],
        "compare": {s.name: {"source": s.source, "kind": s.kind, "count": len(s.energy), **chosen["compare"][s.name]}
                    for s in others},
        "statistics": blocks,
        "warnings": count_warnings(reference, others),
        "kl_definition": KL_DEFINITION,
        "auroc_definition": AUROC_DEFINITION,
        "interval_definition": INTERVAL_DEFINITION,
    }


PLOT_TITLES = {"layers": "layer familiarity", "energy": "−E(x), the paper's score"}
PLOT_LABELS = {"layers": "layer familiarity  (−ln Mahalanobis² to the reference's layer statistics; higher = "
                         "more alike)",
               "energy": "−E(x) = logsumexp f(x)   (higher = more like the reference)"}


def statistics_in_order(chosen: str) -> list[str]:
    """Every score, the chosen one first."""
    return [chosen] + [name for name in STATISTICS if name != chosen]


def plot_histograms(result: dict[str, Any], path: str | os.PathLike, title: str) -> None:
    """Both scores side by side: the chosen one first, −E(x) as in the paper."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    order = statistics_in_order(result["statistic"])
    fig, axes = plt.subplots(1, len(order), figsize=(7 * len(order), 4))
    for ax, name in zip(axes, order):
        block = result["statistics"][name]
        edges = np.asarray(block["bins"])
        for i, (source, counts) in enumerate(block["histograms"].items()):
            counts = np.asarray(counts, dtype=float)
            density = counts / max(counts.sum(), 1) / np.diff(edges)
            if i == 0:
                label = f"{source} (reference, {result['reference']['split'].split(' ')[0]}, n={int(counts.sum())})"
                ax.fill_between(edges[:-1], density, step="post", alpha=0.35, color="#4c72b0", label=label)
            else:
                c = block["compare"][source]
                ax.step(edges[:-1], density, where="post", linewidth=1.5,
                        label=f"{source} (n={int(counts.sum())}): KL {c['kl_to_reference']:.2f}, "
                              f"AUROC {c['auroc']:.3f}")
        ax.set(xlabel=PLOT_LABELS[name], ylabel="density", title=f"{title}: {PLOT_TITLES[name]}")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def check_parameters(compare: Sequence[CompareItem], bins: int, statistic: str) -> None:
    if not compare:
        raise JEMError("Nothing to compare: give at least one dataset, image folder or raster to compare with.")
    if bins < 2:
        raise JEMError(f"bins must be at least 2 (got {bins}).")
    if statistic not in STATISTICS:
        raise JEMError(f"Unknown OOD statistic '{statistic}'. Choose one of: {', '.join(STATISTICS)}.")


def check_reference_count(count: int, split: str) -> None:
    if count < MIN_REFERENCE_IMAGES:
        raise JEMError(f"The reference ({split}) has only {count} images; a histogram of fewer than "
                       f"{MIN_REFERENCE_IMAGES} says nothing about the data. Use the reference split 'train' or "
                       "'all', or a reference dataset with more images.")


def count_warnings(reference: ScoreSet, others: Sequence[ScoreSet]) -> list[str]:
    """One line per set too small for its KL to mean much (the bootstrap interval says how much)."""
    return [f"{s.name} has only {len(s.energy)} images: its KL is biased upwards and uncertain (see the interval); "
            f"{FEW_IMAGES} or more give a steadier figure" for s in [reference, *others] if len(s.energy) < FEW_IMAGES]


def ood_analysis(model: str | os.PathLike | LoadedModel, reference: str | os.PathLike | SceneDataset,
                 compare: Sequence[CompareItem], *, json_path: str | os.PathLike | None = None,
                 plot_path: str | os.PathLike | None = None, batch_size: int = 256, device: str = "auto",
                 reference_split: str = "train", statistic: str = DEFAULT_STATISTIC, bins: int = 50,
                 stretch: str = "auto", progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Familiarity histograms of `reference` vs each `compare` source: KL, AUROC, intervals; optional JSON, PNG."""
    check_parameters(compare, bins, statistic)
    check_output_folders(json_path, plot_path)
    progress = progress or no_progress
    loaded = as_loaded(model, device)
    steps = len(compare) + 1
    progress(0.0, "scoring the reference")
    dataset = load_reference(reference, loaded)
    check_band_count(dataset.images, loaded.meta.band_names, "the reference dataset")
    indices, split = reference_indices(dataset, loaded, reference_split)
    check_reference_count(len(indices), split)
    name = Path(dataset.paths[0]).parent.parent.name if dataset.paths else "reference"
    ref = ScoreSet(name, "class-folder", str(reference) if not isinstance(reference, SceneDataset) else name,
                   *embed(loaded, dataset.images[indices], batch_size, should_stop))
    others = []
    for i, item in enumerate(compare):
        def step_progress(fraction: float, message: str, i: int = i) -> None:
            progress((i + 1 + min(fraction, 1.0)) / steps, message)

        step_progress(0.0, f"scoring {item[0] if isinstance(item, tuple) else Path(item).name}")
        others.append(score_compare(item, loaded, batch_size, stretch, step_progress, should_stop))
    unique_names(others, {ref.name})
    result = summarise(ref, split, others, bins, statistic)
    with written_together(plot_path, json_path):
        if plot_path is not None:
            plot_histograms(result, plot_path, f"{ref.name} vs other data")
        if json_path is not None:
            text = json.dumps(result, indent=2)
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text), suffix=".json")
    progress(1.0, "done")
    return result
