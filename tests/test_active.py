"""Annotations → labelled patches, semi-supervised retraining, and label suggestions (jem_core.active)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jem_core import JEMError
from jem_core.active import (
    RETRAIN_DEFAULTS,
    Annotation,
    cell_centres,
    fit_head,
    open_patch_reader,
    patches_from_annotations,
    percentile_rank,
    reading_coarsen,
    retrain,
    sample_unlabelled_patches,
    spread_selection,
    suggest,
    uncertainty_scores,
)
from jem_core.data import SceneDataset
from jem_core.model_file import LoadedModel, ModelMeta, load_model
from jem_core.models import ModelSpec, build_model
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig, train

ORIGIN_X, ORIGIN_Y, PIXEL = 500000.0, 4000000.0, 10.0
PATCH = 16


def write_scene(path: Path, size: int = 96, nodata_rows: int = 0) -> Path:
    """Left half 'field' (green, striped), right half 'town' (grey, checkered); EPSG:32633, 10 m pixels.

    nodata_rows: that many top rows are 0 (the nodata value) in every band.
    """
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    pixels = np.empty((3, size, size), dtype=np.float32)
    half = size // 2
    stripes = 20 * np.sin(np.arange(size) / 2.0)
    pixels[:, :, :half] = np.array([60, 170, 60])[:, None, None] + stripes[None, :, None]
    checks = 30 * ((np.arange(size)[:, None] // 4 + np.arange(half)[None, :] // 4) % 2)
    pixels[:, :, half:] = 120 + checks[None]
    pixels += rng.normal(0, 5, pixels.shape)
    pixels = np.clip(pixels, 1, 255).astype(np.uint8)
    pixels[:, :nodata_rows] = 0
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(ORIGIN_X, ORIGIN_Y, PIXEL, PIXEL),
                       nodata=0 if nodata_rows else None) as dst:
        dst.write(pixels)
    return path


def at(col: float, row: float) -> tuple[float, float]:
    """Map coordinates of pixel (col, row)."""
    return ORIGIN_X + col * PIXEL, ORIGIN_Y - row * PIXEL


def point(name: str, col: float, row: float) -> Annotation:
    return Annotation(name, *at(col, row))


def tiny_config(**changes) -> TrainConfig:
    values = dict(arch="wrn-10-1", stem_stride=1, image_size=PATCH, epochs=2, batch_size=8, sgld_batch_size=8,
                  warmup_iters=2, device="cpu", sgld=SGLDConfig(steps=2, buffer_size=64))
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    return write_scene(tmp_path / "scene.tif")


def two_class_annotations() -> list[Annotation]:
    return [point("field", 12, 20), point("field", 20, 70), point("town", 70, 20), point("town", 80, 75)]


def test_cell_centres_one_per_patch_footprint_and_a_grid_for_large_polygons():
    side = PATCH * PIXEL
    assert cell_centres((0, 0, side, side), side, side) == [(side / 2, side / 2)]
    centres = cell_centres((0, 0, 2 * side + 1, side), side, side)
    assert len(centres) == 2 and centres[0][0] < centres[1][0]
    assert cell_centres((0, 0, 1, 1), side, side) == [(0.5, 0.5)]  # smaller than a patch: its centre


def test_points_read_the_patch_under_them_with_class_labels(scene):
    data = patches_from_annotations([scene], two_class_annotations(), PATCH)
    assert data.class_names == ["field", "town"]
    assert data.images.shape == (4, 3, PATCH, PATCH)
    assert data.labels.tolist() == [0, 0, 1, 1]
    green_minus_red = data.images[:, 1].mean((1, 2)) - data.images[:, 0].mean((1, 2))
    assert (green_minus_red[:2] > 80).all() and (green_minus_red[2:].abs() < 10).all()
    assert data.value_range == [0.0, 255.0] and len(data.band_names) == 3


def test_a_label_shift_adds_the_eight_neighbouring_patches_inside_the_raster(scene):
    labels = [point("town", 60, 40), point("field", 0, 0)]  # the second in a corner of the raster
    plain = patches_from_annotations([scene], labels, PATCH)
    shifted = patches_from_annotations([scene], labels, PATCH, shift=4)
    assert len(plain) == 2 and len(shifted) == 18
    assert shifted.labels.tolist() == [plain.labels[0].item()] * 9 + [plain.labels[1].item()] * 9
    assert shifted.places.tolist() == [0] * 9 + [1] * 9 and plain.places.tolist() == [0, 1]
    assert any(torch.equal(image, plain.images[0]) for image in shifted.images[:9])
    # In the corner the shifts that would leave the raster are clamped: 4 distinct patches, not 9.
    assert len({tuple(image.flatten().tolist()) for image in shifted.images[9:]}) == 4


def test_patch_at_the_edge_moves_inside_the_raster(scene):
    corner = patches_from_annotations([scene], [point("field", 0.5, 0.5), point("town", 95.5, 95.5)], PATCH)
    import rasterio
    with rasterio.open(scene) as src:
        pixels = src.read().astype(np.float32)
    assert torch.equal(corner.images[0], torch.from_numpy(pixels[:, :PATCH, :PATCH]))
    assert torch.equal(corner.images[1], torch.from_numpy(pixels[:, -PATCH:, -PATCH:]))


def test_polygon_bounds_label_every_cell_inside(scene):
    xmin, ymax = at(0, 0)
    xmax, ymin = at(2 * PATCH, PATCH)
    data = patches_from_annotations([scene], [Annotation("field", (xmin + xmax) / 2, (ymin + ymax) / 2,
                                                         (xmin, ymin, xmax, ymax)), point("town", 70, 20)], PATCH)
    assert data.labels.tolist() == [0, 0, 1]
    assert data.places.tolist() == [0, 1, 2]  # each cell of a polygon is a labelled place of its own


def test_class_order_follows_the_given_list_and_new_classes_are_appended(scene):
    data = patches_from_annotations([scene], two_class_annotations() + [point("water", 40, 40)], PATCH,
                                    class_names=["town", "field"])
    assert data.class_names == ["town", "field", "water"]
    assert data.labels.tolist() == [1, 1, 0, 0, 2]


@pytest.mark.parametrize("annotations, class_names, message", [
    ([], None, "no annotations"),
    ([point("field", 10, 10), point("town", 500, 10)], None, "outside every raster"),
    ([point("field", 10, 10), point("field", 50, 50)], None, "Only one class"),
    ([point("field", 10, 10), point("town", 60, 60)], ["field", "town", "water"], "water have no labels"),
    ([point("field", 10, 10), point(" ", 60, 60)], None, "empty class name"),
])
def test_bad_annotations_raise_clear_errors(scene, annotations, class_names, message):
    with pytest.raises(JEMError, match=message):
        patches_from_annotations([scene], annotations, PATCH, class_names=class_names)


def test_annotations_are_found_in_whichever_raster_holds_them(tmp_path, scene):
    import rasterio
    from rasterio.transform import from_origin

    second = tmp_path / "east.tif"
    with rasterio.open(scene) as src:
        profile = src.profile
        pixels = src.read()
    profile["transform"] = from_origin(ORIGIN_X + 96 * PIXEL, ORIGIN_Y, PIXEL, PIXEL)
    with rasterio.open(second, "w", **profile) as dst:
        dst.write(pixels[:, :, ::-1])  # mirrored: town on the left
    data = patches_from_annotations([scene, second], [point("field", 10, 10), point("town", 96 + 10, 10)], PATCH)
    assert [p.name for p in data.paths] == ["scene.tif", "east.tif"]
    assert abs(float(data.images[1, 1].mean() - data.images[1, 0].mean())) < 10  # grey: a town patch


def test_unlabelled_patches_are_seeded_and_avoid_nodata(tmp_path):
    raster = write_scene(tmp_path / "holes.tif", nodata_rows=60)
    a = sample_unlabelled_patches([raster], 12, seed=3, patch_size=PATCH)
    b = sample_unlabelled_patches([raster], 12, seed=3, patch_size=PATCH)
    assert a.shape == (12, 3, PATCH, PATCH) and torch.equal(a, b)
    assert not torch.equal(a, sample_unlabelled_patches([raster], 12, seed=4, patch_size=PATCH))
    valid_fraction = (a != 0).all(1).double().mean((1, 2))
    assert (valid_fraction >= 0.5).all()


def test_fit_head_copies_known_rows_by_name_adds_new_ones_and_drops_the_rest():
    torch.manual_seed(0)
    old = LoadedModel(build_model(ModelSpec(arch="wrn-10-1", num_classes=2)).eval(),
                      ModelMeta(["field", "town"], ["r", "g", "b"], PATCH, [0.0] * 3, [1.0] * 3))
    new = fit_head(old, ["field", "town", "water"])
    x = torch.randn(4, 3, PATCH, PATCH)
    with torch.no_grad():
        assert torch.allclose(new.model(x)[:, :2], old.model(x), atol=1e-5)
    assert new.spec.num_classes == 3 and new.meta.class_names == ["field", "town", "water"]
    assert old.spec.num_classes == 2, "the starting model must not change"
    shrunk = fit_head(old, ["water", "town"])
    with torch.no_grad():
        assert torch.allclose(shrunk.model(x)[:, 1], old.model(x)[:, 1], atol=1e-5)
    assert shrunk.meta.class_names == ["water", "town"]


def test_unlabelled_windows_cover_the_scene_one_per_grid_cell(tmp_path):
    from contextlib import ExitStack

    from jem_core.active.patches import covering_windows

    raster = write_scene(tmp_path / "plain.tif")
    with ExitStack() as stack:
        reader = open_patch_reader(stack, [raster], PATCH, None, None)
        windows = covering_windows(reader, 0, 16, np.random.default_rng(0))
    span = 96 - PATCH + 1  # a 4 × 4 grid of cells over the possible patch origins
    cells = sorted((w.row * 4 // span, w.col * 4 // span) for w in windows)
    assert cells == [(r, c) for r in range(4) for c in range(4)]


def test_train_keeps_unlabelled_images_out_of_labels_and_rejects_mismatched_start():
    labelled = SceneDataset(torch.rand(6, 3, PATCH, PATCH) * 255, torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"],
                            ["r", "g", "b"], [0.0, 255.0], [])
    lines: list[str] = []
    result = train(labelled, tiny_config(epochs=1, val_fraction=0.0, test_fraction=0.0),
                   unlabelled=torch.rand(10, 3, PATCH, PATCH) * 255, log=lines.append)
    assert result.metrics["labelled_images"] == 6
    assert "16 train images (6 labelled)" in lines[0]
    three = LoadedModel(build_model(ModelSpec(arch="wrn-10-1", num_classes=3)), result.loaded.meta)
    with pytest.raises(JEMError, match="Extend its head"):
        train(labelled, tiny_config(epochs=1), start_model=three)
    with pytest.raises(JEMError, match="same bands and size"):
        train(labelled, tiny_config(epochs=1), unlabelled=torch.rand(2, 3, 8, 8))


def test_retrain_from_scratch_then_extend_with_a_new_class(tmp_path, scene):
    first = retrain([scene], two_class_annotations(), out_model=tmp_path / "m1.pt", config=tiny_config(),
                    unlabelled_count=24)
    assert first.class_names == ["field", "town"] and first.new_classes == ["field", "town"]
    # Each of the 4 annotations labels its patch and the 8 patches shifted a quarter patch around it.
    assert (first.labelled_count, first.unlabelled_count) == (4 * 9, 24)
    saved = load_model(tmp_path / "m1.pt")
    assert saved.meta.class_names == ["field", "town"] and saved.meta.image_size == PATCH

    # Round 2: only 'town' and a new class are labelled. By default the new model has just those two classes;
    # keep_model_classes keeps 'field' in the head, with a warning.
    lines: list[str] = []
    labels = [point("town", 70, 20), point("water", 40, 85)]
    default = retrain([scene], labels, start_model=tmp_path / "m1.pt", config=tiny_config(epochs=1),
                      unlabelled_count=16, log=lines.append)
    assert default.class_names == ["town", "water"] and default.new_classes == ["water"]
    assert any("field are left out (keep them with --keep-model-classes)" in line for line in lines)
    second = retrain([scene], labels, start_model=tmp_path / "m1.pt", keep_model_classes=True,
                     out_model=tmp_path / "m2.pt", config=tiny_config(epochs=1), unlabelled_count=16,
                     log=lines.append)
    assert second.class_names == ["field", "town", "water"] and second.new_classes == ["water"]
    assert second.unlabelled_classes == ["field"]
    assert any("no labels this round for field" in line for line in lines)
    assert load_model(tmp_path / "m2.pt").spec.num_classes == 3


def test_retrain_learns_the_two_halves(tmp_path, scene):
    annotations = [point("field", c, r) for c, r in ((10, 10), (30, 40), (15, 80))] + \
                  [point("town", c, r) for c, r in ((60, 10), (85, 45), (70, 80))]
    result = retrain([scene], annotations, config=tiny_config(epochs=8, sgld=SGLDConfig(steps=1, buffer_size=32)),
                     unlabelled_count=16)
    assert result.labelled_accuracy == 1.0


def test_retrain_reads_coarser_and_the_model_maps_and_suggests_the_same_way(tmp_path, scene):
    import rasterio

    from jem_core.mapping import map_raster

    lines: list[str] = []
    retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt", config=tiny_config(epochs=1),
            unlabelled_count=8, log=lines.append)
    assert any("at 1/2 of their resolution" in line for line in lines)
    model = load_model(tmp_path / "m.pt")
    assert model.meta.coarsen == RETRAIN_DEFAULTS.coarsen == 2
    # The 96 px, 10 m scene is mapped on its 48 px, 20 m reading, and suggested patches cover 2 × 16 px.
    map_raster(model, scene, tmp_path / "classes.tif", stride=PATCH // 2, resolution="input")
    with rasterio.open(tmp_path / "classes.tif") as mapped:
        assert (mapped.width, mapped.height, mapped.transform.a) == (48, 48, 2 * PIXEL)
    (first,) = suggest(model, scene, 1)
    assert first.bounds[2] - first.bounds[0] == pytest.approx(2 * PATCH * PIXEL)
    # A second round from it keeps its reading unless told otherwise; a model read as-is gets the default.
    assert reading_coarsen(model.meta) == 2 and reading_coarsen(model.meta, 1) == 1
    assert reading_coarsen(None) == reading_coarsen(ModelMeta(["a"], ["red"], PATCH, [0.0], [1.0])) == 2
    with pytest.raises(JEMError, match="whole number ≥ 1"):
        reading_coarsen(None, 0)


def test_a_raster_too_small_at_the_coarser_reading_gets_one_message_naming_the_finer_one(tmp_path):
    small = write_scene(tmp_path / "small.tif", size=24)  # 24 px read at 1/2 = 12 px, under a 16 px patch
    annotations = [point("field", 6, 12), point("town", 18, 12)]
    with pytest.raises(JEMError, match=r"12×12 px when read coarser \(read at 1/2 .*: 24 × 24 px read as 12 × 12\)"
                                       r".*--coarsen 1"):
        retrain([small], annotations, config=tiny_config(epochs=1), unlabelled_count=8, coarsen=2)


def test_uncertainty_scores():
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [3.0, 3.0, -5.0]])
    s = uncertainty_scores(logits)
    assert s["entropy"][0] == pytest.approx(math.log(3), abs=1e-5)
    assert s["entropy"][1] < 0.01 and s["margin"][1] > 0.99 and s["margin"][2] == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(s["neg_energy"], torch.logsumexp(logits, 1))
    assert percentile_rank(torch.tensor([5.0, 1.0, 3.0])).tolist() == [1.0, 0.0, 0.5]


def test_spread_selection_keeps_the_minimum_distance_and_prefers_high_scores():
    positions = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 2.0], [30.0, 30.0]])
    score = torch.tensor([0.9, 0.95, 0.5, 0.6, 0.1])
    assert spread_selection(score, positions, 3, min_distance=5.0) == [1, 3, 4]
    assert spread_selection(score, positions, 5, min_distance=0.0) == [1, 0, 3, 2, 4]


def test_spread_selection_goes_round_the_predicted_classes():
    score = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1])
    positions = torch.tensor([[0.0, float(10 * i)] for i in range(5)])
    classes = torch.tensor([0, 0, 0, 1, 2])  # the three best are all class 0
    assert spread_selection(score, positions, 3, min_distance=0.0) == [0, 1, 2]
    assert spread_selection(score, positions, 3, min_distance=0.0, groups=classes) == [0, 3, 4]
    assert spread_selection(score, positions, 5, min_distance=5.0, groups=classes) == [0, 3, 4, 1, 2]


def test_suggest_returns_spread_scored_patches(tmp_path, scene):
    result = retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt", config=tiny_config(epochs=1),
                     unlabelled_count=8, coarsen=1)
    suggestions = suggest(tmp_path / "m.pt", scene, 4, min_distance=2 * PATCH, balance_classes=False)
    assert [s.rank for s in suggestions] == [1, 2, 3, 4]
    assert [s.score for s in suggestions] == sorted((s.score for s in suggestions), reverse=True)
    for s in suggestions:
        assert 0.0 <= s.unfamiliarity <= 1.0 and 0.0 <= s.uncertainty <= 1.0
        assert s.score == pytest.approx((s.unfamiliarity + s.uncertainty) / 2)
        assert s.predicted_class in result.class_names and 0.0 <= s.margin <= 1.0
        assert s.bounds[2] - s.bounds[0] == pytest.approx(PATCH * PIXEL)
        assert (s.x, s.y) == pytest.approx(((s.bounds[0] + s.bounds[2]) / 2, (s.bounds[1] + s.bounds[3]) / 2))
    centres = torch.tensor([[s.row, s.col] for s in suggestions], dtype=torch.float64)
    distances = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e9
    assert distances.min() >= 2 * PATCH
    # 36 non-overlapping patches in the 96 px scene; the best-scoring one is always suggested first.
    everything = suggest(result.loaded, scene, 36, min_distance=0)
    assert len(everything) == 36
    assert everything[0].score == max(s.score for s in everything)
    with pytest.raises(JEMError, match="COUNT must be at least 1"):
        suggest(result.loaded, scene, 0)


def overlaps(suggestion, col: float, row: float) -> bool:
    """Does the suggested patch overlap the PATCH-px patch centred on pixel (col, row)?"""
    return abs(suggestion.col + PATCH / 2 - col) < PATCH and abs(suggestion.row + PATCH / 2 - row) < PATCH


def test_suggest_skips_the_patches_labelled_already(tmp_path, scene):
    result = retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt", config=tiny_config(epochs=1),
                     unlabelled_count=8, coarsen=1)
    best_two = suggest(result.loaded, scene, 2, min_distance=0)
    labelled = [(s.x, s.y) for s in best_two]
    # Labels on two of the 36 grid patches: the other 34 remain, none of them the labelled two.
    rest = suggest(result.loaded, scene, 36, min_distance=0, labelled=labelled)
    assert len(rest) == 34 and not {(s.row, s.col) for s in rest} & {(s.row, s.col) for s in best_two}
    # A point between grid patches labels the patch centred on it, which overlaps four grid patches.
    between = suggest(result.loaded, scene, 36, min_distance=0, labelled=[at(32, 32)])
    assert len(between) == 32 and not any(overlaps(s, 32, 32) for s in between)
    everywhere = [at(col + PATCH / 2, row + PATCH / 2) for row in range(0, 96, PATCH) for col in range(0, 96, PATCH)]
    with pytest.raises(JEMError, match="overlaps a labelled one"):
        suggest(result.loaded, scene, 1, labelled=everywhere)


def write_points_geojson(path: Path, rows: list[tuple[str, float, float]]) -> Path:
    """Annotation points in WGS 84 (the raster is in UTM 33N): the CLI must reproject them."""
    from rasterio.warp import transform as reproject

    xs, ys = zip(*(at(col, row) for _, col, row in rows))
    lons, lats = reproject("EPSG:32633", "EPSG:4326", xs, ys)
    features = [{"type": "Feature", "properties": {"landcover": name},
                 "geometry": {"type": "Point", "coordinates": [lon, lat]}}
                for (name, _, _), lon, lat in zip(rows, lons, lats)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_cli_retrain_then_suggest(tmp_path, scene, capsys):
    from osgeo import ogr

    from jem_core.cli import main

    points = write_points_geojson(tmp_path / "points.geojson", [("field", 12, 20), ("field", 20, 70),
                                                                 ("town", 70, 20), ("town", 80, 75)])
    args = ["retrain", str(scene), "--annotations", str(points), "--class-field", "landcover", "--out",
            str(tmp_path / "m.pt"), "--minutes", "0", "--iterations", "2", "--unlabelled", "16", "--image-size",
            str(PATCH), "--arch", "wrn-10-1", "--device", "cpu", "--from-scratch", "--coarsen", "1"]
    assert main(args) == 0
    assert load_model(tmp_path / "m.pt").meta.class_names == ["field", "town"]
    assert main(args[:4] + ["--class-field", "class"] + args[6:]) == 2
    assert "no field 'class'" in capsys.readouterr().err

    assert main(["suggest", str(tmp_path / "m.pt"), str(scene), "--count", "3", "--out",
                 str(tmp_path / "s.gpkg")]) == 0
    dataset = ogr.Open(str(tmp_path / "s.gpkg"))  # keep it referenced while its layer is read
    layer = dataset.GetLayer(0)
    ranks = sorted(feature.GetField("rank") for feature in layer)
    assert ranks == [1, 2, 3] and layer.GetSpatialRef().GetAuthorityCode(None) == "32633"

    # Every patch, then every patch but those overlapping a labelled one (WGS 84 points, reprojected).
    def suggested_footprints(*options: str) -> list[list[float]]:
        assert main(["suggest", str(tmp_path / "m.pt"), str(scene), "--count", "100", "--min-distance", "0",
                     "--json", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.geojson"), *options]) == 0
        return [s["bounds"] for s in json.loads((tmp_path / "s.json").read_text())]

    def on_a_label(footprints: list[list[float]]) -> int:
        return sum(xmin <= x < xmax and ymin < y <= ymax for xmin, ymin, xmax, ymax in footprints
                   for x, y in (at(12, 20), at(20, 70), at(70, 20), at(80, 75)))

    everything = suggested_footprints()
    assert on_a_label(everything) == 4
    left = suggested_footprints("--annotations", str(points), "--class-field", "landcover")
    assert on_a_label(left) == 0 and 0 < len(left) < len(everything)


def test_annotation_points_for_points_and_polygons():
    from jem_core.active import annotation_points

    assert [(a.x, a.y) for a in annotation_points("field", 10, 10, points=[(1.0, 2.0), (3.0, 4.0)])] == \
        [(1.0, 2.0), (3.0, 4.0)]
    # A 30 × 10 box of 10-unit cells whose left third is outside the polygon: the two cells inside.
    inside = annotation_points("town", 10, 10, bounds=(0, 0, 30, 10), contains=lambda x, y: x > 10,
                               inner_point=lambda: (20.0, 5.0))
    assert [(a.class_name, a.x, a.y) for a in inside] == [("town", 15.0, 5.0), ("town", 25.0, 5.0)]
    # A sliver no cell centre falls in: the patch at its inner point.
    sliver = annotation_points("road", 10, 10, bounds=(0, 0, 30, 10), contains=lambda x, y: False,
                               inner_point=lambda: (12.0, 3.0))
    assert [(a.x, a.y) for a in sliver] == [(12.0, 3.0)]
