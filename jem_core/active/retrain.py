"""Retrain on the analyst's own scene: the annotated patches are the labelled set, patches spread over
the same rasters (plus, optionally, a class-folder dataset) the unlabelled set, semi-supervised JEM
through `training.train`.

By default the run starts from the bundled base model when the raster's bands fit it, lasts a time
budget (RETRAIN_DEFAULTS.minutes), reads the rasters at 1/RETRAIN_DEFAULTS.coarsen of their
resolution (each patch sees that much more ground; the model remembers it, so mapping and suggestions
read the same way) and the new model's classes are the classes labelled this round;
`keep_model_classes` keeps the starting model's other classes too.  A starting model's head is fitted
to the new class list by name: rows of classes it knows are copied, new classes get fresh rows.

Fine-tuning a model, the run trains RETRAIN_DEFAULTS.members networks one after the other, each for
its share of the budget, on its own random draw of unlabelled patches and its own seed, and writes
them as one ensemble model (models.JEMEnsemble): on the scene benchmark two half-length retrains
averaged map a little more accurately and rank their errors a little better than one full-length
retrain, while a new network (no starting model) needs the whole budget (docs/labelling.md).

The model file also holds the labelled patches' pooled features under the final weights
(label_agreement.labelled_features): maps made with it use them to mark errors (the confidence is p(y|x)
times the label agreement).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import JEMError, ProgressFn, StopFn
from ..bundled import base_model_path
from ..data import SceneDataset, load_class_folder
from ..label_agreement import labelled_features
from ..metrics import predict_logits
from ..model_file import LoadedModel, ModelMeta, as_loaded, load_model, save_model
from ..models import ModelSpec, build_model, ensemble_of, networks
from ..raster_io import open_raster
from ..training import TrainConfig, TrainResult, fit_warnings, train
from .patches import Annotation, RasterInput, patches_from_annotations, sample_unlabelled_patches


@dataclass(frozen=True)
class RetrainDefaults:
    """What `jem retrain`, `jem:retrain` and the labelling dock do unless told otherwise (docs/labelling.md
    has the scene-benchmark measurements behind each value)."""

    minutes: float = 3.0  # training time on two CPU cores
    unlabelled: int = 2048  # patches spread over the scene for the energy term
    image_size: int = 32  # patch size of a new model (a starting model brings its own)
    arch: str = "wrn-10-2"  # network of a new model
    lr: float = 1e-3  # fine-tuning; 5e-4 and 2e-3 mapped no better (jem train's own default is 2e-3)
    label_shift_fraction: float = 0.25  # each annotation also labels its neighbours shifted by this × patch
    coarsen: int = 2  # read the rasters at 1/2 resolution: a 32 px patch sees 64 × 64 raster pixels
    members: int = 2  # fine-tuning: networks trained one after the other on a share of the budget each, averaged
    members_from_scratch: int = 1  # a new network needs every iteration of the budget


# Member i of an ensemble trains with seed config.seed + MEMBER_SEED_STEP · i (its unlabelled draw too).
MEMBER_SEED_STEP = 1000


RETRAIN_DEFAULTS = RetrainDefaults()


def reading_coarsen(start_meta: ModelMeta | None, requested: int | None = None) -> int:
    """How a retrain reads the rasters: as requested; else as a starting model retrained coarser reads
    them (a second round keeps the first round's scale); else RETRAIN_DEFAULTS.coarsen."""
    if requested is not None:
        if requested < 1:
            raise JEMError(f"coarsen must be a whole number ≥ 1 (1 = read the raster as it is; got {requested}).")
        return requested
    if start_meta is not None and start_meta.coarsen > 1:
        return start_meta.coarsen
    return RETRAIN_DEFAULTS.coarsen


def retrain_config(minutes: float | None = RETRAIN_DEFAULTS.minutes, iterations: int | None = None,
                   **overrides: Any) -> TrainConfig:
    """The TrainConfig of a retrain: a time budget (or an iteration count), every label used, no split."""
    values = dict(arch=RETRAIN_DEFAULTS.arch, image_size=RETRAIN_DEFAULTS.image_size, lr=RETRAIN_DEFAULTS.lr)
    return TrainConfig(**{**values, **overrides, "time_budget_min": minutes, "iterations": iterations})


@dataclass
class RetrainResult:
    loaded: LoadedModel
    class_names: list[str]
    new_classes: list[str]
    unlabelled_classes: list[str]  # classes of the starting model that got no labels this round
    labelled_count: int
    unlabelled_count: int
    labelled_accuracy: float  # on the annotated patches themselves (a fit check, not a held-out score)
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def fit_head(loaded: LoadedModel, class_names: Sequence[str]) -> LoadedModel:
    """A copy of the model whose head has one row per class in class_names, in that order.

    Rows of classes the model knows are copied (by name), classes not listed are dropped; new classes
    get freshly initialised rows with the mean bias of the old ones, so they start neither favoured
    nor impossible.
    """
    old_names = list(loaded.meta.class_names)
    if list(class_names) == old_names:
        return loaded
    spec = ModelSpec(**{**loaded.spec.to_dict(), "num_classes": len(class_names)})
    model = build_model(spec)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    old_head = loaded.model.head
    with torch.no_grad():
        model.head.bias.fill_(float(old_head.bias.mean()))
        for new_index, name in enumerate(class_names):
            if name in old_names:
                model.head.weight[new_index] = old_head.weight[old_names.index(name)]
                model.head.bias[new_index] = old_head.bias[old_names.index(name)]
    meta = copy.deepcopy(loaded.meta)
    meta.class_names = list(class_names)
    device = next(loaded.model.parameters()).device
    return LoadedModel(model.to(device).eval(), meta)


def default_start_model(rasters: Sequence[RasterInput], bands: Sequence[str] | None,
                        log: Callable[[str], None]) -> LoadedModel | None:
    """The bundled base model when the rasters' bands fit it, else None (a new model), saying which."""
    base = load_model(base_model_path(), "cpu")
    try:
        for raster in rasters:
            with open_raster(raster, bands, base.meta.band_names):
                pass
    except JEMError as error:
        log(f"starting a new model: the bundled base model takes {', '.join(base.meta.band_names)} and these "
            f"rasters do not fit it ({str(error)[:160]})")
        return None
    log(f"starting from the bundled base model ({len(base.meta.class_names)} land-cover classes, "
        f"{base.meta.image_size} px patches); --from-scratch trains a new one")
    return base


def retrain(rasters: Sequence[RasterInput], annotations: Sequence[Annotation], *,
            start_model: LoadedModel | str | Path | None = None, keep_model_classes: bool = False,
            extra_dataset: SceneDataset | str | Path | None = None, out_model: str | Path | None = None,
            config: TrainConfig | None = None, bands: Sequence[str] | None = None,
            unlabelled_count: int = RETRAIN_DEFAULTS.unlabelled, stretch: str = "auto",
            label_shift: int | None = None, coarsen: int | None = None, members: int | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None,
            log: Callable[[str], None] | None = None) -> RetrainResult:
    """Semi-supervised JEM on annotated patches (labelled) + patches spread over the rasters (unlabelled).

    start_model: a model (or its file) to fine-tune; None trains a new one (default_start_model picks
    the bundled base model for callers that want it).  keep_model_classes: the new model keeps the
    starting model's classes beside the labelled ones; otherwise it has the labelled classes only.
    extra_dataset: a class-folder dataset (or its path) whose images join the unlabelled set.
    label_shift: each annotation also labels the patches shifted by ±label_shift px around it
    (default: RETRAIN_DEFAULTS.label_shift_fraction of the patch size; 0: the annotated patch only).
    coarsen: read the rasters at 1/coarsen of their resolution (None: reading_coarsen's default); the
    new model stores it.  The patch size is the starting model's, else config.image_size.
    members: networks to train, each on its own unlabelled draw, and write as one ensemble (1: one network;
    None: default_members).
    """
    start = as_loaded(start_model) if start_model is not None else None
    config = config or retrain_config()
    patch_size = start.meta.image_size if start is not None else config.image_size
    meta = start.meta if start is not None else None
    head_order = meta.class_names if meta is not None and keep_model_classes else None
    if label_shift is None:
        label_shift = round(RETRAIN_DEFAULTS.label_shift_fraction * patch_size)
    coarsen = reading_coarsen(meta, coarsen)
    if log and coarsen > 1:
        log(f"reading the rasters at 1/{coarsen} of their resolution: each {patch_size} px patch covers "
            f"{coarsen * patch_size} × {coarsen * patch_size} raster pixels (--coarsen 1 reads them as they are)")
    labelled = patches_from_annotations(rasters, annotations, patch_size, bands, meta, head_order, stretch,
                                        label_shift, coarsen)
    extra = matching_extra_images(extra_dataset, labelled) if extra_dataset is not None else None
    members = default_members(start) if members is None else members
    if members < 1:
        raise JEMError(f"members must be at least 1 (got {members}).")
    unlabelled_sets = [sample_unlabelled_patches(rasters, unlabelled_count, member_seed(config, member), patch_size,
                                                 bands, meta, stretch, should_stop, coarsen)
                       for member in range(members)]
    if extra is not None:
        unlabelled_sets = [torch.cat([unlabelled, extra]) for unlabelled in unlabelled_sets]
    return retrain_on_patches(labelled, unlabelled_sets, start_model=start, out_model=out_model, config=config,
                              coarsen=coarsen, progress=progress, should_stop=should_stop, log=log)


def matching_extra_images(extra_dataset: SceneDataset | str | Path, labelled: SceneDataset) -> torch.Tensor:
    """The extra dataset's images, refused unless they have the raster patches' bands and size."""
    patch_size = labelled.images.shape[-1]
    extra = extra_dataset if isinstance(extra_dataset, SceneDataset) else load_class_folder(extra_dataset, patch_size)
    if extra.images.shape[1:] != labelled.images.shape[1:]:
        raise JEMError(f"The extra dataset has {extra.images.shape[1]}-band {extra.images.shape[-1]} px images; "
                       f"the raster patches are {labelled.images.shape[1]}-band {patch_size} px. Use matching data.")
    return extra.images


def default_members(start_model: LoadedModel | None) -> int:
    """RETRAIN_DEFAULTS.members when fine-tuning, members_from_scratch for a new network."""
    return RETRAIN_DEFAULTS.members if start_model is not None else RETRAIN_DEFAULTS.members_from_scratch


def member_seed(config: TrainConfig, member: int) -> int:
    return config.seed + MEMBER_SEED_STEP * member


def retrain_on_patches(labelled: SceneDataset, unlabelled: torch.Tensor | Sequence[torch.Tensor], *,
                       start_model: LoadedModel | None = None, out_model: str | Path | None = None,
                       config: TrainConfig | None = None, coarsen: int = 1, progress: ProgressFn | None = None,
                       should_stop: StopFn | None = None, log: Callable[[str], None] | None = None) -> RetrainResult:
    """Semi-supervised JEM: every labelled image is a training label (no validation split: there are
    too few), the unlabelled images feed the generative term; the last weights are kept.

    unlabelled: one set of images, or one set per member network: N sets train N networks, member i on
    set i with seed member_seed(config, i), each for 1/N of the run's minutes or iterations, written as
    one ensemble.  A start model's head is fitted to labelled.class_names (fit_head); member i of the
    new model starts from network i (cycling) of the start model.  coarsen: the resolution divisor the
    patches were read at, stored in the new model (ModelMeta.coarsen).
    """
    log = log or (lambda message: None)
    unlabelled_sets = [unlabelled] if isinstance(unlabelled, torch.Tensor) else list(unlabelled)
    config = dataclasses.replace(config or retrain_config(), image_size=labelled.images.shape[-1],
                                 labels_per_class=None, val_fraction=0.0, test_fraction=0.0)
    old_names = start_model.meta.class_names if start_model is not None else []
    new_classes = [n for n in labelled.class_names if n not in old_names]
    dropped = [n for n in old_names if n not in labelled.class_names]
    counts = torch.bincount(labelled.labels, minlength=labelled.num_classes).tolist()
    without = [n for n, c in zip(labelled.class_names, counts) if c == 0]
    if without:
        log(f"warning: no labels this round for {', '.join(without)}; the model keeps these classes but "
            "fine-tuning may weaken them. Label a few patches of each to keep them sharp.")
    if dropped:
        log(f"the new model has the {len(labelled.class_names)} labelled classes; the starting model's "
            f"{', '.join(dropped)} are left out (keep them with --keep-model-classes)")
    starts = [fit_head(network, labelled.class_names) for network in member_models(start_model)] \
        if start_model is not None else [None]
    per_class = ", ".join(f"{n}: {c}" for n, c in zip(labelled.class_names, counts))
    log(f"retraining on {len(labelled)} labelled patches ({per_class}) and {len(unlabelled_sets[0])} unlabelled "
        "images" + (f"; new classes: {', '.join(new_classes)}" if new_classes else "")
        + (f"; {len(unlabelled_sets)} networks, one after the other, averaged" if len(unlabelled_sets) > 1 else ""))
    results = [train_member(labelled, member_unlabelled, starts[index % len(starts)], config, index,
                            len(unlabelled_sets), progress, should_stop, log)
               for index, member_unlabelled in enumerate(unlabelled_sets)]
    loaded, metrics = combined(results, labelled, config)
    loaded.meta.coarsen = coarsen
    loaded.labelled = labelled_features(loaded, labelled.images, labelled.labels, labelled.places, config.seed)
    if len(results) > 1:  # a single network's run has said its own
        for warning in metrics["warnings"]:
            log(f"warning: {warning}")
    if out_model is not None:
        save_model(out_model, loaded.model, loaded.meta, loaded.labelled)
    return RetrainResult(loaded, list(labelled.class_names), new_classes, without, len(labelled),
                         len(unlabelled_sets[0]), metrics["label_fit"], metrics, list(metrics["warnings"]))


def member_models(loaded: LoadedModel) -> list[LoadedModel]:
    """A model's networks, each as a LoadedModel with the model's metadata."""
    return [LoadedModel(network, loaded.meta) for network in networks(loaded.model)]


def train_member(labelled: SceneDataset, unlabelled: torch.Tensor, start: LoadedModel | None, config: TrainConfig,
                 index: int, count: int, progress: ProgressFn | None, should_stop: StopFn | None,
                 log: Callable[[str], None]) -> TrainResult:
    """Network `index` of `count`: its seed, its share of the run's length, its slice of the progress bar."""
    share = dataclasses.replace(
        config, seed=member_seed(config, index),
        time_budget_min=config.time_budget_min / count if config.time_budget_min else config.time_budget_min,
        iterations=max(1, config.iterations // count) if config.iterations else config.iterations)
    member_progress = None if progress is None else \
        (lambda fraction, message: progress((index + fraction) / count, message))
    member_log = log if count == 1 else (lambda message: log(f"[network {index + 1} of {count}] {message}"))
    return train(labelled, share, progress=member_progress, should_stop=should_stop, log=member_log,
                 unlabelled=unlabelled, start_model=start)


def combined(results: list[TrainResult], labelled: SceneDataset,
             config: TrainConfig) -> tuple[LoadedModel, dict[str, Any]]:
    """The trained networks as one model, with its fit on the labelled patches and the run's totals."""
    if len(results) == 1:
        return results[0].loaded, results[0].metrics
    meta = copy.deepcopy(results[0].loaded.meta)
    meta.train_config = {**dataclasses.asdict(config), "members": len(results),
                         "member_histories": [result.loaded.meta.train_config.get("history", []) for result in results]}
    loaded = LoadedModel(ensemble_of([result.loaded.model for result in results]).eval(), meta)
    # Every labelled patch is a training label (no split), so this is the fit on the annotations.
    label_fit = float((predict_logits(loaded, labelled.images).argmax(1) == labelled.labels).double().mean())
    # The members' shared fields (no test split, labelled count, mode), then the ensemble's own totals.
    shared = {k: v for k, v in results[0].metrics.items() if k not in ("best_epoch", "stop_reason", "recoveries")}
    member_metrics = [result.metrics for result in results]
    metrics = {**shared, "label_fit": label_fit, "members": len(results),
               "iterations": sum(m["iterations"] for m in member_metrics),
               "member_iterations": [m["iterations"] for m in member_metrics],
               "train_seconds": round(sum(m["train_seconds"] for m in member_metrics), 1),
               "recoveries": sum(m["recoveries"] for m in member_metrics),
               "stop_reason": "; ".join(f"network {i + 1}: {m['stop_reason']}" for i, m in enumerate(member_metrics)),
               "warnings": fit_warnings(label_fit, len(labelled), None, labelled.num_classes)}
    meta.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "reliability")}
    return loaded, metrics
