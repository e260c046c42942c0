"""Mapping rasters: georeferencing, overlap averaging, nodata, band choice, stacking, cancel, CLI."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.transform import from_origin

from jem_core import Cancelled, JEMError
from jem_core.cli import main as cli_main
from jem_core.mapping import map_raster
from jem_core.model_file import ModelMeta, load_model, save_model
from jem_core.models import ModelSpec, build_model
from jem_core.windowing import iter_patches, patch_grid

PATCH = 16
TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny untrained 3-class RGB model with 16 px patches; random weights give varied logits."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="wrn-10-1", in_channels=3, num_classes=3, stem_stride=2))
    meta = ModelMeta(class_names=["water", "forest", "urban"], band_names=["red", "green", "blue"],
                     image_size=PATCH, mean=[120.0, 110.0, 100.0], std=[50.0, 45.0, 40.0])
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(path, model, meta)
    return path


def write_raster(path: Path, pixels: np.ndarray, nodata: float | None = None, descriptions=None,
                 transform=TRANSFORM) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1],
                       count=pixels.shape[0], dtype=pixels.dtype, crs="EPSG:32633", transform=transform,
                       nodata=nodata) as dst:
        dst.write(pixels)
        for i, name in enumerate(descriptions or []):
            dst.set_band_description(i + 1, name)
    return path


def scene(height: int = 53, width: int = 70, bands: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random structure plus noise, 8-bit."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (bands, height // 8 + 2, width // 8 + 2))
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :height, :width]
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), {"transform": src.transform, "crs": src.crs, "shape": (src.height, src.width),
                            "tags": src.tags(), "band_tags": src.tags(1), "colormap": src.colormap(1)
                            if src.dtypes[0] == "uint8" else None, "nodata": src.nodata, "tiled": src.is_tiled}


def patch_logits(model_path: Path, pixels: np.ndarray, windows: list[tuple[int, int]]) -> torch.Tensor:
    """Logits of the patches whose top-left corners are `windows` (row, col), computed directly."""
    loaded = load_model(model_path)
    batch = torch.stack([torch.from_numpy(pixels[:, r:r + PATCH, c:c + PATCH].astype(np.float32)) for r, c in windows])
    with torch.no_grad():
        return loaded.model(loaded.normalise(batch)).double()


def test_patch_grid_covers_the_raster_with_inward_shifted_edge_patches():
    grid = patch_grid(70, 53, 16, 8)
    assert (grid.patch_cols, grid.patch_rows) == (8, 6)
    assert (grid.cell_cols, grid.cell_rows) == (9, 7)  # ceil(70 / 8), ceil(53 / 8)
    assert grid.patch_window(2, 3) == (24, 16, 16, 16)
    assert grid.patch_window(5, 7) == (54, 37, 16, 16)  # the last row and column end at the raster's edge
    assert grid.cell_window(6, 8) == (64, 48, 6, 5)
    rows, cols = grid.cells_of_patches(np.array([2, 5]), np.array([3, 7]))
    assert rows.tolist() == [[2, 3], [5, 6]] and cols.tolist() == [[3, 4], [7, 8]]
    with pytest.raises(JEMError, match="does not divide"):
        patch_grid(70, 53, 16, 6)
    with pytest.raises(JEMError, match="smaller than the model's 16"):
        patch_grid(15, 53, 16)


def test_georeferencing_is_exact_at_patch_and_input_resolution(tmp_path, model_path):
    raster = write_raster(tmp_path / "in.tif", scene())
    patch = map_raster(model_path, [raster], tmp_path / "c.tif", tmp_path / "e.tif", stride=8, device="cpu")
    classes, info = read(patch.classes)
    assert info["crs"] == rasterio.crs.CRS.from_epsg(32633)
    assert info["transform"] == TRANSFORM * TRANSFORM.scale(8)
    assert info["shape"] == (7, 9) and info["tiled"]
    assert json.loads(info["tags"]["jem_class_names"]) == ["water", "forest", "urban"]
    assert info["band_tags"]["CLASS_2"] == "urban" and len(info["colormap"]) >= 3
    assert (classes < 3).all()

    full = map_raster(model_path, [raster], tmp_path / "cf.tif", tmp_path / "ef.tif", stride=8,
                      resolution="input", device="cpu")
    full_classes, full_info = read(full.classes)
    assert full_info["transform"] == TRANSFORM and full_info["shape"] == (53, 70)
    # Each cell's value fills its 8 × 8 pixels, clipped at the edge: every pixel is mapped.
    assert np.array_equal(full_classes[0], np.repeat(np.repeat(classes[0], 8, 0), 8, 1)[:53, :70])
    confidence, _ = read(full.confidence)
    assert np.isfinite(confidence[0]).all()


@pytest.mark.parametrize("resolution", ["patch", "input"])
def test_overlapping_stride_averages_logits(tmp_path, model_path, resolution):
    """Each cell's outputs come from the mean logits of its patches: class = argmax, confidence = max softmax,
    familiarity = logsumexp, probabilities = softmax; at input resolution they fill the cell's pixels."""
    pixels = scene(seed=3)
    raster = write_raster(tmp_path / "in.tif", pixels)
    result = map_raster(model_path, raster, tmp_path / "c.tif", tmp_path / "conf.tif", stride=8, device="cpu",
                        out_familiarity=tmp_path / "fam.tif", out_probabilities=tmp_path / "probs.tif",
                        resolution=resolution, stretch="none", confidence_box=0)  # test_confidence_box: the box
    scale = 8 if resolution == "input" else 1  # a cell's top-left pixel in the output grid
    outputs = {kind: read(getattr(result, kind))[0]
               for kind in ("classes", "confidence", "familiarity", "probabilities")}

    def at(kind: str, row: int, col: int) -> np.ndarray:
        return outputs[kind][:, row * scale, col * scale]

    def check(row: int, col: int, logits: torch.Tensor) -> None:
        assert at("confidence", row, col)[0] == pytest.approx(logits.softmax(0).max().item(), abs=1e-5)
        assert at("familiarity", row, col)[0] == pytest.approx(torch.logsumexp(logits, 0).item(), abs=1e-4)
        assert at("probabilities", row, col) == pytest.approx(logits.softmax(0).numpy(), abs=1e-5)
        assert at("classes", row, col)[0] == logits.argmax().item()

    confidence = outputs["confidence"]
    assert np.isfinite(confidence).all() and (confidence >= 1 / 3 - 1e-6).all() and (confidence <= 1).all()
    assert np.allclose(confidence[0], outputs["probabilities"].max(0), atol=1e-6)
    # Cell (2, 3) lies under patches with origins rows {8, 16} × cols {16, 24} (stride 8, patch 16).
    inner = patch_logits(model_path, pixels, [(8, 16), (8, 24), (16, 16), (16, 24)]).mean(0)
    check(2, 3, inner)
    # The corner cell has one patch only; a single patch's logits differ from the average.
    corner = patch_logits(model_path, pixels, [(0, 0)])[0]
    check(0, 0, corner)
    assert abs(torch.logsumexp(corner, 0).item() - at("familiarity", 2, 3)[0]) > 1e-4
    # The edge: the last patch row/column is shifted inwards to origins 53 − 16 = 37 and 70 − 16 = 54.
    check(5, 7, patch_logits(model_path, pixels, [(32, 48), (32, 54), (37, 48), (37, 54)]).mean(0))
    check(6, 8, patch_logits(model_path, pixels, [(37, 54)])[0])
    for kind, meaning, tag in (("confidence", "p(y|x)", "p(y|x) of the cell's mapped class y;"),
                               ("familiarity", "-E(x)", "-E(x)")):
        with rasterio.open(getattr(result, kind)) as src:
            assert src.descriptions[0].startswith(f"{kind}: {meaning}")
            assert src.tags()[f"jem_{kind}"].startswith(tag)


