"""What every JEM algorithm shares: torch check, JEMError → QgsProcessingException, progress, cancel."""
from __future__ import annotations

from typing import Any, Callable

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterString,
    QgsRasterLayer,
)

from jem_core import JEMError

from ..lazy_torch import core_constant, require_torch
from ..paths import icon

DEVICES: list[str] = list(core_constant("device", "DEVICE_CHOICES"))
MODEL_HELP = ("<br><b>Model</b>: empty uses the bundled base model, a JEM trained on AID scenes grouped into 8 "
              "land-cover classes (Bare, Cropland-Meadow, Dense-urban, Forest, Industrial-Transport, "
              "Parks-Sports, Residential, Water), RGB, 32 px patches.")
# The dialog's log gets a line for every progress text: at most one per this many percent of the run.
PROGRESS_TEXT_EVERY = 10.0


class JemAlgorithm(QgsProcessingAlgorithm):
    """Subclasses set ALGORITHM_ID, DISPLAY_NAME, ICON, HELP and implement execute()."""

    ALGORITHM_ID = ""
    DISPLAY_NAME = ""
    ICON = "jem.svg"
    HELP = ""

    def name(self) -> str:
        return self.ALGORITHM_ID

    def displayName(self) -> str:  # noqa: N802 (QGIS API name)
        return self.DISPLAY_NAME

    def shortHelpString(self) -> str:  # noqa: N802 (QGIS API name)
        return self.HELP + (MODEL_HELP if self.parameterDefinition("MODEL") is not None else "")

    def icon(self):
        return icon(self.ICON)

    def createInstance(self) -> "JemAlgorithm":  # noqa: N802 (QGIS API name)
        return type(self)()

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        """Runs in a background thread: no GUI calls, only feedback and files."""
        try:
            require_torch()
            return self.execute(parameters, context, feedback)
        except (JEMError, QgsProcessingException) as error:  # the message already names the problem and the fix
            message = str(error)
        # QGIS 3.22's bindings never release a QgsProcessingException raised here, nor its traceback: whatever
        # its frames hold lives until the interpreter exits, after QgsApplication.exitQgis(), where destroying
        # a layer crashes.  A fresh exception raised outside the except block chains no context, so the failed
        # run's own frames (layers, model, arrays) are freed now.
        raise QgsProcessingException(message)

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
            feedback: QgsProcessingFeedback) -> dict[str, Any]:
        raise NotImplementedError

    def add_model_parameter(self, description: str = "JEM model file") -> None:
        """Optional: empty means the bundled base model (model_file() resolves it)."""
        self.addParameter(QgsProcessingParameterFile("MODEL", f"{description} (empty: the bundled base model)",
                                                     optional=True, fileFilter="JEM model (*.pt)"))

    def model_file(self, parameters: dict[str, Any], context: QgsProcessingContext) -> str:
        """The MODEL parameter's file, else the bundled base model's."""
        from jem_core.bundled import base_model_path

        return self.parameterAsFile(parameters, "MODEL", context) or str(base_model_path())

    def add_advanced(self, *parameters: QgsProcessingParameterDefinition) -> None:
        """Parameters shown under the dialog's "Advanced parameters"."""
        for parameter in parameters:
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)

    def add_device_parameter(self, name: str = "DEVICE") -> None:
        """Static strings: scripts pass DEVICE='cpu' rather than an index; 'auto' picks CUDA when present."""
        self.addParameter(QgsProcessingParameterEnum(name, "Device (auto: CUDA GPU when present, else CPU)",
                                                     options=DEVICES, defaultValue="auto", usesStaticStrings=True))

    def device(self, parameters: dict[str, Any], context: QgsProcessingContext, name: str = "DEVICE") -> str:
        return self.parameterAsEnumString(parameters, name, context)

    def raster_file_layer(self, parameters: dict[str, Any], context: QgsProcessingContext,
                          name: str = "INPUT") -> QgsRasterLayer:
        """The raster parameter as a GDAL file layer: the engine reads files, not QGIS providers."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None or layer.providerType() != "gdal":
            raise QgsProcessingException("The input must be a raster file layer (GDAL); save web or memory "
                                         "rasters to a GeoTIFF first.")
        return layer

    @staticmethod
    def bands_parameter(name: str = "BANDS") -> QgsProcessingParameterString:
        """The text band_list() parses."""
        return QgsProcessingParameterString(name, "Bands (names or 1-based indexes, comma separated)", optional=True)

    def band_list(self, parameters: dict[str, Any], context: QgsProcessingContext,
                  name: str = "BANDS") -> list[str] | None:
        """'B04, B03,B02' → ['B04', 'B03', 'B02']; empty → None (the model's bands)."""
        from jem_core.raster_io import parse_band_list

        return parse_band_list(self.parameterAsString(parameters, name, context))


def progress_reporter(feedback: QgsProcessingFeedback, start: float = 0.0,
                      end: float = 100.0) -> Callable[[float, str], None]:
    """jem_core's progress(fraction, message) mapped onto start..end % of the Processing progress bar.

    The bar follows every call; the text (one log line each in the dialog) at most every
    PROGRESS_TEXT_EVERY percent, so a run logs about ten progress lines, not one per batch.
    """
    last_text_at: list[float] = []

    def report(fraction: float, message: str = "") -> None:
        percent = start + (end - start) * min(max(fraction, 0.0), 1.0)
        feedback.setProgress(percent)
        if message and (not last_text_at or percent - last_text_at[0] >= PROGRESS_TEXT_EVERY):
            last_text_at[:] = [percent]
            feedback.setProgressText(message)

    return report
