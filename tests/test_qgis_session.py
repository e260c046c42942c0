"""One QGIS session as a user has it: every algorithm run twice with its results loaded into the project
(runAndLoadResults), both runs' layers valid, styled and named; and one test per usability defect fixed."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import (
    QgsFeature,
    QgsGeometry,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt
from qgis.PyQt.QtGui import QColor

from jem_core import JEMError
from jem_core.bundled import base_model_path
from jem_core.map_writer import CLASS_NODATA, class_colours
from jem_core.model_file import load_model
from jem_qgis_plugin.algorithms.base import JemAlgorithm
from jem_qgis_plugin.annotation import AnnotationDock, AnnotationUi
from jem_qgis_plugin.annotation_layer import create_annotation_layer
from jem_qgis_plugin.styles import MIN_COLOUR_DISTANCE, class_map_renderer, distinct_colours, layer_name
from tests.test_active import PATCH, at, write_scene
from tests.test_qgis_plugin import model_file, scenes  # noqa: F401 (fixtures used as test arguments)

REPO = Path(__file__).resolve().parent.parent
TEMPORARY = "TEMPORARY_OUTPUT"
RETRAIN_FAST = {"ITERATIONS": 1, "UNLABELLED": 16, "NEW_MODEL": True, "PATCH_SIZE": PATCH, "ARCH": "wrn-10-1",
                "DEVICE": "cpu", "CLASS_FIELD": "class"}


@pytest.fixture
def project():
    QgsProject.instance().clear()
    yield QgsProject.instance()
    QgsProject.instance().clear()


@pytest.fixture
def scene(tmp_path) -> Path:
    return write_scene(tmp_path / "scene.tif")


def run_and_load(algorithm: str, parameters: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.runAndLoadResults(algorithm, parameters, feedback=feedback or QgsProcessingFeedback())


def loaded(project, output: str):
    """The project layer loaded from a run's output (a file path or a memory layer id)."""
    for layer in project.mapLayers().values():
        if layer.id() == output or layer.source().split("|")[0] == output:
            return layer
    sources = [layer.source() for layer in project.mapLayers().values()]
    raise AssertionError(f"{output} was not loaded; the project has {sources}")


def assert_class_map(layer) -> None:
    assert layer.isValid() and layer.renderer().type() == "paletted"
    assert layer.renderer().classes()


def assert_confidence(layer, retrained: bool = False) -> None:
    """max p(y|x) on a fixed 0–1 ramp (low confidence stands out the same on every map); a retrained model's
    p(y|x) × label agreement on a ramp whose stops follow the map's own values inside 0–1."""
    assert layer.isValid() and layer.renderer().type() == "singlebandpseudocolor"
    ramp = layer.renderer().shader().rasterShaderFunction().colorRampItemList()
    if retrained:
        values = [item.value for item in ramp]
        assert 0 < values[0] and values == sorted(values) and values[-1] < 1
    else:
        assert (ramp[0].value, ramp[-1].value) == (0, 1)


def assert_familiarity(layer) -> None:
    """−E(x) on a ramp stretched over the map's own values, which are not confined to 0–1."""
    assert layer.isValid() and layer.renderer().type() == "singlebandpseudocolor"
    ramp = layer.renderer().shader().rasterShaderFunction().colorRampItemList()
    assert ramp[0].value < ramp[-1].value and (ramp[0].value, ramp[-1].value) != (0, 1)


def assert_footprints(layer, field: str) -> None:
    """Outline only (no fill hiding the image), labelled with `field` in haloed text."""
    assert layer.isValid()
    symbol_layer = layer.renderer().symbol().symbolLayer(0)
    assert symbol_layer.brushStyle() == Qt.NoBrush
    assert layer.labelsEnabled()
    settings = layer.labeling().settings()
    assert settings.fieldName == field and settings.format().buffer().enabled()


