"""Label agreement: the distances behind it, the model file that carries it, and the map's confidence with it."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from test_ensemble import ensemble, meta_for
from test_mapping import PATCH, model_path, read, scene, write_raster  # noqa: F401  (model_path is a fixture)

from jem_core import JEMError
from jem_core.active.retrain import retrain
from jem_core.label_agreement import AGREEMENT_PLACES, FARTHEST, LabelledFeatures, even_draw, labelled_features
from jem_core.mapping import map_raster
from jem_core.model_file import LoadedModel, load_model, save_model
from jem_core.models import feature_count
from tests.test_active import tiny_config, two_class_annotations, write_scene


def bank(classes: int = 3, per_class: int = 4, dimensions: int = 6, seed: int = 0, ring: int = 1) -> LabelledFeatures:
    """per_class places of each class, each of `ring` patches."""
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(classes * per_class * ring, dimensions, generator=generator), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class * ring)
    return LabelledFeatures(features, labels, torch.arange(classes * per_class).repeat_interleave(ring), classes)


def test_log_agreement_is_minus_sharpness_times_the_log_mean_distance_to_each_class_nearest_places():
    labelled = bank(classes=4, per_class=3, ring=3)
    labelled.labels[labelled.labels == 2] = 0  # class 2 has no labelled place left
    labelled.labels[labelled.places == 9] = 1  # class 3 has one place left, fewer than AGREEMENT_PLACES
    labelled.labels[labelled.places == 10] = 1
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    got = labelled.log_agreement(x)
    for i in range(5):
        distances = 1 - F.normalize(x[i].double(), dim=0) @ labelled.features.double().T
        for k in range(4):
            places = labelled.places[labelled.labels == k].unique().tolist()
            by_place = sorted(float(distances[labelled.places == a].min()) for a in places)[:AGREEMENT_PLACES]
            nearest = np.mean(by_place) if by_place else FARTHEST
            assert float(got[i, k]) == pytest.approx(-labelled.sharpness * np.log(nearest), abs=1e-4)
    assert len(by_place) == 1 and AGREEMENT_PLACES > 1  # class 3's distance is that of its one place


def test_the_copies_of_one_place_back_its_class_once():
    """Two places of class 0 far apart and one of class 1: a patch on one class-0 place is backed by the
    other class-0 place too, however many copies the first has."""
    features = F.normalize(torch.tensor([[1.0, 0.0, 0.0]] * 5 + [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    labelled = LabelledFeatures(features, torch.tensor([0] * 6 + [1]), torch.tensor([0] * 5 + [1, 2]), 2)
    d = (1 - torch.tensor([[1.0, 0.0, 0.0]]) @ features.T)[0]
    got = labelled.log_agreement(torch.tensor([[1.0, 0.0, 0.0]]))
    assert float(got[0, 0]) == pytest.approx(-labelled.sharpness * np.log(float(d[0] + d[5]) / 2), abs=1e-4)


def test_the_class_of_the_nearest_labelled_patches_agrees_most():
    labelled = bank(per_class=1)  # one labelled patch per class: q_k ∝ d_k^-s of that patch
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    nearest_class = labelled.labels[(F.normalize(x, dim=1) @ labelled.features.T).argmax(1)]
    assert torch.equal(labelled.log_agreement(x).softmax(1).argmax(1), nearest_class)


def test_a_patch_on_a_labelled_one_gets_a_finite_score():
    labelled = bank()
    assert torch.isfinite(labelled.log_agreement(labelled.features * 3)).all()


@pytest.mark.parametrize(("counts", "limit", "expected"), [
    ((5, 5), 20, (5, 5)), ((2, 30, 30), 20, (2, 9, 9)), ((10, 10, 10), 12, (4, 4, 4)), ((1, 50), 8, (1, 7))])
def test_even_draw_keeps_everything_that_fits_and_shares_the_rest_evenly(counts, limit, expected):
    labels = torch.cat([torch.full((count,), c) for c, count in enumerate(counts)])
    kept = even_draw(labels, limit, seed=1)
    assert tuple(torch.bincount(labels[kept], minlength=len(counts)).tolist()) == expected
    assert len(set(kept.tolist())) == len(kept)
    assert torch.equal(kept, even_draw(labels, limit, seed=1))


def test_labelled_features_are_the_models_pooled_features_of_the_normalised_pixels():
    model = ensemble(2)
    loaded = LoadedModel(model, meta_for(model))
    pixels, labels = torch.rand(7, 3, 16, 16) * 255, torch.tensor([0, 1, 2, 3, 0, 1, 2])
    labelled = labelled_features(loaded, pixels, labels)
    with torch.no_grad():
        expected = F.normalize(model.penultimate(loaded.normalise(pixels)), dim=1)
        logits, features = model.logits_and_features(loaded.normalise(pixels))
        assert torch.allclose(logits, model(loaded.normalise(pixels)), atol=1e-6)
    assert torch.allclose(labelled.features, expected, atol=1e-5)
    assert torch.allclose(F.normalize(features, dim=1), expected, atol=1e-5)
    assert torch.equal(labelled.labels, labels) and labelled.features.shape[1] == feature_count(model)
    assert torch.equal(labelled.places, torch.arange(7))  # no places given: one per patch
    grouped = labelled_features(loaded, pixels, labels, torch.tensor([4, 7, 9, 11, 4, 7, 9]))
    assert grouped.places.tolist() == [0, 1, 2, 3, 0, 1, 2]  # numbered 0…P−1


def test_model_files_carry_labelled_features_and_refuse_broken_ones(tmp_path):
    model = ensemble(2)
    loaded = LoadedModel(model, meta_for(model))
    labels = torch.tensor([0, 1, 2, 3] * 2)
    labelled = labelled_features(loaded, torch.rand(8, 3, 16, 16) * 255, labels, torch.tensor([0, 1, 2, 3] * 2))
    save_model(tmp_path / "with.pt", model, loaded.meta, labelled)
    back = load_model(tmp_path / "with.pt").labelled
    assert torch.allclose(back.features, labelled.features) and torch.equal(back.labels, labelled.labels)
    assert torch.equal(back.places, labelled.places)
    save_model(tmp_path / "without.pt", model, loaded.meta)
    assert load_model(tmp_path / "without.pt").labelled is None
    payload = torch.load(tmp_path / "with.pt", weights_only=True)
    earlier = {"features": labelled.features, "labels": labels}  # a file written before places were stored
    payload["labelled_features"] = earlier
    torch.save(payload, tmp_path / "earlier.pt")
    assert torch.equal(load_model(tmp_path / "earlier.pt").labelled.places, torch.arange(8))
    for broken in ({"features": labelled.features[:, :5], "labels": labels},  # other dimensions
                   {"features": labelled.features, "labels": labels + 4},  # a class the model lacks
                   {"features": labelled.features * float("nan"), "labels": labels}, "junk",
                   {**earlier, "places": torch.zeros(8, dtype=torch.long)},  # one place, four classes
                   {**earlier, "places": torch.arange(8) - 1},  # a negative place
                   {**earlier, "places": torch.arange(7)}):  # not one per patch
        payload["labelled_features"] = broken
        torch.save(payload, tmp_path / "broken.pt")
        with pytest.raises(JEMError, match="broken.pt"):
            load_model(tmp_path / "broken.pt")


def direct_agreement(model_file, pixels: np.ndarray, labelled: LabelledFeatures) -> np.ndarray:
    """(rows, cols, classes) p(y|x) · q_y(x) of the non-overlapping patches, computed patch by patch."""
    loaded = load_model(model_file)
    rows, cols = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
    windows = [(r * PATCH, c * PATCH) for r in range(rows) for c in range(cols)]
    batch = torch.stack([torch.from_numpy(pixels[:, r:r + PATCH, c:c + PATCH].astype(np.float32)) for r, c in windows])
    with torch.no_grad():
        logits, features = loaded.model.logits_and_features(loaded.normalise(batch))
        support = logits.softmax(1) * labelled.log_agreement(features).softmax(1)
    return support.double().numpy().reshape(rows, cols, -1)


def test_a_map_with_label_agreement_has_p_times_q_of_the_mapped_class_as_confidence(tmp_path, model_path):  # noqa: F811
    plain = load_model(model_path)
    labelled = labelled_features(plain, torch.rand(9, 3, PATCH, PATCH) * 255, torch.tensor([0, 1, 2] * 3))
    agreeing = tmp_path / "agreeing.pt"
    save_model(agreeing, plain.model, plain.meta, labelled)
    pixels = scene(height=4 * PATCH, width=5 * PATCH, seed=3)
    raster = write_raster(tmp_path / "in.tif", pixels)
    maps = {}
    for name, model in (("plain", model_path), ("agreeing", agreeing)):
        for box in (0, 3):  # patch-size stride: one patch per cell; box 3 patches = 3 × 3 cells
            result = map_raster(model, raster, tmp_path / f"{name}{box}_c.tif", tmp_path / f"{name}{box}_conf.tif",
                                stride=PATCH, device="cpu", out_familiarity=tmp_path / f"{name}{box}_f.tif",
                                out_probabilities=tmp_path / f"{name}{box}_p.tif", confidence_box=box, stretch="none")
            maps[name, box] = {kind: read(getattr(result, kind))[0]
                               for kind in ("classes", "confidence", "familiarity", "probabilities")}
    for kind in ("classes", "familiarity", "probabilities"):  # the agreement changes the confidence only
        np.testing.assert_array_equal(maps["agreeing", 3][kind], maps["plain", 3][kind])
    support = direct_agreement(model_path, pixels, labelled)
    classes = maps["plain", 0]["classes"][0]
    own = np.take_along_axis(support, classes[..., None].astype(np.int64), 2)[..., 0]
    np.testing.assert_allclose(maps["agreeing", 0]["confidence"][0], own, atol=1e-5)
    assert not np.allclose(maps["agreeing", 0]["confidence"], maps["plain", 0]["confidence"], atol=1e-3)
    boxed = direct_box_of(support, classes, radius=1)
    np.testing.assert_allclose(maps["agreeing", 3]["confidence"][0], boxed, atol=1e-5)
    with rasterio.open(tmp_path / "agreeing3_conf.tif") as src:
        assert "label agreement" in src.tags()["jem_confidence"]
    with rasterio.open(tmp_path / "plain3_conf.tif") as src:
        assert "label agreement" not in src.tags()["jem_confidence"]


def direct_box_of(support: np.ndarray, classes: np.ndarray, radius: int) -> np.ndarray:
    """(rows, cols) mean support of each cell's mapped class over its box clipped to the raster, cell by cell."""
    rows, cols = classes.shape
    def box(i: int, j: int) -> np.ndarray:
        return support[max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1, classes[i, j]]

    return np.array([[box(i, j).mean() for j in range(cols)] for i in range(rows)])


def test_retrain_writes_its_labelled_patches_features_into_the_model(tmp_path):
    result = retrain([write_scene(tmp_path / "scene.tif")], two_class_annotations(), out_model=tmp_path / "m.pt",
                     members=2, config=tiny_config(epochs=None, iterations=4), unlabelled_count=16, label_shift=2)
    saved = load_model(tmp_path / "m.pt")
    assert saved.labelled is not None and len(saved.labelled.labels) == result.labelled_count
    assert saved.labelled.features.shape[1] == feature_count(saved.model)
    assert torch.allclose(saved.labelled.features, result.loaded.labelled.features)
    assert sorted(set(saved.labelled.labels.tolist())) == [0, 1]
    places = len(two_class_annotations())  # each annotation and its 8 shifted copies are one place
    assert saved.labelled.places.tolist() == torch.arange(places).repeat_interleave(9).tolist()
