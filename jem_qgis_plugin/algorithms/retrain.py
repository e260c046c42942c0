"""`jem:retrain`: annotated patches + the raster's unlabelled patches → a semi-supervised JEM model."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
)

from ..annotation_layer import CLASS_FIELD, annotations_from_source
from ..lazy_torch import core_constant
from ..styles import StyledOutput, file_of, style_outputs
from .base import JemAlgorithm, progress_reporter
from .landcover_map import DEFAULT_RESOLUTION, default_stride

ARCHITECTURES: list[str] = list(core_constant("models", "ARCHITECTURES"))
# The retrain defaults shared with `jem retrain` (jem_core/active/retrain.py), read without importing torch.
RETRAIN = SimpleNamespace(**{name: core_constant("active/retrain", f"RetrainDefaults.{name}")
                             for name in ("minutes", "unlabelled", "image_size", "arch", "lr", "coarsen",
                                          "members", "members_from_scratch")})
# Retraining takes this share of the progress bar; the optional maps the rest.
TRAIN_SHARE = 85.0


class RetrainAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "retrain"
    DISPLAY_NAME = "Retrain from annotations (semi-supervised)"
    ICON = "train.svg"
    HELP = ("Retrains a JEM from a few labelled patches and the raster's own unlabelled imagery.<br><br>"
            "<b>Annotations</b>: points (the patch centred on each) or polygons (every patch-sized cell inside; "
            "the footprints the JEM labelling tool draws are one patch each), with the class name in "
            "<b>Class field</b>. Annotations in another CRS are reprojected to the raster's. "
            "<b>Starting model</b>: fine-tunes it (empty: the bundled base model when the raster's bands fit it, "
            "else a new model). The new model has the classes labelled this round; <b>Keep the starting model's "
            "other classes</b> keeps the rest too. With <b>Train a new model</b> (advanced), a new model is "
            "trained at <b>Patch size</b> instead.<br>"
            "<b>Training time</b> (default 3 minutes, measured on two CPU cores: docs/labelling.md) bounds the run; "
            "<b>Unlabelled patches</b> (default 2048) spread over the whole raster are the unlabelled set of "
            "semi-supervised JEM training. <b>Networks averaged</b> (advanced; 0, the default: "
            f"{RETRAIN.members} when fine-tuning, {RETRAIN.members_from_scratch} for a new model): that many "
            "networks are trained one after the other, each for its share of the time and on its own draw of "
            "unlabelled patches, and saved as one model whose class probabilities and familiarity are their means; "
            "on the scene benchmark two half-length fine-tuned networks map a little more accurately and mark their "
            "errors a little better than one (docs/labelling.md), a new network needs the whole time, and mapping "
            f"costs one network pass each. The raster is read at 1/{RETRAIN.coarsen} of its resolution (averaging "
            f"{RETRAIN.coarsen} × {RETRAIN.coarsen} pixels), so a {RETRAIN.image_size} px patch covers "
            f"{RETRAIN.coarsen * RETRAIN.image_size} × {RETRAIN.coarsen * RETRAIN.image_size} raster pixels (chosen "
            "on the scene benchmark: docs/labelling.md); <b>Read the raster at 1/N of its resolution</b> (advanced) "
            "changes it, and the new model remembers it, so its maps and suggestions read the raster the same way. "
            f"<b>Learning rate</b> (advanced, default {RETRAIN.lr:g}): half or twice it mapped no better on the "
            "scene benchmark (docs/labelling.md). Every annotation is used for training, so the "
            "log reports only how well the model fits them (there is no validation split). <b>Retrained model</b> "
            "left empty is saved beside the annotation file as <i>&lt;annotations&gt;_retrained.pt</i> "
            "(_2, _3 … when that exists; beside the raster for a layer without a file). Optional outputs "
            "(none by default here; the labelling dock asks for the first two as temporary layers): the new "
            "class map, confidence map (p(y|x) times the label agreement with the annotations; low: the class is "
            "likely wrong) and familiarity map "
            "−E(x) (low: unlike the training data) of the raster, as <i>JEM land cover "
            "map</i> makes them. Runs in the background; Cancel stops it and writes nothing.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Input raster"))
        self.addParameter(QgsProcessingParameterFeatureSource(
            "ANNOTATIONS", "Annotations (points or patch polygons)",
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon]))
        # Optional so that a script or qgis_process run without it gets the default: QGIS 3.22 does not
        # apply a field parameter's default to a missing value and refuses "Incorrect parameter value".
        self.addParameter(QgsProcessingParameterField("CLASS_FIELD", f"Class field (default: {CLASS_FIELD})",
                                                      CLASS_FIELD, "ANNOTATIONS", optional=True))
        self.add_model_parameter("Starting model")
        self.addParameter(QgsProcessingParameterNumber("MINUTES", "Training time (minutes)",
                                                       QgsProcessingParameterNumber.Double, RETRAIN.minutes,
                                                       minValue=0.05))
        self.addParameter(QgsProcessingParameterBoolean(
            "KEEP_MODEL_CLASSES", "Keep the starting model's other classes (off: only the classes labelled)", False))
        self.addParameter(QgsProcessingParameterNumber("UNLABELLED", "Unlabelled patches spread over the raster",
                                                       QgsProcessingParameterNumber.Integer, RETRAIN.unlabelled,
                                                       minValue=1))
        self.add_device_parameter()
        self.add_advanced(
                QgsProcessingParameterBoolean("NEW_MODEL", "Train a new model (ignore the starting model)", False),
                QgsProcessingParameterNumber("ITERATIONS", "Iterations (0: as many as the training time allows)",
                                             QgsProcessingParameterNumber.Integer, 0, minValue=0),
                QgsProcessingParameterNumber(
                    "MEMBERS", f"Networks averaged, each trained for its share of the time (0: {RETRAIN.members} "
                               f"when fine-tuning, {RETRAIN.members_from_scratch} for a new model)",
                    QgsProcessingParameterNumber.Integer, 0, minValue=0, maxValue=8),
                QgsProcessingParameterNumber(
                    "COARSEN", "Read the raster at 1/N of its resolution (0: a retrained starting model's own N, "
                               f"else {RETRAIN.coarsen}; 1: as it is)",
                    QgsProcessingParameterNumber.Integer, 0, minValue=0),
                QgsProcessingParameterNumber("PATCH_SIZE", "Patch size in px (new model only)",
                                             QgsProcessingParameterNumber.Integer, RETRAIN.image_size, minValue=8),
                QgsProcessingParameterEnum("ARCH", "Architecture (new model only)", options=ARCHITECTURES,
                                           defaultValue=RETRAIN.arch, usesStaticStrings=True),
                self.bands_parameter(),
                QgsProcessingParameterFile("EXTRA_DATASET", "Extra unlabelled images: class-folder dataset",
                                           behavior=QgsProcessingParameterFile.Folder, optional=True),
                QgsProcessingParameterNumber("LR", "Learning rate", QgsProcessingParameterNumber.Double, RETRAIN.lr,
                                             minValue=1e-7),
                QgsProcessingParameterNumber("SEED", "Random seed", QgsProcessingParameterNumber.Integer, 0))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_MODEL", "Retrained model (empty: <annotations>_retrained.pt beside the annotations)",
            "JEM model (*.pt)", optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_MAP", "New class map", optional=True,
                                                                  createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_CONFIDENCE", "New confidence",
                                                                  optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_FAMILIARITY", "New familiarity −E(x)",
                                                                  optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(
            "LABELLED", "Labelled patches (each annotated patch and its 8 neighbours a quarter patch away)"))
        self.addOutput(QgsProcessingOutputNumber("FIT_ACCURACY", "Accuracy on the annotated patches"))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.active import default_start_model, reading_coarsen, retrain, retrain_config
        from jem_core.model_file import load_model
        from jem_core.raster_io import no_crs_message
        from jem_core.sampler import SGLDConfig

        raster = self.raster_file_layer(parameters, context)
        if not raster.crs().isValid():
            raise QgsProcessingException(no_crs_message(f"'{raster.source()}'",
                                                        "the annotations cannot be placed on it"))
        source = self.parameterAsSource(parameters, "ANNOTATIONS", context)
        if source is None:
            raise QgsProcessingException("The annotation layer cannot be read. Pick a point or polygon layer.")
        out_map = self.parameterAsOutputLayer(parameters, "OUTPUT_MAP", context) or None
        out_confidence = self.parameterAsOutputLayer(parameters, "OUTPUT_CONFIDENCE", context) or None
        out_familiarity = self.parameterAsOutputLayer(parameters, "OUTPUT_FAMILIARITY", context) or None
        for name, chosen_output in (("confidence", out_confidence), ("familiarity", out_familiarity)):
            if chosen_output and not out_map:  # refused before training, not after
                raise QgsProcessingException(f"The {name} map comes with the class map: set 'New class map' too.")
        new_model = self.parameterAsBool(parameters, "NEW_MODEL", context)
        bands = self.band_list(parameters, context)
        chosen = self.parameterAsFile(parameters, "MODEL", context)
        start = None if new_model else load_model(chosen) if chosen else \
            default_start_model([raster.source()], bands, feedback.pushInfo)
        patch_size = start.meta.image_size if start else self.parameterAsInt(parameters, "PATCH_SIZE", context)
        coarsen = reading_coarsen(start.meta if start else None,
                                  self.parameterAsInt(parameters, "COARSEN", context) or None)
        class_field = self.parameterAsString(parameters, "CLASS_FIELD", context) or CLASS_FIELD
        annotations = annotations_from_source(source, class_field, raster, coarsen * patch_size, context)
        if not annotations:
            raise QgsProcessingException("The annotation layer has no features. Label a few patches (at least one "
                                         "per class), then retrain.")
        feedback.pushInfo(f"{len(annotations)} labelled patches of {patch_size} px from {source.featureCount()} "
                          "features.")
        unlabelled = self.parameterAsInt(parameters, "UNLABELLED", context)
        # A replay buffer the size of the unlabelled pool: the default 10,000 chains are far more than a
        # few thousand patches need and slow to initialise.
        config = retrain_config(self.parameterAsDouble(parameters, "MINUTES", context),
                                self.parameterAsInt(parameters, "ITERATIONS", context) or None,
                                arch=self.parameterAsEnumString(parameters, "ARCH", context), image_size=patch_size,
                                lr=self.parameterAsDouble(parameters, "LR", context),
                                seed=self.parameterAsInt(parameters, "SEED", context),
                                device=self.device(parameters, context), sgld=SGLDConfig(buffer_size=unlabelled))
        out_model = self.parameterAsFileOutput(parameters, "OUTPUT_MODEL", context) or \
            default_model_path(self.parameterAsVectorLayer(parameters, "ANNOTATIONS", context), raster)
        result = retrain([raster.source()], annotations, start_model=start,
                         keep_model_classes=self.parameterAsBool(parameters, "KEEP_MODEL_CLASSES", context),
                         extra_dataset=self.parameterAsFile(parameters, "EXTRA_DATASET", context) or None,
                         out_model=out_model, config=config, bands=bands, unlabelled_count=unlabelled,
                         coarsen=coarsen, members=self.parameterAsInt(parameters, "MEMBERS", context) or None,
                         progress=progress_reporter(feedback, 0, TRAIN_SHARE),
                         should_stop=feedback.isCanceled, log=feedback.pushInfo)
        for warning in result.warnings:
            feedback.reportError(f"Warning: {warning}", fatalError=False)
        feedback.pushInfo(f"Classes: {', '.join(result.class_names)}; the model fits {result.labelled_accuracy:.0%} "
                          f"of the {result.labelled_count} annotated patches. Model written to {out_model}.")
        outputs: dict[str, Any] = {"OUTPUT_MODEL": out_model, "LABELLED": result.labelled_count,
                                   "FIT_ACCURACY": result.labelled_accuracy}
        if out_map:
            outputs.update(self.write_maps(context, feedback, result.loaded, Path(out_model).stem, raster, bands,
                                           out_map, out_confidence, out_familiarity, config.device))
        return outputs

    def write_maps(self, context: QgsProcessingContext, feedback: QgsProcessingFeedback, loaded, model_name: str,
                   raster: QgsRasterLayer, bands: list[str] | None, out_map: str, out_confidence: str | None,
                   out_familiarity: str | None, device: str) -> dict[str, Any]:
        """The class (confidence, familiarity) maps of the new model, on DEVICE, as jem:landcovermap makes them.
        Temporary layers are named after the raster and the model ('scene class map (ann_retrained_2)'), so the
        maps of successive rounds can be told apart."""
        from jem_core.mapping import map_raster

        map_raster(loaded, raster.source(), out_map, out_confidence, out_familiarity=out_familiarity, bands=bands,
                   device=device,
                   stride=default_stride(loaded.meta.image_size), resolution=DEFAULT_RESOLUTION,
                   progress=progress_reporter(feedback, TRAIN_SHARE, 100.0), should_stop=feedback.isCanceled)
        outputs = {"OUTPUT_MAP": out_map}
        styled = [StyledOutput(out_map, "class_map", f"class map ({model_name})")]
        if out_confidence:
            outputs["OUTPUT_CONFIDENCE"] = out_confidence
            styled.append(StyledOutput(out_confidence, "confidence", f"confidence ({model_name})"))
        if out_familiarity:
            outputs["OUTPUT_FAMILIARITY"] = out_familiarity
            styled.append(StyledOutput(out_familiarity, "familiarity", f"familiarity ({model_name})"))
        style_outputs(context, raster.name(), styled)
        return outputs


def default_model_path(annotations, raster: QgsRasterLayer) -> str:
    """<annotations>_retrained.pt beside the annotation file (beside the raster for a layer without one),
    numbered so an earlier model is never overwritten."""
    source = Path(file_of(annotations.source())) if annotations is not None else None
    base = source if source is not None and source.is_file() else Path(file_of(raster.source()))
    stem = annotations.name() if annotations is not None and base != source else base.stem
    candidate, number = base.with_name(f"{stem}_retrained.pt"), 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{stem}_retrained_{number}.pt")
    return str(candidate)
