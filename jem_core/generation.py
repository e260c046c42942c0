"""Sampling images from a trained JEM with SGLD, and an offline sample-quality score.

A JEM is a generative model too: SGLD on E(x) (unconditional, p(x)) or on E(x, y) = −f(x)[y]
(class-conditional, p(x|y)) turns a starting image into a sample.  As in JEM's evaluation the
chains run longer than the few steps per training iteration, from fresh starts: the per-class
Gaussian fitted to the data ("informative" init, as in training) when a dataset is given,
uniform noise otherwise.

API (the QGIS algorithm `jem:samples` wraps it 1:1)
---------------------------------------------------
sample_grid(model, out_png, *, per_class=4, steps=60, conditional=True, unconditional=True,
            unconditional_count=None, data=None, feature_model=None, json_path=None, step_size=None,
            noise=None, seed=0, batch_size=64, device="auto", progress=None, should_stop=None) -> dict

  model          a model file path or a LoadedModel.
  out_png        the grid: one row per class (conditional samples), then rows of unconditional
                 samples; displayed bands: red/green/blue when named so, else the first three.
  data           the class-folder dataset the model was trained on (path or SceneDataset): fits the
                 informative init on its training split and is the real data of the quality score.
  feature_model  classifier whose penultimate features the quality score uses (e.g. the CE
                 baseline trained on the same data); None = the sampled model's own features.

Sample quality (only with `data`): Fréchet distance and kernel distance (unbiased MMD², cubic
kernel; the KID estimator) between the features of the samples and those of up to 1,000 real
training images.  These are NOT Inception FID/KID (no Inception weights offline): they are only
comparable between runs that use the same feature model and data.  For scale, the same distances
are reported for the chains' starting images (init, no SGLD) and for as many held-out real
images ("real"), the floor for that sample count.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import JEMError, ProgressFn, check_stop, no_progress
from .data import SceneDataset
from .distances import frechet_distance, kernel_distance
from .files import atomic_write, check_output_folders, written_together
from .model_file import LoadedModel, as_loaded
from .ood import load_reference, reference_indices
from .sampler import ClassGaussianInit, SGLDConfig, UniformInit, make_initialiser, run_chain

REAL_REFERENCE_MAX = 1000
STEP_CHUNK = 10  # SGLD steps between progress updates / cancel checks


def sgld_config(loaded: LoadedModel, steps: int, step_size: float | None, noise: float | None) -> SGLDConfig:
    """The training run's SGLD settings, with a longer chain (and optional overrides)."""
    if steps < 1:
        raise JEMError(f"steps must be at least 1 (got {steps}).")
    saved = dict(loaded.meta.train_config.get("sgld", {}))
    config = SGLDConfig(**{k: v for k, v in saved.items() if k in SGLDConfig.__dataclass_fields__})
    overrides = {"steps": steps, "step_size": step_size, "noise": noise}
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})  # re-validates


def training_data(loaded: LoadedModel, data: str | os.PathLike | SceneDataset) -> tuple[SceneDataset, torch.Tensor,
                                                                                        torch.Tensor]:
    """The dataset, its training indices and its held-out test indices (by the model's seed)."""
    dataset = load_reference(data, loaded)
    if list(dataset.class_names) != list(loaded.meta.class_names):
        raise JEMError(f"The dataset's classes ({', '.join(dataset.class_names[:5])}…) are not the model's "
                       f"({', '.join(loaded.meta.class_names[:5])}…). Give the dataset the model was trained on.")
    if dataset.images.shape[1] != len(loaded.meta.band_names):
        raise JEMError(f"The dataset has {dataset.images.shape[1]} bands, the model {len(loaded.meta.band_names)}.")
    return dataset, reference_indices(dataset, loaded, "train")[0], reference_indices(dataset, loaded, "test")[0]


def run_chains(loaded: LoadedModel, starts: torch.Tensor, labels: torch.Tensor | None, config: SGLDConfig,
               batch_size: int, report: Callable[[int], None], should_stop: Callable[[], bool] | None) -> torch.Tensor:
    """SGLD from `starts` (normalised), in batches and chunks of steps so progress and cancel stay live."""
    out = []
    for begin in range(0, len(starts), batch_size):
        x = starts[begin:begin + batch_size]
        y = None if labels is None else labels[begin:begin + batch_size]
        done = 0
        while done < config.steps:
            check_stop(should_stop)
            chunk = min(STEP_CHUNK, config.steps - done)
            x = run_chain(loaded.model, x, config, y=y, steps=chunk)
            done += chunk
            report(len(x) * chunk)
        out.append(x)
    return torch.cat(out)