def test_landcovermap_twice_loaded_styled_and_named(provider, model_file, scene, tmp_path, project):
    first = run_and_load("jem:landcovermap", {"INPUT": str(scene), "MODEL": str(model_file), "DEVICE": "cpu",
                                              "OUTPUT": str(tmp_path / "milano_classes.tif"),
                                              "CONFIDENCE": str(tmp_path / "milano_confidence.tif"),
                                              "FAMILIARITY": str(tmp_path / "milano_familiarity.tif")})
    second = run_and_load("jem:landcovermap", {"INPUT": str(scene), "MODEL": str(model_file), "DEVICE": "cpu",
                                               "OUTPUT": TEMPORARY, "CONFIDENCE": TEMPORARY,
                                               "FAMILIARITY": TEMPORARY})
    for result in (first, second):
        assert_class_map(loaded(project, result["OUTPUT"]))
        assert_confidence(loaded(project, result["CONFIDENCE"]))
        assert_familiarity(loaded(project, result["FAMILIARITY"]))
        assert Path(result["CONFIDENCE"]).with_suffix(".qml").is_file()
        assert Path(result["FAMILIARITY"]).with_suffix(".qml").is_file()
    keys = ("OUTPUT", "CONFIDENCE", "FAMILIARITY")
    names = [loaded(project, result[key]).name() for result in (first, second) for key in keys]
    assert names == ["milano_classes", "milano_confidence", "milano_familiarity",
                     "scene class map", "scene confidence", "scene familiarity"]


@pytest.mark.parametrize("output, name", [("milano_classes.tif", "milano_classes"),
                                          ("/data/maps/milano_classes.tif", "milano_classes"),
                                          ("Suggested_patches_1f2e", "milano class map")])
def test_layer_names_come_from_the_file_else_the_input(qgis_app, output, name):
    assert layer_name(output, "milano", "class map") == name


def test_temporary_outputs_are_named_after_the_input(qgis_app):
    assert layer_name(QgsProcessingUtils.generateTempFilename("OUTPUT.tif"), "milano", "class map") == \
        "milano class map"


def test_default_map_is_on_the_input_grid_at_a_quarter_patch_stride_with_the_bundled_model(provider, scene, tmp_path):
    import processing

    feedback = LogCounter()
    result = processing.run("jem:landcovermap", {"INPUT": str(scene), "DEVICE": "cpu",
                                                 "OUTPUT": str(tmp_path / "c.tif")}, feedback=feedback)
    classes = QgsRasterLayer(result["OUTPUT"], "c")
    assert (classes.width(), classes.height()) == (96, 96)  # the input's grid
    bundled = load_model(base_model_path()).meta
    assert {c.label for c in classes.renderer().classes()} <= set(bundled.class_names)
    assert any(f"stride {bundled.image_size // 4} px" in line for line in feedback.infos)
    assert 0 < len(feedback.texts) <= 11, feedback.texts  # a throttled log, not a line per patch row


class LogCounter(QgsProcessingFeedback):
    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.infos: list[str] = []

    def setProgressText(self, text: str) -> None:  # noqa: N802 (QGIS API name)
        self.texts.append(text)

    def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS API name)
        self.infos.append(info)


def test_confidence_map_has_no_histogram_sidecar(provider, model_file, scene, tmp_path, project):
    result = run_and_load("jem:landcovermap", {"INPUT": str(scene), "MODEL": str(model_file), "DEVICE": "cpu",
                                               "OUTPUT": str(tmp_path / "c.tif"),
                                               "CONFIDENCE": str(tmp_path / "e.tif")})
    assert_confidence(loaded(project, result["CONFIDENCE"]))
    aux = Path(result["CONFIDENCE"] + ".aux.xml")
    assert not aux.exists() or "Histogram" not in aux.read_text()


def annotations(tmp_path: Path, scene_layer: QgsRasterLayer, name: str = "ann") -> QgsVectorLayer:
    layer = create_annotation_layer(tmp_path / f"{name}.gpkg", scene_layer.crs())
    features = []
    for label, col, row in (("field", 12, 20), ("field", 20, 70), ("town", 70, 20), ("town", 80, 75)):
        feature = QgsFeature(layer.fields())
        x, y = at(col, row)
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(x - 80, y - 80, x + 80, y + 80)))
        feature.setAttribute("class", label)
        features.append(feature)
    assert layer.dataProvider().addFeatures(features)
    assert Path(tmp_path / f"{name}.qml").is_file()  # its style is saved beside it
    return layer


