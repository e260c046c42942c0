"""Figure of `jem suggest` on a real scene: the RGB image with the suggested patches (ranked) beside
the suggestion score of every patch.

    .venv/bin/python bench/suggest_figure.py demo/model.pt demo/beirut/*_B04.tif demo/beirut/*_B03.tif \\
        demo/beirut/*_B02.tif --bands B04,B03,B02 --count 10 --out docs/img/suggest_beirut.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jem_core.active import open_patch_reader, priority, suggest, uncertainty_scores
from jem_core.metrics import predict_logits
from jem_core.model_file import load_model
from jem_core.windowing import iter_patches


def score_grid(loaded, reader) -> np.ndarray:
    """The suggestion score of every non-overlapping patch (NaN where the patch has nodata)."""
    size = loaded.meta.image_size
    source = reader.sources[0]
    grid = np.full((source.height // size, source.width // size), np.nan)
    places, logits = [], []
    for batch in iter_patches(source, size, stretch=reader.stretches[0]):
        places += list(zip(batch.rows.tolist(), batch.cols.tolist()))
        logits.append(predict_logits(loaded, torch.from_numpy(batch.pixels)))
    scores = priority(uncertainty_scores(torch.cat(logits)))["score"].numpy()
    for (row, col), score in zip(places, scores):
        grid[row, col] = score
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("raster", nargs="+")
    p.add_argument("--bands")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    from contextlib import ExitStack

    import matplotlib.pyplot as plt

    loaded = load_model(args.model)
    bands = args.bands.split(",") if args.bands else None
    raster = args.raster[0] if len(args.raster) == 1 else args.raster
    suggestions = suggest(loaded, raster, args.count, bands=bands)
    size = loaded.meta.image_size
    with ExitStack() as stack:
        reader = open_patch_reader(stack, [raster], size, bands, loaded.meta)
        source = reader.sources[0]
        with source.open() as dataset:
            rgb = dataset.read(source.band_indexes, out_dtype="float32")
        reader.stretches[0].apply(rgb)
        grid = score_grid(loaded, reader)
    low, high = loaded.meta.value_range
    image = np.clip((rgb[:3].transpose(1, 2, 0) - low) / (high - low), 0, 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6))
    left.imshow(image)
    for s in suggestions:
        left.add_patch(plt.Rectangle((s.col, s.row), size, size, fill=False, edgecolor="magenta", linewidth=1.5))
        left.text(s.col + 2, s.row + 10, str(s.rank), color="yellow", fontsize=9, weight="bold")
    left.set_title(f"{args.count} suggested patches (rank 1 = label first)")
    shown = right.imshow(grid, cmap="magma", vmin=0, vmax=1, extent=(0, grid.shape[1] * size, grid.shape[0] * size, 0))
    right.set_title("score per patch (mean percentile of E(x), entropy)")
    fig.colorbar(shown, ax=right, fraction=0.046)
    for axis in (left, right):
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
