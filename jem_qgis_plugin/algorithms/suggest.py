"""`jem:suggest`: the patches most worth labelling next (unfamiliar and uncertain), spread over the scene."""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
    QgsRectangle,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from ..annotation_layer import CLASS_FIELD, annotations_from_source
from ..lazy_torch import core_constant
from ..styles import StyledOutput, style_outputs
from .base import JemAlgorithm, progress_reporter

# jem_core's suggestion attribute types as QGIS field types; `class` stays empty for the analyst to fill in.
QGIS_TYPES = {"int": QVariant.Int, "real": QVariant.Double, "text": QVariant.String}
SCORE_FIELDS = [(name, QGIS_TYPES[kind]) for name, kind in core_constant("active/suggest", "SUGGESTION_FIELDS")]


def suggestion_fields() -> QgsFields:
    fields = QgsFields()
    for name, kind in SCORE_FIELDS:
        fields.append(QgsField(name, kind))
    fields.append(QgsField(CLASS_FIELD, QVariant.String))
    return fields


class SuggestAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "suggest"
    DISPLAY_NAME = "Suggest where to label next"
    ICON = "jem.svg"
    HELP = ("Scores every patch of the raster with the model and returns the <b>Count</b> patches most worth "
            "labelling: those the model finds <b>unfamiliar</b> (low −E(x), high energy) and <b>uncertain</b> "
            "(high predictive entropy). <i>score</i> is the mean of the two percentiles (1 = most worth "
            "labelling); suggestions are picked best first, each at least <b>Minimum distance</b> pixels from "
            "the others, so they spread over the scene (0 = automatic: half the side of the square each "
            "suggestion would get if the scene were split evenly). Give your <b>Annotations</b> (the labelling "
            "dock fills in its layer) and no suggestion overlaps a patch you have labelled already (on the "
            "scene benchmark, a second or third round without them put up to 3 of its 20 suggestions on "
            "patches labelled already).<br>"
            "The output polygons are the patch footprints with their scores and an empty <i>class</i> field: "
            "fill it in (delete the ones you skip) and use the layer as annotations for <i>Retrain</i>. They are "
            "drawn as outlines labelled with their rank (1 = best), so the image stays visible.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster"))
        self.add_model_parameter()
        self.addParameter(QgsProcessingParameterNumber("COUNT", "Number of suggestions",
                                                       QgsProcessingParameterNumber.Integer, 10, minValue=1))
        self.addParameter(QgsProcessingParameterFeatureSource(
            "ANNOTATIONS", "Annotations (skip the patches labelled already)",
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon], optional=True))
        self.add_device_parameter()
        self.add_advanced(
                QgsProcessingParameterField("CLASS_FIELD", "Class field of the annotations", CLASS_FIELD,
                                            "ANNOTATIONS", optional=True),
                QgsProcessingParameterNumber("MIN_DISTANCE", "Minimum distance between suggestions (px, 0 = auto)",
                                             QgsProcessingParameterNumber.Double, 0.0, minValue=0.0),
                self.bands_parameter())
        self.addParameter(QgsProcessingParameterFeatureSink("OUTPUT", "Suggested patches"))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.active import suggest
        from jem_core.device import resolve_device
        from jem_core.model_file import load_model

        raster = self.raster_file_layer(parameters, context)
        loaded = load_model(self.model_file(parameters, context),
                            resolve_device(self.device(parameters, context)))
        labelled = self.labelled_points(parameters, context, raster, loaded.meta)
        suggestions = suggest(loaded, raster.source(), self.parameterAsInt(parameters, "COUNT", context),
                              min_distance=self.parameterAsDouble(parameters, "MIN_DISTANCE", context) or None,
                              bands=self.band_list(parameters, context), labelled=labelled,
                              progress=progress_reporter(feedback), should_stop=feedback.isCanceled)
        sink, sink_id = self.parameterAsSink(parameters, "OUTPUT", context, suggestion_fields(), QgsWkbTypes.Polygon,
                                             raster.crs())
        if sink is None:
            raise QgsProcessingException("Cannot create the output layer. Choose another destination.")
        for item in suggestions:
            feature = QgsFeature(suggestion_fields())
            feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*item.bounds)))
            feature.setAttributes([getattr(item, name) for name, _ in SCORE_FIELDS] + [None])
            sink.addFeature(feature, QgsFeatureSink.FastInsert)
        del sink  # closes the file, so its style can be written beside it
        style_outputs(context, raster.name(), [StyledOutput(sink_id, "suggestions", "suggested patches")])
        feedback.pushInfo(f"{len(suggestions)} suggestions; best score {suggestions[0].score:.2f} "
                          f"(unfamiliarity {suggestions[0].unfamiliarity:.2f}, uncertainty "
                          f"{suggestions[0].uncertainty:.2f}).")
        return {"OUTPUT": sink_id}

    def labelled_points(self, parameters: dict[str, Any], context: QgsProcessingContext, raster: QgsRasterLayer,
                        meta) -> list[tuple[float, float]]:
        """Centres (raster CRS) of the patches the ANNOTATIONS label, read as Retrain reads them; none without."""
        source = self.parameterAsSource(parameters, "ANNOTATIONS", context)
        if source is None:
            return []
        class_field = self.parameterAsString(parameters, "CLASS_FIELD", context) or CLASS_FIELD
        annotations = annotations_from_source(source, class_field, raster, meta.coarsen * meta.image_size, context)
        return [(a.x, a.y) for a in annotations]
