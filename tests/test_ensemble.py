"""Ensembles: several networks trained apart, used as one model (retrain's default)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jem_core import JEMError
from jem_core.active.retrain import RETRAIN_DEFAULTS, default_members, retrain
from jem_core.cli import main as cli_main
from jem_core.data import SceneDataset
from jem_core.model_file import LoadedModel, ModelMeta, load_model, model_payload, save_model
from jem_core.models import JEM, JEMEnsemble, ModelSpec, build_model, ensemble_of, networks
from jem_core.ood import embed
from jem_core.training import train
from tests.test_active import PATCH, point, tiny_config, two_class_annotations, write_scene

SPEC = ModelSpec(arch="wrn-10-1", in_channels=3, num_classes=4)


def ensemble(members: int = 3) -> JEMEnsemble:
    torch.manual_seed(0)
    return ensemble_of([build_model(SPEC) for _ in range(members)]).eval()


def test_the_ensemble_is_the_mean_of_its_members_in_p_y_given_x_and_in_energy():
    model, x = ensemble(), torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        logits = torch.stack([member(x) for member in model.members])
        combined = model(x)
        assert torch.allclose(combined.softmax(1), logits.softmax(2).mean(0), atol=1e-6)
        assert torch.allclose(model.energy(x), JEM.energy_from_logits(logits.flatten(0, 1)).view(3, 5).mean(0),
                              atol=1e-5)
        # The members differ, so their mean is not any one of them.
        assert not torch.allclose(combined.softmax(1), logits[0].softmax(1), atol=1e-3)


def test_ensemble_files_round_trip_and_single_networks_keep_the_old_format(tmp_path):
    model, x = ensemble(2), torch.randn(4, 3, 16, 16)
    assert model_payload(model, meta_for(model))["format_version"] == 2
    save_model(tmp_path / "e.pt", model, meta_for(model))
    loaded = load_model(tmp_path / "e.pt")
    assert isinstance(loaded.model, JEMEnsemble) and loaded.spec.members == 2
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-5)
    single = build_model(SPEC)
    payload = model_payload(single, meta_for(single))
    assert payload["format_version"] == 1 and "members" not in payload["spec"]


def meta_for(model: torch.nn.Module) -> ModelMeta:
    return ModelMeta(class_names=list("abcd"), band_names=["r", "g", "b"], image_size=16, mean=[0.0] * 3,
                     std=[1.0] * 3)


def test_familiarity_and_layer_statistics_of_an_ensemble_come_from_every_member():
    model = ensemble(2)
    loaded = LoadedModel(model, meta_for(model))
    pixels = torch.rand(6, 3, 16, 16)
    statistics, familiarity = embed(loaded, pixels, batch_size=4)
    with torch.no_grad():
        assert torch.allclose(familiarity.float(), -model.energy(pixels), atol=1e-4)
        single_statistics, _ = embed(LoadedModel(model.members[0], loaded.meta), pixels, batch_size=4)
    assert statistics.shape[1] == 2 * single_statistics.shape[1]
    assert model.penultimate(pixels).shape[1] == 2 * model.members[0].penultimate(pixels).shape[1]


def test_retrain_trains_members_apart_on_shares_of_the_run_and_writes_one_model(tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    lines: list[str] = []
    fractions: list[float] = []
    result = retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt", members=2,
                     config=tiny_config(epochs=None, iterations=6), unlabelled_count=24, log=lines.append,
                     progress=lambda fraction, message: fractions.append(fraction))
    assert result.metrics["member_iterations"] == [3, 3] and result.metrics["iterations"] == 6
    assert any(line.startswith("[network 2 of 2]") for line in lines)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    saved = load_model(tmp_path / "m.pt")
    assert saved.spec.members == 2 and saved.meta.train_config["members"] == 2
    first, second = (network.state_dict() for network in networks(saved.model))
    assert any(not torch.equal(first[name], second[name]) for name in first)  # own seeds, own draws

    # Round 2 from the ensemble: every member is fine-tuned (a new class extends each head).
    again = retrain([scene], two_class_annotations() + [point("water", 40, 85)], start_model=tmp_path / "m.pt",
                    members=2, config=tiny_config(epochs=None, iterations=4), unlabelled_count=16)
    assert again.loaded.spec.members == 2 and again.class_names == ["field", "town", "water"]
    single = retrain([scene], two_class_annotations(), start_model=tmp_path / "m.pt", members=1,
                     config=tiny_config(epochs=None, iterations=2), unlabelled_count=16)
    assert isinstance(single.loaded.model, JEM)


def test_training_refuses_an_ensemble_to_fine_tune_and_retrain_refuses_zero_members(tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    model = ensemble(2)
    data = SceneDataset(torch.rand(8, 3, 16, 16) * 255, torch.tensor([0, 1, 2, 3] * 2), list("abcd"),
                        ["r", "g", "b"], [0.0, 255.0], [])
    with pytest.raises(JEMError, match="ensemble of 2 networks"):
        train(data, tiny_config(), start_model=LoadedModel(model, meta_for(model)))
    with pytest.raises(JEMError, match="members must be at least 1"):
        retrain([scene], two_class_annotations(), members=0, config=tiny_config())
    with pytest.raises(JEMError, match="at least one member"):
        ModelSpec(members=0)


def test_two_networks_when_fine_tuning_one_for_a_new_network_unless_told(tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    new = retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt",
                  config=tiny_config(epochs=None, iterations=2), unlabelled_count=16)
    assert isinstance(new.loaded.model, JEM) and new.metrics["iterations"] == 2
    fine_tuned = retrain([scene], two_class_annotations(), start_model=tmp_path / "m.pt",
                         config=tiny_config(epochs=None, iterations=2), unlabelled_count=16)
    assert fine_tuned.loaded.spec.members == RETRAIN_DEFAULTS.members == 2
    assert default_members(None) == RETRAIN_DEFAULTS.members_from_scratch == 1


def test_cli_retrain_help_names_the_members_defaults():
    shown = subprocess.run([sys.executable, "-m", "jem_core", "retrain", "--help"], capture_output=True,
                           text=True, check=True).stdout
    text = " ".join(shown[shown.rindex("--members"):].split())[:700]
    assert "Default: 2 when fine-tuning a model" in text and "1 for a new network" in text


def test_an_extra_dataset_joins_every_members_unlabelled_draw_or_is_refused(tmp_path):
    scene = write_scene(tmp_path / "scene.tif")
    extra = SceneDataset(torch.rand(5, 3, PATCH, PATCH) * 255, torch.zeros(5, dtype=torch.long), ["x"],
                         ["r", "g", "b"], [0.0, 255.0], [])
    alone = retrain([scene], two_class_annotations(), members=2, config=tiny_config(epochs=None, iterations=2),
                    unlabelled_count=16)
    joined = retrain([scene], two_class_annotations(), members=2, extra_dataset=extra,
                     config=tiny_config(epochs=None, iterations=2), unlabelled_count=16)
    assert joined.unlabelled_count == alone.unlabelled_count + 5
    wrong = SceneDataset(torch.rand(5, 3, PATCH + 2, PATCH + 2), torch.zeros(5, dtype=torch.long), ["x"],
                         ["r", "g", "b"], [0.0, 255.0], [])
    with pytest.raises(JEMError, match="Use matching data"):
        retrain([scene], two_class_annotations(), members=2, extra_dataset=wrong, config=tiny_config(),
                unlabelled_count=16)


def test_an_ensembles_metrics_are_its_own_and_its_report_says_it_has_no_test_split(tmp_path, capsys):
    scene = write_scene(tmp_path / "scene.tif")
    result = retrain([scene], two_class_annotations(), out_model=tmp_path / "m.pt", members=2,
                     config=tiny_config(epochs=None, iterations=4), unlabelled_count=16)
    assert result.metrics["stop_reason"] == "network 1: 2 iterations done; network 2: 2 iterations done"
    assert "best_epoch" not in result.metrics and result.metrics["recoveries"] == 0
    assert cli_main(["report", str(tmp_path / "m.pt"), "--out", str(tmp_path / "r.html"), "--no-samples"]) == 0
    shown = capsys.readouterr().out
    assert "no test split" in shown and "accuracy 0.0" not in shown
    assert "trained without a test split" in (tmp_path / "r.html").read_text()
