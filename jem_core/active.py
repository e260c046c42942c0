"""Label a few patches, retrain semi-supervised, and suggest where to label next (active learning).

Annotations are points in the raster's CRS, each with a class name.  A point labels the patch
(the model's patch size, on the raster's pixel grid) centred on it, moved inwards where it would
stick out of the raster.  A polygon is given either by its bounds (`Annotation.bounds`): it then
labels every patch-sized cell of a grid centred in those bounds (at least one, at the centre), or,
for irregular shapes, as one point per cell inside it (`cell_centres` + the caller's own
point-in-polygon test, which the QGIS side does).

`retrain` takes the annotated patches as the labelled set and patches sampled at random from the
same rasters (plus, optionally, images of a class-folder dataset) as the unlabelled set, and runs
semi-supervised JEM through `training.train`.  A starting model is fine-tuned; classes it does not
know extend its linear head (old rows copied, new rows freshly initialised).

`suggest` scores every patch of a raster by how unfamiliar it is to the model (low −E(x), i.e. high
energy) and how unsure its classification is (high predictive entropy), and picks the best-scoring
patches greedily with a minimum spacing, so the suggestions spread over the scene.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from . import Cancelled, JEMError, ProgressFn, no_progress
from .data import SceneDataset, load_class_folder
from .mapping import iter_patches
from .metrics import predict_logits
from .model_file import LoadedModel, ModelMeta, as_loaded
from .models import ModelSpec, build_model
from .raster_io import RasterSource, Stretch, choose_stretch, open_raster, require_crs
from .training import TrainConfig, train

StopFn = Callable[[], bool]
# One raster: a path GDAL opens, or single-band files stacked on the finest grid (raster_io.open_raster).
RasterInput = Union[str, Path, Sequence[Union[str, Path]]]
# A patch counts as imagery when at least this fraction of its pixels is valid (not nodata).
MIN_VALID_FRACTION = 0.5


@dataclass
class Annotation:
    """A labelled location: centre (x, y) in the raster's CRS; bounds (xmin, ymin, xmax, ymax) for a polygon."""

    class_name: str
    x: float
    y: float
    bounds: tuple[float, float, float, float] | None = None


@dataclass
class PatchWindow:
    raster: int  # index into the rasters list
    row: int  # top-left pixel of the patch
    col: int


@dataclass
class Suggestion:
    """A patch worth labelling, with the scores that put it there (higher score = label it sooner)."""

    rank: int
    x: float  # patch centre, raster CRS
    y: float
    bounds: tuple[float, float, float, float]  # patch footprint (xmin, ymin, xmax, ymax), raster CRS
    row: int
    col: int
    score: float  # mean of the two percentiles below, in [0, 1]
    unfamiliarity: float  # percentile of E(x) among the raster's patches (1 = least familiar)
    uncertainty: float  # percentile of the predictive entropy (1 = most unsure)
    neg_energy: float  # −E(x) = logsumexp f(x)
    entropy: float  # nats
    margin: float  # p(top class) − p(second class)
    predicted_class: str
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def cell_centres(bounds: Sequence[float], cell_width: float, cell_height: float) -> list[tuple[float, float]]:
    """Centres of the patch-sized cells of a grid centred in bounds; at least the centre of bounds."""
    xmin, ymin, xmax, ymax = bounds
    # A footprint drawn as exactly one patch must give one cell, despite float rounding.
    columns = max(1, int((xmax - xmin) / cell_width + 1e-6))
    rows = max(1, int((ymax - ymin) / cell_height + 1e-6))
    x0 = (xmin + xmax) / 2 - (columns - 1) * cell_width / 2
    y0 = (ymin + ymax) / 2 - (rows - 1) * cell_height / 2
    return [(x0 + i * cell_width, y0 + j * cell_height) for j in range(rows) for i in range(columns)]


