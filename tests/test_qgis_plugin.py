"""The QGIS plugin through Processing, headless: every algorithm run by processing.run on data made here."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProcessingModelOutput,
    QgsProcessingModelParameter,
    QgsProcessingParameterFile,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import Qt, QTimer

from jem_core import __version__
from jem_core.data import load_class_folder
from jem_core.model_file import load_model
from jem_core.models import ARCHITECTURES
from jem_core.training import TrainConfig, train
from tests.conftest import CancelAfter, make_class_folder

PATCH = 16
CLASSES = ["class_a", "class_b", "class_c"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("data") / "scenes", classes=3, per_class=10, size=PATCH)


@pytest.fixture(scope="module")
def model_file(scenes, tmp_path_factory) -> Path:
    """A tiny model really trained with jem_core (cross-entropy, one epoch: the plugin is under test here)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    config = TrainConfig(arch="wrn-10-1", image_size=PATCH, epochs=1, batch_size=16, baseline=True, warmup_iters=1)
    train(load_class_folder(scenes, PATCH), config, out_path=path)
    return path


def write_geotiff(path: Path, width: int, height: int, epsg: int = 32633) -> Path:
    """A 3-band uint8 raster in a projected CRS: left half like class a's colour, right half like class c's."""
    from osgeo import gdal, osr

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 60, (3, height, width)).astype(np.uint8)
    pixels[0, :, : width // 2] += 180
    pixels[2, :, width // 2:] += 180
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4100000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    dataset.SetProjection(srs.ExportToWkt())
    for band in range(3):
        dataset.GetRasterBand(band + 1).WriteArray(pixels[band])
    dataset = None
    return path


@pytest.fixture
def raster(tmp_path) -> Path:
    return write_geotiff(tmp_path / "scene.tif", 4 * PATCH, 3 * PATCH)


def run(algorithm, parameters: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run(algorithm, parameters, feedback=feedback or QgsProcessingFeedback())


def test_provider_offers_every_algorithm_with_documented_parameters(provider):
    ids = {algorithm.id() for algorithm in provider.algorithms()}
    assert {"jem:landcovermap", "jem:train", "jem:ood", "jem:samples"} <= ids
    assert provider.versionInfo() == __version__
    mapping = provider.algorithm("landcovermap")
    names = [p.name() for p in mapping.parameterDefinitions()]
    assert names[:8] == ["INPUT", "MODEL", "BANDS", "STRIDE", "DEVICE", "BATCH_SIZE", "RESOLUTION", "STRETCH"]
    assert {"OUTPUT", "CONFIDENCE", "FAMILIARITY"} <= set(names)
    for output in ("OUTPUT", "CONFIDENCE", "FAMILIARITY"):  # map_raster writes GeoTIFF whatever the name says
        assert mapping.parameterDefinition(output).supportedOutputRasterLayerExtensions() == ["tif"]
    arch = provider.algorithm("train").parameterDefinition("ARCH")
    assert arch.options() == list(ARCHITECTURES)  # read from jem_core's source, without importing torch
    for algorithm in provider.algorithms():
        assert algorithm.shortHelpString() and not algorithm.icon().isNull()
        assert not algorithm.flags() & algorithm.FlagNoThreading  # runs in a background task in QGIS


def test_train_help_states_the_defaults_jem_train_uses(provider):
    from jem_core.training import DEFAULT_ITERATIONS

    train_algorithm = provider.algorithm("train")
    help_text = train_algorithm.shortHelpString()
    assert f"default {DEFAULT_ITERATIONS}," in help_text
    assert f"default {TrainConfig().lr:g}:" in help_text
    assert train_algorithm.parameterDefinition("LR").defaultValue() == TrainConfig().lr


def test_land_cover_map_outputs_are_aligned_styled_and_named(provider, model_file, raster, tmp_path):
    out_classes, out_confidence = tmp_path / "classes.tif", tmp_path / "confidence.tif"
    out_familiarity = tmp_path / "familiarity.tif"
    progress = []
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(progress.append)
    result = run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(model_file), "STRIDE": 8, "DEVICE": "cpu",
                                      "RESOLUTION": "patch", "OUTPUT": str(out_classes),
                                      "CONFIDENCE": str(out_confidence), "FAMILIARITY": str(out_familiarity)},
                 feedback)
    assert result == {"OUTPUT": str(out_classes), "CONFIDENCE": str(out_confidence),
                      "FAMILIARITY": str(out_familiarity)}
    source = QgsRasterLayer(str(raster), "input")
    # A fresh layer loads <name>.qml beside the file as its default style: what a user sees on reload.
    classes = QgsRasterLayer(str(out_classes), "classes")
    confidence = QgsRasterLayer(str(out_confidence), "confidence")
    familiarity = QgsRasterLayer(str(out_familiarity), "familiarity")
    for layer in (classes, confidence, familiarity):
        assert layer.isValid()
        assert layer.crs() == source.crs() == QgsCoordinateReferenceSystem("EPSG:32633")
        assert layer.extent() == source.extent()
        assert Path(layer.source()).with_suffix(".qml").is_file()
    assert (classes.width(), classes.height()) == (raster_width(raster) // 8, raster_height(raster) // 8)
    assert classes.renderer().type() == "paletted"
    present = sorted(set(np.unique(read_band(out_classes))) - {255})  # the legend lists the classes present
    assert [(c.value, c.label) for c in classes.renderer().classes()] == [(v, CLASSES[v]) for v in present]
    assert len({c.color.name() for c in classes.renderer().classes()}) == len(present)
    # Confidence max p(y|x): a fixed 0–1 ramp, low values opaque red, high values transparent.
    assert confidence.renderer().type() == "singlebandpseudocolor"
    ramp = confidence.renderer().shader().rasterShaderFunction().colorRampItemList()
    assert (ramp[0].value, ramp[-1].value) == (0, 1)
    low, high = ramp[0].color, ramp[-1].color
    assert low.alpha() == 255 and low.red() > 2 * max(low.green(), low.blue()) and high.alpha() == 0
    stats = confidence.dataProvider().bandStatistics(1)
    assert 1 / len(CLASSES) - 1e-6 <= stats.minimumValue <= stats.maximumValue <= 1
    # Familiarity −E(x): the ramp stretched over the map's own 2–98 % range.
    assert familiarity.renderer().type() == "singlebandpseudocolor"
    ramp = familiarity.renderer().shader().rasterShaderFunction().colorRampItemList()
    stats = familiarity.dataProvider().bandStatistics(1)
    assert len(ramp) >= 3 and stats.minimumValue <= ramp[0].value < ramp[-1].value <= stats.maximumValue
    assert progress and max(progress) == pytest.approx(100)


def test_a_retrained_models_confidence_ramp_is_stretched_over_the_maps_range(provider, model_file, raster, tmp_path):
    """p(y|x) times the label agreement is a score, not a probability: its ramp's stops sit at the map's
    quantiles (the template's stop positions within its 2–98 % range)."""
    import torch

    from jem_core.label_agreement import labelled_features
    from jem_core.model_file import save_model

    loaded = load_model(model_file)
    agreeing = tmp_path / "agreeing.pt"
    labelled = labelled_features(loaded, torch.rand(6, 3, PATCH, PATCH) * 255, torch.tensor([0, 1, 2] * 2))
    save_model(agreeing, loaded.model, loaded.meta, labelled)
    out_confidence = tmp_path / "confidence.tif"
    run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(agreeing), "STRIDE": 8, "DEVICE": "cpu",
                             "OUTPUT": str(tmp_path / "classes.tif"), "CONFIDENCE": str(out_confidence)})
    confidence = QgsRasterLayer(str(out_confidence), "confidence")
    ramp = confidence.renderer().shader().rasterShaderFunction().colorRampItemList()
    values = read_band(out_confidence)
    levels = [0.02 + 0.96 * stop for stop in (0, 0.5, 0.8, 1)]  # resources/styles/confidence.qml's stops
    expected = np.quantile(values[np.isfinite(values)], levels)
    assert [item.value for item in ramp] == pytest.approx(expected, abs=1e-3)
    assert 0 < ramp[0].value < ramp[-1].value < 1 and ramp[0].color.alpha() == 255 and ramp[-1].color.alpha() == 0


