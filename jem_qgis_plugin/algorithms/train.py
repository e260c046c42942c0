"""`jem:train`: train a JEM (or the cross-entropy baseline) on a class-folder dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from ..lazy_torch import core_constant
from .base import JemAlgorithm, progress_reporter

ARCHITECTURES: list[str] = list(core_constant("models", "ARCHITECTURES"))


def default(field: str, config: str = "training.TrainConfig") -> Any:
    """A jem_core config field's default, read from its source (no torch import at plugin load)."""
    module, cls = config.split(".")
    return core_constant(module, f"{cls}.{field}")


SGLD = "sampler.SGLDConfig"
DEFAULT_ARCH = default("arch")
DEFAULT_ITERATIONS = core_constant("training", "DEFAULT_ITERATIONS")
DEFAULT_LR = default("lr")
# Reading the dataset takes this share of the progress bar, training the rest.
LOAD_SHARE = 10.0


class TrainAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "train"
    DISPLAY_NAME = "Train JEM model"
    ICON = "train.svg"
    HELP = ("Trains a Joint Energy-based Model on a class-folder dataset (one sub-folder per class holding "
            "JPEG/PNG/GeoTIFF scenes, the EuroSAT/AID layout). The network is a classifier and an energy model "
            "at once: its −E(x) tells how typical an image is of the training data.<br><br>"
            "<b>Labels per class</b>: 0 uses every label; K keeps K labels per class and uses the other images "
            "unlabelled (semi-supervised). The run lasts <b>Iterations</b> optimiser steps "
            f"(default {DEFAULT_ITERATIONS}, whatever the dataset size), or less when <b>Epochs</b> (passes over "
            "the images) or the <b>Time budget</b> (minutes) come first; the learning rate warms up over the first "
            f"tenth of the run to its peak (<b>Learning rate</b>, default {DEFAULT_LR:g}: on AID it beat 0.001 for "
            "JEM with 1, 3, 20 and all labels per class). <b>Baseline</b> "
            "trains the same network with cross-entropy only, for comparison.<br>"
            "Outputs: the model file (.pt), test metrics (JSON) and a reliability diagram (PNG). "
            "Training runs in the background; Cancel stops it within one iteration and writes nothing.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.addParameter(QgsProcessingParameterFile("DATASET", "Dataset folder (one sub-folder per class)",
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterNumber("LABELS_PER_CLASS", "Labels per class (0 = all)",
                                                       QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterEnum("ARCH", "Architecture (Wide-ResNet depth-width)",
                                                     options=ARCHITECTURES, defaultValue=DEFAULT_ARCH,
                                                     usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterNumber("IMAGE_SIZE", "Image size (px)",
                                                       QgsProcessingParameterNumber.Integer, default("image_size"),
                                                       minValue=8))
        self.addParameter(QgsProcessingParameterNumber(
            "ITERATIONS", f"Iterations (0: {DEFAULT_ITERATIONS}, unless epochs or the "
                          "time budget bound the run)", QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Epochs: at most this many passes (0 = no bound)",
                                                       QgsProcessingParameterNumber.Integer, 0, minValue=0))
        self.addParameter(QgsProcessingParameterNumber("TIME_BUDGET_MIN", "Time budget (minutes, 0 = none)",
                                                       QgsProcessingParameterNumber.Double, 0.0, minValue=0.0))
        self.add_device_parameter()
        self.addParameter(QgsProcessingParameterBoolean("BASELINE", "Baseline: cross-entropy only (no JEM)", False))
        self.add_advanced(
                QgsProcessingParameterNumber("BATCH_SIZE", "Batch size (labelled images per step)",
                                             QgsProcessingParameterNumber.Integer, default("batch_size"), minValue=1),
                QgsProcessingParameterNumber("LR", "Learning rate (peak, after the warm-up)",
                                             QgsProcessingParameterNumber.Double,
                                             DEFAULT_LR, minValue=1e-7),
                QgsProcessingParameterNumber("SGLD_STEPS", "SGLD steps per iteration",
                                             QgsProcessingParameterNumber.Integer, default("steps", SGLD), minValue=1),
                QgsProcessingParameterNumber("BUFFER_SIZE", "SGLD replay buffer size (images)",
                                             QgsProcessingParameterNumber.Integer, default("buffer_size", SGLD),
                                             minValue=1),
                QgsProcessingParameterNumber("SEED", "Random seed (split, labelled subset, initialisation)",
                                             QgsProcessingParameterNumber.Integer, default("seed")))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT_MODEL", "Model file", "JEM model (*.pt)"))
        self.addParameter(QgsProcessingParameterFileDestination("METRICS", "Test metrics", "JSON (*.json)",
                                                                optional=True))
        self.addParameter(QgsProcessingParameterFileDestination("RELIABILITY_PLOT", "Reliability diagram",
                                                                "PNG image (*.png)", optional=True))
        for name, description in (("ACCURACY", "Test accuracy"), ("ECE", "Test expected calibration error"),
                                  ("NLL", "Test negative log-likelihood")):
            self.addOutput(QgsProcessingOutputNumber(name, description))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
            feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.data import load_class_folder
        from jem_core.files import check_output_folders, write_json
        from jem_core.plots import reliability_diagram
        from jem_core.sampler import SGLDConfig
        from jem_core.training import TrainConfig, train

        config = TrainConfig(
            arch=self.parameterAsEnumString(parameters, "ARCH", context),
            image_size=self.parameterAsInt(parameters, "IMAGE_SIZE", context),
            iterations=self.parameterAsInt(parameters, "ITERATIONS", context) or None,
            epochs=self.parameterAsInt(parameters, "EPOCHS", context) or None,
            time_budget_min=self.parameterAsDouble(parameters, "TIME_BUDGET_MIN", context) or None,
            labels_per_class=self.parameterAsInt(parameters, "LABELS_PER_CLASS", context) or None,
            baseline=self.parameterAsBool(parameters, "BASELINE", context),
            device=self.device(parameters, context),
            batch_size=self.parameterAsInt(parameters, "BATCH_SIZE", context),
            lr=self.parameterAsDouble(parameters, "LR", context),
            seed=self.parameterAsInt(parameters, "SEED", context),
            sgld=SGLDConfig(steps=self.parameterAsInt(parameters, "SGLD_STEPS", context),
                            buffer_size=self.parameterAsInt(parameters, "BUFFER_SIZE", context)))
        dataset_dir = self.parameterAsFile(parameters, "DATASET", context)
        model_path = self.parameterAsFileOutput(parameters, "OUTPUT_MODEL", context)
        metrics_path = self.parameterAsFileOutput(parameters, "METRICS", context)
        plot_path = self.parameterAsFileOutput(parameters, "RELIABILITY_PLOT", context)
        check_output_folders(model_path, metrics_path or None, plot_path or None)  # before, not after, training

        feedback.pushInfo(f"Reading {dataset_dir} at {config.image_size} px …")
        load_progress = progress_reporter(feedback, 0, LOAD_SHARE)
        dataset = load_class_folder(dataset_dir, config.image_size, progress=lambda f: load_progress(f, "reading"))
        feedback.pushInfo(f"{len(dataset)} images, classes: {', '.join(dataset.class_names)}")
        result = train(dataset, config, out_path=model_path, progress=progress_reporter(feedback, LOAD_SHARE),
                       should_stop=feedback.isCanceled, log=feedback.pushInfo)
        metrics = result.metrics
        for warning in metrics["warnings"]:
            feedback.reportError(f"Warning: {warning}", fatalError=False)
        feedback.pushInfo(f"Test accuracy {metrics['accuracy']:.1%}, NLL {metrics['nll']:.3f}, "
                          f"ECE {metrics['ece']:.3f} on {metrics['count']} test images.")
        outputs: dict[str, Any] = {"OUTPUT_MODEL": model_path, "ACCURACY": metrics["accuracy"],
                                   "ECE": metrics["ece"], "NLL": metrics["nll"]}
        if metrics_path:
            write_json(metrics_path, metrics)
            outputs["METRICS"] = metrics_path
        if plot_path:
            reliability_diagram({Path(model_path).stem: metrics}, plot_path)
            outputs["RELIABILITY_PLOT"] = plot_path
        return outputs
