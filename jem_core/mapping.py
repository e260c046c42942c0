"""Land-cover mapping of real rasters with a JEM: a class map and a −E(x) confidence map.

A model trained on scene patches (image_size × image_size pixels) is slid over a raster; every
patch gets logits f(x), from which the maps follow:

    class        argmax_y f(x)[y]                     Byte, colour table, class names in the metadata
    confidence   −E(x) = logsumexp_y f(x)[y]          Float32; higher = more like the training data
    max_prob     max_y softmax(f(x))[y]               Float32 (optional)
    probs        softmax(f(x)), one band per class    Float32 (optional)

API (the QGIS layer adapts it 1:1)
----------------------------------
map_raster(model, inputs, out_classes, out_confidence=None, *, bands=None, stride=None, batch_size=64,
           device="auto", out_max_probability=None, out_probabilities=None, resolution="patch",
           target_gsd=None, stretch="auto", read_ahead=2, progress=None, should_stop=None) -> MapResult

  model       a model file path or a LoadedModel (moved to `device`).
  inputs      one raster GDAL can read (GeoTIFF, VRT, ...), or several single-band files that are
              stacked on the finest grid (Sentinel-2 / OSCD layout: one file per band, 10/20/60 m).
  bands       names or 1-based indexes in the model's order, e.g. ["B04", "B03", "B02"]; a name
              matches a band description, a colour interpretation (red/green/blue) or a filename
              suffix (`..._B04.tif`); B4 == B04.  None: the model's band names if the raster has
              them, else all bands when the count matches.  A count mismatch raises JEMError.
  stride      pixels between patch origins; must divide the patch size.  None = patch size (no
              overlap).  A smaller stride overlaps patches: each output cell (stride × stride
              pixels) gets the MEAN LOGITS of every patch covering it, then argmax/−E/softmax.
  resolution  "patch": one output pixel per stride × stride cell, geotransform = input's × stride;
              "input": the input grid itself (each cell's value repeated over its pixels).
  target_gsd  resample the raster on read (averaging) to this pixel size, in the raster CRS's units,
              before cutting patches; "input" resolution then means that resampled grid.
  stretch     how raster values reach the model's value range (meta.value_range):
              "auto" (default): percentile 2–98 per band when the model is 8-bit ([0, 255]) and the
                raster is not uint8 (e.g. Sentinel-2 reflectance on an AID model), otherwise none;
              "none"; "percentile[:LOW,HIGH]"; "linear:MIN,MAX" (same fixed range for every band);
              or a raster_io.Stretch.  Percentiles come from a decimated read (≤ 1024 px a side).
              What was applied is reported in MapResult.stretch and in the outputs' metadata.
  read_ahead  strips a reader thread keeps ready (0 = read in the calling thread).
  progress    progress(fraction, message), called after every batch.
  should_stop polled before every batch; True raises jem_core.Cancelled and no output file is left.

  Nodata: a patch with any invalid input pixel (nodata value, mask, NaN) is not classified; a cell
  no valid patch covers is nodata in every output (class 255, Float32 NaN).  The right/bottom
  margin narrower than one stride that no cell covers is nodata at "input" resolution and outside
  the grid at "patch" resolution.  A raster smaller than one patch raises JEMError.

  Outputs are tiled, deflate-compressed GeoTIFFs with the input's CRS, written under temporary
  names beside the targets and renamed only when every output is complete.

Memory: the raster is read as strips of patch_size rows (each row read once); output rows are
written as they complete.  Peak memory depends on the raster's width, not its height.

iter_patches(raster, patch_size, stride=None, bands=None, ...) yields PatchBatch(rows, cols,
pixels) of valid patches for other features (OOD maps, where to label next).  patch_grid(width,
height, patch_size, stride) is the pure windowing function both use.
"""
from __future__ import annotations

