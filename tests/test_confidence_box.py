"""The confidence layer's box average: against a direct computation, streamed, and inside map_raster."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from test_mapping import model_path, read, scene, write_raster  # noqa: F401  (model_path is a fixture)

from jem_core import JEMError
from jem_core.confidence_box import CONFIDENCE_BOX_PATCHES, ConfidenceBox, box_cells, box_of_mapped
from jem_core.mapping import map_raster

NODATA_CLASS = 255


def direct_box(probabilities: np.ndarray, radius: int) -> np.ndarray:
    """(rows, cols) mean p(mapped class) over the covered cells of each cell's clipped box, cell by cell.

    probabilities: (rows, cols, C), NaN where uncovered."""
    rows, cols, _ = probabilities.shape
    out = np.full((rows, cols), np.nan)
    for i in range(rows):
        for j in range(cols):
            if np.isnan(probabilities[i, j, 0]):
                continue
            mapped = probabilities[i, j].argmax()
            box = probabilities[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1, mapped]
            out[i, j] = np.nanmean(box)
    return out


def random_probabilities(rows: int, cols: int, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes), (rows, cols))
    p[rng.random((rows, cols)) < 0.15] = np.nan  # cells no patch covers
    return p


def mapped_classes(p: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(p[..., 0]), NODATA_CLASS, np.nan_to_num(p, nan=-1).argmax(-1)).astype(np.uint8)


@pytest.mark.parametrize(("patch", "stride", "box", "cells"), [
    (32, 8, 0.75, 3), (32, 32, 0.75, 1), (16, 8, 0.75, 1), (32, 4, 0.75, 5), (32, 8, 0, 1), (32, 8, 2, 9),
    (32, 8, CONFIDENCE_BOX_PATCHES, 5), (32, 32, CONFIDENCE_BOX_PATCHES, 1)])
def test_box_cells_is_the_nearest_odd_count(patch, stride, box, cells):
    assert box_cells(patch, stride, box) == cells


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_box_of_mapped_matches_a_direct_computation(radius):
    p = random_probabilities(7, 11, 4, seed=radius)
    classes = mapped_classes(p)
    expected = direct_box(p, radius)
    for i in range(p.shape[0]):
        rows = p[max(0, i - radius):i + radius + 1]
        got = box_of_mapped(rows, classes[i], radius)
        np.testing.assert_allclose(got, expected[i], rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("cells", [3, 5, 9])
def test_streamed_rows_come_out_once_in_order_with_their_box_average(cells):
    p = random_probabilities(6, 9, 3, seed=cells)  # 9 cells: the box is taller than the raster
    classes = mapped_classes(p)
    emitted: list[dict[str, np.ndarray]] = []
    smoother = ConfidenceBox(cells, emitted.append)
    for i in range(p.shape[0]):
        smoother.add({"classes": classes[i], "confidence": np.nanmax(p[i], -1), "row": np.array([i]),
                      "support": p[i].T, "probabilities": p[i].T})
        assert len(emitted) == max(0, i + 1 - cells // 2)  # a row leaves once its box is complete below it
    smoother.finish()
    assert [int(row["row"][0]) for row in emitted] == list(range(p.shape[0]))
    assert all("support" not in row and np.array_equal(row["probabilities"], p[i].T, equal_nan=True)
               for i, row in enumerate(emitted))
    np.testing.assert_allclose(np.stack([row["confidence"] for row in emitted]), direct_box(p, cells // 2),
                               rtol=1e-6, equal_nan=True)


def test_map_confidence_is_the_box_average_of_the_mapped_class(tmp_path, model_path):  # noqa: F811
    """16 px patches at a stride of 4: the default box (1.25 patches) is 5 × 5 cells; the class map,
    familiarity and probabilities are those of the unsmoothed map, nodata stays nodata, and box 0 gives
    max p(y|x)."""
    pixels = scene(seed=5)
    pixels[pixels == 0] = 1
    pixels[:, 25, 30] = 0  # a nodata pixel: the cells only patches through it cover are nodata
    raster = write_raster(tmp_path / "in.tif", pixels, nodata=0)
    outputs = {}
    for name, box in (("boxed", CONFIDENCE_BOX_PATCHES), ("plain", 0)):
        result = map_raster(model_path, raster, tmp_path / f"{name}_c.tif", tmp_path / f"{name}_conf.tif", stride=4,
                            device="cpu", out_familiarity=tmp_path / f"{name}_f.tif", confidence_box=box,
                            out_probabilities=tmp_path / f"{name}_p.tif", stretch="none")
        outputs[name] = {kind: read(getattr(result, kind))[0]
                         for kind in ("classes", "confidence", "familiarity", "probabilities")}
    boxed, plain = outputs["boxed"], outputs["plain"]
    for kind in ("classes", "familiarity", "probabilities"):
        np.testing.assert_array_equal(boxed[kind], plain[kind])
    probabilities = np.moveaxis(plain["probabilities"], 0, -1).astype(np.float64)
    assert np.isnan(probabilities[..., 0]).any()
    np.testing.assert_allclose(plain["confidence"][0], np.nanmax(probabilities, -1), atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(boxed["confidence"][0], direct_box(probabilities, 2), atol=1e-6, equal_nan=True)
    assert not np.allclose(np.nan_to_num(boxed["confidence"]), np.nan_to_num(plain["confidence"]))
    with rasterio.open(tmp_path / "boxed_conf.tif") as src:
        assert src.tags()["jem_confidence"].startswith("p(y|x) of the cell's mapped class y, averaged over the 5 x 5")
    with rasterio.open(tmp_path / "plain_conf.tif") as src:
        assert src.tags()["jem_confidence"].startswith("p(y|x) of the cell's mapped class y;")


@pytest.mark.parametrize("box", [-1, float("nan"), float("inf"), 11])
def test_confidence_box_out_of_range_is_a_clear_error(tmp_path, model_path, box):  # noqa: F811
    raster = write_raster(tmp_path / "in.tif", scene())
    with pytest.raises(JEMError, match="confidence box must be 0 to 10 patches"):
        map_raster(model_path, raster, tmp_path / "c.tif", tmp_path / "conf.tif", confidence_box=box, device="cpu")
    assert not (tmp_path / "c.tif").exists()
