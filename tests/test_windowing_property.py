"""Property tests of the raster windowing (jem_core.windowing.patch_grid / PatchGrid, the functions the
mapper uses) for random raster sizes, patch sizes and strides: the patches and cells cover the whole
raster, which cells each patch's logits go to, and exact georeferencing of patch windows and of the
written maps."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jem_core import JEMError
from jem_core.map_writer import CLASS_NODATA
from jem_core.mapping import map_raster
from jem_core.windowing import iter_patches, patch_grid


@st.composite
def grids(draw, max_side: int = 300):
    """(width, height, patch_size, stride) with stride dividing the patch and the raster at least one patch."""
    patch = draw(st.integers(1, 64))
    stride = draw(st.sampled_from([d for d in range(1, patch + 1) if patch % d == 0]))
    width = draw(st.integers(patch, max(patch, max_side)))
    height = draw(st.integers(patch, max(patch, max_side)))
    return width, height, patch, stride


@st.composite
def transforms(draw):
    """North-up geotransforms with random origins and pixel sizes (UTM-like and degree-like)."""
    x0 = draw(st.floats(-1e7, 1e7, allow_nan=False))
    y0 = draw(st.floats(-1e7, 1e7, allow_nan=False))
    size = draw(st.sampled_from([0.3, 10.0, 20.0, 60.0, 1 / 3600, 8.983e-5]))
    return Affine(size, 0.0, x0, 0.0, -size * draw(st.sampled_from([1.0, 1.5])), y0)


def all_patches(grid) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(grid.patch_rows), np.arange(grid.patch_cols), indexing="ij")
    return rows.ravel(), cols.ravel()


@settings(max_examples=150, deadline=None)
@given(grids(max_side=200))
def test_patches_and_cells_cover_the_whole_raster(params):
    """The issue-15 edge: no pixel is left out, whatever the raster size and stride."""
    width, height, patch, stride = params
    grid = patch_grid(width, height, patch, stride)
    patch_hits = np.zeros((height, width), np.int32)
    for row, col in zip(*all_patches(grid)):
        col_off, row_off, w, h = grid.patch_window(row, col)
        assert (w, h) == (patch, patch) and 0 <= col_off <= width - patch and 0 <= row_off <= height - patch
        patch_hits[row_off:row_off + h, col_off:col_off + w] += 1
    assert (patch_hits > 0).all()
    cell_hits = np.zeros((height, width), np.int32)
    for i in range(grid.cell_rows):
        for j in range(grid.cell_cols):
            col_off, row_off, w, h = grid.cell_window(i, j)
            assert 1 <= w <= stride and 1 <= h <= stride
            cell_hits[row_off:row_off + h, col_off:col_off + w] += 1
    assert (cell_hits == 1).all()  # the cells tile the raster exactly
    # Only the last patch row/column is shifted, and only when the size is not a multiple of the stride.
    assert grid.col_origins().tolist()[:-1] == list(range(0, (grid.patch_cols - 1) * stride, stride))
    assert grid.col_origins()[-1] == ((grid.patch_cols - 1) * stride if width % stride == 0 else width - patch)
    assert grid.row_origins()[-1] == ((grid.patch_rows - 1) * stride if height % stride == 0 else height - patch)


@settings(max_examples=150, deadline=None)
@given(grids(max_side=400))
def test_each_patch_feeds_exactly_the_cells_inside_it(params):
    """cells_of_patches (the mapper's accumulation) sends a patch's logits to exactly the k × k cells
    whose pixels lie inside its window, and every cell gets at least one patch.  Windows and cells are
    rectangles, so this holds per axis: patch rows against cell rows, patch cols against cell cols."""
    width, height, patch, stride = params
    grid = patch_grid(width, height, patch, stride)
    k = patch // stride
    cell_rows = np.array([grid.cell_window(i, 0)[1::2] for i in range(grid.cell_rows)])  # (row_off, height)
    cell_cols = np.array([grid.cell_window(0, j)[0::2] for j in range(grid.cell_cols)])  # (col_off, width)
    patch_rows, patch_cols = np.arange(grid.patch_rows), np.arange(grid.patch_cols)
    fed_rows, fed_cols = grid.cells_of_patches(patch_rows, patch_cols)
    assert fed_rows.shape == (grid.patch_rows, k) and fed_cols.shape == (grid.patch_cols, k)
    for axis, fed, cells, count in (("row", fed_rows, cell_rows, grid.patch_rows),
                                    ("col", fed_cols, cell_cols, grid.patch_cols)):
        for index in range(count):
            col_off, row_off, size, _ = grid.patch_window(index if axis == "row" else 0, index if axis == "col" else 0)
            origin = row_off if axis == "row" else col_off
            inside = (cells[:, 0] >= origin) & (cells[:, 0] + cells[:, 1] <= origin + size)
            assert fed[index].tolist() == np.flatnonzero(inside).tolist()
        assert set(fed.ravel().tolist()) == set(range(len(cells)))  # every cell gets a patch


@settings(max_examples=300, deadline=None)
@given(grids(max_side=100_000), transforms(), st.data())
def test_georeferencing_of_cells_and_windows_is_exact(params, transform, data):
    from rasterio.windows import Window, bounds
    from rasterio.windows import transform as window_transform

    width, height, patch, stride = params
    grid = patch_grid(width, height, patch, stride)
    cells = grid.cell_transform(transform)
    i = data.draw(st.integers(0, grid.cell_rows))
    j = data.draw(st.integers(0, grid.cell_cols))
    # Cell corner (j, i) is pixel corner (j·stride, i·stride), to rounding of the coordinates.
    tolerance = 1e-9 * max(1.0, abs(transform.c), abs(transform.f))
    assert np.allclose(cells * (j, i), transform * (j * stride, i * stride), rtol=0, atol=tolerance)
    assert cells.a == transform.a * stride and cells.e == transform.e * stride
    row = data.draw(st.integers(0, grid.patch_rows - 1))
    col = data.draw(st.integers(0, grid.patch_cols - 1))
    col_off, row_off, w, h = grid.patch_window(row, col)
    window = Window(col_off, row_off, w, h)
    assert window_transform(window, transform) == transform * Affine.translation(col_off, row_off)
    left, bottom, right, top = bounds(window, transform)
    assert np.isclose(right - left, patch * transform.a) and np.isclose(top - bottom, patch * -transform.e)


@settings(max_examples=200, deadline=None)
@given(st.integers(-5, 200), st.integers(-5, 200), st.integers(-3, 64), st.integers(-3, 70))
def test_impossible_grids_are_clear_errors(width, height, patch, stride):
    valid = patch >= 1 and 1 <= stride <= patch and patch % stride == 0 and width >= patch and height >= patch
    if valid:
        assert patch_grid(width, height, patch, stride).patch_cols >= 1
    else:
        with pytest.raises(JEMError):
            patch_grid(width, height, patch, stride)


def write_position_raster(path: Path, width: int, height: int, transform: Affine) -> np.ndarray:
    """Float32 raster whose pixel value is its row·width + col (exact below 2^24), 2 bands."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    position = np.arange(width * height, dtype=np.float32).reshape(height, width)
    pixels = np.stack([position, -position])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=2, dtype="float32",
                           crs="EPSG:32633", transform=transform) as dst:
            dst.write(pixels)
    return pixels


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grids(max_side=90), st.integers(1, 50), st.integers(0, 2))
def test_iter_patches_reads_exactly_each_window(tmp_path, params, batch_size, read_ahead):
    """Every patch iter_patches yields holds exactly the pixels of its window, and every patch comes once."""
    width, height, patch, stride = params
    path = tmp_path / f"pos_{width}_{height}.tif"
    pixels = write_position_raster(path, width, height, Affine(10, 0, 500000, 0, -10, 4100000))
    seen = set()
    for batch in iter_patches(path, patch, stride, batch_size=batch_size, read_ahead=read_ahead):
        assert len(batch.rows) <= batch_size
        for row, col, patch_pixels in zip(batch.rows, batch.cols, batch.pixels):
            col_off, row_off, w, h = batch.grid.patch_window(int(row), int(col))
            assert np.array_equal(patch_pixels, pixels[:, row_off:row_off + h, col_off:col_off + w])
            seen.add((int(row), int(col)))
    grid = patch_grid(width, height, patch, stride)
    assert seen == {(r, c) for r in range(grid.patch_rows) for c in range(grid.patch_cols)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.hostile_cases import write_model

    return write_model(tmp_path_factory.mktemp("model") / "m.pt", bands=["p", "n"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(16, 70), st.integers(16, 70), st.sampled_from([1, 2, 4, 8, 16]), transforms(),
       st.sampled_from(["patch", "input"]))
def test_map_outputs_are_georeferenced_exactly(tiny_model, tmp_path, width, height, stride, transform, resolution):
    """The written class map: grid and transform as specified, every pixel a class (no unmapped edge)."""
    import rasterio

    from tests.hostile_cases import PATCH

    path = tmp_path / f"in_{width}_{height}.tif"
    write_position_raster(path, width, height, transform)
    out = tmp_path / f"classes_{width}_{height}_{stride}_{resolution}.tif"
    map_raster(tiny_model, path, out, stride=stride, resolution=resolution, stretch="none", read_ahead=0,
               batch_size=256)
    grid = patch_grid(width, height, PATCH, stride)
    with rasterio.open(out) as dataset:
        classes = dataset.read(1)
        out_transform, crs = dataset.transform, dataset.crs
    assert crs == rasterio.crs.CRS.from_epsg(32633)
    if resolution == "patch":
        assert classes.shape == (grid.cell_rows, grid.cell_cols)
        assert out_transform.almost_equals(grid.cell_transform(transform), precision=1e-9)
        assert (classes != CLASS_NODATA).all()
    else:
        assert classes.shape == (height, width)
        assert out_transform.almost_equals(transform, precision=1e-9)
        assert (classes != CLASS_NODATA).all()