class PatchReader:
    """Open rasters (same bands, stretched to the model's value range) that patches are cut from."""

    def __init__(self, sources: list[RasterSource], stretches: list[Stretch], patch_size: int) -> None:
        for source in sources:
            if source.width < patch_size or source.height < patch_size:
                raise JEMError(f"'{source.description}' is {source.width}×{source.height} px, smaller than one "
                               f"{patch_size} px patch. Use a larger raster or a model with smaller patches.")
        self.sources, self.stretches, self.patch_size = sources, stretches, patch_size
        self._stack = ExitStack()
        self._datasets = [self._stack.enter_context(source.open()) for source in sources]

    def close(self) -> None:
        self._stack.close()

    @property
    def band_names(self) -> list[str]:
        return self.sources[0].band_names

    def pixel_size(self, raster: int) -> tuple[float, float]:
        transform = self.sources[raster].transform
        return abs(transform.a), abs(transform.e)

    def locate(self, x: float, y: float) -> PatchWindow | None:
        """The patch centred on (x, y) in the first raster that contains the point, moved inside it."""
        for index, source in enumerate(self.sources):
            col, row = ~source.transform * (x, y)
            if 0 <= col < source.width and 0 <= row < source.height:
                half = self.patch_size / 2
                row0 = min(max(int(round(row - half)), 0), source.height - self.patch_size)
                col0 = min(max(int(round(col - half)), 0), source.width - self.patch_size)
                return PatchWindow(index, row0, col0)
        return None

    def read(self, window: PatchWindow) -> tuple[np.ndarray, float]:
        """Pixels (bands, size, size) float32 in the model's value range, and the valid-pixel fraction."""
        from rasterio.windows import Window

        source, size = self.sources[window.raster], self.patch_size
        dataset = self._datasets[window.raster]
        pixels = dataset.read(source.band_indexes, window=Window(window.col, window.row, size, size),
                              out_dtype="float32")
        valid = np.isfinite(pixels).all(axis=0)
        if source.has_mask:
            masks = dataset.read_masks(source.band_indexes, window=Window(window.col, window.row, size, size))
            valid &= (masks > 0).all(axis=0)
        pixels = np.nan_to_num(pixels)
        self.stretches[window.raster].apply(pixels)
        return pixels, float(valid.mean())

    def footprint(self, window: PatchWindow) -> tuple[float, float, float, float]:
        transform = self.sources[window.raster].transform
        xs, ys = zip(*(transform * (window.col + dc, window.row + dr)
                       for dc, dr in ((0, 0), (self.patch_size, self.patch_size))))
        return min(xs), min(ys), max(xs), max(ys)


def open_patch_reader(stack: ExitStack, rasters: Sequence[RasterInput], patch_size: int,
                      bands: Sequence[str] | None, model_meta: ModelMeta | None,
                      stretch: str = "auto") -> PatchReader:
    """Every raster opened with the model's bands and stretch (no model: bands as they are, no stretch)."""
    if not rasters:
        raise JEMError("No raster given. Pass at least one raster to read the annotated patches from.")
    expected = model_meta.band_names if model_meta is not None else None
    sources = [stack.enter_context(open_raster(path, bands, expected)) for path in rasters]
    counts = {len(s.band_indexes) for s in sources}
    if len(counts) > 1:
        raise JEMError("The rasters have different band counts (" + ", ".join(
            f"{s.description}: {len(s.band_indexes)}" for s in sources) + "). Use rasters with the same bands.")
    if model_meta is not None:
        stretches = [choose_stretch(s, model_meta.value_range, stretch) for s in sources]
    else:
        stretches = [Stretch("none", [0.0] * len(s.band_indexes), [1.0] * len(s.band_indexes), 0.0, 1.0)
                     for s in sources]
    reader = PatchReader(sources, stretches, patch_size)
    stack.callback(reader.close)
    return reader


def annotation_windows(reader: PatchReader, annotations: Sequence[Annotation]) -> list[tuple[PatchWindow, str]]:
    """(patch, class name) for every annotation; polygons (bounds) expand to their grid cells."""
    windows = []
    for number, annotation in enumerate(annotations, start=1):
        if not str(annotation.class_name).strip():
            raise JEMError(f"Annotation {number} at ({annotation.x:g}, {annotation.y:g}) has an empty class name. "
                           "Give every annotation a class.")
        centres = [(annotation.x, annotation.y)]
        if annotation.bounds is not None:
            first = reader.locate(annotation.x, annotation.y)
            if first is not None:
                width, height = reader.pixel_size(first.raster)
                centres = cell_centres(annotation.bounds, width * reader.patch_size, height * reader.patch_size)
        for x, y in centres:
            window = reader.locate(x, y)
            if window is None:
                raise JEMError(f"Annotation {number} ('{annotation.class_name}' at {x:g}, {y:g}) lies outside every "
                               f"raster ({describe_extents(reader)}). Remove it, or check that annotations and "
                               "rasters use the same CRS.")
            windows.append((window, str(annotation.class_name).strip()))
    return windows


