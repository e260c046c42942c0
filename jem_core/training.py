"""JEM training (supervised and semi-supervised) and the plain cross-entropy baseline.

Loss per iteration:
    weight_ce · CE(f(x_l), y_l)                         on a labelled batch
  + weight_gen · (mean E(x_data) − mean E(x_sgld))      on all training images, labelled or not
  + energy_reg · mean(E(x_data)² + E(x_sgld)²)          keeps energies near 0 (stability)
  + consistency_weight · CE(strong view, pseudo-label of weak view)   optional (JEM + consistency; the
                                                      pseudo-label threshold: pseudo_labels.py)

x_sgld comes from a short SGLD chain continued from a replay buffer.  The baseline drops the
generative term and trains the same network with CE alone.

How long a run lasts: an iteration count or a time budget is the primary knob (`iterations`,
`time_budget_min`; with neither, DEFAULT_ITERATIONS), `epochs` (passes over the training images)
only an upper bound.  The learning-rate warm-up and cosine decay follow the run's progress, the
larger of the iteration and the time fraction, so every run, short or long, leaves its warm-up
after a tenth of its length.  Validation and checkpoints happen every round (one pass over the
training images, at least MIN_ROUND_ITERS iterations unless `epochs` bounds the run); early stopping
and keeping the best round
need a validation split of at least MIN_VAL_FOR_SELECTION images, otherwise the last weights are kept.
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import Cancelled, JEMError, ProgressFn, distributed, no_progress
from .augmentation import augment, strong_augment
from .checkpoint import LoopState, cpu_state
from .data import SceneDataset, band_statistics, choose_labelled, split_dataset
from .metrics import classification_metrics, predict_logits
from .model_file import LoadedModel, ModelMeta, save_model
from .models import ModelSpec, SpeedOptions, apply_speed_options, build_model
from .pseudo_labels import SelfAdaptiveThreshold, consistency_loss
from .run_state import Diverged, RunParts, divergence_reason, recover, remove_checkpoint, resume_run, save_point
from .sampler import ReplayBuffer, SGLDConfig, SGLDSampler, make_initialiser

__all__ = ["Cancelled", "Diverged", "TrainConfig", "TrainResult", "train"]

# Chosen on the 112-image, 4-class case that ran 20 iterations under the old epoch default: 1000
# iterations take a few minutes at 32 px on two cores and learn such data well above chance.
DEFAULT_ITERATIONS = 1000
WARMUP_FRACTION = 0.1
MIN_ROUND_ITERS = 25
MIN_VAL_FOR_SELECTION = 100
# Below these a finished model gets a warning: fit on its own labelled images, test accuracy / chance.
MIN_LABEL_FIT = 0.7
NEAR_CHANCE_FACTOR = 1.5


@dataclass
class TrainConfig:
    arch: str = "wrn-10-2"
    stem_stride: int = 2
    norm: str = "none"
    dropout: float = 0.0
    image_size: int = 64
    iterations: Optional[int] = None  # None: DEFAULT_ITERATIONS unless epochs or a time budget bound the run
    epochs: Optional[int] = None  # upper bound in passes over the training images
    time_budget_min: Optional[float] = None
    batch_size: int = 64
    sgld_batch_size: int = 32
    lr: float = 2e-3  # peak Adam rate; on AID it beat 1e-3 for JEM at every label count measured
    weight_decay: float = 0.0
    warmup_iters: Optional[int] = None  # None: the first WARMUP_FRACTION of the run
    labels_per_class: Optional[int] = None  # None: every training image is labelled
    baseline: bool = False
    weight_ce: float = 1.0
    weight_gen: float = 1.0
    energy_reg: float = 0.1
    input_noise: float = 0.03
    augment: bool = True
    patience: Optional[int] = 5  # rounds without val improvement; used with ≥ MIN_VAL_FOR_SELECTION val images
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
    # Iterations between validations/checkpoints; None = one pass (at least MIN_ROUND_ITERS).
    epoch_iters: Optional[int] = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    # JEM + consistency (FixMatch): CE on strongly augmented unlabelled images towards the pseudo-label of
    # their weakly augmented view, where that view is confident.  0 = off.
    consistency_weight: float = 0.0
    consistency_threshold: Optional[float] = None  # None: FreeMatch's self-adaptive class-wise thresholds
    # The consistency weight rises linearly from 0 over this first fraction of the run (0: full from the
    # start), so the first, mostly wrong pseudo-labels count little. 0.5: on AID (3 labels/class, 5 seeds;
    # 1 label, 3; 20 labels, 1) +0.8 points on average over no ramp-up (docs/science.md).
    consistency_rampup: float = 0.5
    sgld: SGLDConfig = field(default_factory=SGLDConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    loaded: LoadedModel
    metrics: dict[str, Any]
    history: list[dict[str, float]]


# ---------------------------------------------------------------------------------------------- schedule
def planned_iterations(config: TrainConfig, iters_per_pass: int) -> int | None:
    """The run's length in iterations, or None when only the time budget bounds it."""
    limits = [config.iterations] if config.iterations else []
    if config.epochs:
        limits.append(config.epochs * iters_per_pass)
    if not limits and not config.time_budget_min:
        limits.append(DEFAULT_ITERATIONS)
    return min(limits) if limits else None