def to_pixels(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Normalised network inputs → pixels clipped to the model's value range."""
    low, high = loaded.meta.value_range
    return loaded.denormalise(x.detach().cpu()).clamp(low, high)


def display_bands(band_names: list[str]) -> list[int]:
    lower = [b.lower() for b in band_names]
    if all(c in lower for c in ("red", "green", "blue")):
        return [lower.index(c) for c in ("red", "green", "blue")]
    return list(range(min(3, len(band_names))))


def mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, C) in [0, 1] → one image with a 1 px white gap between tiles, `columns` per row."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c))
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image
    return canvas


def save_grid(loaded: LoadedModel, panels: list[tuple[str, torch.Tensor, list[str]]], columns: int,
              path: str | os.PathLike) -> None:
    """panels: (title, pixels (N, bands, H, W), one label per row)."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    low, high = loaded.meta.value_range
    bands = display_bands(loaded.meta.band_names)
    row_counts = [len(labels) for _, _, labels in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": row_counts},
                             figsize=(0.8 * columns + 2.2, 0.8 * sum(row_counts) + 0.6 * len(panels)))
    for ax, (title, pixels, labels) in zip(axes[:, 0], panels):
        shown = ((pixels[:, bands] - low) / max(high - low, 1e-12)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        if shown.shape[-1] == 1:
            shown = np.repeat(shown, 3, axis=-1)
        elif shown.shape[-1] == 2:
            shown = np.concatenate([shown, shown[..., :1]], axis=-1)
        ax.imshow(mosaic(shown, columns), interpolation="nearest")
        size = pixels.shape[-1] + 1
        ax.set_yticks([(r + 0.5) * size for r in range(len(labels))], labels, fontsize=8)
        ax.set_xticks([])
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)


@torch.no_grad()
def predict_classes(loaded: LoadedModel, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """argmax f(x) of normalised inputs."""
    loaded.model.eval()
    return torch.cat([loaded.model(x[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(model: LoadedModel, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Penultimate-layer features of pixels (in the model's value range)."""
    device = next(model.model.parameters()).device
    model.model.eval()
    return torch.cat([model.model.penultimate(model.normalise(pixels[i:i + batch_size].to(device))).double().cpu()
                      for i in range(0, len(pixels), batch_size)])


