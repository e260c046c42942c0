"""Out-of-distribution analysis with the JEM energy: −E(x) histograms, their KL divergence, AUROC.

A JEM assigns every image a score −E(x) = logsumexp_y f(x)[y] (unnormalised log p(x)): images like
the training data score high, images from elsewhere score lower.  As in the JEM-for-EO paper
(Castillo-Navarro et al. 2022, EuroSAT test 0.27 vs 25–28 for Potsdam, OSCD, BigEarthNet), we
compare histograms of −E(x) of a reference dataset with those of other data.

API (the QGIS algorithm `jem:ood` wraps it 1:1)
-----------------------------------------------
ood_analysis(model, reference, compare, *, json_path=None, plot_path=None, batch_size=256,
             device="auto", reference_split="test", bins=50, stretch="auto",
             progress=None, should_stop=None) -> dict

  model            a model file path or a LoadedModel.
  reference        a class-folder dataset (path, or an in-memory SceneDataset) with the model's classes.
  reference_split  "test": its held-out test split by the model's seed and fractions (what training
                   never saw); "train": the training split (the paper's reference); "all": every image.
                   A reference whose classes are not the model's is always used whole ("all").
  compare          a list of PATHs, each one of: a class-folder dataset (any classes), a folder of
                   images, or a raster (GeoTIFF, VRT, JPEG, ...) cut into non-overlapping patches of
                   the model's size (patches with nodata skipped; bands picked by the model's band
                   names when the raster has them).  Programmatic callers may also pass
                   (name, pixels) with pixels (N, bands, H, W) in the model's value range.
  stretch          for rasters only, as in `jem map`: "auto" maps a non-8-bit raster to an 8-bit
                   model's range with a 2–98 % percentile stretch; "none" uses raw values.
  progress         progress(fraction, message); should_stop() polled between batches → Cancelled.

Returns (and writes as JSON) a dict: reference {name, split, count, mean, std}; compare[name] →
{source, kind, count, mean, std, kl_to_reference, auroc}; bins, histograms; and the definitions:
  kl_to_reference  KL(compare ‖ reference) of the two histograms on shared bins (equal-width over
                   the union of all scores), empty bins smoothed with ε = 1e-10, so disjoint
                   histograms give about 23.
  auroc            AUROC of −E(x) separating reference (positive) from compare images:
                   0.5 = indistinguishable, 1.0 = every reference image scores above every compare one.
The plot overlays the normalised histograms with KL and AUROC in the legend.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
from .metrics import predict_logits
from .model_file import LoadedModel, as_loaded

CompareItem = Union[str, os.PathLike, tuple]
REFERENCE_SPLITS = ("test", "train", "all")


@dataclass
class ScoreSet:
    """−E(x) of every image of one source."""

    name: str
    kind: str
    source: str
    scores: torch.Tensor


def neg_energy(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int,
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """−E(x) = logsumexp f(x) of raw pixels in the model's value range."""
    return torch.logsumexp(predict_logits(loaded, pixels, batch_size, should_stop).double(), 1)


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


def raster_scores(path: Path, loaded: LoadedModel, batch_size: int, stretch: str,
                  progress: ProgressFn, should_stop: Callable[[], bool] | None) -> torch.Tensor:
    """−E(x) of every valid non-overlapping model-size patch of a raster (the mapping patch iterator)."""
    from .raster_io import choose_stretch, open_raster
    from .windowing import iter_patches

    scores = []
    with open_raster(path, expected_bands=loaded.meta.band_names) as source:
        chosen = choose_stretch(source, loaded.meta.value_range, stretch)
        for batch in iter_patches(source, loaded.meta.image_size, batch_size=batch_size, stretch=chosen,
                                  should_stop=should_stop):
            scores.append(neg_energy(loaded, torch.from_numpy(np.ascontiguousarray(batch.pixels)), batch_size))
            progress((int(batch.rows.max()) + 1) / batch.grid.patch_rows,
                     f"{path.name}: {sum(map(len, scores))} patches")
    if not scores:
        raise JEMError(f"Raster '{path}' has no {loaded.meta.image_size} px patch without nodata; nothing to compare.")
    return torch.cat(scores)


def score_compare(item: CompareItem, loaded: LoadedModel, batch_size: int, stretch: str, progress: ProgressFn,
                  should_stop: Callable[[], bool] | None) -> ScoreSet:
    if isinstance(item, tuple):
        name, pixels = item
        check_band_count(pixels, loaded.meta.band_names, name)
        return ScoreSet(name, "pixels", name, neg_energy(loaded, pixels, batch_size, should_stop))
    path = Path(item)
    kind = source_kind(path)
    if kind == "raster":
        return ScoreSet(path.name, kind, str(path), raster_scores(path, loaded, batch_size, stretch, progress,
                                                                  should_stop))
    if kind == "class-folder":
        pixels = load_class_folder(path, loaded.meta.image_size).images
    else:
        pixels = read_image_folder(path, loaded.meta.image_size, should_stop)
    check_band_count(pixels, loaded.meta.band_names, path)
    return ScoreSet(path.name, kind, str(path), neg_energy(loaded, pixels, batch_size, should_stop))