def run_progress(iterations_done: int, total_iters: int | None, elapsed_s: float, budget_s: float | None) -> float:
    """How far the run is, in [0, 1]: the larger of its iteration and its time fraction."""
    by_iterations = iterations_done / total_iters if total_iters else 0.0
    by_time = elapsed_s / budget_s if budget_s else 0.0
    return min(max(by_iterations, by_time), 1.0)


def learning_rate(config: TrainConfig, iteration: int, progress: float, next_progress: float) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of the run (or config.warmup_iters iterations), then
    cosine decay to 0 at its end; next_progress is the progress once this iteration is done."""
    if config.warmup_iters is not None:
        warm = min(1.0, (iteration + 1) / max(config.warmup_iters, 1))
    else:
        warm = min(1.0, next_progress / WARMUP_FRACTION)
    return config.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


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
    for name, value in (("--iterations", config.iterations), ("--epochs", config.epochs)):
        if value is not None and value < 1:
            raise JEMError(f"{name} must be at least 1 (got {value}).")
    if config.time_budget_min is not None and config.time_budget_min <= 0:
        raise JEMError(f"--time-budget-min must be positive (got {config.time_budget_min}).")
    if config.labels_per_class is not None and config.labels_per_class < 1:
        raise JEMError("--labels-per-class must be at least 1 (0 or omitted means: use every label).")
    threshold = config.consistency_threshold
    if config.consistency_weight < 0 or threshold is not None and not 0.0 < threshold <= 1.0:
        raise JEMError("--consistency must be ≥ 0 and --consistency-threshold in (0, 1] (or omitted: adaptive).")
    if not 0.0 <= config.consistency_rampup <= 1.0:
        raise JEMError("--consistency-rampup is a fraction of the run: give a value in [0, 1].")
    if config.image_size < 8:
        raise JEMError(f"--image-size must be at least 8 px (got {config.image_size}).")
    if dataset.images.shape[-1] != config.image_size:
        raise JEMError(f"Dataset images are {dataset.images.shape[-1]} px but the config asks for "
                       f"{config.image_size} px; load the dataset at the training size.")


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything a prepared run needs: the model and its data on the device, the streams, the plan."""

    parts: RunParts
    loaded: LoadedModel
    meta: ModelMeta
    dataset: SceneDataset
    inputs: torch.Tensor
    train_labels: torch.Tensor
    labelled: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    round_iters: int
    total_iters: int | None
    budget_s: float | None
    adaptive_threshold: SelfAdaptiveThreshold | None


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
    With fewer than MIN_VAL_FOR_SELECTION validation images the last weights are kept.
    checkpoint_path: write the training state there at every round end and every checkpoint_every_min
    minutes (deleted when the run finishes or is cancelled); resume=True continues from it.
    Under torchrun (see distributed.py) each rank trains on its shard; rank 0 writes the files.
    The result's metrics carry `warnings`: lines saying the model fits its labels badly or is near chance.
    """
    check_config(config, dataset)
    check_extras(dataset, unlabelled, start_model)
    if resume and checkpoint_path is None:
        raise JEMError("resume needs the checkpoint path of the run to continue.")
    ctx = distributed.current()
    log = log if log and ctx.is_main else (lambda message: None)
    progress = progress if progress and ctx.is_main else no_progress
    run = prepare_run(dataset, config, unlabelled, start_model, checkpoint_path, log)
    state, best_model = LoopState(sgld_steps=config.sgld.steps), None
    if resume:
        state, best_model = resume_run(run.parts, config)
        log(f"resumed from '{checkpoint_path}' at epoch {state.epoch}, iteration {state.iteration}")
    try:
        state, best_model, stop_reason = run_loop(run, config, state, best_model, progress, should_stop,
                                                  checkpoint_every_min, log)
    except Cancelled:
        remove_checkpoint(run.parts)
        raise
    result = finish_run(run, config, state, best_model, stop_reason, log)
    if out_path is not None and ctx.is_main:
        save_model(out_path, run.parts.model, run.meta)
    remove_checkpoint(run.parts)
    progress(1.0, "done")
    return result


def prepare_run(dataset: SceneDataset, config: TrainConfig, unlabelled: torch.Tensor | None,
                start_model: LoadedModel | None, checkpoint_path: str | Path | None,
                log: Callable[[str], None]) -> Run:
    """Split the data, build (or copy) the model, put the training pool on the device, plan the run."""
    ctx = distributed.current()
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
    iters_per_pass = max(1, math.ceil(len(data_indices) / (config.batch_size * ctx.world_size)))
    total_iters = planned_iterations(config, iters_per_pass)
    # A run bounded by --epochs validates after every pass, as asked; others at least every MIN_ROUND_ITERS.
    round_iters = config.epoch_iters or (iters_per_pass if config.epochs else max(iters_per_pass, MIN_ROUND_ITERS))
    if total_iters is not None:
        round_iters = min(round_iters, total_iters)
    streams = [BatchStream(distributed.shard(labelled, ctx), config.batch_size, generator),
               BatchStream(distributed.shard(data_indices, ctx), config.sgld_batch_size, generator)]
    parts = RunParts(model, optimiser, sampler, streams, generator, device, ctx, checkpoint_path,
                     {"images": len(pool), "class_names": list(dataset.class_names)})
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    adaptive = SelfAdaptiveThreshold(spec.num_classes, device) \
        if config.consistency_weight > 0 and config.consistency_threshold is None else None
    run = Run(parts, loaded, meta, dataset, inputs, train_labels, labelled, split.val, split.test, round_iters,
              total_iters, budget_s, adaptive)
    log(describe_run(run, config, len(data_indices), iters_per_pass))
    return run


def describe_run(run: Run, config: TrainConfig, train_images: int, iters_per_pass: int) -> str:
    limits = ([f"{run.total_iters} iterations"] if run.total_iters else []) + \
        ([f"{config.time_budget_min:g} min"] if config.time_budget_min else [])
    validation = f"{len(run.val)} val" if len(run.val) >= MIN_VAL_FOR_SELECTION else \
        "no validation split" if len(run.val) == 0 else \
        f"{len(run.val)} val (too few to pick an epoch: the last weights are kept)"
    mode = "baseline (CE only)" if config.baseline else "JEM"
    processes = f", {run.parts.ctx.world_size} processes" if run.parts.ctx.active else ""
    return (f"{mode}: {run.loaded.spec.arch} on {run.parts.device}, {train_images} train images "
            f"({len(run.labelled)} labelled), {validation}, {len(run.test)} test, {iters_per_pass} iterations/epoch"
            f"{processes}; run of {' or '.join(limits)}{', whichever comes first' if len(limits) > 1 else ''}, "
            f"warm-up over its first {WARMUP_FRACTION:.0%}")


def run_loop(run: Run, config: TrainConfig, state: LoopState, best_model: dict[str, torch.Tensor] | None,
             progress: ProgressFn, should_stop: Callable[[], bool] | None, checkpoint_every_min: float | None,
             log: Callable[[str], None]) -> tuple[LoopState, dict[str, torch.Tensor] | None, str]:
    """Rounds of iterations until the planned iterations or the time budget are used up (or early stop)."""
    parts, ctx, device = run.parts, run.parts.ctx, run.parts.device
    model, sampler, optimiser = parts.model, parts.sampler, parts.optimiser
    labelled_stream, data_stream = parts.streams
    step_model = distributed.wrap(model, ctx, device)
    selects = len(run.val) >= MIN_VAL_FOR_SELECTION
    if sampler is not None:
        sampler.config.steps = state.sgld_steps
    start_time = time.monotonic() - state.elapsed_s
    snapshot = save_point(parts, config, state, best_model, start_time, write=False)
    last_save = time.monotonic()
    grad_norms: deque[float] = deque(maxlen=50)
    stop_reason = f"{run.total_iters} iterations done"
    while run.total_iters is None or state.iteration < run.total_iters:
        model.train()
        over_budget = early_stop = False
        while state.done < run.round_iters and (run.total_iters is None or state.iteration < run.total_iters):
            elapsed = time.monotonic() - start_time
            save_due = checkpoint_every_min is not None and time.monotonic() - last_save >= checkpoint_every_min * 60
            cancel, over_budget, save_due = distributed.any_rank(
                [should_stop is not None and should_stop(), bool(run.budget_s and elapsed >= run.budget_s), save_due],
                ctx, device)
            if cancel:
                raise Cancelled()
            if over_budget:
                stop_reason = (f"time budget of {config.time_budget_min:g} min reached after {state.iteration} "
                               "iterations")
                break
            fraction = run_progress(state.iteration, run.total_iters, elapsed, run.budget_s)
            next_fraction = run_progress(state.iteration + 1, run.total_iters, elapsed, run.budget_s)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, state.iteration, fraction, next_fraction) * state.lr_scale
            losses = training_step(step_model, sampler, optimiser, run.inputs, run.train_labels, labelled_stream,
                                   data_stream, config, run.adaptive_threshold, consistency_ramp(config, fraction))
            if sampler is not None:
                losses["saturation"] = float(sampler.last_saturation)
            losses = dict(zip(losses, distributed.average(list(losses.values()), ctx, device)))
            reason = divergence_reason(losses, config, grad_norms)
            if reason is not None:
                state, best_model = recover(reason, snapshot, state, parts, config, log)
                grad_norms.clear()
                continue
            grad_norms.append(losses["grad_norm"])
            for key in state.sums:
                state.sums[key] += losses[key]
            state.iteration += 1
            state.done += 1
            progress(fraction, f"iteration {state.iteration}" + (f"/{run.total_iters}" if run.total_iters else "")
                     + f" ce {losses['ce']:.3f} gap {losses['gap']:+.2f}"
                     + (f" pseudo-labels {losses['mask_rate']:.0%}" if config.consistency_weight > 0 else ""))
            if save_due:
                snapshot = save_point(parts, config, state, best_model, start_time)
                last_save = time.monotonic()
        if state.done:
            record = end_of_epoch(run.loaded, run.dataset, run.val, state.epoch, state.iteration, state.sums,
                                  state.done, start_time)
            state.history.append(record)
            log(format_record(record))
            if not selects or record["val_accuracy"] > state.best_val_accuracy:
                state.best_val_accuracy, state.best_epoch = record["val_accuracy"], state.epoch
                best_model = cpu_state(model.state_dict()) if selects else None
            elif config.patience is not None and state.epoch - state.best_epoch >= config.patience:
                stop_reason = f"early stop: no val improvement for {config.patience} epochs"
                early_stop = True
        if over_budget or early_stop:
            break
        state.epoch, state.done = state.epoch + 1, 0
        state.sums = dict.fromkeys(state.sums, 0.0)
        snapshot = save_point(parts, config, state, best_model, start_time)
        last_save = time.monotonic()
    state.elapsed_s = time.monotonic() - start_time
    return state, best_model, stop_reason


def finish_run(run: Run, config: TrainConfig, state: LoopState, best_model: dict[str, torch.Tensor] | None,
               stop_reason: str, log: Callable[[str], None]) -> TrainResult:
    """Keep the chosen weights, score the test split, check the fit, fill the model's metadata."""
    model, dataset = run.parts.model, run.dataset
    if best_model is not None:
        model.load_state_dict(best_model)
        log(f"stopped ({stop_reason}); keeping the weights of epoch {state.best_epoch} (best val accuracy)")
    else:
        log(f"stopped ({stop_reason}); keeping the last weights")
    metrics = classification_metrics(predict_logits(run.loaded, dataset.images[run.test]),
                                     dataset.labels[run.test], dataset.class_names)
    labelled = run.labelled
    label_fit = float((predict_logits(run.loaded, dataset.images[labelled]).argmax(1) == dataset.labels[labelled])
                      .double().mean())
    warnings = fit_warnings(label_fit, len(labelled), metrics["accuracy"] if len(run.test) else None,
                            dataset.num_classes)
    for warning in warnings:
        log(f"warning: {warning}")
    metrics.update(split="test", best_epoch=state.best_epoch, iterations=state.iteration, stop_reason=stop_reason,
                   train_seconds=round(state.elapsed_s, 1), labelled_images=len(run.labelled),
                   mode="baseline" if config.baseline else "jem", recoveries=state.recoveries,
                   label_fit=label_fit, warnings=warnings)
    run.meta.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "reliability")}
    run.meta.train_config["history"] = state.history
    model.eval()
    return TrainResult(run.loaded, metrics, state.history)