import colorsys
import json
import os
import re
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import JEMError, ProgressFn, check_stop
from .device import resolve_device
from .files import publish
from .model_file import LoadedModel, as_loaded
from .raster_io import (GdalFailures, RasterSource, Stretch, choose_stretch, open_raster, raster_error, read_strips,
                        require_crs)

RESOLUTIONS = ("patch", "input")
CLASS_NODATA = 255


# ---------------------------------------------------------------------------------------------
# Windowing (pure)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchGrid:
    """Patches of patch_size px at origins (row·stride, col·stride), and the output cell grid.

    Cell (i, j) is the stride × stride block of pixels at rows [i·stride, (i+1)·stride) and cols
    [j·stride, (j+1)·stride).  Patch (r, c) covers the k × k cells (r..r+k−1, c..c+k−1) with
    k = patch_size / stride.  The cells tile [0, covered_width) × [0, covered_height) exactly; the
    uncovered margin on the right/bottom is narrower than one stride.
    """

    width: int
    height: int
    patch_size: int
    stride: int

    @property
    def patch_cols(self) -> int:
        return (self.width - self.patch_size) // self.stride + 1

    @property
    def patch_rows(self) -> int:
        return (self.height - self.patch_size) // self.stride + 1

    @property
    def cells_per_patch(self) -> int:
        return self.patch_size // self.stride

    @property
    def cell_cols(self) -> int:
        return self.patch_cols - 1 + self.cells_per_patch

    @property
    def cell_rows(self) -> int:
        return self.patch_rows - 1 + self.cells_per_patch

    @property
    def covered_width(self) -> int:
        return self.cell_cols * self.stride

    @property
    def covered_height(self) -> int:
        return self.cell_rows * self.stride

    def patch_window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height) in raster pixels of patch (row, col)."""
        return col * self.stride, row * self.stride, self.patch_size, self.patch_size

    def cells_of_patch(self, row: int, col: int) -> tuple[slice, slice]:
        """The cell rows and cols patch (row, col) covers."""
        k = self.cells_per_patch
        return slice(row, row + k), slice(col, col + k)

    def cell_transform(self, transform: Any) -> Any:
        """Geotransform of the cell grid: the raster's, with pixels stride times larger."""
        return transform * transform.scale(self.stride)


def patch_grid(width: int, height: int, patch_size: int, stride: int | None = None) -> PatchGrid:
    """Validate and build the patch/cell grid of a width × height raster (JEMError if impossible)."""
    stride = patch_size if stride is None else int(stride)
    if patch_size < 1:
        raise JEMError(f"The patch size must be positive (got {patch_size}).")
    if not 1 <= stride <= patch_size or patch_size % stride:
        divisors = [d for d in range(patch_size, 0, -1) if patch_size % d == 0][:6]
        raise JEMError(f"--stride {stride} does not divide the model's {patch_size} px patch. Choose one of "
                       f"{', '.join(map(str, divisors))}.")
    if width < patch_size or height < patch_size:
        raise JEMError(f"The raster is {width} × {height} px, smaller than the model's {patch_size} × {patch_size} px "
                       "patch. Use a larger raster (or a model trained on smaller images).")
    return PatchGrid(width, height, patch_size, stride)


# ---------------------------------------------------------------------------------------------
# Patch iteration
# ---------------------------------------------------------------------------------------------
@dataclass
class PatchBatch:
    """Valid patches: grid indices (rows, cols) and pixels (N, bands, P, P) float32, stretched."""

    rows: np.ndarray
    cols: np.ndarray
    pixels: np.ndarray
    grid: PatchGrid
    transform: Any  # the raster's geotransform; window of patch i: grid.patch_window(rows[i], cols[i])