def describe_extents(reader: PatchReader) -> str:
    parts = []
    for source in reader.sources:
        xmin, ymax = source.transform * (0, 0)
        xmax, ymin = source.transform * (source.width, source.height)
        parts.append(f"x {min(xmin, xmax):g}…{max(xmin, xmax):g}, y {min(ymin, ymax):g}…{max(ymin, ymax):g}")
    return "; ".join(parts)


def patches_from_annotations(rasters: Sequence[RasterInput], annotations: Sequence[Annotation], patch_size: int,
                             bands: Sequence[str] | None = None, model_meta: ModelMeta | None = None,
                             class_names: Sequence[str] | None = None, stretch: str = "auto") -> SceneDataset:
    """The labelled patches under the annotations, as a SceneDataset.

    class_names: classes in head order (e.g. a starting model's); annotated classes not in it are
    appended in sorted order.  Each listed class needs at least one annotation unless it is in
    `model_meta.class_names` (a starting model's class may go without new labels).
    """
    if not annotations:
        raise JEMError("There are no annotations. Label at least one patch of each class, then retrain.")
    with ExitStack() as stack:
        reader = open_patch_reader(stack, rasters, patch_size, bands, model_meta, stretch)
        windows = annotation_windows(reader, annotations)
        names = list(class_names or [])
        names += sorted({name for _, name in windows} - set(names))
        counts = {name: 0 for name in names}
        for _, name in windows:
            counts[name] += 1
        known = set(model_meta.class_names) if model_meta is not None else set()
        missing = [name for name, count in counts.items() if count == 0 and name not in known]
        if missing:
            raise JEMError(f"Class(es) {', '.join(missing)} have no labels. Annotate at least one patch of each "
                           "class, or remove it from the class list.")
        if len(names) < 2:
            raise JEMError(f"Only one class ('{names[0]}') is labelled. A classifier needs labels of at least two "
                           "classes (or a starting model that knows others).")
        images = np.stack([reader.read(window)[0] for window, _ in windows])
        labels = torch.tensor([names.index(name) for _, name in windows])
        band_names = reader.band_names
        dtype = reader.sources[0].dtype
        sources = [Path(reader.sources[w.raster].description) for w, _ in windows]
    value_range = list(model_meta.value_range) if model_meta is not None else \
        ([0.0, 255.0] if dtype == "uint8" else [float(images.min()), float(images.max())])
    return SceneDataset(torch.from_numpy(images), labels, names, list(band_names), value_range, sources)


def sample_unlabelled_patches(rasters: Sequence[RasterInput], n: int, seed: int, patch_size: int,
                              bands: Sequence[str] | None = None, model_meta: ModelMeta | None = None,
                              stretch: str = "auto", should_stop: StopFn | None = None) -> torch.Tensor:
    """n patches (n, bands, size, size) at random positions, rasters weighted by area, nodata avoided."""
    if n < 1:
        raise JEMError(f"The number of unlabelled patches must be at least 1 (got {n}).")
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        reader = open_patch_reader(stack, rasters, patch_size, bands, model_meta, stretch)
        areas = np.array([s.width * s.height for s in reader.sources], dtype=float)
        chosen: list[np.ndarray] = []
        attempts = 0
        while len(chosen) < n and attempts < 20 * n:
            if should_stop is not None and should_stop():
                raise Cancelled()
            attempts += 1
            raster = int(rng.choice(len(areas), p=areas / areas.sum()))
            source = reader.sources[raster]
            window = PatchWindow(raster, int(rng.integers(0, source.height - patch_size + 1)),
                                 int(rng.integers(0, source.width - patch_size + 1)))
            pixels, valid = reader.read(window)
            if valid >= MIN_VALID_FRACTION:
                chosen.append(pixels)
    if not chosen:
        raise JEMError("No patch of the rasters has enough valid pixels (they look all nodata). Check the rasters.")
    return torch.from_numpy(np.stack(chosen))


def extend_head(loaded: LoadedModel, class_names: Sequence[str]) -> LoadedModel:
    """A copy of the model whose head has one row per class in class_names.

    Rows of classes the model knows are copied (by name); new classes get freshly initialised rows
    with the mean bias of the old ones, so they start neither favoured nor impossible.
    """
    old_names = list(loaded.meta.class_names)
    if list(class_names) == old_names:
        return loaded
    dropped = [name for name in old_names if name not in class_names]
    if dropped:
        raise JEMError(f"The new class list leaves out {', '.join(dropped)} of the starting model; "
                       "a head can be extended, not shrunk.")
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