def fit_warnings(label_fit: float, labelled: int, test_accuracy: float | None, classes: int) -> list[str]:
    """One clear line, with what to do, when a finished model fits its labels badly or is near chance."""
    warnings = []
    if label_fit < MIN_LABEL_FIT:
        warnings.append(f"the model fits only {label_fit:.0%} of its own {labelled} labelled images: train longer "
                        "(more iterations or minutes), check that the labels are right, or start from a model.")
    if test_accuracy is not None and test_accuracy < NEAR_CHANCE_FACTOR / classes:
        warnings.append(f"test accuracy {test_accuracy:.0%} is near chance ({1 / classes:.0%} for {classes} classes): "
                        "train longer (more iterations or minutes) or give more labels per class.")
    return warnings


def check_extras(dataset: SceneDataset, unlabelled: torch.Tensor | None, start_model: LoadedModel | None) -> None:
    shape = tuple(dataset.images.shape[1:])
    if unlabelled is not None and tuple(unlabelled.shape[1:]) != shape:
        raise JEMError(f"Unlabelled images are {tuple(unlabelled.shape[1:])} (bands, H, W) but the labelled ones "
                       f"are {shape}; give both the same bands and size.")
    if start_model is not None and start_model.spec.members > 1:
        raise JEMError(f"The starting model is an ensemble of {start_model.spec.members} networks; training "
                       "fine-tunes one network. `jem retrain` fine-tunes each member of an ensemble.")
    if start_model is not None and (start_model.spec.in_channels, start_model.spec.num_classes) != \
            (shape[0], dataset.num_classes):
        raise JEMError(f"The starting model takes {start_model.spec.in_channels} bands and "
                       f"{start_model.spec.num_classes} "
                       f"classes; the data has {shape[0]} bands and {dataset.num_classes} classes. Extend its head "
                       "first (jem_core.active.fit_head) or start without a model.")


