"""Divergence recovery: a run that blows up mid-way rolls back, slows down and finishes."""
from __future__ import annotations

import math
from collections import deque

import pytest
import torch

from jem_core import training
from jem_core.sampler import SGLDConfig
from jem_core.training import Diverged, SceneDataset, TrainConfig, divergence_reason, train


def tiny_dataset(seed: int = 0) -> SceneDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(48) % 3
    images = torch.rand(48, 3, 12, 12, generator=generator) * 60 + labels[:, None, None, None] * 60.0
    return SceneDataset(images, labels, ["a", "b", "c"], ["r", "g", "b"], [0.0, 255.0], [])


def tiny_config(**overrides) -> TrainConfig:
    base = dict(arch="wrn-10-1", stem_stride=1, image_size=12, epochs=4, batch_size=8, sgld_batch_size=8,
                patience=None, warmup_iters=1, device="cpu", sgld=SGLDConfig(steps=2, buffer_size=48))
    return TrainConfig(**{**base, **overrides})


def inject_divergence(monkeypatch, at_calls: set[int]) -> list[int]:
    """Make training_step blow the weights up (NaN) on the given call numbers; returns the call log."""
    real_step = training.training_step
    calls: list[int] = []

    def step(model, *args, **kwargs):
        calls.append(len(calls))
        losses = real_step(model, *args, **kwargs)
        if calls[-1] in at_calls:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            losses = {**losses, "loss": float("nan")}
        return losses

    monkeypatch.setattr(training, "training_step", step)
    return calls


def test_injected_divergence_is_rolled_back_and_the_run_finishes(monkeypatch):
    calls = inject_divergence(monkeypatch, at_calls={9})  # in epoch 2 (5 iterations per epoch)
    lines: list[str] = []
    result = train(tiny_dataset(), tiny_config(epochs=3), log=lines.append)
    assert result.metrics["recoveries"] == 1
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert all(torch.isfinite(p).all() for p in result.loaded.model.parameters())
    assert all(math.isfinite(r["train_ce"]) for r in result.history)
    recovery = [line for line in lines if line.startswith("divergence")]
    assert len(recovery) == 1
    assert "non-finite loss" in recovery[0] and "back to epoch 2 iteration 5" in recovery[0]
    assert "learning rate ×0.5" in recovery[0] and "3 SGLD steps" in recovery[0]
    # Rolled back to the end of epoch 1 and redid epoch 2: one extra call per iteration redone.
    assert len(calls) == 3 * 5 + 5


def test_gives_up_with_a_clear_error_after_bounded_recoveries(monkeypatch):
    calls = inject_divergence(monkeypatch, at_calls=set(range(3, 100)))
    with pytest.raises(Diverged, match=r"after 2 automatic recoveries.*lower --lr"):
        train(tiny_dataset(), tiny_config(max_recoveries=2))
    assert len(calls) == 3 + 1 + 1 + 1  # 3 good steps in epoch 1, then one failed attempt each time


def test_no_recovery_when_disabled(monkeypatch):
    inject_divergence(monkeypatch, at_calls={2})
    with pytest.raises(Diverged, match="after 0 automatic recoveries"):
        train(tiny_dataset(), tiny_config(max_recoveries=0))


def test_divergence_signals():
    config = TrainConfig()
    healthy = {"loss": 1.0, "ce": 1.0, "gen": 0.0, "gap": 0.5, "grad_norm": 2.0, "saturation": 0.0}
    norms = deque([1.0, 2.0, 3.0] * 4)
    assert divergence_reason(healthy, config, norms) is None
    assert "energy gap" in divergence_reason({**healthy, "gap": -2e4}, config, norms)
    assert "gradient norm" in divergence_reason({**healthy, "grad_norm": 5e3}, config, norms)
    assert divergence_reason({**healthy, "grad_norm": 5e3}, config, deque([1.0])) is None  # too little history
    assert "pinned at the clamp" in divergence_reason({**healthy, "saturation": 0.9}, config, norms)
    assert "non-finite" in divergence_reason({**healthy, "ce": float("inf")}, config, norms)