def retrain(rasters: Sequence[RasterInput], annotations: Sequence[Annotation], *,
            start_model: LoadedModel | str | Path | None = None,
            extra_dataset: SceneDataset | str | Path | None = None, out_model: str | Path | None = None,
            config: TrainConfig | None = None, bands: Sequence[str] | None = None, unlabelled_count: int = 512,
            stretch: str = "auto", progress: ProgressFn | None = None, should_stop: StopFn | None = None,
            log: Callable[[str], None] | None = None) -> RetrainResult:
    """Semi-supervised JEM on annotated patches (labelled) + random patches of the rasters (unlabelled).

    extra_dataset: a class-folder dataset (or its path) whose images join the unlabelled set.
    The patch size is the starting model's, else config.image_size.
    """
    start = as_loaded(start_model) if start_model is not None else None
    config = config or TrainConfig()
    patch_size = start.meta.image_size if start is not None else config.image_size
    meta = start.meta if start is not None else None
    labelled = patches_from_annotations(rasters, annotations, patch_size, bands, meta,
                                        meta.class_names if meta is not None else None, stretch)
    unlabelled = sample_unlabelled_patches(rasters, unlabelled_count, config.seed, patch_size, bands, meta, stretch,
                                           should_stop)
    if extra_dataset is not None:
        extra = extra_dataset if isinstance(extra_dataset, SceneDataset) else load_class_folder(extra_dataset, patch_size)
        if extra.images.shape[1:] != unlabelled.shape[1:]:
            raise JEMError(f"The extra dataset has {extra.images.shape[1]}-band {extra.images.shape[-1]} px images; "
                           f"the raster patches are {unlabelled.shape[1]}-band {patch_size} px. Use matching data.")
        unlabelled = torch.cat([unlabelled, extra.images])
    return retrain_on_patches(labelled, unlabelled, start_model=start, out_model=out_model, config=config,
                              progress=progress, should_stop=should_stop, log=log)


def retrain_on_patches(labelled: SceneDataset, unlabelled: torch.Tensor, *, start_model: LoadedModel | None = None,
                       out_model: str | Path | None = None, config: TrainConfig | None = None,
                       progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                       log: Callable[[str], None] | None = None) -> RetrainResult:
    """Semi-supervised JEM: every labelled image is a training label (no validation split: there are
    too few), the unlabelled images feed the generative term; the last epoch's model is kept.

    With a start model, labelled.class_names must begin with its classes (patches_from_annotations
    orders them so); the extra classes extend its head.
    """
    log = log or (lambda message: None)
    config = dataclasses.replace(config or TrainConfig(), image_size=labelled.images.shape[-1],
                                 labels_per_class=None, val_fraction=0.0, test_fraction=0.0)
    old_names = start_model.meta.class_names if start_model is not None else []
    new_classes = [n for n in labelled.class_names if n not in old_names]
    counts = torch.bincount(labelled.labels, minlength=labelled.num_classes).tolist()
    without = [n for n, c in zip(labelled.class_names, counts) if c == 0]
    if without:
        log(f"warning: no labels this round for {', '.join(without)}; the model keeps these classes but "
            "fine-tuning may weaken them. Label a few patches of each to keep them sharp.")
    start = extend_head(start_model, labelled.class_names) if start_model is not None else None
    log(f"retraining on {len(labelled)} labelled patches ({', '.join(f'{n}: {c}' for n, c in zip(labelled.class_names, counts))}) "
        f"and {len(unlabelled)} unlabelled images" + (f"; new classes: {', '.join(new_classes)}" if new_classes else ""))
    result = train(labelled, config, out_path=out_model, progress=progress, should_stop=should_stop, log=log,
                   unlabelled=unlabelled, start_model=start)
    predicted = predict_logits(result.loaded, labelled.images).argmax(1)
    fit = (predicted == labelled.labels).double().mean().item()
    return RetrainResult(result.loaded, list(labelled.class_names), new_classes, without, len(labelled),
                         len(unlabelled), fit, result.metrics)


def uncertainty_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row −E(x), predictive entropy, top-2 margin, predicted index and confidence."""
    probs = logits.softmax(1)
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    return {"neg_energy": torch.logsumexp(logits, 1),
            "entropy": -(probs * probs.clamp_min(1e-12).log()).sum(1),
            "margin": top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0],
            "predicted": probs.argmax(1), "confidence": top[:, 0]}


def percentile_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value scaled to [0, 1] (ties share the lower rank); 1 = largest."""
    if len(values) < 2:
        return torch.ones_like(values, dtype=torch.float64)
    order = values.double().argsort()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    return ranks / (len(values) - 1)


