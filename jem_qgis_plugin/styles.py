"""Styles and names for the outputs: class map, confidence and familiarity maps, suggested patches, annotations.

The raster QML templates in resources/styles set the look (default class palette, colour ramps,
opacity); the functions here fit them to one raster (the classes it holds; the familiarity map's value
range; the confidence map keeps its fixed 0–1 ramp, so low confidence looks the same on every map).  The
style is also written as <output>.qml beside a file output, which QGIS loads with the layer next
time.  style_outputs() is the one place an algorithm hands its outputs over for styling and naming.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from xml.etree import ElementTree

import numpy as np
from qgis.core import (
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsPalLayerSettings,
    QgsProcessingContext,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingUtils,
    QgsRasterLayer,
    QgsRasterShader,
    QgsSingleBandPseudoColorRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from jem_core.confidence_box import AGREEMENT_TAG_WORDS
from jem_core.process_state import gdal_exceptions

from .paths import resource_path

CLASS_MAP_TEMPLATE = "class_map.qml"
CONFIDENCE_TEMPLATE = "confidence.qml"
FAMILIARITY_TEMPLATE = "familiarity.qml"
# Share of pixels clipped at each end of a stretched ramp, so a few outliers do not flatten it.
STRETCH_CUT = 0.02
# Longest side of the decimated read a stretched ramp's range is estimated from.
STRETCH_READ_SIDE = 1024
# jem_core.mapping.CLASS_NODATA: the class map's value for pixels no patch covered.
CLASS_NODATA = 255
# Colours closer than this (Euclidean distance of 0-255 RGB) read as one colour in a legend.
MIN_COLOUR_DISTANCE = 80.0
# Colours that are told apart easily (Trubetskoy's 20 distinct colours), for classes whose own collide.
DISTINCT = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
            "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
            "#000075", "#808080"]
ANNOTATION_COLOUR = "255,0,255"
SUGGESTION_COLOUR = "255,200,0"


@dataclass
class Template:
    """What a QML template contributes: colours (with their values) and the layer opacity."""

    stops: list[tuple[float, QColor]]
    opacity: float


def template(name: str) -> Template:
    """Read a template's palette entries (class map) or ramp items (confidence, familiarity) from its QML."""
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

    try:
        with gdal_exceptions():
            dataset = gdal.Open(path)
    except RuntimeError:
        return {}
    listed = dataset.GetMetadataItem("jem_class_names")
    if listed:
        try:
            return dict(enumerate(json.loads(listed)))
        except ValueError:
            pass
    band_items = dataset.GetRasterBand(1).GetMetadata() or {}
    return {int(key[6:]): name for key, name in band_items.items() if key.startswith("CLASS_") and key[6:].isdigit()}


def _row_blocks(path: str, rows: int = 1024) -> Iterator[np.ndarray]:
    """Band 1 of the raster, a block of rows at a time."""
    from osgeo import gdal

    with gdal_exceptions():
        dataset = gdal.Open(path)  # kept referenced: a band outliving its dataset crashes GDAL
        band = dataset.GetRasterBand(1)
        for row in range(0, band.YSize, rows):
            yield band.ReadAsArray(0, row, band.XSize, min(rows, band.YSize - row))


def classes_present(path: str) -> list[int]:
    """Class values that occur in the class map (nodata left out), read in full: a small class counts too."""
    counts = np.zeros(256, dtype=np.int64)
    for block in _row_blocks(path):
        counts += np.bincount(block.ravel().astype(np.uint8), minlength=256)
    counts[CLASS_NODATA] = 0
    return [int(value) for value in np.flatnonzero(counts)]


def _distance(a: QColor, b: QColor) -> float:
    return float(np.linalg.norm([a.red() - b.red(), a.green() - b.green(), a.blue() - b.blue()]))


def distinct_colours(wanted: list[QColor]) -> list[QColor]:
    """The wanted colours, except where one is too close to an earlier one: that class gets the first of
    DISTINCT far enough from every colour kept (the farthest when none is).  Thematic colours that do not
    collide (water blue, forest green) stay as they are."""
    def far_from(colour: QColor, others: list[QColor]) -> bool:
        return all(_distance(colour, other) >= MIN_COLOUR_DISTANCE for other in others)

    result: list[QColor | None] = []
    for colour in wanted:
        result.append(colour if far_from(colour, [c for c in result if c is not None]) else None)
    for i, colour in enumerate(result):
        if colour is None:
            kept = [c for c in result if c is not None]
            candidates = [QColor(c) for c in DISTINCT]
            result[i] = next((c for c in candidates if far_from(c, kept)),
                             max(candidates, key=lambda c: min(_distance(c, other) for other in kept)))
    return result


