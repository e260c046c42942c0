"""The annotation layer without its widgets: patch footprints, the layer's fields, creating and opening it.

The footprint is the model's patch (patch_size × patch_size pixels of the raster's grid) centred
on a point and moved inwards at the raster's edges, exactly the patch jem_core.active reads for
it.  The layer is a GeoPackage polygon layer with a `class` field; annotations_from_source reads
any point or polygon layer as jem_core annotations.  Only qgis.core here: the Processing algorithms
use it too, and they must not pull in widgets.
"""
from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from .styles import apply_style, write_style_beside

CLASS_FIELD = "class"
PATCH_FIELD = "patch_px"
# jem:retrain's patch size for a new model, and the bundled base model's.
DEFAULT_PATCH = 32


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


def create_annotation_layer(path: str | Path, crs: QgsCoordinateReferenceSystem,
                            name: str = "annotations") -> QgsVectorLayer:
    """A new GeoPackage polygon layer with the class and patch-size fields (the file is replaced) and
    its style saved beside it."""
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
    write_style_beside(f"{path}|layername={name}", "annotations")
    return open_annotation_layer(path, name)


def open_annotation_layer(path: str | Path, name: str = "annotations") -> QgsVectorLayer:
    """Reuse an existing GeoPackage annotation layer (it must have the class field)."""
    layer = QgsVectorLayer(f"{path}|layername={name}", name, "ogr")
    if not layer.isValid() or layer.fields().indexFromName(CLASS_FIELD) < 0:
        raise OSError(f"'{path}' has no layer '{name}' with a '{CLASS_FIELD}' field.")
    apply_style(layer, "annotations")
    return layer


def annotations_from_source(source: QgsProcessingFeatureSource, class_field: str, raster: QgsRasterLayer,
                            footprint: int, context: QgsProcessingContext) -> list:
    """jem_core Annotations in the raster's CRS: a point labels the patch under it; a polygon every
    patch-sized cell whose centre lies inside it (at least the patch at its inner point).  footprint:
    the raster pixels a patch covers (patch size × the reading's coarsening)."""
    from jem_core.active import annotation_points

    if source.fields().indexFromName(class_field) < 0:
        names = ", ".join(source.fields().names()) or "none"
        raise QgsProcessingException(f"The annotation layer has no field '{class_field}' (its fields: {names}). "
                                     "Pick the field that holds the class names as CLASS_FIELD.")
    transform = QgsCoordinateTransform(source.sourceCrs(), raster.crs(), context.transformContext())
    cell_w, cell_h = raster.rasterUnitsPerPixelX() * footprint, raster.rasterUnitsPerPixelY() * footprint
    request = QgsFeatureRequest().setInvalidGeometryCheck(QgsFeatureRequest.GeometryNoCheck)
    annotations = []
    for feature in source.getFeatures(request):
        value = feature[class_field]
        name = "" if value is None or str(value) == "NULL" else str(value).strip()
        if not name:
            raise QgsProcessingException(f"Feature {feature.id()} has no class in '{class_field}'. Fill it in or "
                                         "delete the feature.")
        geometry = QgsGeometry(feature.geometry())
        if geometry.isNull() or geometry.isEmpty():
            raise QgsProcessingException(f"Feature {feature.id()} ('{name}') has no geometry. Delete it or redraw it.")
        if not geometry.isGeosValid():
            errors = geometry.validateGeometry()
            raise QgsProcessingException(f"Feature {feature.id()} ('{name}') has an invalid geometry "
                                         f"({errors[0].what() if errors else 'not valid'}). Fix it (Vector ▸ "
                                         "Geometry tools ▸ Fix geometries) or redraw it.")
        geometry.transform(transform)
        if geometry.type() == QgsWkbTypes.PointGeometry:
            annotations += annotation_points(name, cell_w, cell_h, points=[(p.x(), p.y()) for p in geometry.vertices()])
        else:
            box = geometry.boundingBox()
            inner = geometry.pointOnSurface().asPoint()
            annotations += annotation_points(
                name, cell_w, cell_h, bounds=(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()),
                contains=lambda x, y, shape=geometry: shape.contains(QgsPointXY(x, y)),
                inner_point=lambda point=inner: (point.x(), point.y()))
    return annotations
