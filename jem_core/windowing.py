"""Cutting a raster into model-size patches: the patch/cell grid and the patch iterator.

- `patch_grid(width, height, patch_size, stride)` → PatchGrid (pure): where every patch lies and
  which output cells it covers.  The grid covers the whole raster: when the raster size is not a
  multiple of the stride, the last patch row/column is shifted inwards to end at the raster's edge
  (as torchgeo's GridGeoSampler does), so no valid pixel is left unmapped.
- `iter_patches(raster, patch_size, stride, ...)` yields PatchBatch(rows, cols, pixels) of the valid
  patches (patches with any nodata pixel are skipped and counted), for the mapper and for other
  features (OOD scores, where to label next).
"""
from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import JEMError, StopFn, check_stop
from .raster_io import RasterSource, Stretch, open_raster, read_strips


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PatchGrid:
    """Patches of patch_size px and the output cell grid of a width × height raster.

    Cell (i, j) is the stride × stride block of pixels at rows [i·stride, (i+1)·stride) and cols
    [j·stride, (j+1)·stride), clipped at the raster's edge: the cells tile the whole raster, the last
    row/column of cells may be narrower than one stride.  Patch (r, c) has its origin at
    (r·stride, c·stride), except that the last patch row/column is shifted inwards to end at the
    raster's edge; either way it covers the k × k cells (r..r+k−1, c..c+k−1), k = patch_size / stride
    (a shifted patch covers all in-raster pixels of those cells, and part of one more that its
    neighbour already covers).
    """

    width: int
    height: int
    patch_size: int
    stride: int

    @property
    def cells_per_patch(self) -> int:
        return self.patch_size // self.stride

    @property
    def cell_cols(self) -> int:
        return _ceil_div(self.width, self.stride)

    @property
    def cell_rows(self) -> int:
        return _ceil_div(self.height, self.stride)

    @property
    def patch_cols(self) -> int:
        return self.cell_cols - self.cells_per_patch + 1

    @property
    def patch_rows(self) -> int:
        return self.cell_rows - self.cells_per_patch + 1

    @property
    def patch_count(self) -> int:
        return self.patch_rows * self.patch_cols

    def col_origins(self) -> np.ndarray:
        """Pixel column of each patch column's left edge."""
        return np.minimum(np.arange(self.patch_cols) * self.stride, self.width - self.patch_size)

    def row_origins(self) -> np.ndarray:
        """Pixel row of each patch row's top edge."""
        return np.minimum(np.arange(self.patch_rows) * self.stride, self.height - self.patch_size)

    def patch_window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height) in raster pixels of patch (row, col)."""
        col_off = min(int(col) * self.stride, self.width - self.patch_size)
        row_off = min(int(row) * self.stride, self.height - self.patch_size)
        return col_off, row_off, self.patch_size, self.patch_size

    def cells_of_patches(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell rows and cell cols, (n, k) each, that the patches (rows[i], cols[i]) cover."""
        offsets = np.arange(self.cells_per_patch)
        return np.asarray(rows)[:, None] + offsets, np.asarray(cols)[:, None] + offsets

    def cell_window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height) in raster pixels of cell (i, j), clipped at the raster's edge."""
        col_off, row_off = j * self.stride, i * self.stride
        return (col_off, row_off, min(self.stride, self.width - col_off), min(self.stride, self.height - row_off))

    def cell_transform(self, transform: Any) -> Any:
        """Geotransform of the cell grid: the raster's, with pixels stride times larger (the last
        row/column of cells reaches past the raster's edge when its size is not a multiple of the stride)."""
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


@dataclass
class PatchBatch:
    """Valid patches: grid indices (rows, cols) and pixels (N, bands, P, P) float32, stretched."""

    rows: np.ndarray
    cols: np.ndarray
    pixels: np.ndarray
    grid: PatchGrid
    transform: Any  # the raster's geotransform; window of patch i: grid.patch_window(rows[i], cols[i])
    skipped: int  # patches skipped for nodata so far (in the patch rows read up to this batch)


class PendingPatches:
    """Valid patches waiting for a full batch, across patch rows, in row order."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, row: int, cols: np.ndarray, pixels: np.ndarray) -> None:
        """Patches (row, cols[i]) with pixels (len(cols), bands, P, P)."""
        if len(cols):
            self.rows.append(np.full(len(cols), row))
            self.cols.append(cols)
            self.pixels.append(pixels)
            self.count += len(cols)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols, pixels = (np.concatenate(parts) for parts in (self.rows, self.cols, self.pixels))
        self.count = len(rows) - n
        keep = self.count > 0
        self.rows, self.cols, self.pixels = ([rows[n:]], [cols[n:]], [pixels[n:]]) if keep else ([], [], [])
        return rows[:n], cols[:n], np.ascontiguousarray(pixels[:n])


def _patch_rows(source: RasterSource, grid: PatchGrid, stretch: Stretch | None,
                read_ahead: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(patch row, valid patch cols, their pixels (n, bands, P, P)) per patch row, read as strips."""
    from numpy.lib.stride_tricks import sliding_window_view

    size, origins = grid.patch_size, grid.col_origins()
    for strip in read_strips(source, grid.row_origins().tolist(), size, grid.width, stretch, read_ahead):
        windows = sliding_window_view(strip.pixels, size, axis=2)  # (B, P, every origin, P): a view
        valid = sliding_window_view(strip.valid.all(axis=0), size).all(axis=1)[origins]
        cols = np.flatnonzero(valid)
        yield strip.index, cols, windows[:, :, origins[cols]].transpose(2, 0, 1, 3)  # copies valid patches only


def iter_patches(raster: RasterSource | str | os.PathLike | Sequence[str | os.PathLike], patch_size: int,
                 stride: int | None = None, bands: Sequence[str] | None = None, *, batch_size: int = 64,
                 stretch: Stretch | None = None, read_ahead: int = 2,
                 should_stop: StopFn | None = None) -> Iterator[PatchBatch]:
    """Batches of batch_size valid patches (the last one smaller), in row order; patches with nodata
    are skipped and counted in PatchBatch.skipped.  should_stop is polled before every batch.

    raster: an open RasterSource or what open_raster takes.  stretch: None yields raw values;
    use raster_io.choose_stretch(source, meta.value_range) for model-ready pixels.  Close the
    generator (contextlib.closing) to stop its reader thread early.
    """
    if not isinstance(raster, RasterSource):
        with open_raster(raster, bands) as source:
            yield from iter_patches(source, patch_size, stride, batch_size=batch_size, stretch=stretch,
                                    read_ahead=read_ahead, should_stop=should_stop)
        return
    grid = patch_grid(raster.width, raster.height, patch_size, stride)
    pending, skipped = PendingPatches(), 0
    with closing(_patch_rows(raster, grid, stretch, read_ahead)) as patch_rows:  # stops the reader thread early
        for row, cols, pixels in patch_rows:
            skipped += grid.patch_cols - len(cols)
            pending.add(row, cols, pixels)
            while len(pending) >= batch_size:
                check_stop(should_stop)
                yield PatchBatch(*pending.take(batch_size), grid=grid, transform=raster.transform, skipped=skipped)
    if len(pending):
        check_stop(should_stop)
        yield PatchBatch(*pending.take(len(pending)), grid=grid, transform=raster.transform, skipped=skipped)
