"""The paper's science as features: OOD analysis, SGLD sample grids, report, JEM + consistency, CLI."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from jem_core import Cancelled, JEMError
from jem_core.cli import main as cli_main
from jem_core.data import load_class_folder
from jem_core.distances import auroc
from jem_core.generation import sample_grid
from jem_core.model_file import load_model
from jem_core.ood import (
    BOOTSTRAP_ROUNDS,
    choose_shrinkage,
    cross_fitted_familiarity,
    ood_analysis,
    shrunk_gaussian,
    source_kind,
    squared_distances,
)
from jem_core.pseudo_labels import SelfAdaptiveThreshold, consistency_loss
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig, strong_augment, train
from tests.conftest import make_class_folder, write_image

SIZE = 16


def tiny_config(**overrides) -> TrainConfig:
    base = dict(arch="wrn-10-1", image_size=SIZE, epochs=2, batch_size=16, sgld_batch_size=8, warmup_iters=2,
                patience=None, sgld=SGLDConfig(buffer_size=60, steps=2))
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny JEM and CE baseline on 3 synthetic classes, plus data to compare with."""
    root = tmp_path_factory.mktemp("science")
    data = make_class_folder(root / "scenes", classes=3, per_class=10, size=SIZE)
    dataset = load_class_folder(data, SIZE)
    paths = {"data": data, "jem": root / "jem.pt", "ce": root / "ce.pt", "root": root}
    train(dataset, tiny_config(epochs=1), paths["jem"])
    train(dataset, tiny_config(epochs=1, baseline=True), paths["ce"])
    # Other data: a flat folder of noise images and a raster with a nodata corner.
    rng = np.random.default_rng(5)
    noise = root / "noise"
    noise.mkdir()
    for i in range(6):
        write_image(noise / f"n{i}.png", rng.integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8))
    raster = rng.integers(1, 255, (3, 3 * SIZE, 2 * SIZE), dtype=np.uint8)
    raster[:, :SIZE, :SIZE] = 0
    paths["raster"] = root / "scene.tif"
    write_raster_with_nodata(paths["raster"], raster)
    return paths


def write_raster_with_nodata(path: Path, pixels: np.ndarray) -> None:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1],
                           count=pixels.shape[0], dtype=pixels.dtype, nodata=0) as dst:
            dst.write(pixels)


# ---------------------------------------------------------------- OOD analysis
def test_ood_analysis_scores_every_kind_of_source(trained, tmp_path):
    messages = []
    result = ood_analysis(trained["jem"], trained["data"], [trained["data"], trained["root"] / "noise",
                                                            trained["raster"]],
                          json_path=tmp_path / "ood.json", plot_path=tmp_path / "ood.png",
                          progress=lambda f, m: messages.append(f))
    assert result["reference"]["split"] == "train" and result["reference"]["count"] == 21  # 70 % of 30
    assert result["statistic"] == "layers" and set(result["statistics"]) == {"layers", "energy"}
    compare = result["compare"]
    assert list(compare) == ["scenes (2)", "noise", "scene.tif"]
    assert compare["scenes (2)"]["count"] == 30 and compare["noise"]["count"] == 6
    assert compare["scene.tif"]["count"] == 5  # 3 × 2 patches, the nodata one skipped
    assert [compare[n]["kind"] for n in compare] == ["class-folder", "image-folder", "raster"]
    for block in result["statistics"].values():
        for entry in block["compare"].values():
            assert entry["kl_to_reference"] >= 0 and 0 <= entry["auroc"] <= 1
            low, high = entry["auroc_interval"]
            assert 0 <= low <= high <= 1 and entry["kl_interval"][0] <= entry["kl_interval"][1]
    # The same data as the reference overlaps it far more than uniform noise does, by either score.
    for block in result["statistics"].values():
        assert block["compare"]["scenes (2)"]["kl_to_reference"] < block["compare"]["noise"]["kl_to_reference"]
    assert compare["noise"]["auroc"] == result["statistics"]["layers"]["compare"]["noise"]["auroc"]
    # Every set here is small, and each says so.
    assert len(result["warnings"]) == 4 and all("biased upwards" in w for w in result["warnings"])
    saved = json.loads((tmp_path / "ood.json").read_text())
    assert saved["compare"]["noise"]["auroc"] == pytest.approx(compare["noise"]["auroc"])
    energy = saved["statistics"]["energy"]
    assert sum(energy["histograms"]["noise"]) == 6 and len(energy["bins"]) == 51
    assert (tmp_path / "ood.png").read_bytes()[:4] == b"\x89PNG"
    assert messages[-1] == 1.0 and messages == sorted(messages)


