"""Class-folder scene datasets (EuroSAT / AID / UCMerced layout) held in memory.

Layout: DATA_DIR/<class name>/<image>.{jpg,jpeg,png,tif,tiff}.  Every image is read with GDAL
(through rasterio), so RGB JPEGs and multi-band GeoTIFFs go through one path, resized to the
model's size on read.  Splits are deterministic for a given seed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import JEMError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
RGB_BAND_NAMES = ["red", "green", "blue"]
# A scene image larger than this is refused before reading: shrinking it would read every pixel
# (a header may declare 10^12 px in a file of a few hundred bytes).
MAX_SCENE_PIXELS = 100_000_000


@dataclass
class SceneDataset:
    """Images (N, bands, size, size) float32 in their original units, labels (N,) int64; for labelled raster
    patches, places (N,): the annotated window each patch comes from (its shifted copies share it)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    band_names: list[str]
    value_range: list[float]
    paths: list[Path]
    places: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Split:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def list_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name → sorted image paths; clear errors for the usual layout mistakes."""
    if not root.is_dir():
        raise JEMError(f"Dataset folder '{root}' does not exist or is not a folder.")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise JEMError(f"Dataset folder '{root}' cannot be read (permission denied).") from None
    classes: dict[str, list[Path]] = {}
    for folder in folders:
        try:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except PermissionError:
            raise JEMError(f"Class folder '{folder}' cannot be read (permission denied).") from None
        if images:
            classes[folder.name] = images
    if not classes:
        raise JEMError(f"No class folders with images found in '{root}'. Expected one sub-folder per class "
                       f"holding {', '.join(sorted(IMAGE_SUFFIXES))} files (EuroSAT / AID layout).")
    if len(classes) < 2:
        raise JEMError(f"Only one class ('{next(iter(classes))}') found in '{root}'. A classifier needs at least "
                       "two class folders with images.")
    return classes


def read_image(path: Path, size: int) -> tuple[np.ndarray, list[str], str]:
    """(bands, size, size) float32, band names, dtype name; resampled by averaging on read."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.width * src.height > MAX_SCENE_PIXELS:
                    raise JEMError(f"Image '{path}' is {src.width} × {src.height} px, too large for a scene image "
                                   f"(at most {MAX_SCENE_PIXELS // 1_000_000} Mpx). Cut it into scenes "
                                   "(e.g. gdal_retile.py) or remove it; map large rasters with `jem map`.")
                pixels = src.read(out_shape=(src.count, size, size), resampling=Resampling.average)
                names = [d or f"B{i + 1}" for i, d in enumerate(src.descriptions)]
                dtype = src.dtypes[0]
    except RasterioIOError as error:
        raise JEMError(f"Cannot read image '{path}': {str(error).strip().rstrip('.')[:200]}. Remove or replace "
                       "the file.") from None
    if len(names) == 3 and dtype == "uint8" and all(n.startswith("B") for n in names):
        names = list(RGB_BAND_NAMES)
    return pixels.astype(np.float32), names, dtype


def load_class_folder(root: str | Path, image_size: int, class_names: Sequence[str] | None = None,
                      progress: Callable[[float], None] | None = None) -> SceneDataset:
    """Read a whole class-folder dataset into memory at image_size × image_size.

    With class_names given (a trained model's), labels follow that order and a folder the
    model does not know is an error that names it.
    """
    root = Path(root)
    classes = list_class_folders(root)
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise JEMError(f"Class folder(s) {', '.join(unknown)} in '{root}' are not classes of the model "
                           f"(it knows: {', '.join(class_names)}). Rename or remove them.")
    names = list(class_names) if class_names is not None else sorted(classes)
    items = [(path, names.index(name)) for name, paths in classes.items() for path in paths]
    images = np.empty((len(items), 0, image_size, image_size), dtype=np.float32)
    band_names: list[str] | None = None
    dtypes: set[str] = set()
    for i, (path, _) in enumerate(items):
        pixels, bands, dtype = read_image(path, image_size)
        if band_names is None:
            band_names = bands
            images = np.empty((len(items), len(bands), image_size, image_size), dtype=np.float32)
        elif len(bands) != len(band_names):
            raise JEMError(f"Image '{path}' has {len(bands)} bands but '{items[0][0]}' has {len(band_names)}. "
                           "All images of a dataset need the same bands.")
        images[i] = pixels
        dtypes.add(dtype)
        if progress and i % 200 == 0:
            progress(i / len(items))
    assert band_names is not None
    value_range = [0.0, 255.0] if dtypes == {"uint8"} else [float(images.min()), float(images.max())]
    return SceneDataset(torch.from_numpy(images), torch.tensor([label for _, label in items]), names,
                        band_names, value_range, [path for path, _ in items])


# The validation and test fractions of every split (TrainConfig's defaults; a model file records its own).
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2


def split_dataset(labels: torch.Tensor, seed: int, val_fraction: float = VAL_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> Split:
    """Stratified, deterministic train/val/test split: the same seed gives the same split."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for label in labels.unique(sorted=True):
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return Split(*(torch.cat(parts[name]).sort().values for name in ("train", "val", "test")))


def training_split(labels: torch.Tensor, train_config: dict[str, Any]) -> Split:
    """The split a model was trained with, from the train_config its file records (seed, fractions)."""
    return split_dataset(labels, train_config.get("seed", 0), train_config.get("val_fraction", VAL_FRACTION),
                         train_config.get("test_fraction", TEST_FRACTION))


def choose_labelled(train_indices: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """k training images per class (chosen by seed): the only labels a semi-supervised run sees."""
    generator = torch.Generator().manual_seed(seed + 1)
    chosen = []
    train_labels = labels[train_indices]
    for label in train_labels.unique(sorted=True):
        members = train_indices[train_labels == label]
        if len(members) < per_class:
            raise JEMError(f"Class {int(label)} has only {len(members)} training images, fewer than the "
                           f"{per_class} labels per class asked for. Lower --labels-per-class.")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def band_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-band mean and std (std floored so constant bands do not divide by zero)."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-3).tolist()


def check_band_count(images: torch.Tensor, band_names: Sequence[str], source: str | Path) -> None:
    """Images (N, bands, H, W) must have as many bands as the model was trained on."""
    if images.shape[1] != len(band_names):
        raise JEMError(f"'{source}' has {images.shape[1]}-band images but the model expects {len(band_names)} "
                       f"bands ({', '.join(band_names)}). Use data with the model's bands.")