def test_retrain_twice_with_maps_loaded_and_models_kept_beside_the_annotations(provider, scene, tmp_path, project):
    raster = QgsRasterLayer(str(scene), "scene")
    layer = annotations(tmp_path, raster)
    first = run_and_load("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, **RETRAIN_FAST,
                                         "OUTPUT_MAP": str(tmp_path / "new_classes.tif"),
                                         "OUTPUT_CONFIDENCE": str(tmp_path / "new_confidence.tif")})
    second = run_and_load("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, **RETRAIN_FAST,
                                          "OUTPUT_MAP": TEMPORARY, "OUTPUT_CONFIDENCE": TEMPORARY,
                                          "OUTPUT_FAMILIARITY": TEMPORARY})
    assert [Path(r["OUTPUT_MODEL"]).name for r in (first, second)] == ["ann_retrained.pt", "ann_retrained_2.pt"]
    for result in (first, second):
        assert load_model(result["OUTPUT_MODEL"]).meta.class_names == ["field", "town"]
        assert_class_map(loaded(project, result["OUTPUT_MAP"]))
        assert_confidence(loaded(project, result["OUTPUT_CONFIDENCE"]), retrained=True)
    assert loaded(project, first["OUTPUT_MAP"]).name() == "new_classes"
    assert loaded(project, second["OUTPUT_MAP"]).name() == "scene class map (ann_retrained_2)"
    assert loaded(project, second["OUTPUT_CONFIDENCE"]).name() == "scene confidence (ann_retrained_2)"
    familiarity = loaded(project, second["OUTPUT_FAMILIARITY"])
    assert_familiarity(familiarity)
    assert familiarity.name() == "scene familiarity (ann_retrained_2)"


def test_suggest_twice_outlined_and_ranked(provider, model_file, scene, tmp_path, project):
    first = run_and_load("jem:suggest", {"INPUT": str(scene), "MODEL": str(model_file), "COUNT": 3, "DEVICE": "cpu",
                                         "OUTPUT": str(tmp_path / "suggested.gpkg")})
    second = run_and_load("jem:suggest", {"INPUT": str(scene), "MODEL": str(model_file), "COUNT": 3, "DEVICE": "cpu",
                                          "OUTPUT": TEMPORARY})
    for result in (first, second):
        layer = loaded(project, result["OUTPUT"])
        assert layer.featureCount() == 3
        assert_footprints(layer, "rank")
    assert (tmp_path / "suggested.qml").is_file()
    reopened = QgsVectorLayer(str(tmp_path / "suggested.gpkg"), "again", "ogr")  # the saved style comes back
    assert_footprints(reopened, "rank")
    assert loaded(project, second["OUTPUT"]).name() == "scene suggested patches"


def test_train_ood_and_samples_twice_in_one_session(provider, model_file, scenes, scene, tmp_path, project):
    for run in (1, 2):
        trained = run_and_load("jem:train", {"DATASET": str(scenes), "IMAGE_SIZE": 16, "EPOCHS": 1, "BASELINE": True,
                                             "ARCH": "wrn-10-1", "BATCH_SIZE": 16, "DEVICE": "cpu",
                                             "OUTPUT_MODEL": str(tmp_path / f"m{run}.pt")})
        assert load_model(trained["OUTPUT_MODEL"]).meta.image_size == 16
        ood = run_and_load("jem:ood", {"MODEL": str(model_file), "REFERENCE": str(scenes), "DEVICE": "cpu",
                                       "COMPARE_RASTERS": [str(scene)], "OUTPUT_HTML": str(tmp_path / f"o{run}.html")})
        assert "AUROC" in ood["SUMMARY"] and Path(ood["OUTPUT_HTML"]).is_file()
        samples = run_and_load("jem:samples", {"MODEL": str(model_file), "PER_CLASS": 1, "STEPS": 2, "DEVICE": "cpu",
                                               "OUTPUT": str(tmp_path / f"s{run}.png")})
        assert Path(samples["OUTPUT"]).is_file()


@pytest.mark.parametrize("output", ["OUTPUT_CONFIDENCE", "OUTPUT_FAMILIARITY"])
def test_confidence_without_class_map_is_refused_before_training(provider, scene, tmp_path, project, output):
    import processing

    # QGIS 3.22 keeps a refused run's caller frames (and so these layers) alive until exit; owned by the
    # project, they are deleted by its teardown rather than after exitQgis, where deleting one crashes.
    raster = QgsRasterLayer(str(scene), "scene")
    layer = annotations(tmp_path, raster)
    project.addMapLayers([raster, layer])
    with pytest.raises(QgsProcessingException, match="comes with the class map"):
        processing.run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, **RETRAIN_FAST,
                                       output: str(tmp_path / "e.tif")}, feedback=QgsProcessingFeedback())
    assert not list(tmp_path.glob("*.pt"))