def read_band(path: Path) -> np.ndarray:
    from osgeo import gdal

    dataset = gdal.Open(str(path))
    return dataset.GetRasterBand(1).ReadAsArray()


def raster_width(path: Path) -> int:
    return QgsRasterLayer(str(path), "r").width()


def raster_height(path: Path) -> int:
    return QgsRasterLayer(str(path), "r").height()


def test_cancelled_map_leaves_no_output(provider, model_file, tmp_path):
    raster = write_geotiff(tmp_path / "big.tif", 12 * PATCH, 12 * PATCH)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(model_file), "BATCH_SIZE": 4, "STRIDE": 8,
                                 "OUTPUT": str(out / "classes.tif"), "CONFIDENCE": str(out / "conf.tif")},
            CancelAfter(polls=3))
    assert list(out.iterdir()) == []


def test_user_errors_arrive_as_processing_exceptions_with_the_core_message(provider, model_file, raster, tmp_path):
    with pytest.raises(QgsProcessingException, match="Band index 9 is out of range"):
        run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(model_file), "BANDS": "1,2,9",
                                 "OUTPUT": str(tmp_path / "c.tif")})
    with pytest.raises(QgsProcessingException, match="does not divide"):
        run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(model_file), "STRIDE": 5,
                                 "OUTPUT": str(tmp_path / "c.tif")})
    assert not (tmp_path / "c.tif").exists()