def test_nodata_in_input_gives_nodata_in_outputs(tmp_path, model_path):
    pixels = scene(48, 64)
    pixels[pixels == 0] = 1
    pixels[:, 20, 40] = 0  # one nodata pixel inside patch (1, 2) only (stride = patch)
    raster = write_raster(tmp_path / "in.tif", pixels, nodata=0)
    result = map_raster(model_path, raster, tmp_path / "c.tif", tmp_path / "e.tif", device="cpu")
    classes, info = read(result.classes)
    confidence, _ = read(result.confidence)
    assert info["nodata"] == 255
    assert classes[0, 1, 2] == 255 and np.isnan(confidence[0, 1, 2])
    others = np.ones((3, 4), bool)
    others[1, 2] = False
    assert (classes[0][others] < 3).all() and np.isfinite(confidence[0][others]).all()
    assert result.skipped_patches == 1 and result.patches == 11
    assert sum(result.class_counts.values()) == 11


def test_band_mismatch_is_a_clear_error(tmp_path, model_path):
    two_bands = write_raster(tmp_path / "two.tif", scene(bands=2))
    with pytest.raises(JEMError, match="expects 3"):
        map_raster(model_path, two_bands, tmp_path / "c.tif", device="cpu")
    four = write_raster(tmp_path / "four.tif", scene(bands=4), descriptions=["B02", "B03", "B04", "B08"])
    with pytest.raises(JEMError, match="expects 3"):
        map_raster(model_path, four, tmp_path / "c.tif", bands=["B04", "B03"], device="cpu")
    with pytest.raises(JEMError, match="'B11' is not in"):
        map_raster(model_path, four, tmp_path / "c.tif", bands=["B04", "B03", "B11"], device="cpu")
    assert not (tmp_path / "c.tif").exists()