def test_ood_reference_splits_and_pixels(trained):
    model = load_model(trained["jem"])
    pixels = torch.rand(4, 3, SIZE, SIZE) * 255
    result = ood_analysis(model, trained["data"], [("random", pixels)], reference_split="train")
    assert result["reference"]["split"] == "train" and result["reference"]["count"] == 21
    assert result["compare"]["random"]["count"] == 4
    other = make_class_folder(trained["root"] / "other_classes", classes=2, per_class=10, size=SIZE, seed=3)
    result = ood_analysis(model, other, [("random", pixels)])
    assert result["reference"]["split"].startswith("all") and result["reference"]["count"] == 20


def test_ood_errors_are_clear(trained, tmp_path):
    with pytest.raises(JEMError, match="does not exist"):
        ood_analysis(trained["jem"], trained["data"], [tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(JEMError, match="holds no images"):
        source_kind(tmp_path / "empty")
    with pytest.raises(JEMError, match="Nothing to compare"):
        ood_analysis(trained["jem"], trained["data"], [])
    with pytest.raises(JEMError, match="only 6 images.*split 'train' or 'all'"):
        ood_analysis(trained["jem"], trained["data"], [trained["root"] / "noise"], reference_split="test")
    with pytest.raises(JEMError, match="Unknown OOD statistic 'density'. Choose one of: layers, energy"):
        ood_analysis(trained["jem"], trained["data"], [trained["root"] / "noise"], statistic="density")
    with pytest.raises(JEMError, match="bands"):
        ood_analysis(trained["jem"], trained["data"], [("gray", torch.zeros(2, 1, SIZE, SIZE))])
    with pytest.raises(Cancelled):
        ood_analysis(trained["jem"], trained["data"], [trained["root"] / "noise"], json_path=tmp_path / "x.json",
                     should_stop=lambda: True)
    assert not (tmp_path / "x.json").exists()


def test_squared_mahalanobis_distance_by_hand():
    fit = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    # Mean 0, covariance diag(2/3, 8/3): (1, 1) is 1.5 + 0.375 = 1.875 away.
    assert squared_distances(shrunk_gaussian(fit, 0.0), torch.tensor([[1.0, 1.0]], dtype=torch.float64)).item() == \
        pytest.approx(1.875)
    # A constant channel does not make the covariance singular.
    flat = torch.cat([fit, torch.ones(4, 1, dtype=torch.float64)], 1)
    assert torch.isfinite(squared_distances(shrunk_gaussian(flat, 0.0), flat)).all()


def test_shrinkage_is_chosen_by_held_out_likelihood_on_the_reference():
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    plenty = torch.randn(4000, 40, generator=generator, dtype=torch.float64) @ mixing  # correlated statistics
    few = plenty[:30]  # fewer images than statistics: the plain covariance is singular
    assert choose_shrinkage(plenty, torch.arange(4000) % 5) <= 1e-3
    assert choose_shrinkage(few, torch.arange(30) % 5) >= 0.1


def test_cross_fitting_scores_in_domain_like_the_reference_and_shifted_data_lower():
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    same = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    shifted = torch.randn(300, 6, generator=generator, dtype=torch.float64) * 2 + 1
    ref_scores, (same_scores, shifted_scores), _ = cross_fitted_familiarity(reference, [same, shifted],
                                                                            torch.Generator().manual_seed(0))
    assert auroc(ref_scores, same_scores) == pytest.approx(0.5, abs=0.06)
    assert auroc(ref_scores, shifted_scores) > 0.9


def test_ood_interval_covers_the_estimate_and_is_reproducible(trained):
    model = load_model(trained["jem"])
    pixels = torch.rand(40, 3, SIZE, SIZE) * 255
    first = ood_analysis(model, trained["data"], [("random", pixels)])
    again = ood_analysis(model, trained["data"], [("random", pixels)])
    entry = first["compare"]["random"]
    assert entry["auroc_interval"][0] <= entry["auroc"] <= entry["auroc_interval"][1]
    assert entry == again["compare"]["random"]
    assert str(BOOTSTRAP_ROUNDS) in first["interval_definition"]


# ---------------------------------------------------------------- generation
def test_sample_grid_with_quality_score(trained, tmp_path):
    result = sample_grid(trained["jem"], tmp_path / "grid.png", per_class=2, steps=3, data=trained["data"],
                         feature_model=trained["ce"], json_path=tmp_path / "samples.json", unconditional_count=4)
    assert result["steps"] == 3 and result["init"].startswith("informative")
    assert 0 <= result["conditional"]["classified_as_their_class"] <= 1
    assert sum(result["unconditional"]["predicted_classes"].values()) == 4
    quality = result["quality"]
    assert quality["count"] == 10 and "NOT Inception" in quality["feature_space"]
    assert "small-sample bias" in quality["warning"]  # 10 samples, 64-d features
    assert "ce.pt" in quality["feature_space"]
    for key in ("samples", "init", "real"):
        assert quality[key]["frechet"] >= 0 and np.isfinite(quality[key]["kernel"])
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "samples.json").read_text())["quality"]["samples"]["frechet"] == \
        pytest.approx(quality["samples"]["frechet"])


