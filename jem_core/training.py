"""JEM training (supervised and semi-supervised) and the plain cross-entropy baseline.

Loss per iteration:
    weight_ce · CE(f(x_l), y_l)                         on a labelled batch
  + weight_gen · (mean E(x_data) − mean E(x_sgld))      on all training images, labelled or not
  + energy_reg · mean(E(x_data)² + E(x_sgld)²)          keeps energies near 0 (stability)
  + consistency_weight · FixMatch CE(strong view, pseudo-label of weak view)   optional (JEM + consistency)

x_sgld comes from a short SGLD chain continued from a replay buffer.  The baseline drops the
generative term and trains the same network with CE alone.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import Cancelled, JEMError, ProgressFn, distributed, no_progress
from .checkpoint import (LoopState, Snapshot, check_resumable, cpu_state, load_checkpoint, restore_snapshot,
                         remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state,
                         take_snapshot)
from .data import SceneDataset, band_statistics, choose_labelled, split_dataset
from .metrics import classification_metrics, predict_logits
from .model_file import LoadedModel, ModelMeta, save_model
from .models import ModelSpec, SpeedOptions, apply_speed_options, build_model
from .sampler import ReplayBuffer, SGLDConfig, SGLDSampler, make_initialiser


class Diverged(JEMError):
    pass


@dataclass
class TrainConfig:
    arch: str = "wrn-10-2"
    stem_stride: int = 2
    norm: str = "none"
    dropout: float = 0.0
    image_size: int = 64
    epochs: int = 10
    time_budget_min: Optional[float] = None
    batch_size: int = 64
    sgld_batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_iters: int = 100
    labels_per_class: Optional[int] = None  # None: every training image is labelled
    baseline: bool = False
    weight_ce: float = 1.0
    weight_gen: float = 1.0
    energy_reg: float = 0.1
    input_noise: float = 0.03
    augment: bool = True
    patience: Optional[int] = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    divergence_threshold: float = 1e4
    # Divergence recovery: also a divergence when the gradient norm exceeds grad_blowup × its recent
    # median or more than saturation_limit of SGLD sample values sit at ±sample_clamp; roll back
    # at most max_recoveries times (0 = fail at the first divergence).
    grad_blowup: float = 1e3
    saturation_limit: float = 0.5
    max_recoveries: int = 3
    # Iterations between validations/checkpoints; None = one pass over the training images.
    epoch_iters: Optional[int] = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    # JEM + consistency (FixMatch): CE on strongly augmented unlabelled images towards the pseudo-label of
    # their weakly augmented view, where that view is confident.  0 = off.
    consistency_weight: float = 0.0
    consistency_threshold: float = 0.95
    sgld: SGLDConfig = field(default_factory=SGLDConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    loaded: LoadedModel
    metrics: dict[str, Any]
    history: list[dict[str, float]]




def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips per image and a random quarter turn per batch: scenes seen from above have no 'up'."""
    flip_h = torch.rand(len(x), device=x.device) < 0.5
    flip_v = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(2, 3))