class Payload:
    """Stands for what a run holds (layers, a model), weakly referenced to see whether it outlives the run."""


class RefusingAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "refusing"
    error: type[Exception] = JEMError
    payloads: list[weakref.ref] = []

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        pass

    def execute(self, parameters, context, feedback):
        payload = Payload()
        self.payloads.append(weakref.ref(payload))
        raise self.error("Refused: choose another input.")


@pytest.mark.parametrize("error", [JEMError, QgsProcessingException])
def test_a_refused_run_frees_what_it_held(qgis_app, error, monkeypatch):
    monkeypatch.setattr(RefusingAlgorithm, "error", error)
    monkeypatch.setattr(RefusingAlgorithm, "payloads", [])
    with pytest.raises(QgsProcessingException, match="^Refused: choose another input.$"):
        RefusingAlgorithm().run({}, QgsProcessingContext(), QgsProcessingFeedback(), {}, False)
    gc.collect()
    assert [payload() for payload in RefusingAlgorithm.payloads] == [None]


def test_retrain_maps_run_on_the_chosen_device(provider, scene, tmp_path, monkeypatch):
    import processing

    import jem_core.mapping

    devices = []
    real = jem_core.mapping.map_raster
    monkeypatch.setattr(jem_core.mapping, "map_raster", lambda *a, **k: devices.append(k["device"]) or real(*a, **k))
    raster = QgsRasterLayer(str(scene), "scene")
    processing.run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": annotations(tmp_path, raster), **RETRAIN_FAST,
                                   "OUTPUT_MAP": str(tmp_path / "c.tif")}, feedback=QgsProcessingFeedback())
    assert devices == ["cpu"]


def test_train_checks_its_output_folders_before_training(provider, scenes, tmp_path, monkeypatch):
    import processing

    import jem_core.data

    monkeypatch.setattr(jem_core.data, "load_class_folder", lambda *a, **k: pytest.fail("read the data first"))
    with pytest.raises(QgsProcessingException, match="does not exist"):
        processing.run("jem:train", {"DATASET": str(scenes), "OUTPUT_MODEL": str(tmp_path / "missing" / "m.pt")},
                       feedback=QgsProcessingFeedback())


def test_legend_colours_of_grey_classes_are_told_apart():
    names = ["Commercial", "Parking", "RailwayStation", "Viaduct", "Industrial", "StorageTanks"]
    colours = distinct_colours([QColor(*rgba[:3]) for rgba in class_colours(names).values()])
    pairs = [(a, b) for i, a in enumerate(colours) for b in colours[i + 1:]]
    assert min(np.linalg.norm([a.red() - b.red(), a.green() - b.green(), a.blue() - b.blue()]) for a, b in pairs) \
        >= MIN_COLOUR_DISTANCE


def test_legend_lists_only_the_classes_present(provider, tmp_path):
    path = tmp_path / "c.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 4, 4, 1, gdal.GDT_Byte)
    dataset.SetMetadataItem("jem_class_names", json.dumps([f"c{i}" for i in range(30)]))
    dataset.GetRasterBand(1).WriteArray(np.array([[3, 3, 7, 7]] * 3 + [[CLASS_NODATA, 29, 3, 3]], dtype=np.uint8))
    dataset = None
    renderer: QgsPalettedRasterRenderer = class_map_renderer(QgsRasterLayer(str(path), "c"))
    assert [(c.value, c.label) for c in renderer.classes()] == [(3, "c3"), (7, "c7"), (29, "c29")]


@pytest.fixture
def dock(qgis_iface, scene, tmp_path):
    raster = QgsRasterLayer(str(scene), "scene")
    layer = create_annotation_layer(tmp_path / "ann.gpkg", raster.crs())
    QgsProject.instance().addMapLayers([raster, layer])
    canvas = qgis_iface.mapCanvas()
    canvas.resize(480, 480)
    canvas.setDestinationCrs(raster.crs())
    canvas.setLayers([raster])
    canvas.setExtent(raster.extent())
    ui = AnnotationUi(qgis_iface)
    ui.initGui()
    ui.dock.raster_combo.setLayer(raster)
    ui.dock.layer_combo.setLayer(layer)
    yield ui.dock
    ui.unload()
    canvas.setLayers([])
    QgsProject.instance().removeAllMapLayers()


