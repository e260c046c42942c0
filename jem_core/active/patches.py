"""Patches of the analyst's rasters: under the annotations (the labelled set) and spread over the
scene (the unlabelled set).

Annotations are points in the raster's CRS, each with a class name.  A point labels the patch
(the model's patch size, on the raster's pixel grid) centred on it, moved inwards where it would
stick out of the raster.  A polygon is given either by its bounds (`Annotation.bounds`): it then
labels every patch-sized cell of a grid centred in those bounds (at least one, at the centre), or,
for irregular shapes, as one point per cell inside it (`annotation_points`).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .. import JEMError, StopFn, check_stop
from ..data import SceneDataset
from ..model_file import ModelMeta
from ..raster_io import RasterSource, Stretch, choose_stretch, open_raster, valid_pixels

# One raster: a path GDAL opens, or single-band files stacked on the finest grid (raster_io.open_raster).
RasterInput = Union[str, Path, Sequence[Union[str, Path]]]
# A patch counts as imagery when at least this fraction of its pixels is valid (not nodata).
MIN_VALID_FRACTION = 0.5


@dataclass
class Annotation:
    """A labelled location: centre (x, y) in the raster's CRS; bounds (xmin, ymin, xmax, ymax) for a polygon."""

    class_name: str
    x: float
    y: float
    bounds: tuple[float, float, float, float] | None = None


@dataclass
class PatchWindow:
    raster: int  # index into the rasters list
    row: int  # top-left pixel of the patch
    col: int


def cell_centres(bounds: Sequence[float], cell_width: float, cell_height: float) -> list[tuple[float, float]]:
    """Centres of the patch-sized cells of a grid centred in bounds; at least the centre of bounds."""
    xmin, ymin, xmax, ymax = bounds
    # A footprint drawn as exactly one patch must give one cell, despite float rounding.
    columns = max(1, int((xmax - xmin) / cell_width + 1e-6))
    rows = max(1, int((ymax - ymin) / cell_height + 1e-6))
    x0 = (xmin + xmax) / 2 - (columns - 1) * cell_width / 2
    y0 = (ymin + ymax) / 2 - (rows - 1) * cell_height / 2
    return [(x0 + i * cell_width, y0 + j * cell_height) for j in range(rows) for i in range(columns)]


def annotation_points(class_name: str, cell_width: float, cell_height: float, *,
                      points: Sequence[tuple[float, float]] | None = None,
                      bounds: tuple[float, float, float, float] | None = None,
                      contains: Callable[[float, float], bool] | None = None,
                      inner_point: Callable[[], tuple[float, float]] | None = None) -> list[Annotation]:
    """The annotations of one labelled feature, whatever library holds its geometry (OGR, QGIS).

    A point (or multi-point) labels the patch under each of its `points`; a polygon labels every
    patch-sized cell of a grid over its `bounds` whose centre it `contains`, and at least the patch at
    its `inner_point()` (a footprint drawn by the labelling tool is exactly one patch).
    """
    if points is not None:
        return [Annotation(class_name, x, y) for x, y in points]
    if bounds is None or contains is None or inner_point is None:
        raise ValueError("a polygon needs its bounds, a contains test and an inner point")
    centres = [(x, y) for x, y in cell_centres(bounds, cell_width, cell_height) if contains(x, y)] or [inner_point()]
    return [Annotation(class_name, x, y) for x, y in centres]


class PatchReader:
    """Open rasters (same bands, stretched to the model's value range) that patches are cut from."""

    def __init__(self, sources: list[RasterSource], stretches: list[Stretch], patch_size: int) -> None:
        for source in sources:
            if source.width < patch_size or source.height < patch_size:
                coarser = source.resample_to is not None
                read = f" when read coarser ({source.resampling})" if coarser else ""
                finer = ", a finer reading (jem retrain --coarsen 1)" if coarser else ""
                raise JEMError(f"'{source.description}' is {source.width}×{source.height} px{read}, smaller than one "
                               f"{patch_size} px patch. Use a larger raster{finer} or a model with smaller patches.")
        self.sources, self.stretches, self.patch_size = sources, stretches, patch_size
        self._stack = ExitStack()
        self._datasets = [self._stack.enter_context(source.open()) for source in sources]

    def close(self) -> None:
        self._stack.close()

    @property
    def band_names(self) -> list[str]:
        return self.sources[0].band_names

    def pixel_size(self, raster: int) -> tuple[float, float]:
        transform = self.sources[raster].transform
        return abs(transform.a), abs(transform.e)

    def locate(self, x: float, y: float) -> PatchWindow | None:
        """The patch centred on (x, y) in the first raster that contains the point, moved inside it."""
        for index, source in enumerate(self.sources):
            col, row = ~source.transform * (x, y)
            if 0 <= col < source.width and 0 <= row < source.height:
                half = self.patch_size / 2
                row0 = min(max(int(round(row - half)), 0), source.height - self.patch_size)
                col0 = min(max(int(round(col - half)), 0), source.width - self.patch_size)
                return PatchWindow(index, row0, col0)
        return None

    def read(self, window: PatchWindow) -> tuple[np.ndarray, float]:
        """Pixels (bands, size, size) float32 in the model's value range, and the valid-pixel fraction."""
        from rasterio.windows import Window

        source, size = self.sources[window.raster], self.patch_size
        dataset = self._datasets[window.raster]
        pixels = dataset.read(source.band_indexes, window=Window(window.col, window.row, size, size),
                              out_dtype="float32")
        valid = valid_pixels(source, dataset, pixels, window=Window(window.col, window.row, size, size))
        pixels = np.nan_to_num(pixels)
        self.stretches[window.raster].apply(pixels)
        return pixels, float(valid.mean())

    def footprint(self, window: PatchWindow) -> tuple[float, float, float, float]:
        transform = self.sources[window.raster].transform
        xs, ys = zip(*(transform * (window.col + dc, window.row + dr)
                       for dc, dr in ((0, 0), (self.patch_size, self.patch_size))))
        return min(xs), min(ys), max(xs), max(ys)