def _patch_rows(source: RasterSource, grid: PatchGrid, stretch: Stretch | None,
                read_ahead: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(patch row, patches (patch_cols, bands, P, P) view, valid (patch_cols,) bool) per patch row."""
    from numpy.lib.stride_tricks import sliding_window_view

    size, stride = grid.patch_size, grid.stride
    starts = [r * stride for r in range(grid.patch_rows)]
    for strip in read_strips(source, starts, size, grid.covered_width, stretch, read_ahead):
        windows = sliding_window_view(strip.pixels, size, axis=2)[:, :, ::stride]  # (B, P, cols, P)
        patches = windows.transpose(2, 0, 1, 3)
        column_ok = strip.valid.all(axis=0)
        valid = sliding_window_view(column_ok, size)[::stride].all(axis=1)
        yield strip.index, patches, valid


def iter_patches(raster: RasterSource | str | os.PathLike | Sequence[str | os.PathLike], patch_size: int,
                 stride: int | None = None, bands: Sequence[str] | None = None, *, batch_size: int = 64,
                 stretch: Stretch | None = None, read_ahead: int = 2,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[PatchBatch]:
    """Batches of the valid patches of a raster, row by row (patches with nodata are skipped).

    raster: an open RasterSource or what open_raster takes.  stretch: None yields raw values;
    use raster_io.choose_stretch(source, meta.value_range) for model-ready pixels.
    """
    if not isinstance(raster, RasterSource):
        with open_raster(raster, bands) as source:
            yield from iter_patches(source, patch_size, stride, batch_size=batch_size, stretch=stretch,
                                    read_ahead=read_ahead, should_stop=should_stop)
        return
    grid = patch_grid(raster.width, raster.height, patch_size, stride)
    pending = _Pending()
    with closing(_patch_rows(raster, grid, stretch, read_ahead)) as patch_rows:  # stops the reader thread early
        for row, patches, valid in patch_rows:
            pending.add(row, np.flatnonzero(valid), patches)
            while len(pending) >= batch_size:
                check_stop(should_stop)
                yield PatchBatch(*pending.take(batch_size), grid=grid, transform=raster.transform)
    if len(pending):
        check_stop(should_stop)
        yield PatchBatch(*pending.take(len(pending)), grid=grid, transform=raster.transform)


class _Pending:
    """Valid patches waiting for a full batch, across patch rows."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, row: int, cols: np.ndarray, patches: np.ndarray) -> None:
        if len(cols):
            self.rows.append(np.full(len(cols), row))
            self.cols.append(cols)
            self.pixels.append(patches[cols])  # fancy indexing copies out of the strip
            self.count += len(cols)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, pixels = (np.concatenate(parts) for parts in (self.rows, self.cols, self.pixels))
        self.count = len(rows) - n
        keep = self.count > 0
        self.rows, self.cols, self.pixels = ([rows[n:]], [cols[n:]], [pixels[n:]]) if keep else ([], [], [])
        return rows[:n], cols[:n], np.ascontiguousarray(pixels[:n])

    def first_row(self) -> int | None:
        return int(self.rows[0][0]) if self.count else None


# ---------------------------------------------------------------------------------------------
# Output rasters
# ---------------------------------------------------------------------------------------------
_PALETTE_GROUPS = [  # word prefix → base colour (first match wins: Parking before Park)
    (("water", "river", "pond", "lake", "sea", "port", "harbo", "ocean"), (31, 105, 180)),
    (("forest", "tree", "wood"), (24, 110, 40)),
    (("bare", "desert", "mountain", "beach", "sand"), (200, 170, 110)),
    (("industrial", "storage", "commercial", "airport", "railway", "station", "parking", "viaduct", "bridge",
      "highway", "road"), (140, 140, 150)),
    (("meadow", "grass", "park", "farm", "crop", "pasture", "herbaceous", "vegetation", "golf"), (120, 190, 70)),
    (("residential", "center", "church", "school", "square", "urban", "building", "resort"), (205, 60, 45)),
    (("stadium", "playground", "baseball", "sport", "tennis"), (230, 140, 200)),
]


def class_colours(class_names: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """A colour per class: a thematic base colour when a word of the name matches, varied within a group."""
    colours = {}
    used: dict[int, int] = {}
    for i, name in enumerate(class_names):
        words = [w.lower() for w in re.findall(r"[A-Za-z][a-z]*", name)]
        group = next((g for g, (keys, _) in enumerate(_PALETTE_GROUPS)
                      if any(w.startswith(k) for w in words for k in keys)), None)
        if group is None:
            hue, saturation, value = (i * 0.618034) % 1.0, 0.55, 0.85  # golden-ratio hues for unmatched names
        else:
            member = used.get(group, 0)
            used[group] = member + 1
            hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in _PALETTE_GROUPS[group][1]))
            hue = (hue + 0.035 * ((member + 1) // 2) * (1 if member % 2 else -1)) % 1.0
            value = 0.55 + 0.4 * ((value + 0.37 * member) % 1.0)
        colours[i] = (*(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value)), 255)
    return colours


@dataclass
class _Output:
    final: Path
    tmp: Path
    dataset: Any


class _Outputs:
    """The output GeoTIFFs, written under temporary names and renamed together by commit()."""

    def __init__(self, targets: dict[str, Path | None], profile: dict[str, Any], class_names: list[str],
                 tags: dict[str, str]) -> None:
        import rasterio

        self.files: dict[str, _Output] = {}
        self.gdal_failures = GdalFailures().start()
        try:
            for kind, target in targets.items():
                if target is None:
                    continue
                target = Path(target)
                if not target.parent.is_dir():
                    raise JEMError(f"Output folder '{target.parent}' does not exist. Create it or choose another path.")
                handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.tif", dir=target.parent)
                os.close(handle)
                self.files[kind] = _Output(target, Path(tmp), None)
                kind_profile = dict(profile, **_KIND_PROFILE[kind](len(class_names)))
                dataset = rasterio.open(tmp, "w", **kind_profile)
                self.files[kind].dataset = dataset
                dataset.update_tags(**tags)
                self._describe(kind, dataset, class_names)
        except OSError as error:  # no permission, disk full, read-only file system
            self.abort()
            raise _write_failed(target, str(getattr(error, "strerror", None) or error)) from None
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _describe(kind: str, dataset: Any, class_names: list[str]) -> None:
        if kind == "classes":
            dataset.set_band_description(1, "class")
            dataset.write_colormap(1, class_colours(class_names))
            dataset.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(class_names)})
        elif kind == "probabilities":
            for i, name in enumerate(class_names):
                dataset.set_band_description(i + 1, f"p({name})")
        else:
            dataset.set_band_description(1, {"confidence": "-E(x) = logsumexp f(x)",
                                             "max_probability": "max p(y|x)"}[kind])

    def write(self, row_off: int, arrays: dict[str, np.ndarray]) -> None:
        from rasterio.windows import Window

        for kind, output in self.files.items():
            data = arrays[kind]
            if data.ndim == 2:
                data = data[None]
            output.dataset.write(data, window=Window(0, row_off, data.shape[2], data.shape[1]))

    def commit(self) -> None:
        for output in self.files.values():
            output.dataset.close()
        self.gdal_failures.stop()
        if self.gdal_failures.messages:
            raise _write_failed(next(iter(self.files.values())).final, self.gdal_failures.messages[0])
        for output in self.files.values():
            publish(output.tmp, output.final)

    def abort(self) -> None:
        self.gdal_failures.stop()
        for output in self.files.values():
            try:
                if output.dataset is not None and not output.dataset.closed:
                    output.dataset.close()
            finally:
                output.tmp.unlink(missing_ok=True)
                Path(str(output.tmp) + ".aux.xml").unlink(missing_ok=True)


