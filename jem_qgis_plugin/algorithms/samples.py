"""`jem:samples`: what the model has learnt each class looks like — a PNG grid of SGLD samples."""
from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from .base import JemAlgorithm, progress_reporter


class SamplesAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "samples"
    DISPLAY_NAME = "Generate samples"
    ICON = "samples.svg"
    HELP = ("A JEM is also a generative model: Langevin dynamics (SGLD) on its energy turns noise into images. "
            "This draws <b>class-conditional</b> samples x ~ p(x|y), one row per class, and <b>unconditional</b> "
            "samples x ~ p(x), and writes them as a PNG grid: a quick look at what the model has learnt each "
            "class looks like.<br><br>"
            "With the <b>training dataset</b> given, chains start from a per-class Gaussian fitted to it (as in "
            "training) and the JSON also holds a sample-quality score (Fréchet and kernel distances in the "
            "model's feature space; comparable only between runs with the same data and feature model). "
            "Without it, chains start from uniform noise. More <b>SGLD steps</b> give cleaner samples and take "
            "longer.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.add_model_parameter()
        self.addParameter(QgsProcessingParameterNumber("PER_CLASS", "Samples per class",
                                                       QgsProcessingParameterNumber.Integer, 4, minValue=1))
        self.addParameter(QgsProcessingParameterNumber("STEPS", "SGLD steps per sample",
                                                       QgsProcessingParameterNumber.Integer, 60, minValue=1))
        self.addParameter(QgsProcessingParameterBoolean("CONDITIONAL", "Class-conditional samples p(x|y)", True))
        self.addParameter(QgsProcessingParameterBoolean("UNCONDITIONAL", "Unconditional samples p(x)", True))
        self.addParameter(QgsProcessingParameterFile("DATASET", "Training dataset (optional: informative start "
                                                     "and quality score)", behavior=QgsProcessingParameterFile.Folder,
                                                     optional=True))
        self.add_device_parameter()
        self.add_advanced(
                QgsProcessingParameterFile("FEATURE_MODEL", "Feature model for the quality score (default: the "
                                           "sampled model)", fileFilter="JEM model (*.pt)", optional=True),
                QgsProcessingParameterNumber("SEED", "Random seed", QgsProcessingParameterNumber.Integer, 0),
                QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (chains run together)",
                                             QgsProcessingParameterNumber.Integer, 64, minValue=1))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Sample grid", "PNG image (*.png)"))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT_JSON", "Numbers (JSON)", "JSON (*.json)",
                                                                optional=True))
        self.addOutput(QgsProcessingOutputNumber("CLASSIFIED_AS_THEIR_CLASS", "Share of conditional samples "
                                                 "the model classifies as the class they were drawn for"))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.generation import sample_grid

        out_png = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        json_path = self.parameterAsFileOutput(parameters, "OUTPUT_JSON", context)
        result = sample_grid(
            self.model_file(parameters, context), out_png,
            per_class=self.parameterAsInt(parameters, "PER_CLASS", context),
            steps=self.parameterAsInt(parameters, "STEPS", context),
            conditional=self.parameterAsBool(parameters, "CONDITIONAL", context),
            unconditional=self.parameterAsBool(parameters, "UNCONDITIONAL", context),
            data=self.parameterAsFile(parameters, "DATASET", context) or None,
            feature_model=self.parameterAsFile(parameters, "FEATURE_MODEL", context) or None,
            json_path=json_path or None, seed=self.parameterAsInt(parameters, "SEED", context),
            batch_size=self.parameterAsInt(parameters, "BATCH_SIZE", context), device=self.device(parameters, context),
            progress=progress_reporter(feedback), should_stop=feedback.isCanceled)
        feedback.pushInfo(f"SGLD: {result['steps']} steps from {result['init']}.")
        outputs: dict[str, Any] = {"OUTPUT": out_png}
        if "conditional" in result:
            share = result["conditional"]["classified_as_their_class"]
            feedback.pushInfo(f"{share:.0%} of the class-conditional samples are classified as their class.")
            outputs["CLASSIFIED_AS_THEIR_CLASS"] = share
        quality = result.get("quality", {})
        for key in ("samples", "init", "real"):
            if key in quality:
                feedback.pushInfo(f"{key}: Fréchet distance {quality[key]['frechet']:.3g}, kernel distance "
                                  f"{quality[key]['kernel']:.3g} ({quality['feature_space']})")
        if json_path:
            outputs["OUTPUT_JSON"] = json_path
        return outputs
