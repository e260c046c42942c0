"""The AID bench's --energy-every variant keeps the energy term on every k-th training step only."""
from __future__ import annotations

import sys
from pathlib import Path

from jem_core import training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from aid_table import EnergyEvery  # noqa: E402


def test_energy_term_on_every_kth_step_only_and_the_step_restored(monkeypatch):
    samplers = []
    monkeypatch.setattr(training, "training_step", lambda model, sampler, *args, **kwargs: samplers.append(sampler))
    plain_step = training.training_step
    with EnergyEvery(3):
        for _ in range(6):
            training.training_step("model", "sampler", "optimiser", config="config")
    assert samplers == [None, None, "sampler"] * 2
    assert training.training_step is plain_step
    with EnergyEvery(1):  # the default leaves the step alone
        assert training.training_step is plain_step
