# Run by `qgis --code docs/qgis_screenshots.py` under Xvfb (docs/qgis.md, "As a new user sees it"):
# the screenshots of docs/qgis.md and README.md into SHOT_IMG, SHOT_OUT/log.json says how each run went.
# SHOT_VRT: the Beirut B04/B03/B02 VRT, for the Beirut shots. SHOT_SCENE: a folder with the scene
# benchmark's scene.tif and labels.geojson, retrained on for the mosaic shot. Either may be left unset.
# SHOT_ALL_TWICE=1 (with SHOT_VRT and SHOT_DATASET, a small class-folder dataset): after the Beirut
# shots every algorithm runs twice more in the same session.
import json
import os
import shutil
import time
import traceback
from pathlib import Path

from qgis.core import (QgsApplication, QgsMapThemeCollection, QgsMarkerSymbol, QgsPointXY,
                       QgsProcessingFeedback, QgsProject, QgsRasterLayer, QgsVectorLayer)
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import QAbstractItemView, QDockWidget
from qgis.utils import iface, plugins

OUT = Path(os.environ["SHOT_OUT"])
IMG = Path(os.environ["SHOT_IMG"])
VRT = os.environ.get("SHOT_VRT")
SCENE = os.environ.get("SHOT_SCENE")
log = {"runs": {}, "shots": []}


def settle():
    for _ in range(50):
        QgsApplication.processEvents()


def wait_render(*canvases):
    for canvas in (iface.mapCanvas(), *canvases):
        canvas.refreshAllLayers()
    settle()
    for canvas in (iface.mapCanvas(), *canvases):
        canvas.waitWhileRendering()
    settle()


def grab(widget, name):
    settle()
    widget.grab().save(str(IMG / name), "PNG", 0)  # 0: smallest file
    log["shots"].append(name)


def run(key, algorithm, parameters):
    """processing.runAndLoadResults as the dialog would run it; its outputs, time and log into log.json."""
    import processing
    feedback = QgsProcessingFeedback()
    start = time.monotonic()
    result = processing.runAndLoadResults(algorithm, parameters, feedback=feedback)
    log["runs"][key] = {"seconds": round(time.monotonic() - start, 1),
                        "outputs": {k: str(v)[:120] for k, v in result.items()},
                        "log_tail": feedback.textLog()[-1500:]}
    return result


def layer_named(name):
    layers = QgsProject.instance().mapLayersByName(name)
    if not layers:
        names = [layer.name() for layer in QgsProject.instance().mapLayers().values()]
        raise RuntimeError(f"No layer named {name!r}; the project has {names}")
    return layers[0]


def only(visible, expanded=()):
    """Show these layers in the main map and expand these legends; hide and collapse the rest."""
    for node in QgsProject.instance().layerTreeRoot().findLayers():
        node.setItemVisibilityChecked(node.layer() in visible)
        node.setExpanded(node.layer() in expanded)
    iface.setActiveLayer(visible[0])


def fit(canvas, layer):
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())


def fitted(layer, *views):
    """The main map and these views fitted to the layer once the layout has settled, then rendered."""
    for _ in range(2):  # a dock resize reaches the canvases only after the first render
        settle()
        for canvas in (iface.mapCanvas(), *views):
            fit(canvas, layer)
        wait_render(*views)


def dock_of(widget):
    while not isinstance(widget, QDockWidget):
        widget = widget.parent()
    return widget


def second_view(title, layers, width=560):
    """A second map view (View ▸ New Map View) showing these layers through a map theme, so it does
    not follow the main map's layer visibility."""
    record = QgsMapThemeCollection.MapThemeRecord()
    layer_records = [QgsMapThemeCollection.MapThemeLayerRecord(layer) for layer in layers]
    for layer_record in layer_records:
        layer_record.isVisible = True
    record.setLayerRecords(layer_records)
    QgsProject.instance().mapThemeCollection().insert(title, record)
    canvas = iface.createNewMapCanvas(title)
    canvas.freeze(False)
    canvas.setTheme(title)
    dock = dock_of(canvas)
    dock.setFloating(False)
    iface.addDockWidget(Qt.RightDockWidgetArea, dock)
    iface.mainWindow().resizeDocks([dock], [width], Qt.Horizontal)
    settle()
    fit(canvas, layers[-1])
    return canvas


