"""An RGB model on Sentinel-2 / Landsat band files: bands picked by what they measure, not by position."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from jem_core import JEMError
from jem_core.raster_io import open_raster
from jem_core.sensor_bands import band_hint, pick_bands, sensor_of

RGB = ["red", "green", "blue"]
S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
OSCD_STEM = "S2A_OPER_MSI_L1C_TL_EPA__20160929T004310_A000833_T36SYC"


def band_files(folder: Path, stem: str, bands: list[str]) -> list[Path]:
    """One small single-band GeoTIFF per band; band i holds the value i + 1 so picks can be checked."""
    folder.mkdir()
    paths = []
    for i, band in enumerate(bands):
        path = folder / f"{stem}_{band}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16",
                           crs="EPSG:32636", transform=from_origin(700000.0, 3700000.0, 10.0, 10.0)) as dst:
            dst.write(np.full((1, 8, 8), i + 1, dtype="uint16"))
        paths.append(path)
    return paths


def first_pixels(source) -> list[int]:
    with source.open() as dataset:
        pixels, _ = source.read_rows(dataset, 0, 1, 1)
    return [int(v) for v in pixels[:, 0, 0]]


def test_sentinel2_stack_gives_b04_b03_b02_and_says_so(tmp_path):
    files = band_files(tmp_path / "imgs_1", OSCD_STEM, S2_BANDS)
    with open_raster(files, expected_bands=RGB) as source:
        assert source.band_names == ["B04", "B03", "B02"]
        assert first_pixels(source) == [4, 3, 2]
        assert any("Sentinel-2" in note and "red=B04" in note for note in source.notes)


@pytest.mark.parametrize("stem, expected", [
    ("LC08_L1TP_044034_20200101_20200113_02_T1", ["B4", "B3", "B2"]),
    ("LC09_L2SP_044034_20220101_20220103_02_T1_SR", ["B4", "B3", "B2"]),
    ("LE07_L1TP_044034_20000101_20161215_01_T1", ["B3", "B2", "B1"]),
    ("LT05_L1TP_044034_19900101_20161001_01_T1", ["B3", "B2", "B1"]),
])
def test_landsat_stacks_pick_the_sensor_rgb(tmp_path, stem, expected):
    files = band_files(tmp_path / "scene", stem, [f"B{i}" for i in range(1, 8)])
    with open_raster(files, expected_bands=RGB) as source:
        assert source.band_names == expected
        assert first_pixels(source) == [int(name[1:]) for name in expected]


def test_three_sentinel2_files_in_blue_green_red_order_are_not_taken_by_position(tmp_path):
    files = band_files(tmp_path / "rgb", "T36SYC_20160929", ["B02", "B03", "B04"])
    with open_raster(files, expected_bands=RGB) as source:
        assert source.band_names == ["B04", "B03", "B02"]


def test_explicit_bands_and_the_models_own_names_win_over_the_rule(tmp_path):
    files = band_files(tmp_path / "imgs", OSCD_STEM, S2_BANDS)
    with open_raster(files, ["B08", "B04", "B03"], expected_bands=RGB) as source:
        assert source.band_names == ["B08", "B04", "B03"] and source.notes == []
    assert pick_bands(["B04", "B03", "B02"], S2_BANDS, []) is None


def test_no_rule_gives_an_error_with_sensible_band_advice(tmp_path):
    files = band_files(tmp_path / "unknown", "scene", ["B1", "B2", "B3", "B4", "B5"])
    with pytest.raises(JEMError, match=r"Sentinel-2: --bands B04,B03,B02; Landsat 8/9: --bands B4,B3,B2"):
        open_raster(files, expected_bands=RGB).__enter__()
    s2_without_red = band_files(tmp_path / "partial", OSCD_STEM, ["B01", "B02", "B03", "B05"])
    with pytest.raises(JEMError, match=r"For Sentinel-2 that is --bands B04,B03,B02"):
        open_raster(s2_without_red, expected_bands=RGB).__enter__()


def test_sensor_recognition_needs_a_product_id_or_sentinel2_band_names():
    assert sensor_of(["B1", "B2", "B3"], ["scene.tif"]) is None
    assert sensor_of(["B1", "B2"], ["LC08_L1TP_x.tif"]) == "Landsat 8/9"
    assert sensor_of(["B1"], ["LM01_L1GS_x.tif"]) is None  # MSS has no blue band
    assert sensor_of(["B02", "B8A"], ["x.tif"]) == "Sentinel-2"
    assert band_hint(["nir", "red"], ["B1", "B2"], ["LE07_x.tif"]).startswith("For Landsat 4-7 that is --bands B4,B3 ")
    assert "--bands ndvi,slope" in band_hint(["ndvi", "slope"], ["B1", "B2", "B3"], [])
    assert band_hint(RGB, ["B1"], []).startswith("Give an input with the 3 bands the model needs (red, green, blue)")
