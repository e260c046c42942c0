"""Hostile inputs through every jem: Processing algorithm: one QgsProcessingException naming the problem,
no traceback text, and no output or temp file left (the bad inputs are those of tests/hostile_cases.py)."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from qgis.core import QgsProcessingException, QgsProcessingFeedback

from tests.hostile_cases import (
    DATASET_CASES,
    MODEL_CASES,
    NO_CRS,
    PATCH,
    RASTER_CASES,
    build_inputs,
    disk_full,
    unreadable_dataset,
)

Params = Callable[[dict[str, Path], Path], dict]


@dataclass
class QgisCase:
    algorithm: str
    bad_input: str
    params: Params
    message: str  # regex the exception message must match
    setup: Callable | None = None


def map_params(raster: str = "good raster", model: str = "good model", out_name: str = "classes.tif") -> Params:
    return lambda inputs, out: {"INPUT": str(inputs[raster]), "MODEL": str(inputs[model]), "DEVICE": "cpu",
                                "OUTPUT": str(out / out_name), "CONFIDENCE": str(out / "confidence.tif"),
                                "FAMILIARITY": str(out / "familiarity.tif")}


def train_params(dataset: str = "good dataset", out_name: str = "model.pt") -> Params:
    return lambda inputs, out: {"DATASET": str(inputs[dataset]), "ARCH": "wrn-10-1", "IMAGE_SIZE": PATCH, "EPOCHS": 1,
                                "BATCH_SIZE": 4, "SGLD_STEPS": 2, "BUFFER_SIZE": 16, "BASELINE": True, "DEVICE": "cpu",
                                "OUTPUT_MODEL": str(out / out_name)}


def ood_params(compare: str = "good raster", model: str = "good model", dataset: str = "good dataset",
               out_name: str = "ood.html") -> Params:
    return lambda inputs, out: {"MODEL": str(inputs[model]), "REFERENCE": str(inputs[dataset]),
                                "REFERENCE_SPLIT": "all", "COMPARE_RASTERS": [str(inputs[compare])], "DEVICE": "cpu",
                                "OUTPUT_HTML": str(out / out_name), "OUTPUT_JSON": str(out / "ood.json")}


def samples_params(model: str = "good model", out_name: str = "samples.png") -> Params:
    return lambda inputs, out: {"MODEL": str(inputs[model]), "PER_CLASS": 1, "STEPS": 2, "DEVICE": "cpu",
                                "OUTPUT": str(out / out_name), "OUTPUT_JSON": str(out / "samples.json")}


def retrain_params(raster: str = "good raster", model: str = "good model", annotations: str = "good annotations",
                   out_name: str = "retrained.pt") -> Params:
    return lambda inputs, out: {"INPUT": str(inputs[raster]), "ANNOTATIONS": str(inputs[annotations]),
                                "CLASS_FIELD": "class", "MODEL": str(inputs[model]), "ITERATIONS": 1, "UNLABELLED": 8,
                                "DEVICE": "cpu", "OUTPUT_MODEL": str(out / out_name)}


def suggest_params(raster: str = "good raster", model: str = "good model",
                   out_name: str = "suggestions.gpkg") -> Params:
    return lambda inputs, out: {"INPUT": str(inputs[raster]), "MODEL": str(inputs[model]), "COUNT": 3, "DEVICE": "cpu",
                                "OUTPUT": str(out / out_name)}


def no_space_for_temp_files(monkeypatch, inputs, out) -> None:
    """Creating any temporary output file fails as on a full disk (ENOSPC)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)


# A raster QGIS itself cannot load never reaches the algorithm: QGIS's own message names the parameter.
UNLOADABLE = r"Could not load source layer for INPUT|Incorrect parameter value for COMPARE_RASTERS"


def raster_cases(algorithm: str, params: Callable[..., Params], key: str = "raster",
                 crs: bool = True) -> list[QgisCase]:
    """crs: the outputs are placed on the ground, so a raster without CRS is an error."""
    unloadable = {"raster: corrupt bytes", "raster: JPEG that is not an image", "raster: missing file"}
    return [QgisCase(algorithm, name, params(**{key: name}), UNLOADABLE if name in unloadable else message)
            for name, message in RASTER_CASES + ([NO_CRS] if crs else [])]


def model_cases(algorithm: str, params: Callable[..., Params]) -> list[QgisCase]:
    return [QgisCase(algorithm, name, params(model=name), message if name != "model: missing file" else
                     r"does not exist|MODEL") for name, message in MODEL_CASES]


def dataset_cases(algorithm: str, params: Callable[..., Params]) -> list[QgisCase]:
    return [QgisCase(algorithm, name, params(dataset=name), message) for name, message in DATASET_CASES] + \
        [QgisCase(algorithm, "dataset: unreadable folder", params(), r"permission denied", setup=unreadable_dataset)]


def output_cases(algorithm: str, params: Callable[..., Params], setup: Callable = disk_full) -> list[QgisCase]:
    return [QgisCase(algorithm, "output folder does not exist", params(out_name="nowhere/out.file"),
                     r"does not exist"),
            QgisCase(algorithm, "disk full while writing", params(), r"No space left on device", setup=setup)]


CASES: list[QgisCase] = [
    *raster_cases("landcovermap", map_params), *model_cases("landcovermap", map_params),
    *output_cases("landcovermap", map_params, setup=no_space_for_temp_files),
    *dataset_cases("train", train_params), *output_cases("train", train_params),
    *raster_cases("ood", ood_params, key="compare", crs=False), *model_cases("ood", ood_params),
    *dataset_cases("ood", ood_params), *output_cases("ood", ood_params),
    *model_cases("samples", samples_params), *output_cases("samples", samples_params),
    *raster_cases("retrain", retrain_params), *model_cases("retrain", retrain_params),
    QgisCase("retrain", "annotations: invalid geometry", retrain_params(annotations="annotations: invalid geometry"),
             r"invalid geometry.*Fix geometries"),
    *output_cases("retrain", retrain_params),
    *raster_cases("suggest", suggest_params), *model_cases("suggest", suggest_params),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("hostile"))


def run_case(case: QgisCase, inputs: dict[str, Path], out: Path, monkeypatch) -> str:
    """The QgsProcessingException message of one case ('' if the algorithm succeeded)."""
    import processing

    if case.setup is not None:
        case.setup(monkeypatch, inputs, out)
    try:
        processing.run(f"jem:{case.algorithm}", case.params(inputs, out), feedback=QgsProcessingFeedback())
    except QgsProcessingException as error:
        return str(error)
    finally:
        monkeypatch.undo()
    return ""


@pytest.mark.parametrize("case", CASES, ids=[f"{c.algorithm}: {c.bad_input}" for c in CASES])
def test_bad_input_raises_one_clear_processing_exception(provider, case, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    message = run_case(case, inputs, out, monkeypatch)
    assert message, "the algorithm accepted the bad input"
    assert re.search(case.message, message), message
    assert "Traceback" not in message and "File \"" not in message
    assert sorted(p.name for p in out.rglob("*")) == [], "partial output or stale temp file left behind"
