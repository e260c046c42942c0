"""`jem:landcovermap`: a trained model slid over a raster → class map, confidence map (p(y|x) of the mapped
class, times its label agreement for a retrained model) and familiarity map −E(x)."""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from ..lazy_torch import core_constant
from ..styles import StyledOutput, style_outputs
from .base import JemAlgorithm, progress_reporter

# jem_core.mapping.RESOLUTIONS, read without importing torch.
RESOLUTIONS: list[str] = list(core_constant("mapping", "RESOLUTIONS"))
# The map an analyst expects by default: the input's own grid, patches overlapping by three quarters.
DEFAULT_RESOLUTION = "input"
STRIDE_SHARE = 4
# jem_core.confidence_box.CONFIDENCE_BOX_PATCHES: the box the confidence map averages over, in patches.
CONFIDENCE_BOX: float = core_constant("confidence_box", "CONFIDENCE_BOX_PATCHES")


def default_stride(patch_size: int) -> int:
    """The largest stride that divides the patch size and is at most a quarter of it."""
    return max(d for d in range(1, max(1, patch_size // STRIDE_SHARE) + 1) if patch_size % d == 0)


class LandCoverMapAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "landcovermap"
    DISPLAY_NAME = "JEM land cover map"
    ICON = "landcovermap.svg"
    HELP = ("Slides a trained JEM model over a raster and writes rasters aligned with the input: the "
            "<b>class map</b> (most probable class per pixel, named and coloured), the <b>confidence map</b> "
            "p(y|x) of the mapped class, 0–1 (how sure the classifier is; the layer that marks likely errors: "
            "low values, shown in red, are where the class map is most likely wrong; written by default; for a "
            "model made by <i>Retrain from annotations</i> it is p(y|x) times the <i>label agreement</i>: how much "
            "nearer, in the network's features, each patch lies to the labelled patches of its class than to "
            "other classes' (each annotation with its shifted copies counting once, the two nearest of each class "
            "averaged). That product is a score, not a probability (median about 0.2), so its red ramp "
            "follows the map's own spread: the least confident half of the map is red to orange; it marked the "
            "errors of the scene benchmark's retrains better than p(y|x) alone) and, "
            "optionally, "
            "the <b>familiarity map</b> −E(x) = logsumexp f(x) (how much each patch looks like the training "
            "data: low means unusual imagery, out of the model's experience; it does not tell right from "
            "wrong classes; not written by default).<br><br>"
            "<b>Bands</b>: the input bands to feed the model, in the model's order, as names or 1-based "
            "indexes separated by commas (e.g. <i>3,2,1</i> or <i>B04,B03,B02</i>); empty picks them by the "
            "model's band names, else (a red/green/blue model on Sentinel-2 or Landsat bands) by what the sensor's "
            "bands measure, else all bands when the counts match. <b>Stride</b>: pixels between patch "
            "origins; it must divide the model's patch size (0, the default: a quarter of the patch size, e.g. 8 px "
            "for 32 px patches). Smaller strides give a finer map and cost more: overlapping patches are "
            f"averaged, and the confidence averages the mapped class's score over a box {CONFIDENCE_BOX:g} "
            "patches wide (with a stride of a whole patch: each cell's own), which marked the errors "
            "best on the scene benchmark (docs/labelling.md).<br>"
            "Advanced: <b>Output grid</b> <i>input</i> (default) writes the input's own grid, <i>patch</i> one "
            "pixel per stride × stride cell. These defaults cost time: on the OSCD Beirut crop (1070 × 1180 px, "
            "B04/B03/B02) the bundled model took 8.6 s on one CPU thread, against 0.8 s with stride = patch size "
            "on the patch grid. <b>Value stretch</b> maps raster values to the model's range (auto: percentile "
            "2–98 when an 8-bit model meets a 16-bit raster).")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster"))
        self.add_model_parameter()
        self.addParameter(self.bands_parameter())
        self.addParameter(QgsProcessingParameterNumber("STRIDE", "Stride in pixels (0 = a quarter of the patch size)",
                                                       QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.add_device_parameter()
        self.add_advanced(
                QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (patches per forward pass)",
                                             QgsProcessingParameterNumber.Integer, 64, minValue=1),
                QgsProcessingParameterEnum("RESOLUTION", "Output grid (patch: one pixel per stride × stride "
                                           "cell; input: the input's pixels)", options=list(RESOLUTIONS),
                                           defaultValue=DEFAULT_RESOLUTION, usesStaticStrings=True),
                QgsProcessingParameterString("STRETCH", "Value stretch (auto, none, percentile:2,98, "
                                             "linear:MIN,MAX)", defaultValue="auto"))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Class map"))
        self.addParameter(QgsProcessingParameterRasterDestination("CONFIDENCE", "Confidence",
                                                                  optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterRasterDestination("FAMILIARITY", "Familiarity −E(x)",
                                                                  optional=True, createByDefault=False))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
            feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.device import resolve_device
        from jem_core.mapping import map_raster
        from jem_core.model_file import load_model

        layer = self.raster_file_layer(parameters, context)
        bands = self.band_list(parameters, context)
        out_classes = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        out_confidence = self.parameterAsOutputLayer(parameters, "CONFIDENCE", context) or None
        out_familiarity = self.parameterAsOutputLayer(parameters, "FAMILIARITY", context) or None
        device = self.device(parameters, context)
        loaded = load_model(self.model_file(parameters, context), resolve_device(device))
        stride = self.parameterAsInt(parameters, "STRIDE", context) or default_stride(loaded.meta.image_size)
        result = map_raster(
            loaded, layer.source(), out_classes, out_confidence, bands=bands, stride=stride,
            out_familiarity=out_familiarity, batch_size=self.parameterAsInt(parameters, "BATCH_SIZE", context),
            device=device,
            resolution=self.parameterAsEnumString(parameters, "RESOLUTION", context),
            stretch=self.parameterAsString(parameters, "STRETCH", context).strip() or "auto",
            progress=progress_reporter(feedback), should_stop=feedback.isCanceled)
        for note in result.notes:
            feedback.pushInfo(note)
        feedback.pushInfo(f"Bands {', '.join(result.bands)}; stretch {result.stretch}; stride {stride} px.")
        feedback.pushInfo(result.summary())
        outputs = {"OUTPUT": out_classes}
        styled = [StyledOutput(out_classes, "class_map", "class map")]
        if out_confidence:
            outputs["CONFIDENCE"] = out_confidence
            styled.append(StyledOutput(out_confidence, "confidence", "confidence"))
        if out_familiarity:
            outputs["FAMILIARITY"] = out_familiarity
            styled.append(StyledOutput(out_familiarity, "familiarity", "familiarity"))
        style_outputs(context, layer.name(), styled)
        return outputs