def test_band_names_win_over_positional_aliases(tmp_path):
    """Bands described B04, B03, B02 (a Sentinel RGB stack): 'B03' is band 2, not band 3 ("B3")."""
    from jem_core.raster_io import open_raster

    stack = write_raster(tmp_path / "rgb.tif", scene(), descriptions=["B04", "B03", "B02"])
    with open_raster(stack, ["B04", "B03", "B02"]) as source:
        assert source.band_indexes == [1, 2, 3] and source.band_names == ["B04", "B03", "B02"]
    with open_raster(stack, ["B2", "B4"]) as source:
        assert source.band_indexes == [3, 1]


def test_raster_smaller_than_a_patch_is_a_clear_error(tmp_path, model_path):
    small = write_raster(tmp_path / "small.tif", scene(12, 40))
    with pytest.raises(JEMError, match="smaller than the model's 16 × 16 px patch"):
        map_raster(model_path, small, tmp_path / "c.tif", device="cpu")


@pytest.mark.parametrize("stop_after", [0, 2])
def test_cancel_leaves_no_output_files(tmp_path, model_path, stop_after):
    raster = write_raster(tmp_path / "in.tif", scene(96, 96))
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > stop_after

    with pytest.raises(Cancelled):
        map_raster(model_path, raster, out / "c.tif", out / "e.tif", out_probabilities=out / "p.tif", stride=8,
                   batch_size=4, should_stop=should_stop, device="cpu")
    assert len(calls) == stop_after + 1
    assert list(out.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "jem-raster-reader"], "the reader thread must stop"


