"""Training-state checkpoints: everything needed to continue a killed run where it stopped.

A checkpoint is one `.pt` file holding a plain dict, loadable with
``torch.load(path, weights_only=True)`` (loading never runs code from the file):

    format          "jem-eo-checkpoint"
    format_version  CHECKPOINT_VERSION (int)
    config          the TrainConfig as a dict (the settings that shape the state must match on resume)
    dataset         {"images": pool size, "class_names": [...]} to refuse a different dataset
    world_size      number of training processes (DDP ranks) that wrote it
    model           network weights;  best_model: weights of the best epoch so far (or None)
    optimiser       Adam state (moments, step counts)
    loop            LoopState as a dict: epoch, iteration, position in the epoch, running sums,
                    history, best epoch, elapsed seconds, and the divergence-recovery state
    ranks           one dict per rank: torch/CUDA RNG states, batch-order generator state and pending
                    batch orders, and that rank's replay-buffer shard (None for the CE baseline)

It is written with files.atomic_write (temporary name, then rename), so a kill during
the write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import JEMError
from .files import atomic_write
from .model_file import load_versioned

CHECKPOINT_FORMAT = "jem-eo-checkpoint"
CHECKPOINT_VERSION = 1
# TrainConfig keys that fix the shape of the saved state or the data split; the others
# (learning rate, epochs, time budget, patience, device, speed switches) may change on resume.
STRUCTURAL_KEYS = ("arch", "stem_stride", "norm", "dropout", "image_size", "batch_size", "sgld_batch_size",
                   "labels_per_class", "baseline", "val_fraction", "test_fraction", "seed", "epoch_iters")
STRUCTURAL_SGLD_KEYS = ("buffer_size", "init", "init_resolution")


@dataclass
class LoopState:
    """Where the training loop is, plus what divergence recovery has changed so far."""

    epoch: int = 1                 # the epoch in progress (1-based)
    done: int = 0                  # iterations finished in that epoch
    iteration: int = 0             # iterations finished in the whole run
    sums: dict[str, float] = field(default_factory=lambda: {"ce": 0.0, "gen": 0.0, "gap": 0.0, "mask_rate": 0.0})
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0
    # Divergence recovery: learning-rate multiplier, current SGLD chain length, recoveries so far.
    lr_scale: float = 1.0
    sgld_steps: int = 0
    recoveries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """An in-memory copy of the last good state, for rolling back after a divergence."""

    model: dict[str, torch.Tensor]
    optimiser: dict[str, Any]
    loop: LoopState
    best_model: Optional[dict[str, torch.Tensor]]


def cpu_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy in the default memory format (channels_last weights are stored plainly)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def take_snapshot(model: torch.nn.Module, optimiser: torch.optim.Optimizer, loop: LoopState,
                  best_model: Optional[dict[str, torch.Tensor]]) -> Snapshot:
    return Snapshot(cpu_state(model.state_dict()), copy.deepcopy(optimiser.state_dict()), copy.deepcopy(loop),
                    best_model)


def restore_snapshot(snapshot: Snapshot, model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> LoopState:
    model.load_state_dict(snapshot.model)
    optimiser.load_state_dict(copy.deepcopy(snapshot.optimiser))
    return copy.deepcopy(snapshot.loop)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "cuda": None}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), suffix=".ckpt")


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete half-written checkpoints a killed run left beside path (atomic_write's temp names)."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.ckpt.tmp"):
            stale.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True; one clear JEMError for every failure."""
    path = Path(path)
    if not path.is_file():
        raise JEMError(f"No checkpoint at '{path}' to resume from. Start without --resume, or pass the "
                       "checkpoint of the killed run with --checkpoint.")
    return load_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "JEM-EO checkpoint",
                          "Pass the .ckpt file written by `jem train`, or delete it and start without --resume.")


def check_resumable(payload: dict[str, Any], config: dict[str, Any], images: int, class_names: list[str],
                    world_size: int, path: str | os.PathLike) -> None:
    """Refuse to continue a run on other data or with settings that change the saved state's shape."""
    saved = payload["config"]
    changed = [key for key in STRUCTURAL_KEYS if saved.get(key) != config.get(key)]
    changed += [f"sgld.{key}" for key in STRUCTURAL_SGLD_KEYS if saved["sgld"].get(key) != config["sgld"].get(key)]
    if changed:
        details = ", ".join(f"{k} {lookup(saved, k)!r} → {lookup(config, k)!r}" for k in changed)
        raise JEMError(f"Checkpoint '{path}' was written with other settings ({details}). Resume with the "
                       "settings of the killed run, or start without --resume.")
    dataset = payload["dataset"]
    if dataset["images"] != images or dataset["class_names"] != list(class_names):
        raise JEMError(f"Checkpoint '{path}' belongs to another dataset ({dataset['images']} images, classes "
                       f"{', '.join(dataset['class_names'])}). Resume on the same data or start without --resume.")
    if payload["world_size"] != world_size:
        raise JEMError(f"Checkpoint '{path}' was written by {payload['world_size']} training process(es) but "
                       f"this run has {world_size}. Resume with the same number of processes "
                       "(torchrun --nproc-per-node).")


def lookup(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