def priority(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unfamiliarity (high E(x)), uncertainty (high entropy) percentiles and their mean, the score."""
    unfamiliarity = percentile_rank(-scores["neg_energy"])
    uncertainty = percentile_rank(scores["entropy"])
    return {"unfamiliarity": unfamiliarity, "uncertainty": uncertainty, "score": (unfamiliarity + uncertainty) / 2}


def spread_selection(score: torch.Tensor, positions: torch.Tensor, count: int, min_distance: float) -> list[int]:
    """Greedy: take the best-scoring candidate that lies at least min_distance from every one taken."""
    chosen: list[int] = []
    for index in score.argsort(descending=True).tolist():
        if len(chosen) == count:
            break
        if chosen and torch.cdist(positions[index][None].double(), positions[chosen].double()).min() < min_distance:
            continue
        chosen.append(index)
    return chosen


def suggest(model: LoadedModel | str | Path, raster: RasterInput, count: int, *, min_distance: float | None = None,
            stride: int | None = None, bands: Sequence[str] | None = None, stretch: str = "auto",
            batch_size: int = 64, progress: ProgressFn | None = None,
            should_stop: StopFn | None = None) -> list[Suggestion]:
    """The `count` patches of the raster most worth labelling, spread over the scene, best first.

    Patches come from mapping.iter_patches (the land-cover map's grid; patches with nodata are
    skipped).  min_distance: least spacing between suggested patch centres, in raster pixels;
    default half the side of the square each suggestion would get if the scene were split evenly
    (√(width·height / count) / 2), and at least one patch.  stride: patch grid step, a divisor of
    the patch size (default: the patch size, i.e. non-overlapping patches).
    """
    if count < 1:
        raise JEMError(f"COUNT must be at least 1 (got {count}).")
    loaded = as_loaded(model)
    progress = progress or no_progress
    size = loaded.meta.image_size
    windows: list[PatchWindow] = []
    logits: list[torch.Tensor] = []
    with ExitStack() as stack:
        reader = open_patch_reader(stack, [raster], size, bands, loaded.meta, stretch)
        source = reader.sources[0]
        require_crs(source, "the suggestions could not be placed on the ground")
        for batch in iter_patches(source, size, stride, batch_size=batch_size, stretch=reader.stretches[0],
                                  should_stop=should_stop):
            windows += [PatchWindow(0, *batch.grid.patch_window(int(r), int(c))[1::-1])
                        for r, c in zip(batch.rows, batch.cols)]
            logits.append(predict_logits(loaded, torch.from_numpy(batch.pixels), should_stop=should_stop))
            progress((int(batch.rows[-1]) + 1) / batch.grid.patch_rows, f"scored {len(windows)} patches")
        if not windows:
            raise JEMError(f"'{source.description}' has no patch without nodata to score. Check the raster.")
        scores = uncertainty_scores(torch.cat(logits))
        ranks = priority(scores)
        positions = torch.tensor([[w.row + size / 2, w.col + size / 2] for w in windows])
        spacing = min_distance if min_distance is not None else \
            max(float(size), math.sqrt(source.width * source.height / count) / 2)
        chosen = spread_selection(ranks["score"], positions, count, spacing)
        return [make_suggestion(rank, index, windows[index], reader, scores, ranks, loaded.meta.class_names)
                for rank, index in enumerate(chosen, start=1)]


def make_suggestion(rank: int, index: int, window: PatchWindow, reader: PatchReader,
                    scores: dict[str, torch.Tensor], ranks: dict[str, torch.Tensor],
                    class_names: list[str]) -> Suggestion:
    bounds = reader.footprint(window)
    return Suggestion(rank=rank, x=(bounds[0] + bounds[2]) / 2, y=(bounds[1] + bounds[3]) / 2, bounds=bounds,
                      row=window.row, col=window.col, score=float(ranks["score"][index]),
                      unfamiliarity=float(ranks["unfamiliarity"][index]),
                      uncertainty=float(ranks["uncertainty"][index]),
                      neg_energy=float(scores["neg_energy"][index]), entropy=float(scores["entropy"][index]),
                      margin=float(scores["margin"][index]),
                      predicted_class=class_names[int(scores["predicted"][index])],
                      confidence=float(scores["confidence"][index]))