def _write_failed(target: Path, detail: str) -> JEMError:
    return JEMError(f"Could not write the maps in '{target.parent}': {detail[:200]}. Check the free space and "
                    "the write permission there; no output was kept.")


_KIND_PROFILE: dict[str, Callable[[int], dict[str, Any]]] = {
    "classes": lambda n: {"count": 1, "dtype": "uint8", "nodata": CLASS_NODATA},
    "confidence": lambda n: {"count": 1, "dtype": "float32", "nodata": float("nan")},
    "max_probability": lambda n: {"count": 1, "dtype": "float32", "nodata": float("nan")},
    "probabilities": lambda n: {"count": n, "dtype": "float32", "nodata": float("nan"), "interleave": "band"},
}


def _cell_values(sums: np.ndarray, counts: np.ndarray, kinds: set[str]) -> dict[str, np.ndarray]:
    """Per-cell outputs from summed logits (cells, C) and patch counts (cells,)."""
    covered = counts > 0
    logits = sums / np.maximum(counts, 1)[:, None]
    top = logits.max(axis=1, keepdims=True)
    exp = np.exp(logits - top)
    total = exp.sum(axis=1)
    values = {"classes": np.where(covered, logits.argmax(axis=1), CLASS_NODATA).astype(np.uint8)}
    if "confidence" in kinds:
        values["confidence"] = np.where(covered, top[:, 0] + np.log(total), np.nan).astype(np.float32)
    if "max_probability" in kinds:
        values["max_probability"] = np.where(covered, 1.0 / total, np.nan).astype(np.float32)
    if "probabilities" in kinds:
        probs = exp / total[:, None]
        values["probabilities"] = np.where(covered[None], probs.T, np.nan).astype(np.float32)
    return values


