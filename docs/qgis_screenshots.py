# Run by `qgis --code docs/qgis_screenshots.py` under Xvfb (docs/qgis.md, "As a new user sees it"):
# screenshots of the dialog, a class map with its legend, suggestions and the labelling dock into
# SHOT_IMG, then every algorithm run twice in the same desktop session; SHOT_OUT/log.json says how
# each run went.  SHOT_VRT: the Beirut RGB VRT; SHOT_DATASET: a small class-folder dataset.
import json
import os
import traceback
from pathlib import Path

from qgis.core import QgsApplication, QgsPointXY, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins

OUT = Path(os.environ["SHOT_OUT"])
IMG = Path(os.environ["SHOT_IMG"])
VRT = os.environ["SHOT_VRT"]
log = {}


def wait_render():
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    for _ in range(50):
        QgsApplication.processEvents()
    canvas.waitWhileRendering()
    for _ in range(50):
        QgsApplication.processEvents()


def grab(widget, name):
    QgsApplication.processEvents()
    widget.grab().save(str(IMG / name))
    log.setdefault("shots", []).append(name)


def only(*layers):
    """Show these layers, with their legends expanded; hide and collapse the others."""
    root = QgsProject.instance().layerTreeRoot()
    for node in root.findLayers():
        node.setItemVisibilityChecked(node.layer() in layers)
        node.setExpanded(node.layer() in layers)
    iface.setActiveLayer(layers[0])


def step():
    import processing
    try:
        iface.mainWindow().resize(1500, 950)
        from qgis.PyQt.QtWidgets import QDockWidget
        for dock_widget in iface.mainWindow().findChildren(QDockWidget):
            if dock_widget.objectName() == "Browser":
                dock_widget.hide()
        scene = QgsRasterLayer(VRT, "beirut")
        QgsProject.instance().addMapLayer(scene)
        canvas = iface.mapCanvas()
        canvas.setDestinationCrs(scene.crs())
        canvas.setExtent(scene.extent())
        runs = {}
        runs["map1"] = processing.runAndLoadResults("jem:landcovermap", {
            "INPUT": scene, "DEVICE": "cpu", "OUTPUT": str(OUT / "beirut_classes.tif"),
            "CONFIDENCE": str(OUT / "beirut_confidence.tif")})
        runs["map2"] = processing.runAndLoadResults("jem:landcovermap", {
            "INPUT": scene, "DEVICE": "cpu", "STRIDE": 16, "OUTPUT": "TEMPORARY_OUTPUT",
            "CONFIDENCE": "TEMPORARY_OUTPUT"})
        runs["suggest1"] = processing.runAndLoadResults("jem:suggest", {
            "INPUT": scene, "DEVICE": "cpu", "COUNT": 12, "OUTPUT": str(OUT / "beirut_suggestions.gpkg")})
        runs["suggest2"] = processing.runAndLoadResults("jem:suggest", {
            "INPUT": scene, "DEVICE": "cpu", "COUNT": 5, "OUTPUT": "TEMPORARY_OUTPUT"})
        log["runs"] = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in runs.items()}
        layers = QgsProject.instance().mapLayers().values()
        log["layers"] = [(l.name(), l.isValid(), l.renderer().type() if hasattr(l, "renderer") and l.renderer() else None)
                         for l in layers]
        by_name = {l.name(): l for l in layers}

        # The map with its legend: the first class map over the image.
        classes = by_name["beirut_classes"]
        only(classes, scene)
        wait_render()
        grab(iface.mainWindow(), "qgis_map_legend.png")

        # Suggestions over the image.
        suggestions = by_name["beirut_suggestions"]
        only(suggestions, scene)
        wait_render()
        grab(iface.mainWindow(), "qgis_suggestions.png")

        # The dock with labelled patches.
        from jem_qgis_plugin.annotation_layer import create_annotation_layer
        ui = plugins["jem_qgis_plugin"].annotation_ui
        ui.action.setChecked(True)
        dock = ui.dock
        annotations = create_annotation_layer(OUT / "beirut_annotations.gpkg", scene.crs())
        QgsProject.instance().addMapLayer(annotations)
        dock.raster_combo.setLayer(scene)
        dock.layer_combo.setLayer(annotations)
        dock.annotate_button.setChecked(True)
        tool = canvas.mapTool()
        extent = scene.extent()
        for name, fx, fy in (("Water", 0.04, 0.96), ("Water", 0.04, 0.6), ("Dense-urban", 0.5, 0.6),
                             ("Dense-urban", 0.6, 0.75), ("Forest", 0.85, 0.2)):
            dock.class_combo.setCurrentText(name)
            tool.annotate(QgsPointXY(extent.xMinimum() + fx * extent.width(), extent.yMinimum() + fy * extent.height()))
        only(annotations, scene)
        wait_render()
        grab(iface.mainWindow(), "qgis_dock.png")
        log["dock_status"] = dock.status.text()
        log["annotations"] = annotations.featureCount()

        # The dialog, as opened from the Processing Toolbox.
        dialog = processing.createAlgorithmDialog("jem:landcovermap", {"INPUT": scene})
        dialog.resize(900, 700)
        dialog.show()
        QgsApplication.processEvents()
        grab(dialog, "qgis_dialog.png")
        dialog.close()
        all_twice(scene, annotations)
    except Exception:
        log["error"] = traceback.format_exc()
    (OUT / "log.json").write_text(json.dumps(log, indent=1))
    for layer in QgsProject.instance().mapLayers().values():
        if layer.isEditable():
            layer.commitChanges()
    QgsProject.instance().clear()
    QgsApplication.exit(0)