def unique_names(sets: Sequence[ScoreSet], taken: set[str]) -> None:
    for score_set in sets:
        name, n = score_set.name, 2
        while score_set.name in taken:
            score_set.name = f"{name} ({n})"
            n += 1
        taken.add(score_set.name)


def summarise(reference: ScoreSet, split: str, others: Sequence[ScoreSet], bins: int) -> dict[str, Any]:
    everything = torch.cat([reference.scores] + [s.scores for s in others])
    low, high = float(everything.min()), float(everything.max())
    if high <= low:
        high = low + 1.0
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)

    def histogram(scores: torch.Tensor) -> list[int]:
        return torch.histc(scores, bins, low, high).long().tolist()

    reference_hist = histogram(reference.scores)
    result: dict[str, Any] = {
        "reference": {"name": reference.name, "source": reference.source, "split": split,
                      "count": len(reference.scores), "mean": float(reference.scores.mean()),
                      "std": float(reference.scores.std()) if len(reference.scores) > 1 else 0.0},
        "compare": {},
        "bins": edges.tolist(),
        "histograms": {reference.name: reference_hist},
        "score": "−E(x) = logsumexp_y f(x)[y]",
        "kl_definition": "KL(compare ‖ reference) of histograms on shared bins, empty bins smoothed with "
                         f"{KL_EPSILON:g}",
        "auroc_definition": "AUROC of −E(x), reference images positive, compare images negative",
    }
    for s in others:
        hist = histogram(s.scores)
        result["histograms"][s.name] = hist
        result["compare"][s.name] = {
            "source": s.source, "kind": s.kind, "count": len(s.scores), "mean": float(s.scores.mean()),
            "std": float(s.scores.std()) if len(s.scores) > 1 else 0.0,
            "kl_to_reference": histogram_kl(hist, reference_hist), "auroc": auroc(reference.scores, s.scores)}
    return result


def plot_histograms(result: dict[str, Any], path: str | os.PathLike, title: str) -> None:
    from .plots import pyplot, save_figure

    plt = pyplot()
    edges = np.asarray(result["bins"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, counts) in enumerate(result["histograms"].items()):
        counts = np.asarray(counts, dtype=float)
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        if i == 0:
            label = f"{name} (reference, {result['reference']['split'].split(' ')[0]}, n={int(counts.sum())})"
            ax.fill_between(edges[:-1], density, step="post", alpha=0.35, color="#4c72b0", label=label)
        else:
            c = result["compare"][name]
            ax.step(edges[:-1], density, where="post", linewidth=1.5,
                    label=f"{name} (n={c['count']}): KL {c['kl_to_reference']:.2f}, AUROC {c['auroc']:.3f}")
    ax.set(xlabel="−E(x) = logsumexp f(x)   (higher = more like the reference)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def ood_analysis(model: str | os.PathLike | LoadedModel, reference: str | os.PathLike | SceneDataset,
                 compare: Sequence[CompareItem], *, json_path: str | os.PathLike | None = None,
                 plot_path: str | os.PathLike | None = None, batch_size: int = 256, device: str = "auto",
                 reference_split: str = "test", bins: int = 50, stretch: str = "auto",
                 progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """−E(x) histograms of `reference` vs each `compare` source: KL, AUROC, counts; optional JSON and PNG."""
    if not compare:
        raise JEMError("Nothing to compare: give at least one dataset, image folder or raster to compare with.")
    if bins < 2:
        raise JEMError(f"bins must be at least 2 (got {bins}).")
    check_output_folders(json_path, plot_path)
    progress = progress or no_progress
    loaded = as_loaded(model, device)
    steps = len(compare) + 1
    progress(0.0, "scoring the reference")
    dataset = load_reference(reference, loaded)
    check_band_count(dataset.images, loaded.meta.band_names, "the reference dataset")
    indices, split = reference_indices(dataset, loaded, reference_split)
    name = Path(dataset.paths[0]).parent.parent.name if dataset.paths else "reference"
    ref = ScoreSet(name, "class-folder", str(reference) if not isinstance(reference, SceneDataset) else name,
                   neg_energy(loaded, dataset.images[indices], batch_size, should_stop))
    others = []
    for i, item in enumerate(compare):
        def step_progress(fraction: float, message: str, i: int = i) -> None:
            progress((i + 1 + min(fraction, 1.0)) / steps, message)

        step_progress(0.0, f"scoring {item[0] if isinstance(item, tuple) else Path(item).name}")
        others.append(score_compare(item, loaded, batch_size, stretch, step_progress, should_stop))
    unique_names(others, {ref.name})
    result = summarise(ref, split, others, bins)
    with written_together(plot_path, json_path):
        if plot_path is not None:
            plot_histograms(result, plot_path, f"−E(x) of {ref.name} vs other data")
        if json_path is not None:
            text = json.dumps(result, indent=2)
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text), suffix=".json")
    progress(1.0, "done")
    return result
