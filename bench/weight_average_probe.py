"""Bench-only instrument: would an exponential moving average (EMA) of the weights score better?

Inside one training run (so at exactly the same budget and trajectory as the live weights) it keeps an
EMA of the network's weights per decay, scores each EMA on the validation split at every round end
(the round ends where `jem_core.training` validates the live weights), keeps each decay's best round,
and scores that on the test split. The live run is untouched apart from the few seconds the extra
validations take; the model file saved is the live run's.

Used by `bench/aid_table.py train --ema-probe 0.99,0.998`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from jem_core import training
from jem_core.metrics import classification_metrics, predict_logits


def clone_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy in the weights' own memory format. Not checkpoint.cpu_state: with its plain-format copies as
    the averages, the live run's later losses moved in the 5th digit (tests/test_weight_average_probe.py
    then fails; the cause inside the CPU kernels was not traced)."""
    return {name: value.detach().clone() for name, value in weights.items()}


class WeightAverageProbe:
    """Wraps training_step (update the averages), end_of_epoch (validate them) and finish_run (test them)."""

    def __init__(self, decays: list[float]) -> None:
        self.decays = decays
        self.averages: dict[float, dict[str, torch.Tensor]] = {}
        self.best: dict[float, dict[str, Any]] = {d: {"val_accuracy": -1.0, "weights": None, "round": None}
                                                 for d in decays}
        self.val_history: dict[float, list[float]] = {d: [] for d in decays}
        self.test: dict[float, dict[str, float]] = {}
        self.originals = (training.training_step, training.end_of_epoch, training.finish_run)

    def __enter__(self) -> "WeightAverageProbe":
        step, validate, finish = self.originals

        def averaging_step(model, *args, **kwargs):
            losses = step(model, *args, **kwargs)
            self.update(model)
            return losses

        def validating_end_of_epoch(loaded, dataset, val, epoch, *args, **kwargs):
            record = validate(loaded, dataset, val, epoch, *args, **kwargs)
            self.validate(loaded, dataset, val, epoch)
            return record

        def testing_finish(run, *args, **kwargs):
            result = finish(run, *args, **kwargs)
            self.score_test(run)
            return result

        training.training_step, training.end_of_epoch, training.finish_run = \
            averaging_step, validating_end_of_epoch, testing_finish
        return self

    def __exit__(self, *exc) -> None:
        training.training_step, training.end_of_epoch, training.finish_run = self.originals

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for decay in self.decays:
            if decay not in self.averages:
                self.averages[decay] = clone_weights(model.state_dict())
                continue
            for name, value in model.state_dict().items():
                average = self.averages[decay][name]
                if average.is_floating_point():
                    average.lerp_(value, 1 - decay)
                else:
                    average.copy_(value)

    def validate(self, loaded, dataset, val: torch.Tensor, epoch: int) -> None:
        with live_weights_kept(loaded.model):
            for decay, weights in self.averages.items():
                accuracy = scored_with(loaded, weights, dataset.images[val], dataset.labels[val],
                                       dataset.class_names)["accuracy"]
                self.val_history[decay].append(accuracy)
                if accuracy > self.best[decay]["val_accuracy"]:
                    self.best[decay] = {"val_accuracy": accuracy, "weights": clone_weights(weights), "round": epoch}

    def score_test(self, run) -> None:
        images, labels = run.dataset.images[run.test], run.dataset.labels[run.test]
        with live_weights_kept(run.loaded.model):
            for decay, best in self.best.items():
                if best["weights"] is None:
                    continue
                metrics = scored_with(run.loaded, best["weights"], images, labels, run.dataset.class_names)
                self.test[decay] = {"accuracy": metrics["accuracy"], "nll": metrics["nll"], "ece": metrics["ece"]}

    def results(self) -> dict[str, dict[str, Any]]:
        return {f"{decay:g}": {"best_round": self.best[decay]["round"],
                               "best_val_accuracy": self.best[decay]["val_accuracy"],
                               "val_history": self.val_history[decay], **self.test.get(decay, {})}
                for decay in self.decays}


@contextmanager
def live_weights_kept(model: torch.nn.Module) -> Iterator[None]:
    """Whatever weights the block loads into the model, it carries its own again afterwards."""
    live = clone_weights(model.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(live)


def scored_with(loaded, weights: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                class_names: list[str]) -> dict[str, Any]:
    """Metrics of the network carrying `weights` (call inside live_weights_kept)."""
    loaded.model.load_state_dict(weights)
    return classification_metrics(predict_logits(loaded, images), labels, class_names)