def test_sample_grid_without_data_uses_uniform_init_and_no_score(trained, tmp_path):
    result = sample_grid(trained["jem"], tmp_path / "grid.png", per_class=1, steps=2, unconditional=False)
    assert result["init"] == "uniform noise" and "quality" not in result and "unconditional" not in result
    with pytest.raises(JEMError, match="Nothing to sample"):
        sample_grid(trained["jem"], tmp_path / "g.png", conditional=False, unconditional=False)
    with pytest.raises(Cancelled):
        sample_grid(trained["jem"], tmp_path / "g2.png", per_class=1, steps=2, should_stop=lambda: True)
    assert not (tmp_path / "g2.png").exists()


def test_sgld_samples_move_towards_lower_energy(trained):
    """Longer chains must lower the class energy E(x, y) of their samples: the sampler does its job."""
    from jem_core.generation import run_chains, sgld_config

    model = load_model(trained["jem"])
    config = sgld_config(model, 20, step_size=1.0, noise=0.0)
    labels = torch.arange(3).repeat(4)
    starts = torch.rand(12, 3, SIZE, SIZE) * 2 - 1
    samples = run_chains(model, starts, labels, config, 64, lambda work: None, None)
    with torch.no_grad():
        assert model.model.class_energy(samples, labels).mean() < model.model.class_energy(starts, labels).mean()


# ---------------------------------------------------------------- JEM + consistency
def test_consistency_loss_uses_only_confident_pseudo_labels():
    weak = torch.tensor([[10.0, 0.0], [0.0, 0.1]])  # first confident (class 0), second not
    strong = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    loss, rate = consistency_loss(weak, strong, threshold=0.95)
    # Only image 0 counts: CE of uniform logits towards class 0 = ln 2, averaged over the batch of 2.
    assert rate.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(np.log(2) / 2, rel=1e-5)
    assert consistency_loss(weak, strong, threshold=1.0)[0].item() == 0.0


def test_self_adaptive_thresholds_follow_the_model_and_lower_the_bar_for_rare_classes():
    adaptive = SelfAdaptiveThreshold(3, torch.device("cpu"))
    # A model that is 60 % sure and predicts class 0 most: a fixed 0.95 bar would pass nothing.
    probabilities = torch.tensor([[0.6, 0.2, 0.2]] * 6 + [[0.2, 0.6, 0.2]] * 2)
    for _ in range(500):
        bars = adaptive.update(probabilities)
    assert adaptive.level.item() == pytest.approx(0.6, abs=0.01)
    assert bars[0].item() == pytest.approx(0.6, abs=0.01) and bars[-1].item() < bars[0].item()
    weak = probabilities.log()
    loss, rate = consistency_loss(weak, torch.zeros_like(weak), None, adaptive)
    assert rate.item() == 1.0 and loss.item() > 0
    assert consistency_loss(weak, torch.zeros_like(weak), 0.95)[1].item() == 0.0


def test_strong_augment_changes_images_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.randn(5, 4, SIZE, SIZE)
    y = strong_augment(x)
    assert y.shape == x.shape and not torch.allclose(x, y)


def test_consistency_training_runs_for_jem_and_baseline(trained):
    dataset = load_class_folder(trained["data"], SIZE)
    for baseline in (False, True):
        config = tiny_config(epochs=1, labels_per_class=2, baseline=baseline, consistency_weight=1.0,
                             consistency_threshold=0.3, consistency_rampup=0.0)
        result = train(dataset, config)
        assert result.metrics["iterations"] >= 1 and result.loaded.meta.train_config["consistency_weight"] == 1.0
        # The term is not zero: the same seeded run with a vanishing weight (same code path, same random
        # streams) ends with other weights.  A term that never fires (no pseudo-label above the threshold)
        # would leave the two runs identical.
        vanishing = train(dataset, replace(config, consistency_weight=1e-12))
        moved = max((a - b).abs().max().item() for a, b in zip(result.loaded.model.state_dict().values(),
                                                                vanishing.loaded.model.state_dict().values()))
        assert moved > 1e-4, f"consistency term had no effect (baseline={baseline})"
    # The ramp-up reaches the step: ramped over the whole run, the term weighs less and the weights differ.
    ramped = train(dataset, replace(config, consistency_rampup=1.0))
    assert max((a - b).abs().max().item() for a, b in zip(result.loaded.model.state_dict().values(),
                                                          ramped.loaded.model.state_dict().values())) > 1e-6
    with pytest.raises(JEMError, match="consistency"):
        train(dataset, tiny_config(consistency_threshold=0.0))
    with pytest.raises(JEMError, match="rampup"):
        train(dataset, tiny_config(consistency_rampup=1.5))