def class_map_renderer(layer: QgsRasterLayer) -> QgsPalettedRasterRenderer:
    """Paletted renderer listing the classes the map holds, in the raster's colour table (else the
    template's) colours, changed only where two would be hard to tell apart."""
    names = class_names_of(layer.source())
    table = {int(item.value): item.color for item in layer.dataProvider().colorTable(1)}
    fallback = template(CLASS_MAP_TEMPLATE)
    palette = [color for _, color in fallback.stops]
    values = classes_present(layer.source())
    colours = distinct_colours([QColor(table.get(value, palette[value % len(palette)])) for value in values])
    classes = [QgsPalettedRasterRenderer.Class(value, colour, names.get(value, f"class {value}"))
               for value, colour in zip(values, colours)]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)
    renderer.setOpacity(fallback.opacity)
    return renderer


def stretched_range(path: str) -> tuple[float, float]:
    """The 2-98 % range of the raster's values."""
    quantiles = value_quantiles(path, [STRETCH_CUT, 1 - STRETCH_CUT])
    if quantiles is None:
        return 0.0, 1.0
    low, high = quantiles
    return low, (high if high > low else low + 1.0)


def value_quantiles(path: str, levels: list[float]) -> list[float] | None:
    """Quantiles of the raster's valid values (None for a raster without any), from a decimated read with
    numpy: QGIS's own cumulativeCut would store a histogram of megabytes in <raster>.aux.xml."""
    from osgeo import gdal

    with gdal_exceptions():
        dataset = gdal.Open(path)
        band = dataset.GetRasterBand(1)
        scale = max(band.XSize, band.YSize) / STRETCH_READ_SIDE
        width, height = (max(1, int(band.XSize / scale)), max(1, int(band.YSize / scale))) if scale > 1 \
            else (band.XSize, band.YSize)
        values = band.ReadAsArray(buf_xsize=width, buf_ysize=height).astype(np.float64).ravel()
        nodata = band.GetNoDataValue()
    values = values[np.isfinite(values) & ((values != nodata) if nodata is not None else True)]
    if values.size == 0:
        return None
    return [float(value) for value in np.quantile(values, levels)]


def has_label_agreement(path: str) -> bool:
    """Whether a confidence raster holds p(y|x) times the label agreement (a retrained model's map): a score
    that ranks errors but is no probability (its median is ~0.2 on the scene benchmark)."""
    from osgeo import gdal

    with gdal_exceptions():
        return AGREEMENT_TAG_WORDS in (gdal.Open(path).GetMetadataItem("jem_confidence") or "")


def confidence_renderer(layer: QgsRasterLayer) -> QgsSingleBandPseudoColorRenderer:
    """Low confidence (likely wrong) stands out in red, high confidence is transparent.  p(y|x) gets the
    template's fixed ramp over 0..1, the same on every map.  p(y|x) times the label agreement is a score
    whose scale is not a probability's and whose values crowd near 0 (high only near labelled patches), so
    each template stop goes to the map's quantile at the stop's position within the 2–98 % range: with the
    template's stops at 0, 0.5, 0.8 and 1, the least confident half of the map is red to orange."""
    fallback = template(CONFIDENCE_TEMPLATE)
    values = [value for value, _ in fallback.stops]
    if has_label_agreement(layer.source()):
        levels = [STRETCH_CUT + position * (1 - 2 * STRETCH_CUT) for position in values]
        quantiles = value_quantiles(layer.source(), levels) or levels  # an empty map: the template's own stops
        values = list(np.maximum.accumulate(quantiles) + 1e-6 * np.arange(len(levels)))
    return _ramp_renderer(layer, fallback, values, ("unsure: class likely wrong", "sure"))


def familiarity_renderer(layer: QgsRasterLayer) -> QgsSingleBandPseudoColorRenderer:
    """The template's colour ramp (stops at 0..1) stretched over the 2–98 % range of the raster's −E(x)."""
    fallback = template(FAMILIARITY_TEMPLATE)
    low, high = stretched_range(layer.source())
    return _ramp_renderer(layer, fallback, [low + position * (high - low) for position, _ in fallback.stops],
                          ("unusual for the model", "like the training data"))


def _ramp_renderer(layer: QgsRasterLayer, fallback: Template, values: list[float],
                   ends: tuple[str, str]) -> QgsSingleBandPseudoColorRenderer:
    """An interpolated ramp with the template's colours at `values`; the legend says what each end means."""
    low, high = values[0], values[-1]
    ramp = QgsColorRampShader(low, high)
    ramp.setColorRampType(QgsColorRampShader.Interpolated)
    ramp.setColorRampItemList([QgsColorRampShader.ColorRampItem(value, color, f"{value:.2f}")
                               for value, (_, color) in zip(values, fallback.stops)])
    legend = QgsColorRampLegendNodeSettings()  # say which end is which, not only the numbers
    legend.setMinimumLabel(f"{low:.2f}  {ends[0]}")
    legend.setMaximumLabel(f"{high:.2f}  {ends[1]}")
    ramp.setLegendSettings(legend)
    shader = QgsRasterShader(low, high)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(low)
    renderer.setClassificationMax(high)
    renderer.setOpacity(fallback.opacity)
    return renderer


