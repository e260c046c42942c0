"""Labelling in QGIS, headless: the map tool driven by simulated canvas clicks, then jem:retrain and
jem:suggest through processing.run on a small generated raster."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt

from jem_core.active import Annotation, patches_from_annotations
from jem_core.model_file import load_model
from jem_qgis_plugin.annotation import AnnotationDock, AnnotationUi, PatchAnnotationTool
from jem_qgis_plugin.annotation_layer import create_annotation_layer, open_annotation_layer, patch_footprint
from tests.conftest import CancelAfter
from tests.test_active import ORIGIN_X, ORIGIN_Y, PATCH, PIXEL, at, write_scene

FAST = {"ITERATIONS": 1, "UNLABELLED": 16, "NEW_MODEL": True, "PATCH_SIZE": PATCH, "ARCH": "wrn-10-1", "DEVICE": "cpu"}


def run(algorithm: str, parameters: dict) -> dict:
    import processing

    return processing.run(algorithm, parameters, feedback=QgsProcessingFeedback())


@pytest.fixture
def raster(tmp_path) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(write_scene(tmp_path / "scene.tif")), "scene")
    assert layer.isValid()
    return layer


@pytest.fixture
def canvas(qgis_canvas, raster):
    qgis_canvas.resize(480, 480)
    qgis_canvas.setDestinationCrs(raster.crs())
    qgis_canvas.setLayers([raster])
    qgis_canvas.setExtent(raster.extent())
    qgis_canvas.refresh()
    yield qgis_canvas
    qgis_canvas.setLayers([])  # the session canvas must not keep a layer this test deletes
    qgis_canvas.unsetMapTool(qgis_canvas.mapTool())


def click(canvas, tool: PatchAnnotationTool, col: float, row: float) -> None:
    """A left-button release on the canvas pixel showing raster pixel (col, row)."""
    device = canvas.getCoordinateTransform().transform(QgsPointXY(*at(col, row)))
    event = QgsMapMouseEvent(canvas, QEvent.MouseButtonRelease, QPoint(round(device.x()), round(device.y())),
                             Qt.LeftButton, Qt.LeftButton)
    tool.canvasReleaseEvent(event)


def label_by_clicks(canvas, raster, path: Path, clicks: list[tuple[str, float, float]]) -> QgsVectorLayer:
    layer = create_annotation_layer(path, raster.crs())
    current = {"class": ""}
    tool = PatchAnnotationTool(canvas, raster, layer, PATCH, lambda: current["class"])
    canvas.setMapTool(tool)
    for name, col, row in clicks:
        current["class"] = name
        click(canvas, tool, col, row)
    assert layer.commitChanges(), layer.commitErrors()
    return layer


TWO_CLASSES = [("field", 12, 20), ("field", 20, 70), ("town", 70, 20), ("town", 80, 75)]


def test_clicks_store_patch_footprints_on_the_raster_grid_with_undo(canvas, raster, tmp_path):
    layer = create_annotation_layer(tmp_path / "ann.gpkg", raster.crs())
    current = {"class": "field"}
    tool = PatchAnnotationTool(canvas, raster, layer, PATCH, lambda: current["class"])
    messages: list[str] = []
    tool.message.connect(messages.append)
    canvas.setMapTool(tool)

    click(canvas, tool, 30.2, 40.7)
    click(canvas, tool, 0.5, 0.5)  # at the corner: the patch moves inside
    current["class"] = "town"
    click(canvas, tool, 300, 10)  # outside the raster: nothing stored
    assert layer.featureCount() == 2 and "outside" in messages[-1]
    boxes = [f.geometry().boundingBox() for f in layer.getFeatures()]
    for box in boxes:
        assert box.width() == pytest.approx(PATCH * PIXEL) and box.height() == pytest.approx(PATCH * PIXEL)
        assert (box.xMinimum() - ORIGIN_X) / PIXEL == pytest.approx(round((box.xMinimum() - ORIGIN_X) / PIXEL))
    assert (boxes[1].xMinimum(), boxes[1].yMaximum()) == pytest.approx((ORIGIN_X, ORIGIN_Y))
    assert [f["class"] for f in layer.getFeatures()] == ["field", "field"]

    layer.undoStack().undo()
    assert layer.featureCount() == 1
    click(canvas, tool, 70, 60)
    assert layer.commitChanges()
    saved = open_annotation_layer(tmp_path / "ann.gpkg")
    assert sorted(f["class"] for f in saved.getFeatures()) == ["field", "town"]
    assert {f["patch_px"] for f in saved.getFeatures()} == {PATCH}


def test_stored_footprint_is_the_patch_jem_core_reads(raster):
    import rasterio

    centre = QgsPointXY(*at(41.3, 57.9))
    box = patch_footprint(raster, centre, PATCH)
    col0, row0 = round((box.xMinimum() - ORIGIN_X) / PIXEL), round((ORIGIN_Y - box.yMaximum()) / PIXEL)
    data = patches_from_annotations([raster.source()], [Annotation("a", box.center().x(), box.center().y()),
                                                        Annotation("b", centre.x(), centre.y())], PATCH)
    with rasterio.open(raster.source()) as src:
        expected = src.read().astype(np.float32)[:, row0:row0 + PATCH, col0:col0 + PATCH]
    assert np.array_equal(data.images[0].numpy(), expected)
    assert np.array_equal(data.images[1].numpy(), expected), "click point and footprint centre: same patch"


def test_retrain_and_suggest_through_processing(provider, canvas, raster, tmp_path):
    layer = label_by_clicks(canvas, raster, tmp_path / "ann.gpkg", TWO_CLASSES)
    # No CLASS_FIELD: a script or qgis_process run gets the default field, 'class'.
    first = run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, **FAST,
                                "OUTPUT_MODEL": str(tmp_path / "m1.pt"), "OUTPUT_MAP": str(tmp_path / "map.tif"),
                                "OUTPUT_CONFIDENCE": str(tmp_path / "conf.tif")})
    # 4 annotated patches, each with its 8 neighbours a quarter patch away (the retrain's label shift).
    assert first["LABELLED"] == 4 * 9 and 0.0 <= first["FIT_ACCURACY"] <= 1.0
    assert load_model(first["OUTPUT_MODEL"]).meta.class_names == ["field", "town"]
    class_map = QgsRasterLayer(first["OUTPUT_MAP"], "map")
    assert class_map.isValid() and class_map.crs() == raster.crs() and Path(first["OUTPUT_CONFIDENCE"]).exists()

    # A new class drawn as points in another CRS (WGS 84): reprojected, and the head grows (keeping 'field').
    points = QgsVectorLayer("Point?crs=EPSG:4326&field=landcover:string", "points", "memory")
    to_wgs84 = QgsCoordinateTransform(raster.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    features = []
    for name, col, row in (("water", 40, 85), ("town", 70, 20)):
        feature = QgsFeature(points.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(to_wgs84.transform(QgsPointXY(*at(col, row)))))
        feature.setAttributes([name])
        features.append(feature)
    points.dataProvider().addFeatures(features)
    second = run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": points, "CLASS_FIELD": "landcover",
                                 "MODEL": first["OUTPUT_MODEL"], **FAST, "NEW_MODEL": False, "KEEP_MODEL_CLASSES": True,
                                 "OUTPUT_MODEL": str(tmp_path / "m2.pt")})
    second_model = load_model(second["OUTPUT_MODEL"])
    assert second_model.meta.class_names == ["field", "town", "water"]
    # Both rounds read the raster at 1/2 resolution (the default, kept by the second round from the first's
    # model), so the suggestions' footprints cover 2 × PATCH raster pixels.
    footprint = 2 * PATCH * PIXEL
    assert second_model.meta.coarsen == 2

    result = run("jem:suggest", {"INPUT": raster, "MODEL": second["OUTPUT_MODEL"], "COUNT": 3, "DEVICE": "cpu",
                                 "OUTPUT": str(tmp_path / "suggestions.gpkg")})
    suggestions = QgsVectorLayer(result["OUTPUT"], "suggestions", "ogr")
    assert suggestions.featureCount() == 3 and suggestions.crs() == raster.crs()
    rows = sorted(suggestions.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in rows] == [1, 2, 3]
    # Picks take turns between the predicted classes: the first is the best-scoring patch of all.
    assert rows[0]["score"] == max(f["score"] for f in rows)
    for feature in rows:
        assert 0 <= feature["unfamiliarity"] <= 1 and 0 <= feature["uncertainty"] <= 1
        assert feature["predicted_class"] in ("field", "town", "water")
        box = feature.geometry().boundingBox()
        assert box.width() == pytest.approx(footprint)
        assert not feature["class"], "the class is left for the analyst"
    centres = [f.geometry().centroid().asPoint() for f in rows]
    spacing = min(a.distance(b) for i, a in enumerate(centres) for b in centres[i + 1:])
    assert spacing >= footprint, "suggestions must not overlap"

    # Every patch is suggested; given the labels (the WGS 84 points), none that covers a labelled place.
    def suggested(name: str, **extra) -> list[QgsGeometry]:
        output = run("jem:suggest", {"INPUT": raster, "MODEL": second["OUTPUT_MODEL"], "COUNT": 1000,
                                     "DEVICE": "cpu", "OUTPUT": str(tmp_path / name), **extra})["OUTPUT"]
        return [f.geometry() for f in QgsVectorLayer(output, name, "ogr").getFeatures()]

    def on_labels(footprints: list[QgsGeometry]) -> int:
        return sum(f.contains(QgsPointXY(*at(col, row))) for f in footprints for col, row in ((40, 85), (70, 20)))

    everything = suggested("all.gpkg")
    left = suggested("open.gpkg", ANNOTATIONS=points, CLASS_FIELD="landcover")
    assert on_labels(everything) == 2 and on_labels(left) == 0 and 0 < len(left) < len(everything)


def memory_layer(geometry_type: str, rows: list[tuple[str | None, QgsGeometry]],
                 field: str = "class") -> QgsVectorLayer:
    layer = QgsVectorLayer(f"{geometry_type}?crs=EPSG:32633&field={field}:string", "ann", "memory")
    features = []
    for value, geometry in rows:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(geometry)
        feature.setAttributes([value])
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    return layer


def square(col: float, row: float, side: float = PATCH) -> QgsGeometry:
    x, y = at(col, row)
    return QgsGeometry.fromRect(QgsRectangle(x, y - side * PIXEL, x + side * PIXEL, y))


BOW_TIE = QgsGeometry.fromWkt(f"POLYGON(({at(10, 10)[0]} {at(10, 10)[1]}, {at(30, 30)[0]} {at(30, 30)[1]}, "
                              f"{at(30, 10)[0]} {at(30, 10)[1]}, {at(10, 30)[0]} {at(10, 30)[1]}, "
                              f"{at(10, 10)[0]} {at(10, 10)[1]}))")


@pytest.mark.parametrize("layer_rows, field, message", [
    ([], "class", "no features"),
    ([("field", square(5, 5)), ("town", square(60, 5))], "landcover", "no field 'landcover'"),
    ([("field", square(5, 5)), ("town", square(500, 5))], "class", "outside every raster"),
    ([("field", BOW_TIE), ("town", square(60, 5))], "class", "invalid geometry"),
    ([("field", square(5, 5)), (None, square(60, 5))], "class", "has no class"),
    ([("field", square(5, 5)), ("field", square(60, 5))], "class", "Only one class"),
])
def test_retrain_bad_annotations_give_one_clear_message(provider, raster, tmp_path, layer_rows, field, message):
    layer = memory_layer("Polygon", layer_rows)
    with pytest.raises(QgsProcessingException, match=message):
        run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, "CLASS_FIELD": field, **FAST,
                            "OUTPUT_MODEL": str(tmp_path / "m.pt")})
    assert not (tmp_path / "m.pt").exists()


def test_large_polygon_labels_every_patch_inside(provider, raster, tmp_path):
    layer = memory_layer("Polygon", [("field", square(0, 0, side=2 * PATCH)), ("town", square(60, 10))])
    result = run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, "CLASS_FIELD": "class", **FAST,
                                 "COARSEN": 1, "OUTPUT_MODEL": str(tmp_path / "m.pt")})
    assert result["LABELLED"] == 5 * 9  # 2 × 2 cells + 1, each with its 8 shifted neighbours
    # Read at 1/2 resolution (the default), a patch covers 2 × PATCH raster pixels: one cell each.
    coarser = run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, "CLASS_FIELD": "class", **FAST,
                                  "OUTPUT_MODEL": str(tmp_path / "m2.pt")})
    assert coarser["LABELLED"] == 2 * 9


def test_dock_loads_model_classes_and_activates_the_tool(qgis_iface, canvas, raster, tmp_path):
    from jem_core.model_file import ModelMeta, save_model
    from jem_core.models import ModelSpec, build_model

    model_path = tmp_path / "m.pt"
    save_model(model_path, build_model(ModelSpec(arch="wrn-10-1", num_classes=2)),
               ModelMeta(["forest", "water"], ["r", "g", "b"], 24, [0.0] * 3, [1.0] * 3))
    layer = create_annotation_layer(tmp_path / "ann.gpkg", raster.crs())
    QgsProject.instance().addMapLayers([raster, layer])
    ui = AnnotationUi(qgis_iface)
    ui.initGui()
    dock: AnnotationDock = ui.dock
    try:
        dock.model_widget.setFilePath(str(model_path))
        assert [dock.class_combo.itemText(i) for i in range(dock.class_combo.count())] == ["forest", "water"]
        assert dock.patch_spin.value() == 24
        dock.raster_combo.setLayer(raster)
        dock.layer_combo.setLayer(layer)
        dock.class_combo.setCurrentText("wetland")  # a new class, typed in
        dock.annotate_button.setChecked(True)
        tool = canvas.mapTool()
        # A click labels what the retrain reads as one patch: 24 px at 1/2 resolution, 48 raster pixels.
        assert isinstance(tool, PatchAnnotationTool) and tool.patch_size == 2 * 24
        click(canvas, tool, 50, 50)
        assert [f["class"] for f in layer.getFeatures()] == ["wetland"]
        dock.annotate_button.setChecked(False)
        assert canvas.mapTool() is not tool
    finally:
        ui.unload()
        canvas.setLayers([])
        QgsProject.instance().removeAllMapLayers()


def test_cancelled_retrain_writes_nothing(provider, raster, tmp_path):
    import processing

    layer = memory_layer("Polygon", [("field", square(5, 5)), ("town", square(60, 5))])
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        processing.run("jem:retrain", {"INPUT": raster, "ANNOTATIONS": layer, "CLASS_FIELD": "class", **FAST,
                                       "ITERATIONS": 50, "OUTPUT_MODEL": str(tmp_path / "m.pt")},
                       feedback=CancelAfter(5))
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"], "no model and no temporary file may be left"
