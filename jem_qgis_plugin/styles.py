"""Styles for the outputs: class map (paletted, named classes), confidence map (continuous ramp).

The QML templates in resources/styles set the look (default class palette, colour ramp, opacity);
the functions here fit them to one raster (its classes, its value range).  The style is also
written as <output>.qml beside the file, which QGIS loads with the layer next time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

from qgis.core import (QgsColorRampLegendNodeSettings, QgsColorRampShader, QgsPalettedRasterRenderer,
                       QgsProcessingLayerPostProcessorInterface, QgsRasterLayer, QgsRasterShader,
                       QgsSingleBandPseudoColorRenderer)
from qgis.PyQt.QtGui import QColor

from .paths import resource_path

CLASS_MAP_TEMPLATE = "class_map.qml"
CONFIDENCE_TEMPLATE = "confidence.qml"
# Share of pixels clipped at each end of the confidence ramp, so a few outliers do not flatten it.
CONFIDENCE_CUT = 0.02


@dataclass
class Template:
    """What a QML template contributes: colours (with their values) and the layer opacity."""

    stops: list[tuple[float, QColor]]
    opacity: float


def template(name: str) -> Template:
    """Read a template's palette entries (class map) or ramp items (confidence) from its QML."""
    root = ElementTree.parse(resource_path("styles", name)).getroot()
    renderer = root.find(".//rasterrenderer")
    entries = renderer.findall(".//paletteEntry") + renderer.findall(".//colorrampshader/item")
    stops = []
    for entry in entries:
        color = QColor(entry.get("color"))
        color.setAlpha(int(entry.get("alpha", "255")))
        stops.append((float(entry.get("value")), color))
    return Template(stops, float(renderer.get("opacity", "1")))


def class_names_of(path: str) -> dict[int, str]:
    """Class value → name as jem_core.mapping writes them: `jem_class_names` (JSON list), else band CLASS_<i>."""
    from osgeo import gdal

    dataset = gdal.Open(path)
    if dataset is None:
        return {}
    listed = dataset.GetMetadataItem("jem_class_names")
    if listed:
        try:
            return dict(enumerate(json.loads(listed)))
        except ValueError:
            pass
    band_items = dataset.GetRasterBand(1).GetMetadata() or {}
    return {int(key[6:]): name for key, name in band_items.items() if key.startswith("CLASS_") and key[6:].isdigit()}


def class_map_renderer(layer: QgsRasterLayer) -> QgsPalettedRasterRenderer:
    """Paletted renderer: one entry per class, colour from the raster's colour table (else the template's)."""
    names = class_names_of(layer.source())
    table = {int(item.value): item.color for item in layer.dataProvider().colorTable(1)}
    fallback = template(CLASS_MAP_TEMPLATE)
    palette = [color for _, color in fallback.stops]
    values = sorted(names) or sorted(table)
    classes = [QgsPalettedRasterRenderer.Class(value, QColor(table.get(value, palette[value % len(palette)])),
                                               names.get(value, f"class {value}"))
               for value in values]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)
    renderer.setOpacity(fallback.opacity)
    return renderer


def confidence_renderer(layer: QgsRasterLayer) -> QgsSingleBandPseudoColorRenderer:
    """The template's colour ramp (stops at 0..1) stretched over the 2–98 % range of the raster's values."""
    fallback = template(CONFIDENCE_TEMPLATE)
    low, high = layer.dataProvider().cumulativeCut(1, CONFIDENCE_CUT, 1 - CONFIDENCE_CUT)
    if not high > low:
        high = low + 1.0
    ramp = QgsColorRampShader(low, high)
    ramp.setColorRampType(QgsColorRampShader.Interpolated)
    values = [low + position * (high - low) for position, _ in fallback.stops]
    ramp.setColorRampItemList([QgsColorRampShader.ColorRampItem(value, color, f"{value:.2f}")
                               for value, (_, color) in zip(values, fallback.stops)])
    legend = QgsColorRampLegendNodeSettings()  # say which end is which, not only the numbers
    legend.setMinimumLabel(f"{low:.2f}  unusual for the model")
    legend.setMaximumLabel(f"{high:.2f}  like the training data")
    ramp.setLegendSettings(legend)
    shader = QgsRasterShader(low, high)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    renderer.setOpacity(fallback.opacity)
    return renderer


STYLES: dict[str, Callable[[QgsRasterLayer], object]] = {
    "class_map": class_map_renderer,
    "confidence": confidence_renderer,
}


def apply_style(layer: QgsRasterLayer, kind: str) -> None:
    layer.setRenderer(STYLES[kind](layer))
    layer.triggerRepaint()


def write_style_beside(path: str, kind: str) -> Path:
    """Style the raster at `path` and save <path without suffix>.qml, QGIS's default style for it."""
    layer = QgsRasterLayer(path, Path(path).stem, "gdal")
    if not layer.isValid():
        raise ValueError(f"cannot open {path} to style it")
    apply_style(layer, kind)
    qml = Path(path).with_suffix(".qml")
    message, ok = layer.saveNamedStyle(str(qml))
    if not ok:
        raise OSError(f"could not write {qml}: {message}")
    return qml


class StylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles an output layer once Processing has loaded it into the project (main thread)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 (QGIS API name)
        if isinstance(layer, QgsRasterLayer) and layer.isValid():
            apply_style(layer, self.kind)


# QGIS keeps only a C++ pointer to a post-processor: these Python objects must outlive every run.
_POST_PROCESSORS: dict[str, StylePostProcessor] = {}


def post_processor(kind: str) -> StylePostProcessor:
    if kind not in _POST_PROCESSORS:
        _POST_PROCESSORS[kind] = StylePostProcessor(kind)
    return _POST_PROCESSORS[kind]
