"""The model file: one `.pt` holding weights and metadata, safe to load.

Format (a plain dict, loadable with ``torch.load(path, weights_only=True)``, so loading
never runs code from the file):

    format          "jem-eo-model"
    format_version  1 for one network, 2 for an ensemble (FORMAT_VERSION is the highest read)
    spec            ModelSpec as a dict (architecture, bands count, classes, norm, stem; `members` for an
                    ensemble of that many networks)
    state_dict      the network's weights (an ensemble's: members.0.…, members.1.…)
    meta            ModelMeta as a dict (class names, band names, image size,
                    normalisation, value range, training config, metrics)
    labelled_features  optional (`jem retrain`): the labelled patches' pooled features, classes and
                    places, for the map's label agreement (label_agreement.py); files without it map as
                    before, and earlier JEM-EO versions ignore it

Files are written with files.atomic_write (a temporary name beside the target, then a rename), so
a crash never leaves a half-written model under the real name.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import JEMError, __version__
from .files import atomic_write
from .label_agreement import LabelledFeatures
from .models import Model, ModelSpec, SpeedOptions, apply_speed_options, build_model, feature_count

FORMAT = "jem-eo-model"
FORMAT_VERSION = 2  # 2: the spec may say `members` (an ensemble); single-network files are still written as 1


@dataclass
class ModelMeta:
    """What a user of the model must know to feed it the right pixels."""

    class_names: list[str]
    band_names: list[str]
    image_size: int
    # Per-band statistics in the units of `value_range`: x_net = (x - mean) / std.
    mean: list[float]
    std: list[float]
    # Pixel value range of the training images (e.g. [0, 255] for 8-bit imagery).
    value_range: list[float] = field(default_factory=lambda: [0.0, 255.0])
    # The model reads rasters at 1/coarsen of their resolution (set by `jem retrain`; 1 = as they are):
    # mapping, suggestions and OOD read that way too, so each patch covers what it was trained on.
    coarsen: int = 1
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_by: str = f"jem-eo {__version__}"


@dataclass
class LoadedModel:
    model: Model
    meta: ModelMeta
    labelled: LabelledFeatures | None = None  # the labelled patches' features, when retrained on some

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, bands, H, W) in the model's value range → network input."""
        mean = torch.tensor(self.meta.mean, dtype=pixels.dtype, device=pixels.device)[None, :, None, None]
        std = torch.tensor(self.meta.std, dtype=pixels.dtype, device=pixels.device)[None, :, None, None]
        return (pixels - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.meta.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(self.meta.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return x * std + mean


def model_payload(model: Model, meta: ModelMeta, labelled: LabelledFeatures | None = None) -> dict[str, Any]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    version = FORMAT_VERSION if model.spec.members > 1 else 1
    payload = {"format": FORMAT, "format_version": version, "spec": model.spec.to_dict(),
               "state_dict": state, "meta": asdict(meta)}
    if labelled is not None:
        payload["labelled_features"] = labelled.to_payload()
    return payload


def save_model(path: str | os.PathLike, model: Model, meta: ModelMeta,
               labelled: LabelledFeatures | None = None) -> None:
    payload = model_payload(model, meta, labelled)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_versioned(path: Path, expected_format: str, max_version: int, name: str, fix: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a {"format", "format_version", ...} dict: never runs code.

    name: what the file should be (e.g. "JEM-EO model file"); fix: what the user can do when it is not.
    Every failure is one clear JEMError.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types: pickle, zip, unsafe globals
        raise JEMError(f"'{path}' is not a readable {name} (it may be truncated, corrupt or not one at all; "
                       f"loading refused: {type(error).__name__}). {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise JEMError(f"'{path}' is a PyTorch file but not a {name}. {fix}")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise JEMError(f"'{path}' has {name} format version {version}; this JEM-EO reads up to version "
                       f"{max_version}. Update JEM-EO to load it.")
    return payload


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise JEMError(f"Model file '{path}' does not exist. Train one with `jem train` or pick an existing .pt file.")
    return load_versioned(path, FORMAT, FORMAT_VERSION, "JEM-EO model file",
                          "Use a model written by `jem train`, or retrain it.")


def model_from_payload(payload: dict[str, Any], source: str = "model file") -> LoadedModel:
    try:
        spec = ModelSpec(**payload["spec"])
        meta = ModelMeta(**payload["meta"])
        model = build_model(spec)
        model.load_state_dict(payload["state_dict"])
    except JEMError:
        raise
    except (KeyError, TypeError, RuntimeError) as error:
        raise JEMError(f"The {source} is damaged or incompatible ({type(error).__name__}: {str(error)[:200]}). "
                       "Retrain the model.") from None
    labelled = payload.get("labelled_features")
    if labelled is not None:
        labelled = LabelledFeatures.from_payload(labelled, spec.num_classes, feature_count(model), source)
    return LoadedModel(model.eval(), meta, labelled)


def as_loaded(model: str | os.PathLike | LoadedModel, device: torch.device | str | None = None) -> LoadedModel:
    """A model given by its file or already loaded; on `device` ("auto", "cpu", "cuda…") when one is given.

    A file is loaded onto the CPU when no device is given; a loaded model then stays where it is.
    """
    from .device import resolve_device

    target = resolve_device(str(device)) if device is not None else None
    if not isinstance(model, LoadedModel):
        return load_model(model, target or "cpu")
    if target is not None:
        model.model.to(target)
    return model


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    loaded = model_from_payload(read_payload(path), source=f"model file '{path}'")
    ready_for_inference(loaded.model, device)
    return loaded


def ready_for_inference(model: Model, device: torch.device | str) -> Model:
    """On device in channels_last: oneDNN's blocked convolutions map ~18 % faster on the build
    machine (docs/mapping.md). float32 is kept, so outputs do not depend on the device's bf16 support."""
    return apply_speed_options(model, SpeedOptions(amp="off"), torch.device(device))
