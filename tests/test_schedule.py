"""Run length and learning-rate schedule: every default run, whatever the data size, leaves its warm-up."""
from __future__ import annotations

import math

import pytest
from conftest import make_class_folder

from jem_core.active import retrain_config
from jem_core.training import (
    DEFAULT_ITERATIONS,
    WARMUP_FRACTION,
    TrainConfig,
    fit_warnings,
    learning_rate,
    planned_iterations,
    run_progress,
)


@pytest.mark.parametrize("iters_per_pass", [1, 2, 50, 10_000])
def test_default_run_length_does_not_depend_on_the_data_size(iters_per_pass):
    assert planned_iterations(TrainConfig(), iters_per_pass) == DEFAULT_ITERATIONS


def test_epochs_and_iterations_bound_the_run_whichever_is_shorter():
    assert planned_iterations(TrainConfig(epochs=3), 2) == 6
    assert planned_iterations(TrainConfig(epochs=3, iterations=4), 2) == 4
    assert planned_iterations(TrainConfig(time_budget_min=2.0), 2) is None  # the time budget alone
    assert planned_iterations(TrainConfig(time_budget_min=2.0, iterations=50), 2) == 50


def test_warm_up_ends_after_a_tenth_of_the_run_by_iterations_or_by_time():
    config = TrainConfig(lr=1.0)
    total = 200
    rates = [learning_rate(config, i, run_progress(i, total, 0, None), run_progress(i + 1, total, 0, None))
             for i in range(total)]
    peak = rates.index(max(rates))
    assert peak == int(WARMUP_FRACTION * total) - 1 and rates[0] < 0.1 * max(rates)
    assert rates[-1] < 0.01 and all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:]))
    # A retrain is bounded by its time budget only: after 10 % of its minutes it runs at (nearly) the full rate.
    retrain = retrain_config()
    budget = retrain.time_budget_min * 60
    assert retrain.iterations is None and retrain.warmup_iters is None
    late = learning_rate(retrain, 5, run_progress(5, None, 0.11 * budget, budget), run_progress(6, None, 0.11 * budget,
                                                                                               budget))
    assert late == pytest.approx(retrain.lr * 0.5 * (1 + math.cos(math.pi * 0.11)))


def test_fit_warnings_name_the_problem_and_the_fix():
    assert fit_warnings(0.95, 50, 0.9, 4) == []
    bad_fit, = fit_warnings(0.22, 50, None, 10)
    assert "fits only 22% of its own 50 labelled images" in bad_fit and "train longer" in bad_fit
    chance, = fit_warnings(0.9, 50, 0.30, 4)
    assert "near chance (25% for 4 classes)" in chance


@pytest.mark.slow
def test_default_jem_train_on_about_100_images_learns_well_above_chance(tmp_path):
    from jem_core.cli import main
    from jem_core.model_file import load_model

    data = make_class_folder(tmp_path / "scenes", classes=4, per_class=28, size=16)
    out = tmp_path / "model.pt"
    assert main(["train", str(data), "--out", str(out), "--image-size", "16", "--device", "cpu"]) == 0
    metrics = load_model(out).meta.metrics
    assert metrics["iterations"] == DEFAULT_ITERATIONS
    assert metrics["accuracy"] >= 0.75 and metrics["warnings"] == []

