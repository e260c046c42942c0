"""The state of a training run between iterations: rolling back after a divergence, saving it to a
checkpoint and resuming it (the checkpoint file format itself is checkpoint.py's)."""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import JEMError, distributed
from .checkpoint import (
    LoopState,
    Snapshot,
    check_resumable,
    load_checkpoint,
    remove_stale_temporaries,
    restore_snapshot,
    rng_state,
    save_checkpoint,
    set_rng_state,
    take_snapshot,
)
from .sampler import SGLDSampler

if TYPE_CHECKING:
    from .training import BatchStream, TrainConfig


class Diverged(JEMError):
    pass


def divergence_reason(losses: dict[str, float], config: TrainConfig, grad_norms: deque[float]) -> str | None:
    """Why this step looks like a divergence, or None: non-finite loss, energy gap or gradient norm
    blowing up, SGLD samples saturating at the clamp."""
    if not all(math.isfinite(v) for v in losses.values()):
        return f"non-finite loss (loss {losses['loss']:.3g}, energy gap {losses['gap']:.3g})"
    if abs(losses["gap"]) > config.divergence_threshold:
        return f"energy gap {losses['gap']:.3g} beyond ±{config.divergence_threshold:g}"
    if len(grad_norms) >= 10 and losses["grad_norm"] > config.grad_blowup * statistics.median(grad_norms):
        return (f"gradient norm {losses['grad_norm']:.3g} is over {config.grad_blowup:g}× its recent median "
                f"{statistics.median(grad_norms):.3g}")
    if losses.get("saturation", 0.0) > config.saturation_limit:
        return f"{losses['saturation']:.0%} of SGLD sample values pinned at the clamp"
    return None


@dataclass
class RunParts:
    """The mutable pieces of a run that checkpoints save and restore."""

    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    sampler: SGLDSampler | None
    streams: list[BatchStream]
    generator: torch.Generator
    device: torch.device
    ctx: distributed.DistContext
    checkpoint_path: str | Path | None
    dataset_id: dict[str, Any]


RECOVERY_LR_FACTOR = 0.5
RECOVERY_SGLD_FACTOR = 1.5


def recover(reason: str, snapshot: Snapshot, state: LoopState, run: RunParts, config: TrainConfig,
            log: Callable[[str], None]) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    """Roll back to the last good state with a lower learning rate, longer SGLD chains and a fresh
    replay buffer; raise Diverged after config.max_recoveries attempts."""
    if state.recoveries >= config.max_recoveries:
        saved = f" The last good state is in '{run.checkpoint_path}' (continue it with --resume and a lower " \
                "--lr)." if run.checkpoint_path is not None and Path(run.checkpoint_path).exists() else ""
        raise Diverged(f"Training diverged in epoch {state.epoch} (iteration {state.iteration}): {reason}, after "
                       f"{state.recoveries} automatic recoveries (learning rate ×{state.lr_scale:g}, "
                       f"{state.sgld_steps} "
                       "SGLD steps). Retry with a lower --lr, a larger --energy-reg or more --sgld-steps." + saved)
    restored = restore_snapshot(snapshot, run.model, run.optimiser)
    restored.recoveries = state.recoveries + 1
    restored.lr_scale = state.lr_scale * RECOVERY_LR_FACTOR
    restored.sgld_steps = math.ceil(state.sgld_steps * RECOVERY_SGLD_FACTOR)
    if run.sampler is not None:
        run.sampler.config.steps = restored.sgld_steps
        run.sampler.buffer.reset()
    log(f"divergence in epoch {state.epoch} (iteration {state.iteration}): {reason}. Recovery "
        f"{restored.recoveries}/{config.max_recoveries}: back to epoch {restored.epoch} "
        f"iteration {restored.iteration}, "
        f"learning rate ×{restored.lr_scale:g}, {restored.sgld_steps} SGLD steps, replay buffer reset.")
    return restored, snapshot.best_model


def save_point(run: RunParts, config: TrainConfig, state: LoopState, best_model: dict[str, torch.Tensor] | None,
               start_time: float, write: bool = True) -> Snapshot:
    """Keep the current state in memory for rollback and, with a checkpoint path, write it (rank 0)."""
    state.elapsed_s = time.monotonic() - start_time
    snapshot = take_snapshot(run.model, run.optimiser, state, best_model)
    if not write or run.checkpoint_path is None:
        return snapshot
    local = {"rng": rng_state(run.device), "generator": run.generator.get_state(),
             "orders": [stream.order.clone() for stream in run.streams],
             "buffer": run.sampler.buffer.images.cpu() if run.sampler is not None else None}
    ranks = distributed.gather(local, run.ctx)
    if run.ctx.is_main:
        save_checkpoint(run.checkpoint_path, {
            "config": config.to_dict(), "dataset": run.dataset_id, "world_size": run.ctx.world_size,
            "model": snapshot.model, "optimiser": snapshot.optimiser, "loop": state.to_dict(),
            "best_model": best_model, "ranks": ranks})
    return snapshot


def resume_run(run: RunParts, config: TrainConfig) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    """Load the checkpoint into the run's model, optimiser, buffer, batch orders and RNGs."""
    assert run.checkpoint_path is not None
    payload = load_checkpoint(run.checkpoint_path)
    check_resumable(payload, config.to_dict(), run.dataset_id["images"], run.dataset_id["class_names"],
                    run.ctx.world_size, run.checkpoint_path)
    try:
        run.model.load_state_dict(payload["model"])
        run.optimiser.load_state_dict(payload["optimiser"])
        state = LoopState(**payload["loop"])
        local = payload["ranks"][run.ctx.rank]
        if run.sampler is not None:
            run.sampler.buffer.images = local["buffer"].to(run.device)
        for stream, order in zip(run.streams, local["orders"]):
            stream.order = order
        run.generator.set_state(local["generator"])
        set_rng_state(local["rng"], run.device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise JEMError(f"Checkpoint '{run.checkpoint_path}' is damaged or incompatible ({type(error).__name__}: "
                       f"{str(error)[:150]}). Delete it and start without --resume.") from None
    return state, payload["best_model"]


def remove_checkpoint(run: RunParts) -> None:
    """A finished or cancelled run leaves no checkpoint (nor a killed run's half-written one) behind."""
    if run.checkpoint_path is not None and run.ctx.is_main:
        Path(run.checkpoint_path).unlink(missing_ok=True)
        remove_stale_temporaries(run.checkpoint_path)