class _RowWriter:
    """Turns completed cell rows into output rows (patch or input resolution), written in blocks."""

    BLOCK_ROWS = 256  # the output tile height: whole tiles per write when memory allows
    BLOCK_BYTES = 64 << 20  # but never hold more than this (wide rasters, many probability bands)

    def __init__(self, outputs: _Outputs, grid: PatchGrid, resolution: str, width: int, height: int) -> None:
        self.outputs, self.grid, self.resolution = outputs, grid, resolution
        self.width, self.height = width, height
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.row_off = 0

    def add_cell_row(self, values: dict[str, np.ndarray]) -> None:
        if self.resolution == "input":
            s, margin = self.grid.stride, self.width - self.grid.covered_width
            values = {kind: self._expand(kind, array, s, margin) for kind, array in values.items()}
        else:
            values = {kind: array[..., None, :] for kind, array in values.items()}
        self.buffer.append(values)
        self.buffered_rows += next(iter(values.values())).shape[-2]
        self.buffered_bytes += sum(array.nbytes for array in values.values())
        if self.buffered_rows >= self.BLOCK_ROWS or self.buffered_bytes >= self.BLOCK_BYTES:
            self.flush()

    @staticmethod
    def _expand(kind: str, array: np.ndarray, s: int, margin: int) -> np.ndarray:
        fill = CLASS_NODATA if kind == "classes" else np.nan
        wide = np.repeat(array, s, axis=-1)
        if margin:
            pad = np.full(array.shape[:-1] + (margin,), fill, dtype=array.dtype)
            wide = np.concatenate([wide, pad], axis=-1)
        return np.repeat(wide[..., None, :], s, axis=-2)

    def flush(self) -> None:
        if not self.buffer:
            return
        block = {kind: np.concatenate([b[kind] for b in self.buffer], axis=-2) for kind in self.buffer[0]}
        self.outputs.write(self.row_off, block)
        self.row_off += self.buffered_rows
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0

    def finish(self, class_count: int) -> None:
        """Flush, then fill the bottom margin no cell covers (input resolution) with nodata."""
        self.flush()
        margin = self.height - self.row_off
        if margin > 0:
            fills = {"classes": np.full((margin, self.width), CLASS_NODATA, np.uint8),
                     "confidence": np.full((margin, self.width), np.nan, np.float32),
                     "max_probability": np.full((margin, self.width), np.nan, np.float32),
                     "probabilities": np.full((class_count, margin, self.width), np.nan, np.float32)}
            self.outputs.write(self.row_off, {k: fills[k] for k in self.outputs.files})


