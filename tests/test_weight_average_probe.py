"""The bench's weight-average probe scores averaged weights without changing the live run."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jem_core import training
from jem_core.data import load_class_folder
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig, train
from tests.conftest import UNTHREADED_SPEED, make_class_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from weight_average_probe import WeightAverageProbe, live_weights_kept, scored_with  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 105 validation images: enough for the run to pick its best round, as the AID runs do.
    return load_class_folder(make_class_folder(tmp_path_factory.mktemp("probe"), classes=3, per_class=70,
                                               size=SIZE), SIZE)


def base_config() -> TrainConfig:
    return TrainConfig(arch="wrn-10-1", image_size=SIZE, iterations=6, epoch_iters=2, batch_size=16,
                       sgld_batch_size=8, val_fraction=0.5, patience=None, seed=3,
                       sgld=SGLDConfig(buffer_size=60, steps=2))


def test_probe_leaves_the_live_run_alone_and_decay_zero_tracks_it(dataset, one_thread):
    # On one thread without the threaded speed-ups two identical runs match bit for bit, so the probe must leave
    # the live weights exactly as a plain run has them. With threads the runs' rounding drifted apart by up to
    # 6e-4 in six steps (CI, stop 27).
    config = replace(base_config(), speed=UNTHREADED_SPEED)
    plain = train(dataset, config)
    originals = (training.training_step, training.end_of_epoch, training.finish_run)
    with WeightAverageProbe([0.0, 0.9]) as probe:
        probed = train(dataset, config)
    assert (training.training_step, training.end_of_epoch, training.finish_run) == originals
    assert untimed(probed.metrics) == untimed(plain.metrics)
    plain_weights = plain.loaded.model.state_dict()
    assert largest_difference(probed.loaded.model.state_dict(), plain_weights) == 0.0
    assert largest_difference(probe.averages[0.9], plain_weights) > 1e-4  # the average really is elsewhere

    results = probe.results()
    live_val = [record["val_accuracy"] for record in probed.history]
    # Decay 0: the "average" is the live weights after each step, so it validates and tests like them.
    assert results["0"]["val_history"] == pytest.approx(live_val)
    assert results["0"]["accuracy"] == pytest.approx(probed.metrics["accuracy"])
    assert results["0"]["best_round"] == probed.metrics["best_epoch"]
    # A real average differs from the live weights but is scored the same way.
    assert len(results["0.9"]["val_history"]) == len(live_val)
    assert results["0.9"]["val_history"] != pytest.approx(live_val)
    assert 0.0 <= results["0.9"]["accuracy"] <= 1.0


def test_scoring_other_weights_gives_the_model_its_own_back_bit_for_bit(dataset):
    run = train(dataset, base_config())
    model = run.loaded.model
    before = {name: value.clone() for name, value in model.state_dict().items()}
    other = {name: value + 1 if value.is_floating_point() else value for name, value in before.items()}
    with live_weights_kept(model):
        scored_with(run.loaded, other, dataset.images[:8], dataset.labels[:8], dataset.class_names)
        assert largest_difference(model.state_dict(), before) > 0.5
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def largest_difference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max((weights[name].double() - value.double()).abs().max().item() for name, value in reference.items())


def untimed(metrics: dict) -> dict:
    return {name: value for name, value in metrics.items() if name != "train_seconds"}
