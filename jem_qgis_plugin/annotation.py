"""Label patches on the map: a map tool that stores the patch footprint under a left click, and a dock.

Features go into the annotation layer's edit buffer inside one edit command each, so QGIS's usual
Undo / Delete feature / Save edits apply.  The layer logic (footprints, fields, creating and
opening the GeoPackage) lives in annotation_layer.py, free of widgets.

Nothing here imports torch: the dock reads a model's class names with torch only when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsMapLayerProxyModel,
    QgsPointXY,
    QgsProcessing,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFileWidget, QgsMapCanvas, QgsMapLayerComboBox, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QAction,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .annotation_layer import (
    CLASS_FIELD,
    DEFAULT_PATCH,
    PATCH_FIELD,
    create_annotation_layer,
    open_annotation_layer,
    patch_footprint,
)

# Characters of a layer name the annotation-layer combo always has room for.
LAYER_NAME_CHARS = 24


class PatchAnnotationTool(QgsMapToolEmitPoint):
    """Each left click adds the patch footprint under it, with the current class, to the annotation layer;
    other buttons are left to the canvas."""

    annotated = pyqtSignal(QgsFeature)
    message = pyqtSignal(str)

    def __init__(self, canvas: QgsMapCanvas, raster: QgsRasterLayer, layer: QgsVectorLayer, patch_size: int,
                 class_name: Callable[[], str]) -> None:
        super().__init__(canvas)
        self.raster, self.layer, self.patch_size, self.class_name = raster, layer, patch_size, class_name

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802 (QGIS API name)
        if event.button() == Qt.LeftButton:
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


def model_class_names(path: str) -> tuple[list[str], int, int]:
    """Class names and patch size stored in a JEM model file, and the coarsening a retrain from it reads
    the raster with (imports torch, only when called)."""
    from jem_core.active import reading_coarsen
    from jem_core.model_file import ModelMeta, read_payload

    meta = ModelMeta(**read_payload(path)["meta"])
    return list(meta.class_names), meta.image_size, reading_coarsen(meta)


class AnnotationDock(QgsDockWidget):
    """Raster, model, class and annotation layer pickers, the annotate toggle, retrain and suggest."""

    def __init__(self, iface) -> None:
        super().__init__("JEM labelling")
        self.iface = iface
        self.tool: PatchAnnotationTool | None = None
        self.watched_layer: QgsVectorLayer | None = None
        self.default_model_read = False
        self.coarsen = 1  # a click labels patch size × this many raster pixels, as the retrain will read them
        self.setObjectName("JemAnnotationDock")
        body = QWidget()
        form = QFormLayout()
        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.model_widget = QgsFileWidget()
        self.model_widget.setFilter("JEM model (*.pt)")
        self.model_widget.lineEdit().setPlaceholderText("empty: the bundled base model")
        self.model_widget.fileChanged.connect(self.load_model_classes)
        self.class_combo = QComboBox()
        self.class_combo.setEditable(True)
        self.class_combo.setToolTip("A class of the model, or type a new one")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 1024)
        self.patch_spin.setValue(DEFAULT_PATCH)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.layer_combo.setMinimumContentsLength(LAYER_NAME_CHARS)
        self.layer_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.layer_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.layer_combo.layerChanged.connect(self.watch_layer)
        new_layer = QPushButton("New…")
        new_layer.clicked.connect(self.new_layer)
        layer_row = QHBoxLayout()
        layer_row.addWidget(self.layer_combo, 1)
        layer_row.addWidget(new_layer)
        form.addRow("Raster", self.raster_combo)
        form.addRow("Model", self.model_widget)
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

    def showEvent(self, event) -> None:  # noqa: N802 (Qt API name)
        """The bundled model's classes and patch size, read (with torch) the first time the dock shows."""
        super().showEvent(event)
        if not self.default_model_read and not self.model_widget.filePath():
            self.default_model_read = True
            self.load_model_classes("")

    def model_path(self) -> str:
        """The chosen model file, else the bundled base model's."""
        from jem_core.bundled import base_model_path

        return self.model_widget.filePath() or str(base_model_path())

    def load_model_classes(self, path: str) -> None:
        """Classes and patch size of the model at path (empty: the bundled one) into the class and size pickers."""
        try:
            path = path or self.model_path()
            names, size, self.coarsen = model_class_names(path)
        except Exception as error:  # JEMError, or torch missing: say it, keep the dock usable
            self.status.setText(str(error))
            return
        current = self.class_combo.currentText()
        self.class_combo.clear()
        self.class_combo.addItems(names)
        if current:
            self.class_combo.setCurrentText(current)
        self.patch_spin.setValue(size)
        self.status.setText(f"Model '{Path(path).name}': {len(names)} classes; patch size {size} px; a label "
                            f"covers {size * self.coarsen} × {size * self.coarsen} raster pixels.")

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
        if layer is not self.watched_layer:
            self.watch_layer(layer)
        footprint = self.patch_spin.value() * self.coarsen
        self.tool = PatchAnnotationTool(canvas, raster, layer, footprint, self.class_combo.currentText)
        self.tool.message.connect(self.status.setText)
        self.tool.deactivated.connect(lambda: self.annotate_button.setChecked(False))
        canvas.setMapTool(self.tool)

    def watch_layer(self, layer) -> None:
        """Keep the status in step with the layer, Undo and Delete included."""
        if self.watched_layer is not None:
            try:
                self.watched_layer.featureAdded.disconnect(self.show_count)
                self.watched_layer.featureDeleted.disconnect(self.show_count)
            except (RuntimeError, TypeError):  # the old layer was removed from the project meanwhile
                pass
        self.watched_layer = layer if isinstance(layer, QgsVectorLayer) else None
        if self.watched_layer is not None:
            self.watched_layer.featureAdded.connect(self.show_count)
            self.watched_layer.featureDeleted.connect(self.show_count)

    def show_count(self, *_) -> None:
        layer = self.watched_layer
        unsaved = " (unsaved: 'Save layer edits' keeps them)" if layer.isModified() else ""
        self.status.setText(f"{layer.featureCount()} labelled patches in '{layer.name()}'{unsaved}.")

    def open_algorithm(self, algorithm_id: str) -> None:
        """The Processing dialog, filled in from the dock; it runs in the background with progress and cancel.
        A model that Retrain writes becomes the dock's model, so Suggest and the next Retrain start from it."""
        import processing

        layer = self.layer_combo.currentLayer()
        if layer is not None and layer.isEditable() and layer.isModified() and not layer.commitChanges(False):
            self.status.setText(f"Could not save the edits of '{layer.name()}' (the algorithm reads the saved "
                                f"layer): {'; '.join(layer.commitErrors())}")
            return
        parameters = {"INPUT": self.raster_combo.currentLayer(), "MODEL": self.model_widget.filePath() or None}
        if algorithm_id == "jem:retrain":
            # The new class map and its confidence as temporary layers, so the analyst looks again at once.
            parameters.update(ANNOTATIONS=layer, CLASS_FIELD=CLASS_FIELD, PATCH_SIZE=self.patch_spin.value(),
                              OUTPUT_MAP=QgsProcessing.TEMPORARY_OUTPUT,
                              OUTPUT_CONFIDENCE=QgsProcessing.TEMPORARY_OUTPUT)
        elif algorithm_id == "jem:suggest":  # so the suggestions skip what is labelled already
            parameters.update(ANNOTATIONS=layer)
        results = processing.execAlgorithmDialog(algorithm_id, {k: v for k, v in parameters.items() if v is not None})
        new_model = (results or {}).get("OUTPUT_MODEL")
        if new_model and Path(new_model).is_file():
            self.model_widget.setFilePath(new_model)


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