def style_footprints(layer: QgsVectorLayer, colour: str, label_field: str) -> None:
    """Outline-only patch footprints (the imagery stays visible), labelled with a field in white-haloed text."""
    layer.renderer().setSymbol(QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": colour, "outline_width": "0.6"}))
    text = QgsTextFormat()
    text.setSize(9)
    text.setColor(QColor("black"))
    halo = QgsTextBufferSettings()
    halo.setEnabled(True)
    halo.setSize(1.0)
    halo.setColor(QColor("white"))
    text.setBuffer(halo)
    settings = QgsPalLayerSettings()
    settings.fieldName = label_field
    settings.enabled = True
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)


# Output kind → what styles a layer of it.
STYLES: dict[str, Callable[[QgsMapLayer], None]] = {
    "class_map": lambda layer: layer.setRenderer(class_map_renderer(layer)),
    "confidence": lambda layer: layer.setRenderer(confidence_renderer(layer)),
    "familiarity": lambda layer: layer.setRenderer(familiarity_renderer(layer)),
    "suggestions": lambda layer: style_footprints(layer, SUGGESTION_COLOUR, "rank"),
    "annotations": lambda layer: style_footprints(layer, ANNOTATION_COLOUR, "class"),
}
RASTER_KINDS = {"class_map", "confidence", "familiarity"}


def apply_style(layer: QgsMapLayer, kind: str) -> None:
    STYLES[kind](layer)
    layer.triggerRepaint()


def file_of(source: str) -> str:
    """The file behind a layer source: 'out.gpkg|layername=x' → 'out.gpkg'."""
    return source.split("|", 1)[0]


def open_layer(path: str, kind: str) -> QgsMapLayer:
    if kind in RASTER_KINDS:
        return QgsRasterLayer(path, Path(file_of(path)).stem, "gdal")
    return QgsVectorLayer(path, Path(file_of(path)).stem, "ogr")


def write_style_beside(path: str, kind: str) -> Path:
    """Style the layer at `path` and save <file without suffix>.qml, QGIS's default style for it."""
    layer = open_layer(path, kind)
    if not layer.isValid():
        raise ValueError(f"cannot open {path} to style it")
    apply_style(layer, kind)
    qml = Path(file_of(path)).with_suffix(".qml")
    message, ok = layer.saveNamedStyle(str(qml))
    if not ok:
        raise OSError(f"could not write {qml}: {message}")
    return qml


def layer_name(output: str, input_name: str, what: str) -> str:
    """The output file's name when the user chose one ('milano_classes'); a temporary output is named
    after the input layer plus what it is ('milano class map'), so two runs can be told apart."""
    path = Path(file_of(output))
    memory = not path.suffix  # a memory layer's id, not a file
    temporary = memory or path.resolve().is_relative_to(Path(QgsProcessingUtils.tempFolder()).resolve())
    return f"{input_name} {what}".strip() if temporary else path.stem


class StylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles and names an output layer once Processing has loaded it into the project (main thread)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__()
        self.kind, self.name = kind, name

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 (QGIS API name)
        if layer is not None and layer.isValid():
            apply_style(layer, self.kind)
            layer.setName(self.name)


# QGIS owns a post-processor from setPostProcessor on and deletes it after its run, so every run needs
# a new one; the Python object must stay alive meanwhile, or its postProcessLayer would be lost.  Keyed by
# output path: a later run to the same file replaces the entry (one small object per output otherwise).
_LIVE_POST_PROCESSORS: dict[str, StylePostProcessor] = {}


@dataclass
class StyledOutput:
    path: str  # file, or a sink's destination id
    kind: str  # a key of STYLES
    what: str  # what it is, for the layer name: "class map"


def style_outputs(context: QgsProcessingContext, input_name: str, outputs: list[StyledOutput]) -> None:
    """Write each file output's .qml and give each output loaded on completion its style and name."""
    for output in outputs:
        if Path(file_of(output.path)).is_file():
            write_style_beside(output.path, output.kind)
        if context.willLoadLayerOnCompletion(output.path):
            name = layer_name(output.path, input_name, output.what)
            details = context.layerToLoadOnCompletionDetails(output.path)
            details.name = name
            processor = StylePostProcessor(output.kind, name)
            _LIVE_POST_PROCESSORS[output.path] = processor
            details.setPostProcessor(processor)
