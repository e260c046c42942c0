"""PNG preview of a mapping run: the input (true colour), the class map with a legend, the confidence
(p(y|x) of the mapped class, times the label agreement for a retrained model) and the familiarity −E(x)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .confidence_box import AGREEMENT_TAG_WORDS
from .map_writer import CLASS_NODATA
from .plots import pyplot, save_figure
from .raster_io import band_percentiles, open_raster

PREVIEW_SIDE = 900  # longest side read for display; big rasters are decimated


def _read_decimated(path: str | os.PathLike, band: int | None = None) -> tuple[np.ndarray, dict]:
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        factor = max(1.0, max(src.width, src.height) / PREVIEW_SIDE)
        shape = (max(1, int(src.height / factor)), max(1, int(src.width / factor)))
        indexes = band if band is not None else list(range(1, src.count + 1))
        data = src.read(indexes, out_shape=shape if band is not None else (src.count, *shape),
                        resampling=Resampling.nearest)
        info = {"tags": src.tags(), "colormap": src.colormap(1) if src.dtypes[0] == "uint8" else None,
                "bounds": src.bounds}
    return data, info


def _true_colour(inputs: Sequence[str | os.PathLike], bands: Sequence[str] | None) -> np.ndarray:
    """(H, W, 3) in [0, 1] with a per-band 2–98 % stretch, decimated for display."""
    from rasterio.enums import Resampling

    with open_raster(inputs, bands) as source:
        lows, highs = band_percentiles(source, 2, 98)
        factor = max(1.0, max(source.width, source.height) / PREVIEW_SIDE)
        shape = (max(1, int(source.height / factor)), max(1, int(source.width / factor)))
        with source.open() as dataset:
            pixels = dataset.read(source.band_indexes[:3], out_shape=(min(3, len(source.band_indexes)), *shape),
                                  resampling=Resampling.average, out_dtype="float32")
    for b in range(len(pixels)):
        pixels[b] = (pixels[b] - lows[b]) / max(highs[b] - lows[b], 1e-6)
    if len(pixels) < 3:
        pixels = np.repeat(pixels[:1], 3, axis=0)
    return np.clip(pixels.transpose(1, 2, 0), 0, 1)


def render_map_preview(classes_path: str | os.PathLike, confidence_path: str | os.PathLike | None,
                       out_png: str | os.PathLike, inputs: Sequence[str | os.PathLike] | None = None,
                       bands: Sequence[str] | None = None, title: str = "", max_legend: int = 12,
                       familiarity_path: str | os.PathLike | None = None) -> Path:
    """Side-by-side panels: input (when given), class map (legend: the largest classes), confidence
    (p(y|x) of the mapped class) and familiarity −E(x) (each when given)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = pyplot()
    classes, info = _read_decimated(classes_path, band=1)
    names = json.loads(info["tags"].get("jem_class_names", "[]")) or [str(i) for i in range(int(classes.max()) + 1)]
    colormap = info["colormap"] or {}
    colours = np.array([colormap.get(i, (128, 128, 128, 255)) for i in range(len(names))], float) / 255
    panels = (1 if inputs else 0) + 1 + (1 if confidence_path else 0) + (1 if familiarity_path else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 6.0), squeeze=False, layout="constrained")
    axes = list(axes[0])
    b = info["bounds"]
    extent = (b.left, b.right, b.bottom, b.top)
    if inputs:
        ax = axes.pop(0)
        ax.imshow(_true_colour(inputs, bands), extent=extent, interpolation="nearest")
        ax.set_title("input (2–98 % stretch)")
    ax = axes.pop(0)
    masked = np.ma.masked_equal(classes, CLASS_NODATA)
    ax.imshow(masked, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, extent=extent,
              interpolation="nearest")
    counts = np.bincount(classes[classes != CLASS_NODATA].ravel(), minlength=len(names))[:len(names)]
    order = [i for i in np.argsort(-counts) if counts[i] > 0][:max_legend]
    total = max(int(counts.sum()), 1)
    ax.legend(handles=[Patch(color=colours[i], label=f"{names[i]} {counts[i] / total:.0%}") for i in order],
              loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize=7, frameon=False)
    ax.set_title("class map argmax p(y|x)")
    if confidence_path:  # low (likely wrong) in dark red as in the QGIS style
        ax = axes.pop(0)
        confidence, info = _read_decimated(confidence_path, band=1)
        finite = np.sort(confidence[np.isfinite(confidence)])
        if AGREEMENT_TAG_WORDS in info["tags"].get("jem_confidence", "") and finite.size:
            # a score crowding near 0, not a probability: shown by its rank within the map
            confidence = np.where(np.isfinite(confidence), np.searchsorted(finite, confidence) / finite.size, np.nan)
            what = "rank in this map of p(y|x) × label agreement"
        else:  # a probability: the fixed 0–1 scale
            what = "p(y|x) of the mapped class"
        image = ax.imshow(np.ma.masked_invalid(confidence), cmap="Reds_r", vmin=0, vmax=1, extent=extent,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"{what} (low = likely wrong)")
        ax.set_title("confidence")
    if familiarity_path:
        ax = axes.pop(0)
        familiarity, _ = _read_decimated(familiarity_path, band=1)
        finite = familiarity[np.isfinite(familiarity)]
        low, high = np.percentile(finite, [2, 98]) if finite.size else (0, 1)
        image = ax.imshow(np.ma.masked_invalid(familiarity), cmap="magma", vmin=low, vmax=high, extent=extent,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="−E(x) (higher = more like training data)")
        ax.set_title("familiarity −E(x)")
    if title:
        fig.suptitle(title, fontsize=10)
    for ax in fig.axes[:panels]:
        ax.tick_params(labelsize=6)
    save_figure(fig, out_png)
    return Path(out_png)