def quality_scores(feature_model: LoadedModel, feature_name: str, samples: torch.Tensor, starts: torch.Tensor,
                   dataset: SceneDataset, train_idx: torch.Tensor, test_idx: torch.Tensor, seed: int,
                   batch_size: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    reference = train_idx[torch.randperm(len(train_idx), generator=generator)[:REAL_REFERENCE_MAX]]
    held_out = test_idx[torch.randperm(len(test_idx), generator=generator)[:len(samples)]]
    ref_features = features(feature_model, dataset.images[reference], batch_size)
    result: dict[str, Any] = {
        "feature_space": f"penultimate layer ({ref_features.shape[1]}-d) of {feature_name}; NOT Inception FID/KID",
        "reference": f"{len(reference)} real training images", "count": len(samples)}
    if len(samples) <= 2 * ref_features.shape[1]:
        result["warning"] = (f"only {len(samples)} samples for {ref_features.shape[1]}-d features: the distances are "
                             "dominated by small-sample bias; compare them only with the 'real' row (same count)")
    for key, pixels in (("samples", samples), ("init", starts), ("real", dataset.images[held_out])):
        if len(pixels) < 2:
            continue
        f = features(feature_model, pixels, batch_size)
        result[key] = {"count": len(pixels), "frechet": frechet_distance(f, ref_features),
                       "kernel": kernel_distance(f, ref_features)}
    return result


def sample_grid(model: str | os.PathLike | LoadedModel, out_png: str | os.PathLike, *, per_class: int = 4,
                steps: int = 60, conditional: bool = True, unconditional: bool = True,
                unconditional_count: int | None = None, data: str | os.PathLike | SceneDataset | None = None,
                feature_model: str | os.PathLike | LoadedModel | None = None,
                json_path: str | os.PathLike | None = None, step_size: float | None = None,
                noise: float | None = None, seed: int = 0, batch_size: int = 64, device: str = "auto",
                progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """SGLD samples of a JEM as a PNG grid (+ quality score with `data`); returns the numbers as a dict."""
    if not (conditional or unconditional):
        raise JEMError("Nothing to sample: ask for conditional and/or unconditional samples.")
    if per_class < 1:
        raise JEMError(f"per_class must be at least 1 (got {per_class}).")
    check_output_folders(out_png, json_path)
    progress = progress or no_progress
    loaded = as_loaded(model, device)
    model_device = next(loaded.model.parameters()).device
    config = sgld_config(loaded, steps, step_size, noise)
    torch.manual_seed(seed)
    classes = loaded.meta.class_names
    num_classes = len(classes)
    shape = (len(loaded.meta.band_names), loaded.meta.image_size, loaded.meta.image_size)

    dataset = train_idx = test_idx = None
    initialiser: UniformInit | ClassGaussianInit = UniformInit(shape)
    if data is not None:
        dataset, train_idx, test_idx = training_data(loaded, data)
        initialiser = make_initialiser(config, loaded.normalise(dataset.images[train_idx]), dataset.labels[train_idx],
                                       num_classes)
    n_uncond = (unconditional_count or per_class * min(num_classes, 10)) if unconditional else 0
    cond_labels = (torch.arange(num_classes).repeat_interleave(per_class) if conditional
                   else torch.empty(0, dtype=torch.long))
    total_work = (len(cond_labels) + n_uncond) * config.steps
    done = 0

    def report(work: int) -> None:
        nonlocal done
        done += work
        progress(min(done / total_work, 0.99), f"SGLD {done // config.steps}/{total_work // config.steps} samples")

    panels, all_samples, all_starts = [], [], []
    result: dict[str, Any] = {"image": str(out_png), "steps": config.steps, "step_size": config.step_size,
                              "noise": config.noise, "init": "informative (per-class Gaussian of the data)"
                              if isinstance(initialiser, ClassGaussianInit) else "uniform noise"}
    if conditional:
        starts = initialiser.sample(len(cond_labels), cond_labels, model_device)
        samples = run_chains(loaded, starts, cond_labels.to(model_device), config, batch_size, report, should_stop)
        predicted = predict_classes(loaded, samples, batch_size)
        result["conditional"] = {"per_class": per_class, "classified_as_their_class":
                                 float((predicted == cond_labels).double().mean())}
        panels.append(("class-conditional samples  x ~ p(x | y)", to_pixels(loaded, samples), list(classes)))
        all_samples.append(samples)
        all_starts.append(starts)
    if unconditional:
        starts = initialiser.sample(n_uncond, None, model_device)
        samples = run_chains(loaded, starts, None, config, batch_size, report, should_stop)
        counts = torch.bincount(predict_classes(loaded, samples, batch_size), minlength=num_classes)
        result["unconditional"] = {"count": n_uncond, "predicted_classes": {classes[i]: int(c) for i, c in
                                                                           enumerate(counts) if c}}
        rows = -(-n_uncond // per_class)
        panels.append(("unconditional samples  x ~ p(x)", to_pixels(loaded, samples), ["p(x)"] * rows))
        all_samples.append(samples)
        all_starts.append(starts)

    if dataset is not None:
        progress(0.99, "sample-quality score")
        if feature_model is None:
            scorer, scorer_name = loaded, "the sampled model itself"
        else:
            scorer = as_loaded(feature_model, device)
            name = "given model" if isinstance(feature_model, LoadedModel) else Path(feature_model).name
            scorer_name = f"a separate classifier ({name})"
            if (len(scorer.meta.band_names), scorer.meta.image_size) != (shape[0], shape[1]):
                raise JEMError("The feature model must take the same bands and image size as the sampled model.")
        result["quality"] = quality_scores(scorer, scorer_name, to_pixels(loaded, torch.cat(all_samples)),
                                           to_pixels(loaded, torch.cat(all_starts)), dataset, train_idx, test_idx,
                                           seed, batch_size)
    with written_together(out_png, json_path):
        save_grid(loaded, panels, per_class, out_png)
        if json_path is not None:
            text = json.dumps(result, indent=2)
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text), suffix=".json")
    progress(1.0, "done")
    return result