def test_stacked_single_band_files_match_a_multiband_raster(tmp_path, model_path):
    pixels = scene(48, 64, bands=3, seed=5)  # bands in B02, B03, B04 order
    folder = tmp_path / "s2"
    folder.mkdir()
    for band, name in zip(pixels, ["B02", "B03", "B04"]):
        write_raster(folder / f"T36SYC_{name}.tif", band[None])
    coarse = pixels[0, ::2, ::2][None]  # a 20 m band: stacked on the 10 m grid
    write_raster(folder / "T36SYC_B05.tif", coarse, transform=from_origin(500000.0, 4000000.0, 20.0, 20.0))
    files = sorted(folder.glob("*.tif"))
    stacked = map_raster(model_path, files, tmp_path / "c1.tif", tmp_path / "e1.tif", bands=["B4", "B03", "B02"],
                         device="cpu", stretch="none")
    multi = write_raster(tmp_path / "rgb.tif", pixels[::-1].copy())
    single = map_raster(model_path, multi, tmp_path / "c2.tif", tmp_path / "e2.tif", device="cpu", stretch="none")
    assert stacked.bands == ["B04", "B03", "B02"]
    assert np.array_equal(read(stacked.classes)[0], read(single.classes)[0])
    assert np.allclose(read(stacked.confidence)[0], read(single.confidence)[0], atol=1e-5)
    with_coarse = map_raster(model_path, files, tmp_path / "c3.tif", bands=["B05", "B03", "B02"], device="cpu")
    assert read(with_coarse.classes)[1]["transform"] == TRANSFORM * TRANSFORM.scale(PATCH)
    assert (with_coarse.width, with_coarse.height) == (4, 3)


def test_auto_stretch_maps_uint16_reflectance_onto_an_8bit_model(tmp_path, model_path):
    pixels = scene(seed=7)
    eight_bit = write_raster(tmp_path / "u8.tif", pixels)
    reflectance = write_raster(tmp_path / "u16.tif", pixels.astype(np.uint16) * 10 + 300)
    a = map_raster(model_path, eight_bit, tmp_path / "a.tif", tmp_path / "ea.tif", stretch="percentile", device="cpu")
    b = map_raster(model_path, reflectance, tmp_path / "b.tif", tmp_path / "eb.tif", device="cpu")
    assert b.stretch.startswith("percentile 2–98") and "→ [0, 255]" in b.stretch
    assert np.allclose(read(a.confidence)[0], read(b.confidence)[0], atol=1e-3)
    none = map_raster(model_path, eight_bit, tmp_path / "n.tif", tmp_path / "en.tif", device="cpu")
    assert none.stretch.startswith("none")
    with pytest.raises(JEMError, match="linear:0,3000"):
        map_raster(model_path, reflectance, tmp_path / "x.tif", stretch="linear", device="cpu")


def test_reader_thread_gives_the_same_map_and_iter_patches_cuts_exact_windows(tmp_path, model_path):
    pixels = scene(64, 80, seed=9)
    raster = write_raster(tmp_path / "in.tif", pixels)
    # 17 patches per row, batches of 34: a batch ends exactly at a row end, the next spans rows.
    threaded = map_raster(model_path, raster, tmp_path / "t.tif", tmp_path / "et.tif", stride=4, read_ahead=3,
                          device="cpu", batch_size=34)
    inline = map_raster(model_path, raster, tmp_path / "i.tif", tmp_path / "ei.tif", stride=4, read_ahead=0,
                        device="cpu")
    assert np.array_equal(read(threaded.confidence)[0], read(inline.confidence)[0])
    seen = 0
    for batch in iter_patches(raster, PATCH, stride=8, batch_size=5):
        assert len(batch.rows) <= 5
        for r, c, patch in zip(batch.rows, batch.cols, batch.pixels):
            col_off, row_off, w, h = batch.grid.patch_window(r, c)
            assert np.array_equal(patch, pixels[:, row_off:row_off + h, col_off:col_off + w])
            seen += 1
    assert seen == patch_grid(80, 64, PATCH, 8).patch_rows * patch_grid(80, 64, PATCH, 8).patch_cols