def open_patch_reader(stack: ExitStack, rasters: Sequence[RasterInput], patch_size: int,
                      bands: Sequence[str] | None, model_meta: ModelMeta | None,
                      stretch: str = "auto", coarsen: int | None = None) -> PatchReader:
    """Every raster opened with the model's bands and stretch (no model: bands as they are, no stretch),
    at 1/coarsen of its resolution (None: the model's ModelMeta.coarsen, 1 without a model)."""
    if not rasters:
        raise JEMError("No raster given. Pass at least one raster to read the annotated patches from.")
    expected = model_meta.band_names if model_meta is not None else None
    if coarsen is None:
        coarsen = model_meta.coarsen if model_meta is not None else 1
    sources = [stack.enter_context(open_raster(path, bands, expected, coarsen=coarsen)) for path in rasters]
    counts = {len(s.band_indexes) for s in sources}
    if len(counts) > 1:
        raise JEMError("The rasters have different band counts (" + ", ".join(
            f"{s.description}: {len(s.band_indexes)}" for s in sources) + "). Use rasters with the same bands.")
    if model_meta is not None:
        stretches = [choose_stretch(s, model_meta.value_range, stretch) for s in sources]
    else:
        stretches = [Stretch("none", [0.0] * len(s.band_indexes), [1.0] * len(s.band_indexes), 0.0, 1.0)
                     for s in sources]
    reader = PatchReader(sources, stretches, patch_size)
    stack.callback(reader.close)
    return reader


def annotation_windows(reader: PatchReader, annotations: Sequence[Annotation]) -> list[tuple[PatchWindow, str]]:
    """(patch, class name) for every annotation; polygons (bounds) expand to their grid cells."""
    windows = []
    for number, annotation in enumerate(annotations, start=1):
        if not str(annotation.class_name).strip():
            raise JEMError(f"Annotation {number} at ({annotation.x:g}, {annotation.y:g}) has an empty class name. "
                           "Give every annotation a class.")
        centres = [(annotation.x, annotation.y)]
        if annotation.bounds is not None:
            first = reader.locate(annotation.x, annotation.y)
            if first is not None:
                width, height = reader.pixel_size(first.raster)
                centres = cell_centres(annotation.bounds, width * reader.patch_size, height * reader.patch_size)
        for x, y in centres:
            window = reader.locate(x, y)
            if window is None:
                raise JEMError(f"Annotation {number} ('{annotation.class_name}' at {x:g}, {y:g}) lies outside every "
                               f"raster ({describe_extents(reader)}). Remove it, or check that annotations and "
                               "rasters use the same CRS.")
            windows.append((window, str(annotation.class_name).strip()))
    return windows


def describe_extents(reader: PatchReader) -> str:
    parts = []
    for source in reader.sources:
        xmin, ymax = source.transform * (0, 0)
        xmax, ymin = source.transform * (source.width, source.height)
        parts.append(f"x {min(xmin, xmax):g}…{max(xmin, xmax):g}, y {min(ymin, ymax):g}…{max(ymin, ymax):g}")
    return "; ".join(parts)