# ---------------------------------------------------------------------------------------------
# map_raster
# ---------------------------------------------------------------------------------------------
@dataclass
class MapResult:
    classes: Path
    confidence: Path | None
    max_probability: Path | None
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
    megapixels_per_second: float  # input pixels covered by cells per second
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
               device: str = "auto", out_max_probability: str | os.PathLike | None = None,
               out_probabilities: str | os.PathLike | None = None, resolution: str = "patch",
               target_gsd: float | None = None, stretch: str | Stretch = "auto", read_ahead: int = 2,
               progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> MapResult:
    """Classify a raster patch by patch; see the module docstring for every option."""
    if resolution not in RESOLUTIONS:
        raise JEMError(f"Unknown resolution '{resolution}'. Choose one of: {', '.join(RESOLUTIONS)}.")
    if batch_size < 1:
        raise JEMError(f"--batch-size must be at least 1 (got {batch_size}).")
    torch_device = resolve_device(device)
    loaded = as_loaded(model, torch_device)
    loaded.model.eval()
    meta = loaded.meta
    if len(meta.class_names) > CLASS_NODATA:
        raise JEMError(f"The model has {len(meta.class_names)} classes; a Byte class map holds at most {CLASS_NODATA}.")
    targets = {"classes": out_classes, "confidence": out_confidence, "max_probability": out_max_probability,
               "probabilities": out_probabilities}
    paths = [Path(p).resolve() for p in targets.values() if p is not None]
    if len(set(paths)) != len(paths):
        raise JEMError("Two outputs have the same path. Give each output its own file name.")
    with open_raster(inputs, bands, meta.band_names, target_gsd) as source:
        require_crs(source, "the maps could not be placed on the ground")
        if len(source.band_indexes) != loaded.spec.in_channels:
            raise JEMError(f"The model takes {loaded.spec.in_channels} bands but {len(source.band_indexes)} were chosen.")
        grid = patch_grid(source.width, source.height, meta.image_size, stride)
        applied = choose_stretch(source, meta.value_range, stretch)
        return _map(loaded, source, grid, applied, targets, resolution, batch_size, torch_device, read_ahead,
                    progress, should_stop)


def _map(loaded: LoadedModel, source: RasterSource, grid: PatchGrid, stretch: Stretch, targets: dict[str, Any],
         resolution: str, batch_size: int, device: torch.device, read_ahead: int, progress: ProgressFn | None,
         should_stop: Callable[[], bool] | None) -> MapResult:
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
            "jem_confidence": "-E(x) = logsumexp of the mean logits of the patches covering the cell"}
    start = time.monotonic()
    outputs = _Outputs(targets, profile, meta.class_names, tags)
    try:
        writer = _RowWriter(outputs, grid, resolution, width, height)
        counts = np.zeros(classes, dtype=np.int64)
        stats = _run(loaded, source, grid, stretch, batch_size, device, read_ahead, writer, counts, set(outputs.files),
                     progress, should_stop)
        if stats["patches"] == 0:
            raise JEMError(f"'{source.description}' has no {grid.patch_size} × {grid.patch_size} px patch without "
                           "nodata (all pixels are nodata, NaN or masked); nothing to map. Check the raster and its "
                           "nodata value.")
        writer.finish(classes)
        outputs.commit()
    except RasterioIOError as error:
        outputs.abort()
        raise raster_error(error) from None
    except BaseException:
        outputs.abort()
        raise
    seconds = time.monotonic() - start
    covered_mpx = grid.covered_width * grid.covered_height / 1e6
    if progress:
        progress(1.0, "done")
    return MapResult(
        classes=Path(targets["classes"]), confidence=_path(targets["confidence"]),
        max_probability=_path(targets["max_probability"]), probabilities=_path(targets["probabilities"]),
        width=width, height=height, resolution=resolution, patch_size=grid.patch_size, stride=grid.stride,
        bands=list(source.band_names), stretch=stretch.describe(), device=str(device), patches=stats["patches"],
        skipped_patches=stats["skipped"], class_counts=dict(zip(meta.class_names, counts.tolist())),
        seconds=seconds, patches_per_second=stats["patches"] / max(seconds, 1e-9),
        megapixels_per_second=covered_mpx / max(seconds, 1e-9), notes=list(source.notes))


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