def release(dock: AnnotationDock, button, col: float, row: float) -> None:
    canvas = dock.iface.mapCanvas()
    device = canvas.getCoordinateTransform().transform(*at(col, row))
    canvas.mapTool().canvasReleaseEvent(QgsMapMouseEvent(canvas, QEvent.MouseButtonRelease,
                                                          QPoint(round(device.x()), round(device.y())), button, button))


def test_dock_defaults_to_the_bundled_model_and_its_patch_size(dock):
    dock.show()
    meta = load_model(base_model_path()).meta
    assert dock.patch_spin.value() == meta.image_size == 32
    # A click labels the 64 × 64 raster pixels the retrain reads as one 32 px patch (at 1/2 resolution).
    assert dock.coarsen == 2 and "covers 64 × 64 raster pixels" in dock.status.text()
    assert [dock.class_combo.itemText(i) for i in range(dock.class_combo.count())] == meta.class_names
    assert dock.layer_combo.minimumContentsLength() >= 20  # room for the layer's name


def test_dock_labels_on_left_click_only_and_its_status_follows_undo(dock):
    layer = dock.layer_combo.currentLayer()
    dock.class_combo.setCurrentText("Farmland")
    dock.annotate_button.setChecked(True)
    release(dock, Qt.RightButton, 50, 50)
    assert layer.featureCount() == 0
    release(dock, Qt.LeftButton, 50, 50)
    assert layer.featureCount() == 1 and "Farmland" in dock.status.text()
    layer.undoStack().undo()
    assert layer.featureCount() == 0
    assert "Farmland" not in dock.status.text() and dock.status.text().startswith("0 labelled patches")


def test_suggest_from_the_dock_uses_the_model_retrain_just_wrote(dock, model_file, monkeypatch):
    import processing

    calls = []

    def dialog(algorithm, parameters):
        calls.append((algorithm, parameters))
        return {"OUTPUT_MODEL": str(model_file)} if algorithm == "jem:retrain" else {}

    monkeypatch.setattr(processing, "execAlgorithmDialog", dialog)
    dock.open_algorithm("jem:retrain")
    dock.open_algorithm("jem:suggest")
    # Retrain maps the raster with the new model by default (temporary layers), so the analyst sees the result.
    assert calls[0][1]["OUTPUT_MAP"] == calls[0][1]["OUTPUT_CONFIDENCE"] == "TEMPORARY_OUTPUT"
    # The dock's annotation layer too, so the suggestions skip what is labelled already.
    assert calls[1] == ("jem:suggest", {"INPUT": dock.raster_combo.currentLayer(), "MODEL": str(model_file),
                                        "ANNOTATIONS": dock.layer_combo.currentLayer()})
    assert dock.patch_spin.value() == load_model(model_file).meta.image_size


def test_dock_stops_when_the_edits_cannot_be_saved(dock, monkeypatch):
    import processing

    layer = dock.layer_combo.currentLayer()
    dock.class_combo.setCurrentText("Farmland")
    dock.annotate_button.setChecked(True)
    release(dock, Qt.LeftButton, 50, 50)
    monkeypatch.setattr(layer, "commitChanges", lambda stop=True: False)
    monkeypatch.setattr(processing, "execAlgorithmDialog", lambda *a: pytest.fail("opened on a stale layer"))
    dock.open_algorithm("jem:retrain")
    assert dock.status.text().startswith("Could not save the edits")


def test_processing_provider_pulls_in_no_widgets():
    """qgis_process and Processing load the provider: the dock's module (QtWidgets, qgis.gui) stays out."""
    script = ("import json, sys, pathlib; from qgis.core import QgsApplication; import jem_qgis_plugin.provider; "
              "mods = [m for m in sys.modules if m.startswith('jem_qgis_plugin')]; "
              "bad = [m for m in mods if any(w in pathlib.Path(sys.modules[m].__file__).read_text() "
              "for w in ('qgis.gui', 'QtWidgets'))]; print(json.dumps(bad))")
    env = dict(os.environ, PYTHONPATH=str(REPO), QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stderr