def show_toolbox():
    """The Processing Toolbox with the JEM-EO group open and 'JEM land cover map' selected."""
    toolbox = plugins["processing"].toolbox
    toolbox.show()
    settle()
    tree = toolbox.algorithmTree
    model = tree.model()
    for row in range(model.rowCount()):
        group = model.index(row, 0)
        if model.data(group) != "JEM-EO":
            continue
        tree.expand(group)
        for child in range(model.rowCount(group)):
            if model.data(model.index(child, 0, group)) == "JEM land cover map":
                tree.setCurrentIndex(model.index(child, 0, group))
        settle()
        tree.scrollTo(group, QAbstractItemView.PositionAtTop)
    log["toolbox groups"] = [model.data(model.index(row, 0)) for row in range(model.rowCount())]
    return toolbox


def beirut():
    """Dialog, default map (class, confidence, familiarity), suggestions and the dock on Beirut."""
    import processing
    canvas = iface.mapCanvas()
    scene = QgsRasterLayer(VRT, "Beirut Sentinel-2")
    QgsProject.instance().addMapLayer(scene)
    fit(canvas, scene)

    dialog = processing.createAlgorithmDialog("jem:landcovermap", {"INPUT": scene})
    dialog.resize(900, 700)
    dialog.show()
    grab(dialog, "qgis_dialog.png")
    dialog.close()

    # Defaults: no MODEL (the bundled one), default stride and grid; all three maps as temporary outputs.
    maps = run("beirut map", "jem:landcovermap", {"INPUT": scene, "OUTPUT": "TEMPORARY_OUTPUT",
                                                  "CONFIDENCE": "TEMPORARY_OUTPUT", "FAMILIARITY": "TEMPORARY_OUTPUT"})
    for key, path in maps.items():  # copies to read the numbers back: QGIS deletes its temporary files at exit
        shutil.copy(path, OUT / f"beirut_{key}.tif")
    classes = layer_named("Beirut Sentinel-2 class map")
    confidence = layer_named("Beirut Sentinel-2 confidence")
    familiarity = layer_named("Beirut Sentinel-2 familiarity")

    only([classes, scene], [classes])
    fitted(scene)
    grab(iface.mainWindow(), "qgis_map_legend.png")

    only([confidence, scene], [confidence, familiarity])
    view = second_view("Familiarity −E(x)", [familiarity])
    fitted(scene, view)
    grab(iface.mainWindow(), "qgis_confidence.png")
    iface.closeMapCanvas("Familiarity −E(x)")

    only([classes, scene], [classes, confidence])
    toolbox = show_toolbox()
    view = second_view("Confidence over the image", [confidence, scene])
    iface.mainWindow().resizeDocks([toolbox, dock_of(view)], [300, 560], Qt.Vertical)
    settle()
    toolbox.algorithmTree.scrollTo(toolbox.algorithmTree.currentIndex(), QAbstractItemView.PositionAtBottom)
    fitted(scene, view)
    grab(iface.mainWindow(), "qgis_screenshot.png")
    iface.closeMapCanvas("Confidence over the image")
    toolbox.hide()

    run("beirut suggest", "jem:suggest", {"INPUT": scene, "COUNT": 12, "OUTPUT": "TEMPORARY_OUTPUT"})
    suggestions = layer_named("Beirut Sentinel-2 suggested patches")
    only([suggestions, scene])
    fitted(scene)
    grab(iface.mainWindow(), "qgis_suggestions.png")

    annotations = label_with_dock(scene)
    if os.environ.get("SHOT_ALL_TWICE") == "1":
        all_twice(scene, annotations)