def test_missing_torch_is_explained_with_the_install_command(provider, model_file, raster, tmp_path, monkeypatch):
    from jem_qgis_plugin import lazy_torch

    monkeypatch.setattr(lazy_torch, "torch_available", lambda: False)
    with pytest.raises(QgsProcessingException, match=r"needs PyTorch.*-m pip install .*torch==2\.13\.0"):
        run("jem:landcovermap", {"INPUT": str(raster), "MODEL": str(model_file), "OUTPUT": str(tmp_path / "c.tif")})


TRAIN_FAST = {"ARCH": "wrn-10-1", "IMAGE_SIZE": PATCH, "EPOCHS": 1, "BATCH_SIZE": 8, "SGLD_STEPS": 2,
              "BUFFER_SIZE": 64, "DEVICE": "cpu"}


def test_train_writes_model_metrics_and_plot(provider, scenes, tmp_path):
    outputs = {"OUTPUT_MODEL": str(tmp_path / "m.pt"), "METRICS": str(tmp_path / "m.json"),
               "RELIABILITY_PLOT": str(tmp_path / "m.png")}
    messages = []
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(messages.append)
    result = run("jem:train", {"DATASET": str(scenes), "LABELS_PER_CLASS": 3, **TRAIN_FAST, **outputs}, feedback)
    loaded = load_model(outputs["OUTPUT_MODEL"])
    assert loaded.meta.class_names == CLASSES and loaded.meta.image_size == PATCH
    assert loaded.meta.train_config["labels_per_class"] == 3 and not loaded.meta.train_config["baseline"]
    metrics = json.loads(Path(outputs["METRICS"]).read_text())
    assert result["ACCURACY"] == pytest.approx(metrics["accuracy"]) and 0 <= result["ECE"] <= 1
    assert Path(outputs["RELIABILITY_PLOT"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert messages and max(messages) == pytest.approx(100)


def test_cancelled_training_writes_nothing(provider, scenes, tmp_path):
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run("jem:train", {"DATASET": str(scenes), **TRAIN_FAST, "BASELINE": True,
                          "OUTPUT_MODEL": str(tmp_path / "m.pt"), "METRICS": str(tmp_path / "m.json")},
            CancelAfter(polls=1))
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_missing_folder_says_so(provider, tmp_path):
    with pytest.raises(QgsProcessingException, match="does not exist"):
        run("jem:train", {"DATASET": str(tmp_path / "nowhere"), **TRAIN_FAST, "OUTPUT_MODEL": str(tmp_path / "m.pt")})


def test_ood_reports_kl_and_auroc_for_rasters_and_folders(provider, model_file, scenes, raster, tmp_path):
    outputs = {"OUTPUT_HTML": str(tmp_path / "ood.html"), "OUTPUT_PLOT": str(tmp_path / "ood.png"),
               "OUTPUT_JSON": str(tmp_path / "ood.json")}
    result = run("jem:ood", {"MODEL": str(model_file), "REFERENCE": str(scenes), "REFERENCE_SPLIT": "all",
                             "COMPARE_RASTERS": [str(raster)], "COMPARE_FOLDERS": f"{scenes / 'class_a'}",
                             "DEVICE": "cpu", **outputs})
    numbers = json.loads(Path(outputs["OUTPUT_JSON"]).read_text())
    assert numbers["reference"]["count"] == 30
    assert set(numbers["compare"]) == {"scene.tif", "class_a"}
    assert numbers["compare"]["scene.tif"]["count"] == 12  # 4 × 3 patches of 16 px
    for c in numbers["compare"].values():
        assert f"KL to reference {c['kl_to_reference']:.3f}" in result["SUMMARY"]
    page = Path(outputs["OUTPUT_HTML"]).read_text()
    assert "scene.tif" in page and "data:image/png;base64," in page
    assert Path(outputs["OUTPUT_PLOT"]).read_bytes()[:4] == b"\x89PNG"


def test_ood_without_anything_to_compare_says_so(provider, model_file, scenes, tmp_path):
    with pytest.raises(QgsProcessingException, match="Nothing to compare"):
        run("jem:ood", {"MODEL": str(model_file), "REFERENCE": str(scenes), "OUTPUT_HTML": str(tmp_path / "o.html")})
    assert list(tmp_path.iterdir()) == []


def test_samples_grid_and_numbers(provider, model_file, scenes, tmp_path):
    out = {"OUTPUT": str(tmp_path / "samples.png"), "OUTPUT_JSON": str(tmp_path / "samples.json")}
    result = run("jem:samples", {"MODEL": str(model_file), "PER_CLASS": 2, "STEPS": 3, "DATASET": str(scenes),
                                 "DEVICE": "cpu", **out})
    numbers = json.loads(Path(out["OUTPUT_JSON"]).read_text())
    assert numbers["steps"] == 3 and numbers["conditional"]["per_class"] == 2
    assert result["CLASSIFIED_AS_THEIR_CLASS"] == pytest.approx(numbers["conditional"]["classified_as_their_class"])
    image = QgsRasterLayer(out["OUTPUT"], "grid")
    assert image.isValid() and image.width() > 2 * PATCH


def test_cancelled_sampling_writes_nothing(provider, model_file, tmp_path):
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run("jem:samples", {"MODEL": str(model_file), "STEPS": 50, "OUTPUT": str(tmp_path / "s.png"),
                            "OUTPUT_JSON": str(tmp_path / "s.json")}, CancelAfter(polls=1))
    assert list(tmp_path.iterdir()) == []


def test_runs_as_a_background_task_without_blocking_the_main_thread(provider, model_file, tmp_path, qgis_app):
    """What the Processing dialog does: a QgsProcessingAlgRunnerTask in QGIS's task manager."""
    raster = write_geotiff(tmp_path / "big.tif", 12 * PATCH, 12 * PATCH)
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("jem:landcovermap")
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    progress_threads = set()
    feedback.progressChanged.connect(lambda _: progress_threads.add(threading.get_ident()), Qt.DirectConnection)
    task = QgsProcessingAlgRunnerTask(algorithm, {"INPUT": str(raster), "MODEL": str(model_file), "STRIDE": 4,
                                                  "BATCH_SIZE": 8, "OUTPUT": str(tmp_path / "c.tif")},
                                      context, feedback)
    finished = []
    task.executed.connect(lambda ok, results: finished.append((ok, results)))
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(20)
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        qgis_app.processEvents()
        time.sleep(0.005)
    timer.stop()
    assert finished and finished[0][0], "the task failed or did not finish"
    assert QgsRasterLayer(finished[0][1]["OUTPUT"], "c").isValid()
    assert progress_threads and threading.get_ident() not in progress_threads  # the work ran off the main thread
    assert len(ticks) >= 5 and max(b - a for a, b in zip(ticks, ticks[1:])) < 1.0  # the event loop kept running


def test_usable_as_a_step_of_a_graphical_model(provider, model_file, raster, tmp_path):
    """A Processing model whose child step is jem:landcovermap, fed from model inputs."""
    model = QgsProcessingModelAlgorithm("map with JEM", "tests")
    for definition in (QgsProcessingParameterRasterLayer("scene", "Scene"),
                       QgsProcessingParameterFile("weights", "Model file", extension="pt")):
        model.addModelParameter(definition, QgsProcessingModelParameter(definition.name()))
    child = QgsProcessingModelChildAlgorithm("jem:landcovermap")
    child.setChildId("map")
    child.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("scene")])
    child.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromModelParameter("weights")])
    child.addParameterSources("STRIDE", [QgsProcessingModelChildParameterSource.fromStaticValue(8)])
    output = QgsProcessingModelOutput("classes", "Classes")
    output.setChildOutputName("OUTPUT")
    child.setModelOutputs({"classes": output})
    model.addChildAlgorithm(child)
    results = run(model, {"scene": str(raster), "weights": str(model_file),
                                     "map:classes": str(tmp_path / "classes.tif")})
    classes = QgsRasterLayer(results["map:classes"], "classes")
    assert classes.isValid() and classes.renderer().type() == "paletted"
    assert {c.label for c in classes.renderer().classes()} <= set(CLASSES)