def all_twice(scene, annotations):
    """Every algorithm run twice in this desktop session with its results loaded; what each run gave."""
    import processing

    annotations.commitChanges()
    tiny = os.environ["SHOT_DATASET"]
    runs = {
        "jem:landcovermap": lambda i: {"INPUT": scene, "DEVICE": "cpu", "STRIDE": 32, "RESOLUTION": "patch",
                                       "OUTPUT": "TEMPORARY_OUTPUT", "CONFIDENCE": "TEMPORARY_OUTPUT"},
        "jem:suggest": lambda i: {"INPUT": scene, "DEVICE": "cpu", "COUNT": 4, "OUTPUT": "TEMPORARY_OUTPUT"},
        "jem:retrain": lambda i: {"INPUT": scene, "ANNOTATIONS": annotations, "CLASS_FIELD": "class", "EPOCHS": 1,
                                  "UNLABELLED": 32, "DEVICE": "cpu", "OUTPUT_MAP": "TEMPORARY_OUTPUT",
                                  "OUTPUT_CONFIDENCE": "TEMPORARY_OUTPUT"},
        "jem:train": lambda i: {"DATASET": tiny, "IMAGE_SIZE": 16, "EPOCHS": 1, "BASELINE": True, "ARCH": "wrn-10-1",
                                "BATCH_SIZE": 8, "DEVICE": "cpu", "OUTPUT_MODEL": str(OUT / f"tiny_{i}.pt")},
        "jem:ood": lambda i: {"REFERENCE": tiny, "COMPARE_RASTERS": [scene], "DEVICE": "cpu",
                              "OUTPUT_HTML": str(OUT / f"ood_{i}.html")},
        "jem:samples": lambda i: {"PER_CLASS": 1, "STEPS": 5, "DEVICE": "cpu", "OUTPUT": str(OUT / f"samples_{i}.png")},
    }
    report = {}
    for algorithm, parameters in runs.items():
        for i in (1, 2):
            try:
                result = processing.runAndLoadResults(algorithm, parameters(i))
                report[f"{algorithm} #{i}"] = {k: str(v)[:80] for k, v in result.items()}
            except Exception as error:
                report[f"{algorithm} #{i}"] = f"FAILED: {error}"
    report["styled layers"] = [(l.name(), l.isValid(), l.renderer().type() if l.renderer() else None)
                               for l in QgsProject.instance().mapLayers().values()]
    log["all_twice"] = report


QTimer.singleShot(3000, step)