def patches_from_annotations(rasters: Sequence[RasterInput], annotations: Sequence[Annotation], patch_size: int,
                             bands: Sequence[str] | None = None, model_meta: ModelMeta | None = None,
                             class_names: Sequence[str] | None = None, stretch: str = "auto",
                             shift: int = 0, coarsen: int | None = None) -> SceneDataset:
    """The labelled patches under the annotations, as a SceneDataset.

    class_names: classes in head order (e.g. a starting model's); annotated classes not in it are
    appended in sorted order.  Each listed class needs at least one annotation unless it is in
    `model_meta.class_names` (a starting model's class may go without new labels).
    shift: each annotation also labels the 8 patches shifted by ±shift pixels around its own (kept
    inside the raster): a click labels the ground around it, not one exact window.
    coarsen: read the rasters at 1/coarsen of their resolution (None: the model's; open_patch_reader).
    """
    if not annotations:
        raise JEMError("There are no annotations. Label at least one patch of each class, then retrain.")
    with ExitStack() as stack:
        reader = open_patch_reader(stack, rasters, patch_size, bands, model_meta, stretch, coarsen)
        windows = annotation_windows(reader, annotations)
        names = list(class_names or [])
        names += sorted({name for _, name in windows} - set(names))
        counts = {name: 0 for name in names}
        for _, name in windows:
            counts[name] += 1
        known = set(model_meta.class_names) if model_meta is not None else set()
        missing = [name for name, count in counts.items() if count == 0 and name not in known]
        if missing:
            raise JEMError(f"Class(es) {', '.join(missing)} have no labels. Annotate at least one patch of each "
                           "class, or remove it from the class list.")
        if len(names) < 2:
            raise JEMError(f"Only one class ('{names[0]}') is labelled. A classifier needs labels of at least two "
                           "classes (or a starting model that knows others).")
        rings = [shifted(reader, window, shift) for window, _ in windows]
        places = torch.tensor([place for place, ring in enumerate(rings) for _ in ring])
        windows = [(moved, name) for ring, (_, name) in zip(rings, windows) for moved in ring]
        images = np.stack([reader.read(window)[0] for window, _ in windows])
        labels = torch.tensor([names.index(name) for _, name in windows])
        band_names = reader.band_names
        dtype = reader.sources[0].dtype
        sources = [Path(reader.sources[w.raster].description) for w, _ in windows]
    value_range = list(model_meta.value_range) if model_meta is not None else \
        ([0.0, 255.0] if dtype == "uint8" else [float(images.min()), float(images.max())])
    return SceneDataset(torch.from_numpy(images), labels, names, list(band_names), value_range, sources, places)


def shifted(reader: PatchReader, window: PatchWindow, shift: int) -> list[PatchWindow]:
    """The window and, for shift > 0, its 8 neighbours ±shift pixels away, clamped inside the raster."""
    if shift <= 0:
        return [window]
    source, size = reader.sources[window.raster], reader.patch_size
    return [PatchWindow(window.raster, min(max(window.row + dy, 0), source.height - size),
                        min(max(window.col + dx, 0), source.width - size))
            for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)]


def sample_unlabelled_patches(rasters: Sequence[RasterInput], n: int, seed: int, patch_size: int,
                              bands: Sequence[str] | None = None, model_meta: ModelMeta | None = None,
                              stretch: str = "auto", should_stop: StopFn | None = None,
                              coarsen: int | None = None) -> torch.Tensor:
    """n patches (n, bands, size, size) spread over the scene: rasters share n by area, each raster is
    covered by a jittered grid (one random position per grid cell); patches mostly nodata are skipped
    and replaced by random positions.  coarsen: as in patches_from_annotations."""
    if n < 1:
        raise JEMError(f"The number of unlabelled patches must be at least 1 (got {n}).")
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        reader = open_patch_reader(stack, rasters, patch_size, bands, model_meta, stretch, coarsen)
        areas = np.array([s.width * s.height for s in reader.sources], dtype=float)
        shares = np.floor(n * areas / areas.sum()).astype(int)
        shares[np.argmax(areas)] += n - shares.sum()
        windows = [w for raster, share in enumerate(shares) for w in covering_windows(reader, raster, share, rng)]
        chosen: list[np.ndarray] = []
        for attempt in range(20 * n):
            if len(chosen) == n:
                break
            check_stop(should_stop)
            window = windows[attempt] if attempt < len(windows) else random_window(reader, areas, rng)
            pixels, valid = reader.read(window)
            if valid >= MIN_VALID_FRACTION:
                chosen.append(pixels)
    if not chosen:
        raise JEMError("No patch of the rasters has enough valid pixels (they look all nodata). Check the rasters.")
    return torch.from_numpy(np.stack(chosen))


def covering_windows(reader: PatchReader, raster: int, count: int, rng: np.random.Generator) -> list[PatchWindow]:
    """count patch windows, one at a random position in each cell of a grid laid over the raster."""
    if count < 1:
        return []
    source, size = reader.sources[raster], reader.patch_size
    span_rows, span_cols = source.height - size + 1, source.width - size + 1
    cols = max(1, round(math.sqrt(count * span_cols / span_rows)))
    rows = math.ceil(count / cols)
    cells = rng.permutation(rows * cols)[:count]
    return [PatchWindow(raster, int((cell // cols + rng.random()) * span_rows / rows),
                        int((cell % cols + rng.random()) * span_cols / cols)) for cell in cells]


def random_window(reader: PatchReader, areas: np.ndarray, rng: np.random.Generator) -> PatchWindow:
    raster = int(rng.choice(len(areas), p=areas / areas.sum()))
    source, size = reader.sources[raster], reader.patch_size
    return PatchWindow(raster, int(rng.integers(0, source.height - size + 1)),
                       int(rng.integers(0, source.width - size + 1)))