def label_with_dock(scene):
    """Five patches labelled with the dock's map tool, then the dock closed again."""
    from jem_qgis_plugin.annotation_layer import create_annotation_layer
    canvas = iface.mapCanvas()
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
    only([annotations, scene])
    fitted(scene)
    grab(iface.mainWindow(), "qgis_dock.png")
    log["dock_status"] = dock.status.text()
    log["annotations"] = annotations.featureCount()
    dock.annotate_button.setChecked(False)
    annotations.commitChanges()
    ui.action.setChecked(False)
    return annotations


def scene_mosaic():
    """jem:retrain with its defaults on the scene benchmark's mosaic and labels; new class map and confidence."""
    canvas = iface.mapCanvas()
    scene = QgsRasterLayer(str(Path(SCENE) / "scene.tif"), "scene mosaic")
    labels = QgsVectorLayer(str(Path(SCENE) / "labels.geojson"), "labelled points", "ogr")
    labels.renderer().setSymbol(QgsMarkerSymbol.createSimple(
        {"name": "circle", "color": "white", "outline_color": "black", "size": "2.2"}))
    QgsProject.instance().addMapLayer(scene)
    QgsProject.instance().addMapLayer(labels)
    fit(canvas, scene)
    run("scene retrain", "jem:retrain", {"INPUT": scene, "ANNOTATIONS": labels, "CLASS_FIELD": "class",
                                         "OUTPUT_MODEL": str(OUT / "scene_retrained.pt"),
                                         "OUTPUT_MAP": "TEMPORARY_OUTPUT", "OUTPUT_CONFIDENCE": "TEMPORARY_OUTPUT"})
    classes = layer_named("scene mosaic class map (scene_retrained)")
    confidence = layer_named("scene mosaic confidence (scene_retrained)")
    root = QgsProject.instance().layerTreeRoot()  # the labelled points above the new maps
    node = root.findLayer(labels.id())
    root.insertChildNode(0, node.clone())
    root.removeChildNode(node)
    only([labels, classes], [classes, confidence])
    view = second_view("Scene with confidence", [confidence, scene], width=520)
    fitted(scene, view)
    grab(iface.mainWindow(), "qgis_scene_mosaic.png")
    iface.closeMapCanvas("Scene with confidence")


def step():
    try:
        iface.mainWindow().resize(1450, 880)  # smaller shots: the imagery makes the PNGs large
        for dock_widget in iface.mainWindow().findChildren(QDockWidget):
            if dock_widget.objectName() == "Browser":
                dock_widget.hide()
            if dock_widget.objectName() == "Layers":  # wide enough for the layer names and legend labels
                iface.mainWindow().resizeDocks([dock_widget], [340], Qt.Horizontal)
        settle()
        if VRT:
            beirut()
        if SCENE:
            QgsProject.instance().removeAllMapLayers()
            scene_mosaic()
        log["layers"] = [(layer.name(), layer.isValid()) for layer in QgsProject.instance().mapLayers().values()]
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

    tiny = os.environ["SHOT_DATASET"]
    runs = {
        "jem:landcovermap": lambda i: {"INPUT": scene, "DEVICE": "cpu", "STRIDE": 32, "RESOLUTION": "patch",
                                       "OUTPUT": "TEMPORARY_OUTPUT", "CONFIDENCE": "TEMPORARY_OUTPUT"},
        "jem:suggest": lambda i: {"INPUT": scene, "DEVICE": "cpu", "COUNT": 4, "OUTPUT": "TEMPORARY_OUTPUT"},
        "jem:retrain": lambda i: {"INPUT": scene, "ANNOTATIONS": annotations, "CLASS_FIELD": "class",
                                  "ITERATIONS": 2, "UNLABELLED": 32, "DEVICE": "cpu",
                                  "OUTPUT_MAP": "TEMPORARY_OUTPUT", "OUTPUT_CONFIDENCE": "TEMPORARY_OUTPUT"},
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