@torch.inference_mode()
def _run(loaded: LoadedModel, source: RasterSource, grid: PatchGrid, stretch: Stretch, batch_size: int,
         device: torch.device, read_ahead: int, writer: _RowWriter, class_counts: np.ndarray, kinds: set[str],
         progress: ProgressFn | None, should_stop: Callable[[], bool] | None) -> dict[str, int]:
    """Classify patch rows in batches; emit each cell row as soon as no later patch can touch it."""
    classes, k = len(loaded.meta.class_names), grid.cells_per_patch
    sums: dict[int, np.ndarray] = {}
    hits: dict[int, np.ndarray] = {}
    pending = _Pending()
    stats = {"patches": 0, "skipped": 0}
    next_cell_row = 0

    def accumulate(rows: np.ndarray, cols: np.ndarray, logits: np.ndarray) -> None:
        for row in np.unique(rows):
            members = rows == row
            row_cols, row_logits = cols[members], logits[members]
            for dr in range(k):
                cell_row = int(row) + dr
                if cell_row not in sums:
                    sums[cell_row] = np.zeros((grid.cell_cols, classes), np.float64)
                    hits[cell_row] = np.zeros(grid.cell_cols, np.int32)
                for dc in range(k):
                    sums[cell_row][row_cols + dc] += row_logits
                    hits[cell_row][row_cols + dc] += 1

    def run_batch(n: int) -> None:
        check_stop(should_stop)
        rows, cols, pixels = pending.take(n)
        x = loaded.normalise(torch.from_numpy(pixels).to(device))
        accumulate(rows, cols, loaded.model(x).float().cpu().numpy().astype(np.float64))
        stats["patches"] += n

    def emit_through(last_cell_row: int) -> None:
        nonlocal next_cell_row
        while next_cell_row <= last_cell_row:
            empty = (np.zeros((grid.cell_cols, classes)), np.zeros(grid.cell_cols, np.int32))
            row_sums, row_hits = sums.pop(next_cell_row, empty[0]), hits.pop(next_cell_row, empty[1])
            values = _cell_values(row_sums, row_hits, kinds)
            class_counts[:] += np.bincount(values["classes"][row_hits > 0], minlength=classes)[:classes]
            writer.add_cell_row(values)
            next_cell_row += 1

    total = grid.patch_rows * grid.patch_cols
    start = time.monotonic()
    with closing(_patch_rows(source, grid, stretch, read_ahead)) as patch_rows:  # cancel stops the reader now
        for row, patches, valid in patch_rows:
            cols = np.flatnonzero(valid)
            stats["skipped"] += len(valid) - len(cols)
            pending.add(row, cols, patches)
            while len(pending) >= batch_size:
                run_batch(batch_size)
                if progress:
                    done = stats["patches"] + stats["skipped"]
                    rate = stats["patches"] / max(time.monotonic() - start, 1e-9)
                    progress(min(done / total, 0.999), f"patch row {row + 1}/{grid.patch_rows}, {rate:.0f} patches/s")
            first_pending = pending.first_row()  # cell row c is final once every patch row <= c is classified
            emit_through(row if first_pending is None else first_pending - 1)
    if len(pending):
        run_batch(len(pending))
    emit_through(grid.cell_rows - 1)
    return stats