# ---------------------------------------------------------------- report and CLI
def test_report_is_one_self_contained_html_page(trained, tmp_path):
    from jem_core.report import build_report

    out = tmp_path / "report.html"
    numbers = build_report(trained["jem"], out, data=trained["data"], baseline=trained["ce"],
                           compare=[trained["root"] / "noise"], per_class=1, steps=2)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 4
    assert "http://" not in page and "https://" not in page and 'src="' + "/" not in page
    assert set(numbers["metrics"]) == {"jem.pt", "ce.pt"}
    assert f"{numbers['metrics']['ce.pt']['ece']:.4g}" in page and "noise" in numbers["ood"]
    assert "NOT Inception" in page and "ce.pt" in numbers["samples"]["quality"]["feature_space"]
    with pytest.raises(JEMError, match="--data"):
        build_report(trained["jem"], tmp_path / "r2.html", compare=[trained["root"] / "noise"])
    assert not (tmp_path / "r2.html").exists()


def test_cli_ood_sample_and_report(trained, tmp_path, capsys):
    rc = cli_main(["ood", str(trained["jem"]), "--reference", str(trained["data"]), "--compare",
                   str(trained["root"] / "noise"), str(trained["raster"]), "--json", str(tmp_path / "ood.json"),
                   "--plot", str(tmp_path / "ood.png"), "--bins", "20"])
    assert rc == 0
    result = json.loads((tmp_path / "ood.json").read_text())
    assert set(result["compare"]) == {"noise", "scene.tif"} and len(result["statistics"]["energy"]["bins"]) == 21
    printed = capsys.readouterr()
    assert "layers: layer familiarity" in printed.out and "energy: −E(x)" in printed.out
    assert len(re.findall(r"AUROC \d\.\d{3} \[", printed.out)) == 4  # 2 sources × 2 scores, with intervals
    assert "warning: noise has only 6 images" in printed.err
    rc = cli_main(["ood", str(trained["jem"]), "--reference", str(trained["data"]), "--compare",
                   str(trained["root"] / "noise"), "--statistic", "energy", "--json", str(tmp_path / "e.json")])
    energy = json.loads((tmp_path / "e.json").read_text())
    assert rc == 0 and energy["statistic"] == "energy"
    assert energy["compare"]["noise"]["auroc"] == result["statistics"]["energy"]["compare"]["noise"]["auroc"]
    rc = cli_main(["sample", str(trained["jem"]), "--out", str(tmp_path / "s.png"), "--per-class", "1",
                   "--steps", "2", "--no-unconditional", "--json", str(tmp_path / "s.json")])
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["steps"] == 2
    rc = cli_main(["report", str(trained["jem"]), "--out", str(tmp_path / "r.html"), "--no-samples"])
    assert rc == 0 and "metrics as stored in the model file" in (tmp_path / "r.html").read_text()
    capsys.readouterr()
    rc = cli_main(["ood", str(tmp_path / "missing.pt"), "--reference", str(trained["data"]), "--compare",
                   str(trained["raster"])])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_cli_consistency_flag():
    from jem_core.cli import build_parser
    from jem_core.cli.train_cmd import config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "d", "--out", "m.pt"])).consistency_weight == 0.0
    config = config_from_args(parse(["train", "d", "--out", "m.pt", "--consistency"]))
    assert config.consistency_weight == 1.0 and config.consistency_threshold is None  # self-adaptive
    config = config_from_args(parse(["train", "d", "--out", "m.pt", "--consistency", "0.5",
                                     "--consistency-threshold", "0.8"]))
    assert (config.consistency_weight, config.consistency_threshold) == (0.5, 0.8)
    assert config.consistency_rampup == TrainConfig().consistency_rampup
    config = config_from_args(parse(["train", "d", "--out", "m.pt", "--consistency", "--consistency-rampup", "0.4"]))
    assert config.consistency_rampup == 0.4


def test_consistency_rampup_scales_the_term_with_the_run():
    from jem_core.training import consistency_ramp

    ramped = TrainConfig(consistency_weight=1.0, consistency_rampup=0.5)
    assert [consistency_ramp(ramped, p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    assert consistency_ramp(TrainConfig(consistency_weight=1.0, consistency_rampup=0.0), 0.0) == 1.0  # no ramp