def strong_augment(x: torch.Tensor) -> torch.Tensor:
    """FixMatch-style strong view of normalised images: weak flips/turn, then a random shift, per-band
    contrast and brightness changes, a cut-out square and noise (the RandAugment idea without torchvision)."""
    x = augment(x)
    n, bands, size, _ = x.shape
    shift = max(size // 8, 1)
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2))
    x = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])
    contrast = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.6, 1.4)
    brightness = torch.empty(n, bands, 1, 1, device=x.device).uniform_(-0.4, 0.4)
    x = x * contrast + brightness
    cut = torch.randint(size // 4, size // 2 + 1, ())
    top, left = torch.randint(0, size - cut + 1, (2, n)).tolist()
    keep = torch.ones(n, 1, size, size, device=x.device)
    for i in range(n):
        keep[i, :, top[i]:top[i] + cut, left[i]:left[i] + cut] = 0
    return x * keep + 0.1 * torch.randn_like(x)


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch: CE of the strong view towards the weak view's argmax where its confidence ≥ threshold,
    averaged over the whole unlabelled batch; also the fraction of images that passed the threshold."""
    confidence, pseudo = weak_logits.detach().softmax(1).max(1)
    mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
    return loss, mask.mean()


def learning_rate(config: TrainConfig, iteration: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over the run (progress ∈ [0, 1], by iterations or time)."""
    warm = min(1.0, (iteration + 1) / max(config.warmup_iters, 1))
    return config.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class BatchStream:
    """Endless shuffled batches of indices, reshuffled after each pass."""

    def __init__(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.indices, self.batch_size, self.generator = indices, batch_size, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch_size:
            shuffled = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
            self.order = torch.cat([self.order, shuffled])
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch


def check_config(config: TrainConfig, dataset: SceneDataset) -> None:
    if config.epochs < 1:
        raise JEMError(f"--epochs must be at least 1 (got {config.epochs}).")
    if config.time_budget_min is not None and config.time_budget_min <= 0:
        raise JEMError(f"--time-budget-min must be positive (got {config.time_budget_min}).")
    if config.labels_per_class is not None and config.labels_per_class < 1:
        raise JEMError("--labels-per-class must be at least 1 (0 or omitted means: use every label).")
    if config.consistency_weight < 0 or not 0.0 < config.consistency_threshold <= 1.0:
        raise JEMError("--consistency must be ≥ 0 and --consistency-threshold in (0, 1].")
    if config.image_size < 8:
        raise JEMError(f"--image-size must be at least 8 px (got {config.image_size}).")
    if dataset.images.shape[-1] != config.image_size:
        raise JEMError(f"Dataset images are {dataset.images.shape[-1]} px but the config asks for "
                       f"{config.image_size} px; load the dataset at the training size.")


def train(dataset: SceneDataset, config: TrainConfig, out_path: str | Path | None = None,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          log: Callable[[str], None] | None = None, *, unlabelled: torch.Tensor | None = None,
          start_model: LoadedModel | None = None, checkpoint_path: str | Path | None = None,
          checkpoint_every_min: float | None = 10.0, resume: bool = False) -> TrainResult:
    """Train a JEM (or the CE baseline) on a class-folder dataset; optionally save the model file.

    progress(fraction, message) is called every iteration; should_stop() is polled every
    iteration and raises Cancelled (nothing is written) when it returns True.
    unlabelled: extra images (N, bands, H, W) for the generative term only (never in val/test).
    start_model: fine-tune this model (same bands and classes as the dataset; keeps its normalisation).
    With no validation images (val_fraction 0) the last epoch's weights are kept.
    checkpoint_path: write the training state there at every epoch end and every checkpoint_every_min
    minutes (deleted when the run finishes or is cancelled); resume=True continues from it.
    Under torchrun (see distributed.py) each rank trains on its shard; rank 0 writes the files.
    """
    check_config(config, dataset)
    check_extras(dataset, unlabelled, start_model)
    if resume and checkpoint_path is None:
        raise JEMError("resume needs the checkpoint path of the run to continue.")
    ctx = distributed.current()
    log = log if log and ctx.is_main else (lambda message: None)
    progress = progress if progress and ctx.is_main else no_progress
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = distributed.device_for(ctx, config.device)

    split = split_dataset(dataset.labels, config.seed, config.val_fraction, config.test_fraction)
    if len(split.train) == 0:
        raise JEMError("The training split is empty: the dataset has too few images per class.")
    labelled = split.train if config.labels_per_class is None else \
        choose_labelled(split.train, dataset.labels, config.labels_per_class, config.seed)
    # Unlabelled extras go after the dataset's images: training pool only, never val/test.
    pool = dataset.images if unlabelled is None else torch.cat([dataset.images, unlabelled.float()])
    data_indices = torch.cat([split.train, torch.arange(len(dataset), len(pool))])
    # Labels the trainer may see: -1 for every pool image outside the labelled subset.
    visible_labels = torch.full((len(pool),), -1, dtype=torch.long)
    visible_labels[labelled] = dataset.labels[labelled]

    mean, std = band_statistics(pool[data_indices]) if start_model is None else \
        (list(start_model.meta.mean), list(start_model.meta.std))
    spec = start_model.spec if start_model is not None else \
        ModelSpec(arch=config.arch, in_channels=dataset.images.shape[1], num_classes=dataset.num_classes,
                  norm=config.norm, dropout=config.dropout, stem_stride=config.stem_stride)
    meta = ModelMeta(class_names=list(dataset.class_names), band_names=list(dataset.band_names),
                     image_size=config.image_size, mean=mean, std=std, value_range=list(dataset.value_range),
                     train_config=config.to_dict())
    model = build_model(spec) if start_model is None else copy.deepcopy(start_model.model)
    apply_speed_options(model, config.speed, device)  # moves it to the device too
    loaded = LoadedModel(model, meta)
    inputs = loaded.normalise(pool).to(device)  # whole normalised training pool on the device
    train_labels = visible_labels.to(device)

    if ctx.active:  # same initial weights everywhere, but each rank its own chains and noise
        torch.manual_seed(config.seed + 7919 * ctx.rank)
    sampler = None
    if not config.baseline:
        initialiser = make_initialiser(config.sgld, inputs[labelled], train_labels[labelled], spec.num_classes)
        buffer = ReplayBuffer(initialiser, max(config.sgld.buffer_size // ctx.world_size, 1), spec.num_classes, device)
        # torch.compile'd networks are run from one thread only: that is the combination tested.
        sampler = SGLDSampler(model, replace(config.sgld), buffer, fused=config.speed.fused,
                              split=config.speed.split_batches and not config.speed.compile)

    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=config.speed.fused)
    step_model = distributed.wrap(model, ctx, device)
    iters_per_epoch = config.epoch_iters or \
        max(1, math.ceil(len(data_indices) / (config.batch_size * ctx.world_size)))
    total_iters = iters_per_epoch * config.epochs
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    labelled_stream = BatchStream(distributed.shard(labelled, ctx), config.batch_size, generator)
    data_stream = BatchStream(distributed.shard(data_indices, ctx), config.sgld_batch_size, generator)
    run = RunParts(model, optimiser, sampler, [labelled_stream, data_stream], generator, device, ctx,
                   checkpoint_path, {"images": len(pool), "class_names": list(dataset.class_names)})

    mode = "baseline (CE only)" if config.baseline else "JEM"
    log(f"{mode}: {spec.arch} on {device}, {len(data_indices)} train images ({len(labelled)} labelled), "
        f"{len(split.val)} val, {len(split.test)} test, {iters_per_epoch} iterations/epoch"
        + (f", {ctx.world_size} processes" if ctx.active else ""))
    state, best_model = LoopState(sgld_steps=config.sgld.steps), None
    if resume:
        state, best_model = resume_run(run, config)
        log(f"resumed from '{checkpoint_path}' at epoch {state.epoch}, iteration {state.iteration}")
    if sampler is not None:
        sampler.config.steps = state.sgld_steps
    start_time = time.monotonic() - state.elapsed_s
    snapshot = save_point(run, config, state, best_model, start_time, write=False)
    last_save = time.monotonic()
    grad_norms: deque[float] = deque(maxlen=50)
    stop_reason = f"{config.epochs} epochs done"
    try:
        while state.epoch <= config.epochs:
            model.train()
            over_budget = early_stop = False
            while state.done < iters_per_epoch:
                elapsed = time.monotonic() - start_time
                save_due = checkpoint_every_min is not None and time.monotonic() - last_save >= checkpoint_every_min * 60
                cancel, over_budget, save_due = distributed.any_rank(
                    [should_stop is not None and should_stop(), bool(budget_s and elapsed >= budget_s), save_due],
                    ctx, device)
                if cancel:
                    raise Cancelled()
                if over_budget:
                    stop_reason = f"time budget of {config.time_budget_min} min reached in epoch {state.epoch}"
                    break
                fraction = max(state.iteration / total_iters, elapsed / budget_s if budget_s else 0.0)
                for group in optimiser.param_groups:
                    group["lr"] = learning_rate(config, state.iteration, fraction) * state.lr_scale
                losses = training_step(step_model, sampler, optimiser, inputs, train_labels, labelled_stream,
                                       data_stream, config)
                if sampler is not None:
                    losses["saturation"] = float(sampler.last_saturation)
                losses = dict(zip(losses, distributed.average(list(losses.values()), ctx, device)))
                reason = divergence_reason(losses, config, grad_norms)
                if reason is not None:
                    state, best_model = recover(reason, snapshot, state, run, config, log)
                    grad_norms.clear()
                    continue
                grad_norms.append(losses["grad_norm"])
                for key in state.sums:
                    state.sums[key] += losses[key]
                state.iteration += 1
                state.done += 1
                progress(min(fraction, 1.0), f"epoch {state.epoch}/{config.epochs} ce {losses['ce']:.3f} "
                                             f"gap {losses['gap']:+.2f}")
                if save_due:
                    snapshot = save_point(run, config, state, best_model, start_time)
                    last_save = time.monotonic()
            if state.done:
                record = end_of_epoch(loaded, dataset, split.val, state.epoch, state.iteration, state.sums,
                                      state.done, start_time)
                state.history.append(record)
                log(format_record(record))
                if record["val_accuracy"] > state.best_val_accuracy or len(split.val) == 0:
                    state.best_val_accuracy, state.best_epoch = record["val_accuracy"], state.epoch
                    best_model = cpu_state(model.state_dict())
                elif config.patience is not None and state.epoch - state.best_epoch >= config.patience:
                    stop_reason = f"early stop: no val improvement for {config.patience} epochs"
                    early_stop = True
            if over_budget or early_stop:
                break
            state.epoch, state.done = state.epoch + 1, 0
            state.sums = dict.fromkeys(state.sums, 0.0)
            snapshot = save_point(run, config, state, best_model, start_time)
            last_save = time.monotonic()
    except Cancelled:
        remove_checkpoint(run)
        raise

    if best_model is not None:
        model.load_state_dict(best_model)
    log(f"stopped ({stop_reason}); keeping the weights of epoch {state.best_epoch}")
    metrics = classification_metrics(predict_logits(loaded, dataset.images[split.test]),
                                     dataset.labels[split.test], dataset.class_names)
    metrics.update(split="test", best_epoch=state.best_epoch, iterations=state.iteration, stop_reason=stop_reason,
                   train_seconds=round(time.monotonic() - start_time, 1), labelled_images=len(labelled),
                   mode="baseline" if config.baseline else "jem", recoveries=state.recoveries)
    meta.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "reliability")}
    meta.train_config["history"] = state.history
    model.eval()
    if out_path is not None and ctx.is_main:
        save_model(out_path, model, meta)
    remove_checkpoint(run)
    progress(1.0, "done")
    return TrainResult(loaded, metrics, state.history)


def check_extras(dataset: SceneDataset, unlabelled: torch.Tensor | None, start_model: LoadedModel | None) -> None:
    shape = tuple(dataset.images.shape[1:])
    if unlabelled is not None and tuple(unlabelled.shape[1:]) != shape:
        raise JEMError(f"Unlabelled images are {tuple(unlabelled.shape[1:])} (bands, H, W) but the labelled ones "
                       f"are {shape}; give both the same bands and size.")
    if start_model is not None and (start_model.spec.in_channels, start_model.spec.num_classes) != \
            (shape[0], dataset.num_classes):
        raise JEMError(f"The starting model takes {start_model.spec.in_channels} bands and {start_model.spec.num_classes} "
                       f"classes; the data has {shape[0]} bands and {dataset.num_classes} classes. Extend its head "
                       "first (jem_core.active.extend_head) or start without a model.")


def training_step(model, sampler: SGLDSampler | None, optimiser: torch.optim.Optimizer, inputs: torch.Tensor,
                  labels: torch.Tensor, labelled_stream: BatchStream, data_stream: BatchStream,
                  config: TrainConfig) -> dict[str, float]:
    """One optimiser step; labelled, data, strong-view and SGLD images share one forward pass.

    The data batch (all training images, labelled or not) feeds the generative term and, with
    consistency on, is also the weak view whose confident predictions become pseudo-labels.
    """
    labelled_idx = labelled_stream.next().to(inputs.device)
    x_labelled = inputs[labelled_idx]
    parts = [x_labelled]
    consistency_on = config.consistency_weight > 0
    if sampler is not None or consistency_on:
        x_data = inputs[data_stream.next().to(inputs.device)]
        parts.append(x_data)
    if config.augment:
        parts = [augment(x) for x in parts]
    if config.input_noise > 0:
        parts = [x + config.input_noise * torch.randn_like(x) for x in parts]
    if consistency_on:
        parts.append(strong_augment(x_data))
    if sampler is not None:
        parts.append(sampler.sample(config.sgld_batch_size))
    chunks = model(torch.cat(parts)).split([len(x) for x in parts])
    ce = F.cross_entropy(chunks[0], labels[labelled_idx])
    loss = config.weight_ce * ce
    zero = torch.zeros((), device=inputs.device)
    gen = gap = consistency = mask_rate = zero
    if consistency_on:
        consistency, mask_rate = consistency_loss(chunks[1], chunks[2], config.consistency_threshold)
        loss = loss + config.consistency_weight * consistency
    if sampler is not None:
        energy_data = -torch.logsumexp(chunks[1], 1)
        energy_sgld = -torch.logsumexp(chunks[-1], 1)
        gap = energy_data.mean() - energy_sgld.mean()
        gen = gap + config.energy_reg * (energy_data.pow(2).mean() + energy_sgld.pow(2).mean())
        loss = loss + config.weight_gen * gen
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimiser.step()
    return {"loss": loss.item(), "ce": ce.item(), "gen": gen.item(), "gap": gap.item(),
            "consistency": consistency.item(), "mask_rate": mask_rate.item(), "grad_norm": grad_norm.item()}


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
                       f"{state.recoveries} automatic recoveries (learning rate ×{state.lr_scale:g}, {state.sgld_steps} "
                       "SGLD steps). Retry with a lower --lr, a larger --energy-reg or more --sgld-steps." + saved)
    restored = restore_snapshot(snapshot, run.model, run.optimiser)
    restored.recoveries = state.recoveries + 1
    restored.lr_scale = state.lr_scale * RECOVERY_LR_FACTOR
    restored.sgld_steps = math.ceil(state.sgld_steps * RECOVERY_SGLD_FACTOR)
    if run.sampler is not None:
        run.sampler.config.steps = restored.sgld_steps
        run.sampler.buffer.reset()
    log(f"divergence in epoch {state.epoch} (iteration {state.iteration}): {reason}. Recovery "
        f"{restored.recoveries}/{config.max_recoveries}: back to epoch {restored.epoch} iteration {restored.iteration}, "
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


def end_of_epoch(loaded: LoadedModel, dataset: SceneDataset, val: torch.Tensor, epoch: int, iteration: int,
                 sums: dict[str, float], iters: int, start_time: float) -> dict[str, float]:
    val_metrics = classification_metrics(predict_logits(loaded, dataset.images[val]), dataset.labels[val],
                                         dataset.class_names) if len(val) else {"accuracy": 0.0, "nll": 0.0,
                                                                                "ece": 0.0}
    return {"epoch": epoch, "iteration": iteration, "minutes": (time.monotonic() - start_time) / 60,
            "train_ce": sums["ce"] / iters, "train_gap": sums["gap"] / iters,
            "val_accuracy": val_metrics["accuracy"], "val_nll": val_metrics["nll"], "val_ece": val_metrics["ece"]}


def format_record(record: dict[str, float]) -> str:
    return (f"epoch {record['epoch']:3d}  {record['minutes']:6.1f} min  train CE {record['train_ce']:.3f}  "
            f"gap {record['train_gap']:+.3f}  val acc {record['val_accuracy']:.1%}  val NLL {record['val_nll']:.3f}  "
            f"val ECE {record['val_ece']:.3f}")
