"""Land-cover mapping of real rasters with a JEM: a class map, a confidence map and a familiarity map.

A model trained on scene patches (image_size × image_size pixels) is slid over a raster; every
patch gets logits f(x), from which the maps follow:

    class        argmax_y f(x)[y]                     Byte, colour table, class names in the metadata
    confidence   p(y|x) of the mapped class — times    Float32 in [0, 1]; how sure the classifier is,
                 its label agreement q_y for a model  low where the class map is likely wrong
                 with labelled features (`jem
                 retrain`; label_agreement.py) —
                 averaged over a box of cells 1.25
                 patches wide (confidence_box)
    familiarity  −E(x) = logsumexp_y f(x)[y]          Float32; higher = more like the training data
                                                      (the OOD map; it does not mark wrong classes)
    probs        softmax(f(x)), one band per class    Float32 (optional)

API (the QGIS layer adapts it 1:1)
----------------------------------
map_raster(model, inputs, out_classes, out_confidence=None, *, bands=None, stride=None, batch_size=64,
           device="auto", out_familiarity=None, out_probabilities=None, resolution="patch",
           target_gsd=None, stretch="auto", confidence_box=CONFIDENCE_BOX_PATCHES, read_ahead=2, progress=None,
           should_stop=None) -> MapResult

  model       a model file path or a LoadedModel (moved to `device`).
  inputs      one raster GDAL can read (GeoTIFF, VRT, ...), or several single-band files that are
              stacked on the finest grid (Sentinel-2 / OSCD layout: one file per band, 10/20/60 m).
  bands       names or 1-based indexes in the model's order, e.g. ["B04", "B03", "B02"]; a name
              matches a band description, a colour interpretation (red/green/blue) or a filename
              suffix (`..._B04.tif`); B4 == B04.  None: the model's band names if the raster has
              them, else all bands when the count matches.  A count mismatch raises JEMError.
  stride      pixels between patch origins; must divide the patch size.  None = patch size (no
              overlap).  A smaller stride overlaps patches: each output cell (stride × stride
              pixels) gets the MEAN LOGITS of every patch covering it, then argmax/softmax/−E.
  resolution  "patch": one output pixel per stride × stride cell, geotransform = input's × stride;
              "input": the input grid itself (each cell's value repeated over its pixels).
  target_gsd  resample the raster on read (averaging) to this pixel size, in the raster CRS's units,
              before cutting patches; "input" resolution then means that resampled grid.  Refused
              (JEMError) for a rotated raster, which has no single pixel size.  None: the raster is
              read as the model was trained — at 1/meta.coarsen of its resolution for a model
              `jem retrain` made that way (ModelMeta.coarsen), "input" then meaning that coarser grid.
  stretch     how raster values reach the model's value range (meta.value_range):
              "auto" (default): percentile 2–98 per band when the model is 8-bit ([0, 255]) and the
                raster is not uint8 (e.g. Sentinel-2 reflectance on an AID model), otherwise none;
              "none"; "percentile[:LOW,HIGH]"; "linear:MIN,MAX" (same fixed range for every band);
              or a raster_io.Stretch.  Percentiles come from a decimated read (≤ 1024 px a side).
              What was applied is reported in MapResult.stretch and in the outputs' metadata.
  confidence_box  side of the box the confidence averages over, in patches (default 1.25: 5 cells at a
              stride of a quarter patch); the nearest odd number of cells, so 0 — or a stride of a whole
              patch — gives each cell's own score.  See confidence_box.py for why.
  read_ahead  strips a reader thread keeps ready (0 = read in the calling thread).
  progress    progress(fraction, message), called after every batch.
  should_stop polled before every batch; True raises jem_core.Cancelled and no output file is left.

  Edges: the map covers the whole raster.  When its size is not a multiple of the stride, the last
  patch row/column is shifted inwards to end at the raster's edge (windowing.PatchGrid); at "patch"
  resolution the last output row/column then reaches past the raster's edge (its cell is partly
  outside), at "input" resolution the output is exactly the input grid.

  Rotated rasters (a geotransform that is not north-up) are mapped in their own pixel grid; the
  outputs carry the input's rotated geotransform (× stride at "patch" resolution), so they lie
  exactly on the input.

  Nodata: a patch with any invalid input pixel (nodata value, mask, NaN) is not classified; a cell
  no valid patch covers is nodata in every output (class 255, Float32 NaN).  A raster smaller than
  one patch raises JEMError.

  Outputs are tiled, deflate-compressed GeoTIFFs with the input's CRS, written under temporary
  names beside the targets and renamed only when every output is complete.

Memory: the raster is read as strips of patch_size rows (each row read once); output rows are
written as they complete.  Peak memory depends on the raster's width, not its height.

The patches come from windowing.iter_patches (also used by OOD scores and labelling suggestions);
the GeoTIFFs are written by map_writer.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import JEMError, ProgressFn, StopFn
from .confidence_box import AGREEMENT_TAG_WORDS, CONFIDENCE_BOX_PATCHES, MAX_CONFIDENCE_BOX, ConfidenceBox, box_cells
from .device import resolve_device
from .label_agreement import AGREEMENT_PLACES, LabelledFeatures
from .map_writer import CLASS_NODATA, MapOutputs, RowWriter
from .model_file import LoadedModel, as_loaded
from .raster_io import RasterSource, Stretch, choose_stretch, open_raster, raster_error, require_crs
from .windowing import PatchGrid, iter_patches, patch_grid

RESOLUTIONS = ("patch", "input")
CELL_PROBABILITIES = "p(y|x) = softmax of the mean logits of the patches covering the cell"
FAMILIARITY_TAG = "-E(x) = logsumexp of the mean logits of the patches covering the cell"


def confidence_tag(cells: int, agreement: LabelledFeatures | None = None) -> str:
    """What the confidence layer holds, for its metadata."""
    score = "p(y|x)" if agreement is None else (
        f"p(y|x) x {AGREEMENT_TAG_WORDS} q_y (q_k proportional to d_k^-{agreement.sharpness:g}, d_k the mean cosine "
        f"distance in the network's features to the {AGREEMENT_PLACES} nearest labelled places of class k, each "
        "place's nearest patch)")
    if cells == 1:
        return f"{score} of the cell's mapped class y; {CELL_PROBABILITIES}"
    return (f"{score} of the cell's mapped class y, averaged over the {cells} x {cells} cells around it; "
            f"{CELL_PROBABILITIES}")


@dataclass
class MapResult:
    classes: Path
    confidence: Path | None  # p(y|x) (× label agreement) of the mapped class, boxed
    familiarity: Path | None  # −E(x)
    probabilities: Path | None
    width: int  # output size in pixels
    height: int
    resolution: str
    patch_size: int
    stride: int
    bands: list[str]
    stretch: str
    device: str
    patches: int  # patches classified
    skipped_patches: int  # patches with nodata pixels
    class_counts: dict[str, int]  # cells (stride × stride px) per class
    seconds: float
    patches_per_second: float
    megapixels_per_second: float  # input pixels per second
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        top = sorted(self.class_counts.items(), key=lambda kv: -kv[1])[:5]
        share = sum(self.class_counts.values()) or 1
        classes = ", ".join(f"{name} {count / share:.0%}" for name, count in top if count)
        return (f"{self.patches} patches ({self.skipped_patches} skipped for nodata) in {self.seconds:.1f} s: "
                f"{self.patches_per_second:.0f} patches/s, {self.megapixels_per_second:.2f} Mpx/s on {self.device}; "
                f"{self.width} × {self.height} px output at {self.resolution} resolution; top classes: {classes}")


def map_raster(model: str | os.PathLike | LoadedModel, inputs: str | os.PathLike | Sequence[str | os.PathLike],
               out_classes: str | os.PathLike, out_confidence: str | os.PathLike | None = None, *,
               bands: Sequence[str] | None = None, stride: int | None = None, batch_size: int = 64,
               device: str = "auto", out_familiarity: str | os.PathLike | None = None,
               out_probabilities: str | os.PathLike | None = None, resolution: str = "patch",
               target_gsd: float | None = None, stretch: str | Stretch = "auto",
               confidence_box: float = CONFIDENCE_BOX_PATCHES, read_ahead: int = 2,
               progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> MapResult:
    """Classify a raster patch by patch; see the module docstring for every option."""
    if resolution not in RESOLUTIONS:
        raise JEMError(f"Unknown resolution '{resolution}'. Choose one of: {', '.join(RESOLUTIONS)}.")
    if not 0 <= confidence_box <= MAX_CONFIDENCE_BOX:  # also refuses NaN
        raise JEMError(f"The confidence box must be 0 to {MAX_CONFIDENCE_BOX} patches (got {confidence_box}); 0 "
                       f"gives each cell's own score, the default {CONFIDENCE_BOX_PATCHES} ranks errors best.")
    if batch_size < 1:
        raise JEMError(f"--batch-size must be at least 1 (got {batch_size}).")
    torch_device = resolve_device(device)
    loaded = as_loaded(model, torch_device)
    loaded.model.eval()
    meta = loaded.meta
    if len(meta.class_names) > CLASS_NODATA:
        raise JEMError(f"The model has {len(meta.class_names)} classes; a Byte class map holds at most {CLASS_NODATA}.")
    targets = {"classes": out_classes, "confidence": out_confidence, "familiarity": out_familiarity,
               "probabilities": out_probabilities}
    paths = [Path(p).resolve() for p in targets.values() if p is not None]
    if len(set(paths)) != len(paths):
        raise JEMError("Two outputs have the same path. Give each output its own file name.")
    with open_raster(inputs, bands, meta.band_names, target_gsd, meta.coarsen) as source:
        require_crs(source, "the maps could not be placed on the ground")
        if len(source.band_indexes) != loaded.spec.in_channels:
            raise JEMError(f"The model takes {loaded.spec.in_channels} bands but {len(source.band_indexes)} "
                           "were chosen.")
        grid = patch_grid(source.width, source.height, meta.image_size, stride)
        applied = choose_stretch(source, meta.value_range, stretch)
        box = box_cells(grid.patch_size, grid.stride, confidence_box)
        return _map(loaded, source, grid, applied, targets, resolution, box, batch_size, torch_device, read_ahead,
                    progress, should_stop)


def _map(loaded: LoadedModel, source: RasterSource, grid: PatchGrid, stretch: Stretch, targets: dict[str, Any],
         resolution: str, box: int, batch_size: int, device: torch.device, read_ahead: int,
         progress: ProgressFn | None, should_stop: StopFn | None) -> MapResult:
    from rasterio.errors import RasterioIOError

    meta = loaded.meta
    classes = len(meta.class_names)
    if resolution == "patch":
        width, height, transform = grid.cell_cols, grid.cell_rows, grid.cell_transform(source.transform)
    else:
        width, height, transform = source.width, source.height, source.transform
    profile = {"driver": "GTiff", "width": width, "height": height, "crs": source.crs, "transform": transform,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    tags = {"jem_class_names": json.dumps(meta.class_names), "jem_bands": ",".join(source.band_names),
            "jem_stretch": stretch.describe(), "jem_patch_size": str(grid.patch_size), "jem_stride": str(grid.stride),
            "jem_confidence": confidence_tag(box, loaded.labelled), "jem_familiarity": FAMILIARITY_TAG}
    start = time.monotonic()
    outputs = MapOutputs(targets, profile, meta.class_names, tags)
    try:
        writer = RowWriter(outputs, grid, resolution)
        counts = np.zeros(classes, dtype=np.int64)
        kinds = set(outputs.files)
        smoother = ConfidenceBox(box, writer.add_cell_row) if box > 1 and "confidence" in kinds else None
        stats = _run(loaded, source, grid, stretch, batch_size, device, read_ahead,
                     smoother.add if smoother is not None else writer.add_cell_row, counts,
                     kinds | {"support"} if smoother is not None else kinds, progress, should_stop)
        if smoother is not None:
            smoother.finish()
        if stats["patches"] == 0:
            raise JEMError(f"'{source.description}' has no {grid.patch_size} × {grid.patch_size} px patch without "
                           "nodata (all pixels are nodata, NaN or masked); nothing to map. Check the raster and its "
                           "nodata value.")
        writer.flush()
        outputs.commit()
    except RasterioIOError as error:
        outputs.abort()
        raise raster_error(error) from None
    except BaseException:
        outputs.abort()
        raise
    seconds = time.monotonic() - start
    covered_mpx = grid.width * grid.height / 1e6
    if progress:
        progress(1.0, "done")
    return MapResult(
        classes=Path(targets["classes"]), confidence=_path(targets["confidence"]),
        familiarity=_path(targets["familiarity"]), probabilities=_path(targets["probabilities"]),
        width=width, height=height, resolution=resolution, patch_size=grid.patch_size, stride=grid.stride,
        bands=list(source.band_names), stretch=stretch.describe(), device=str(device), patches=stats["patches"],
        skipped_patches=stats["skipped"], class_counts=dict(zip(meta.class_names, counts.tolist())),
        seconds=seconds, patches_per_second=stats["patches"] / max(seconds, 1e-9),
        megapixels_per_second=covered_mpx / max(seconds, 1e-9), notes=list(source.notes))


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


@torch.inference_mode()
def _run(loaded: LoadedModel, source: RasterSource, grid: PatchGrid, stretch: Stretch, batch_size: int,
         device: torch.device, read_ahead: int, add_row: Callable[[dict[str, np.ndarray]], None],
         class_counts: np.ndarray, kinds: set[str], progress: ProgressFn | None,
         should_stop: StopFn | None) -> dict[str, int]:
    """Classify the patches in batches; emit each cell row's values (kinds) to add_row as soon as no later
    patch can touch it.  A model with labelled features also scores each patch's label agreement, averaged
    per cell beside the logits."""
    classes = len(loaded.meta.class_names)
    agreement = loaded.labelled.to(device) if loaded.labelled is not None and "confidence" in kinds else None
    columns = 2 * classes if agreement is not None else classes  # logits, then log agreement
    sums: dict[int, np.ndarray] = {}  # cell row → summed scores (cell_cols, columns)
    hits: dict[int, np.ndarray] = {}  # cell row → patches covering each cell (cell_cols,)
    stats = {"patches": 0, "skipped": 0}
    next_cell_row = 0

    def accumulate(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray) -> None:
        for row in np.unique(rows):  # within one patch row the cols differ, so fancy += adds every patch
            members = rows == row
            cell_rows, cell_cols = grid.cells_of_patches(rows[members], cols[members])
            for cell_row in cell_rows[0].tolist():
                if cell_row not in sums:
                    sums[cell_row] = np.zeros((grid.cell_cols, columns), np.float64)
                    hits[cell_row] = np.zeros(grid.cell_cols, np.int32)
                for targets in cell_cols.T:
                    sums[cell_row][targets] += scores[members]
                    hits[cell_row][targets] += 1

    def emit_through(last_cell_row: int) -> None:
        nonlocal next_cell_row
        while next_cell_row <= last_cell_row:
            row_sums = sums.pop(next_cell_row, np.zeros((grid.cell_cols, columns)))
            row_hits = hits.pop(next_cell_row, np.zeros(grid.cell_cols, np.int32))
            values = cell_values(row_sums, row_hits, kinds, classes)
            class_counts[:] += np.bincount(values["classes"][row_hits > 0], minlength=classes)[:classes]
            add_row(values)
            next_cell_row += 1

    start = time.monotonic()
    batches = iter_patches(source, grid.patch_size, grid.stride, batch_size=batch_size, stretch=stretch,
                           read_ahead=read_ahead, should_stop=should_stop)
    with closing(batches):  # a cancel or error stops the reader thread now
        for batch in batches:
            x = loaded.normalise(torch.from_numpy(batch.pixels).to(device))
            if agreement is None:
                scores = loaded.model(x)
            else:
                logits, features = loaded.model.logits_and_features(x)
                scores = torch.cat([logits, agreement.log_agreement(features)], 1)
            accumulate(batch.rows, batch.cols, scores.float().cpu().numpy().astype(np.float64))
            stats["patches"] += len(batch.rows)
            last_row = int(batch.rows[-1])
            if progress:
                rate = stats["patches"] / max(time.monotonic() - start, 1e-9)
                progress(min((stats["patches"] + batch.skipped) / grid.patch_count, 0.999),
                         f"patch row {last_row + 1}/{grid.patch_rows}, {rate:.0f} patches/s")
            emit_through(last_row - 1)  # later patches start at patch row last_row or below
    emit_through(grid.cell_rows - 1)
    stats["skipped"] = grid.patch_count - stats["patches"]
    return stats


def cell_values(sums: np.ndarray, counts: np.ndarray, kinds: set[str], classes: int) -> dict[str, np.ndarray]:
    """The outputs of a row of cells from their summed scores (cells, classes or 2 × classes: logits, then
    log label agreement) and patch counts (cells,): the one place where the class, the confidence, the
    familiarity and the probabilities are computed.  "support" (classes, cells) is the per-class score whose
    value for the mapped class is the cell's confidence, for the confidence box."""
    covered = counts > 0
    means = sums / np.maximum(counts, 1)[:, None]
    logits = means[:, :classes]
    top = logits.max(axis=1, keepdims=True)
    exp = np.exp(logits - top)
    total = exp.sum(axis=1)
    mapped = logits.argmax(axis=1)
    values = {"classes": np.where(covered, mapped, CLASS_NODATA).astype(np.uint8)}
    probs = exp / total[:, None]
    support = probs * softmax(means[:, classes:]) if means.shape[1] > classes else probs
    if "confidence" in kinds:  # confidence_tag(1): without agreement max p(y|x) = 1 / Σ exp(logits − top)
        values["confidence"] = np.where(covered, support[np.arange(len(mapped)), mapped], np.nan).astype(np.float32)
    if "support" in kinds:
        values["support"] = np.where(covered[None], support.T, np.nan).astype(np.float32)
    if "familiarity" in kinds:  # −E(x) = logsumexp_y of the mean logits (FAMILIARITY_TAG)
        values["familiarity"] = np.where(covered, top[:, 0] + np.log(total), np.nan).astype(np.float32)
    if "probabilities" in kinds:
        values["probabilities"] = np.where(covered[None], probs.T, np.nan).astype(np.float32)
    return values


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (cells, classes)."""
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