def test_cli_map_end_to_end(tmp_path, model_path, capsys):
    raster = write_raster(tmp_path / "in.tif", scene())
    code = cli_main(["map", str(model_path), str(raster), "--out-classes", str(tmp_path / "c.tif"),
                     "--out-confidence", str(tmp_path / "e.tif"), "--out-familiarity", str(tmp_path / "f.tif"),
                     "--stride", "8", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                     "--preview", str(tmp_path / "p.png")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["width"] == 9 and report["stride"] == 8 and report["patches"] == 48
    assert read(tmp_path / "e.tif")[1]["shape"] == (7, 9)
    assert report["confidence"] == str(tmp_path / "e.tif") and report["familiarity"] == str(tmp_path / "f.tif")
    assert (read(tmp_path / "e.tif")[0] <= 1).all() and np.isfinite(read(tmp_path / "f.tif")[0]).all()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.tif").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    code = cli_main(["map", str(model_path), str(raster), "--out-classes", str(tmp_path / "d.tif"),
                     "--bands", "1,2", "--device", "cpu"])
    assert code == 2 and "expects 3" in capsys.readouterr().err
    assert not (tmp_path / "d.tif").exists()


def test_target_gsd_resamples_before_cutting_patches(tmp_path, model_path):
    pixels = scene(96, 128, seed=11)
    raster = write_raster(tmp_path / "in.tif", pixels)
    result = map_raster(model_path, raster, tmp_path / "c.tif", tmp_path / "e.tif", target_gsd=20.0, stride=8,
                        device="cpu", stretch="none")
    _, info = read(result.classes)
    assert info["transform"] == TRANSFORM * TRANSFORM.scale(2) * TRANSFORM.scale(8)
    assert (result.width, result.height) == (8, 6)  # 64 × 48 px at 20 m, stride 8
    assert any("resampled" in note for note in result.notes)
    # The first patch at 20 m is the 2 × 2 average of the top-left 32 × 32 px at 10 m.
    averaged = pixels[:, :32, :32].astype(np.float64).reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    expected = patch_logits(model_path, averaged.astype(np.float32), [(0, 0)])[0]
    assert read(result.confidence)[0][0, 0, 0] == pytest.approx(expected.softmax(0).max().item(), abs=1e-3)


def test_band_list_parser_is_shared_by_cli_and_plugin():
    from jem_core.raster_io import parse_band_list

    assert parse_band_list(" B04, B03,,B02 ") == ["B04", "B03", "B02"]
    assert parse_band_list("3,2,1") == ["3", "2", "1"]
    assert parse_band_list("") is None and parse_band_list(None) is None and parse_band_list(" , ") is None


def test_rotated_raster_is_mapped_in_its_pixel_grid_with_its_rotated_geotransform(tmp_path, model_path):
    """A rotated (not north-up) raster: the same pixels give the same map, placed by the rotated transform."""
    pixels = scene(seed=5)
    rotated = TRANSFORM * Affine.rotation(30)
    north_up = write_raster(tmp_path / "north_up.tif", pixels)
    tilted = write_raster(tmp_path / "rotated.tif", pixels, transform=rotated)
    for resolution in ("patch", "input"):
        plain = map_raster(model_path, north_up, tmp_path / f"n_{resolution}.tif", stride=8, resolution=resolution)
        turned = map_raster(model_path, tilted, tmp_path / f"r_{resolution}.tif", stride=8, resolution=resolution)
        classes, info = read(turned.classes)
        assert np.array_equal(classes, read(plain.classes)[0])
        expected = rotated * rotated.scale(8) if resolution == "patch" else rotated
        assert info["transform"].almost_equals(expected, precision=1e-6)
        # Output pixel (0, 1)'s corner is the input pixel corner (0, 8) or (0, 1) on the ground.
        step = 8 if resolution == "patch" else 1
        assert np.allclose(info["transform"] * (1, 0), rotated * (step, 0))
    with pytest.raises(JEMError, match="rotated.*--target-gsd"):
        map_raster(model_path, tilted, tmp_path / "gsd.tif", target_gsd=20.0)
    assert not (tmp_path / "gsd.tif").exists()