def consistency_ramp(config: TrainConfig, progress: float) -> float:
    """How much of the consistency weight applies at this point of the run (the ramp-up)."""
    return min(1.0, progress / config.consistency_rampup) if config.consistency_rampup > 0 else 1.0


def training_step(model, sampler: SGLDSampler | None, optimiser: torch.optim.Optimizer, inputs: torch.Tensor,
                  labels: torch.Tensor, labelled_stream: BatchStream, data_stream: BatchStream,
                  config: TrainConfig, adaptive: SelfAdaptiveThreshold | None = None,
                  consistency_scale: float = 1.0) -> dict[str, float]:
    """One optimiser step; labelled, data, strong-view and SGLD images share one forward pass.

    The data batch (all training images, labelled or not) feeds the generative term and, with
    consistency on, is also the weak view whose confident predictions become pseudo-labels;
    consistency_scale multiplies that term's weight (its ramp-up).
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
        consistency, mask_rate = consistency_loss(chunks[1], chunks[2], config.consistency_threshold, adaptive)
        loss = loss + consistency_scale * config.consistency_weight * consistency
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


def end_of_epoch(loaded: LoadedModel, dataset: SceneDataset, val: torch.Tensor, epoch: int, iteration: int,
                 sums: dict[str, float], iters: int, start_time: float) -> dict[str, float]:
    nan = float("nan")  # no validation split: no figures rather than zeros that read as a failure
    val_metrics = classification_metrics(predict_logits(loaded, dataset.images[val]), dataset.labels[val],
                                         dataset.class_names) if len(val) else {"accuracy": nan, "nll": nan,
                                                                                "ece": nan}
    return {"epoch": epoch, "iteration": iteration, "minutes": (time.monotonic() - start_time) / 60,
            "train_ce": sums["ce"] / iters, "train_gap": sums["gap"] / iters,
            "pseudo_label_rate": sums.get("mask_rate", 0.0) / iters,
            "val_accuracy": val_metrics["accuracy"], "val_nll": val_metrics["nll"], "val_ece": val_metrics["ece"]}


def format_record(record: dict[str, float]) -> str:
    line = (f"epoch {record['epoch']:3d}  iteration {record['iteration']:5d}  {record['minutes']:6.1f} min  "
            f"train CE {record['train_ce']:.3f}  gap {record['train_gap']:+.3f}")
    if record["pseudo_label_rate"]:
        line += f"  pseudo-labels {record['pseudo_label_rate']:.0%}"
    if math.isnan(record["val_accuracy"]):
        return line + "  (no validation split)"
    return line + (f"  val acc {record['val_accuracy']:.1%}  val NLL {record['val_nll']:.3f}  "
                   f"val ECE {record['val_ece']:.3f}")
