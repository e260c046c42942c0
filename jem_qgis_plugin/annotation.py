"""Label patches on the map: a map tool that stores the patch footprint under a click, and a dock.

The footprint is the model's patch (patch_size × patch_size pixels of the raster's grid) centred
on the click and moved inwards at the raster's edges, exactly the patch jem_core.active reads for
it.  Features go into the annotation layer's edit buffer inside one edit command each, so QGIS's
usual Undo / Delete feature / Save edits apply.  The layer is a GeoPackage polygon layer with a
`class` field (created here, or any polygon/point layer the user picks).

Nothing here imports torch: the dock reads a model's class names with torch only when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsField, QgsFields,
                       QgsFillSymbol, QgsGeometry, QgsMapLayerProxyModel, QgsPalLayerSettings, QgsPointXY,
                       QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorFileWriter, QgsVectorLayer,
                       QgsVectorLayerSimpleLabeling, QgsWkbTypes)
from qgis.gui import QgsDockWidget, QgsFileWidget, QgsMapCanvas, QgsMapLayerComboBox, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import QVariant, pyqtSignal
from qgis.PyQt.QtWidgets import (QAction, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton,
                                 QSpinBox, QVBoxLayout, QWidget)

CLASS_FIELD = "class"
PATCH_FIELD = "patch_px"
DEFAULT_PATCH = 64


def patch_footprint(raster: QgsRasterLayer, point: QgsPointXY, patch_size: int) -> QgsRectangle | None:
    """The patch centred on point (raster CRS), snapped to the pixel grid and moved inside; None outside."""
    extent = raster.extent()
    width, height = raster.width(), raster.height()
    pixel_x, pixel_y = raster.rasterUnitsPerPixelX(), raster.rasterUnitsPerPixelY()
    col = (point.x() - extent.xMinimum()) / pixel_x
    row = (extent.yMaximum() - point.y()) / pixel_y
    if not (0 <= col < width and 0 <= row < height) or width < patch_size or height < patch_size:
        return None
    # Same rounding as jem_core.active.PatchReader.locate, so the stored footprint is the patch trained on.
    col0 = min(max(int(round(col - patch_size / 2)), 0), width - patch_size)
    row0 = min(max(int(round(row - patch_size / 2)), 0), height - patch_size)
    xmin = extent.xMinimum() + col0 * pixel_x
    ymax = extent.yMaximum() - row0 * pixel_y
    return QgsRectangle(xmin, ymax - patch_size * pixel_y, xmin + patch_size * pixel_x, ymax)


def annotation_fields() -> QgsFields:
    fields = QgsFields()
    fields.append(QgsField(CLASS_FIELD, QVariant.String))
    fields.append(QgsField(PATCH_FIELD, QVariant.Int))
    return fields


def style_annotation_layer(layer: QgsVectorLayer) -> None:
    """Outline-only footprints labelled with their class, so the imagery stays visible."""
    layer.renderer().setSymbol(QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": "255,0,255", "outline_width": "0.6"}))
    settings = QgsPalLayerSettings()
    settings.fieldName = CLASS_FIELD
    settings.enabled = True
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)


def create_annotation_layer(path: str | Path, crs: QgsCoordinateReferenceSystem,
                            name: str = "annotations") -> QgsVectorLayer:
    """A new GeoPackage polygon layer with the class and patch-size fields (the file is replaced)."""
    memory = QgsVectorLayer(f"Polygon?crs={crs.authid() or crs.toWkt()}", name, "memory")
    memory.dataProvider().addAttributes(annotation_fields().toList())
    memory.updateFields()
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = name
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        memory, str(path), QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise OSError(f"Cannot create the annotation layer '{path}': {message}")
    return open_annotation_layer(path, name)


def open_annotation_layer(path: str | Path, name: str = "annotations") -> QgsVectorLayer:
    """Reuse an existing GeoPackage annotation layer (it must have the class field)."""
    layer = QgsVectorLayer(f"{path}|layername={name}", name, "ogr")
    if not layer.isValid() or layer.fields().indexFromName(CLASS_FIELD) < 0:
        raise OSError(f"'{path}' has no layer '{name}' with a '{CLASS_FIELD}' field.")
    style_annotation_layer(layer)
    return layer


class PatchAnnotationTool(QgsMapToolEmitPoint):
    """Each left click adds the patch footprint under it, with the current class, to the annotation layer."""

    annotated = pyqtSignal(QgsFeature)
    message = pyqtSignal(str)

    def __init__(self, canvas: QgsMapCanvas, raster: QgsRasterLayer, layer: QgsVectorLayer, patch_size: int,
                 class_name: Callable[[], str]) -> None:
        super().__init__(canvas)
        self.raster, self.layer, self.patch_size, self.class_name = raster, layer, patch_size, class_name

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802 (QGIS API name)
        self.annotate(self.toMapCoordinates(event.pos()))

    def annotate(self, map_point: QgsPointXY) -> QgsFeature | None:
        """Add the footprint at map_point (canvas CRS); returns the feature, or None with a message why not."""
        name = self.class_name().strip()
        if not name:
            self.message.emit("Pick or type a class name first.")
            return None
        project = QgsProject.instance()
        canvas_crs = self.canvas().mapSettings().destinationCrs()
        to_raster = QgsCoordinateTransform(canvas_crs, self.raster.crs(), project)
        footprint = patch_footprint(self.raster, to_raster.transform(map_point), self.patch_size)
        if footprint is None:
            self.message.emit(f"The click is outside '{self.raster.name()}' (or it is smaller than one "
                              f"{self.patch_size} px patch).")
            return None
        geometry = QgsGeometry.fromRect(footprint)
        geometry.transform(QgsCoordinateTransform(self.raster.crs(), self.layer.crs(), project))
        feature = QgsFeature(self.layer.fields())
        feature.setGeometry(geometry)
        feature.setAttribute(CLASS_FIELD, name)
        if self.layer.fields().indexFromName(PATCH_FIELD) >= 0:
            feature.setAttribute(PATCH_FIELD, self.patch_size)
        if not self.layer.isEditable():
            self.layer.startEditing()
        self.layer.beginEditCommand(f"JEM annotation: {name}")
        if not self.layer.addFeature(feature):
            self.layer.destroyEditCommand()
            self.message.emit(f"Could not add the annotation to '{self.layer.name()}' (is it read-only?).")
            return None
        self.layer.endEditCommand()
        self.layer.triggerRepaint()
        self.annotated.emit(feature)
        self.message.emit(f"Labelled a {self.patch_size} px patch as '{name}'. Undo with Ctrl+Z; save with "
                          "'Save layer edits'.")
        return feature


def model_class_names(path: str) -> tuple[list[str], int]:
    """Class names and patch size stored in a JEM model file (imports torch, only when called)."""
    from jem_core.model_file import read_payload

    meta = read_payload(path)["meta"]
    return list(meta["class_names"]), int(meta["image_size"])


class AnnotationDock(QgsDockWidget):
    """Raster, model, class and annotation layer pickers, the annotate toggle, retrain and suggest."""

    def __init__(self, iface) -> None:
        super().__init__("JEM labelling")
        self.iface = iface
        self.tool: PatchAnnotationTool | None = None
        self.setObjectName("JemAnnotationDock")
        body = QWidget()
        form = QFormLayout()
        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.model_widget = QgsFileWidget()
        self.model_widget.setFilter("JEM model (*.pt)")
        self.model_widget.fileChanged.connect(self.load_model_classes)
        self.class_combo = QComboBox()
        self.class_combo.setEditable(True)
        self.class_combo.setToolTip("A class of the model, or type a new one")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 1024)
        self.patch_spin.setValue(DEFAULT_PATCH)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        new_layer = QPushButton("New…")
        new_layer.clicked.connect(self.new_layer)
        layer_row = QHBoxLayout()
        layer_row.addWidget(self.layer_combo, 1)
        layer_row.addWidget(new_layer)
        form.addRow("Raster", self.raster_combo)
        form.addRow("Model (optional)", self.model_widget)
        form.addRow("Class", self.class_combo)
        form.addRow("Patch size (px)", self.patch_spin)
        form.addRow("Annotation layer", layer_row)
        self.annotate_button = QPushButton("Label patches on the map")
        self.annotate_button.setCheckable(True)
        self.annotate_button.toggled.connect(self.toggle_tool)
        retrain = QPushButton("Retrain…")
        retrain.clicked.connect(lambda: self.open_algorithm("jem:retrain"))
        suggest = QPushButton("Suggest where to label…")
        suggest.clicked.connect(lambda: self.open_algorithm("jem:suggest"))
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout = QVBoxLayout()
        layout.addLayout(form)
        for widget in (self.annotate_button, retrain, suggest, self.status):
            layout.addWidget(widget)
        layout.addStretch(1)
        body.setLayout(layout)
        self.setWidget(body)

    def load_model_classes(self, path: str) -> None:
        if not path:
            return
        try:
            names, size = model_class_names(path)
        except Exception as error:  # JEMError, or torch missing: say it, keep the dock usable
            self.status.setText(str(error))
            return
        current = self.class_combo.currentText()
        self.class_combo.clear()
        self.class_combo.addItems(names)
        if current:
            self.class_combo.setCurrentText(current)
        self.patch_spin.setValue(size)
        self.status.setText(f"Model classes loaded; patch size {size} px.")

    def new_layer(self) -> None:
        raster = self.raster_combo.currentLayer()
        if raster is None:
            self.status.setText("Pick the raster first: the annotation layer takes its CRS.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "New annotation layer", "annotations.gpkg", "GeoPackage (*.gpkg)")
        if not path:
            return
        try:
            layer = open_annotation_layer(path) if Path(path).exists() else create_annotation_layer(path, raster.crs())
        except OSError as error:
            self.status.setText(str(error))
            return
        QgsProject.instance().addMapLayer(layer)
        self.layer_combo.setLayer(layer)

    def toggle_tool(self, active: bool) -> None:
        canvas = self.iface.mapCanvas()
        if not active:
            if self.tool is not None and canvas.mapTool() is self.tool:
                canvas.unsetMapTool(self.tool)
            return
        raster, layer = self.raster_combo.currentLayer(), self.layer_combo.currentLayer()
        if raster is None or layer is None:
            self.status.setText("Pick a raster and an annotation layer (or make one with New…) first.")
            self.annotate_button.setChecked(False)
            return
        self.tool = PatchAnnotationTool(canvas, raster, layer, self.patch_spin.value(), self.class_combo.currentText)
        self.tool.message.connect(self.status.setText)
        self.tool.deactivated.connect(lambda: self.annotate_button.setChecked(False))
        canvas.setMapTool(self.tool)

    def open_algorithm(self, algorithm_id: str) -> None:
        """The Processing dialog, filled in from the dock; it runs in the background with progress and cancel."""
        import processing

        layer = self.layer_combo.currentLayer()
        if layer is not None and layer.isEditable() and layer.isModified():
            layer.commitChanges(False)  # the algorithm reads the saved layer
        parameters = {"INPUT": self.raster_combo.currentLayer(), "MODEL": self.model_widget.filePath() or None}
        if algorithm_id == "jem:retrain":
            parameters.update(ANNOTATIONS=layer, CLASS_FIELD=CLASS_FIELD)
        processing.execAlgorithmDialog(algorithm_id, {k: v for k, v in parameters.items() if v is not None})


class AnnotationUi:
    """What the plugin adds to the desktop: a toolbar/menu action that shows the labelling dock."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.dock: AnnotationDock | None = None
        self.action: QAction | None = None

    def initGui(self) -> None:  # noqa: N802 (QGIS API name)
        from .paths import icon

        self.dock = AnnotationDock(self.iface)
        self.iface.addDockWidget(2, self.dock)  # Qt.RightDockWidgetArea
        self.dock.hide()
        self.action = QAction(icon("jem.svg"), "JEM labelling", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self.dock.setUserVisible)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addPluginToMenu("JEM-EO", self.action)
        self.iface.addToolBarIcon(self.action)

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.toggle_tool(False)
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu("JEM-EO", self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action = None

