"""`jem:ood`: is new imagery like the training data?  Familiarity histograms, KL divergences and AUROC."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from ..lazy_torch import core_constant
from .base import JemAlgorithm, progress_reporter

REFERENCE_SPLITS: list[str] = list(core_constant("ood", "REFERENCE_SPLITS"))
STATISTICS: list[str] = list(core_constant("ood", "STATISTICS"))
DEFAULT_STATISTIC: str = core_constant("ood", "DEFAULT_STATISTIC")
MIN_REFERENCE_IMAGES: int = core_constant("ood", "MIN_REFERENCE_IMAGES")


class OodAlgorithm(JemAlgorithm):
    ALGORITHM_ID = "ood"
    DISPLAY_NAME = "Out-of-distribution analysis"
    ICON = "ood.svg"
    HELP = ("Scores every image with a familiarity score (high for images like the training data) and compares "
            "the histogram of a <b>reference</b> class-folder dataset with those of other data: <b>rasters</b> "
            "(cut into non-overlapping patches of the model's size, nodata skipped) and <b>folders</b> "
            "(class-folder datasets or plain image folders; several separated by <i>;</i>).<br><br>"
            "<b>Score</b> <i>layers</i> (default): how far the image's per-channel statistics in the network's "
            "layers lie from the reference's (a Mahalanobis distance); <i>energy</i>: the paper's −E(x) = "
            "logsumexp f(x). Both are plotted. On AID vs Sentinel-2 and Landsat scenes only <i>layers</i> ranks "
            "the foreign imagery as less familiar (AUROC 0.90–0.97 for a 3-minute model; −E(x) ranks it as more "
            "familiar).<br><br>"
            "For each compared source the report gives KL(compare ‖ reference) of the histograms (0: same "
            "distribution; about 23 when they do not overlap at all) and the AUROC separating the two (0.5: "
            "indistinguishable, 1: fully separated), each with a 95 % bootstrap interval. A high KL warns that "
            "maps of that imagery extrapolate. <b>Reference images</b> default to the model's training split "
            f"(the paper's reference); at least {MIN_REFERENCE_IMAGES} are needed.")

    def initAlgorithm(self, config=None) -> None:  # noqa: N802 (QGIS API name)
        self.add_model_parameter()
        self.addParameter(QgsProcessingParameterFile("REFERENCE", "Reference dataset (class folders, e.g. the "
                                                     "training data)", behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterEnum("REFERENCE_SPLIT", "Reference images", options=REFERENCE_SPLITS,
                                                     defaultValue=REFERENCE_SPLITS[0], usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterEnum("STATISTIC", "Score", options=STATISTICS,
                                                     defaultValue=DEFAULT_STATISTIC, usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterMultipleLayers("COMPARE_RASTERS", "Rasters to compare",
                                                               QgsProcessing.TypeRaster, optional=True))
        self.addParameter(QgsProcessingParameterString("COMPARE_FOLDERS", "Folders to compare (separated by ;)",
                                                       optional=True))
        self.add_device_parameter()
        self.add_advanced(
                QgsProcessingParameterNumber("BINS", "Histogram bins", QgsProcessingParameterNumber.Integer, 50,
                                             minValue=2),
                QgsProcessingParameterNumber("BATCH_SIZE", "Batch size", QgsProcessingParameterNumber.Integer, 256,
                                             minValue=1),
                QgsProcessingParameterString("STRETCH", "Raster value stretch (auto, none, percentile:2,98, "
                                             "linear:MIN,MAX)", defaultValue="auto"))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT_HTML", "OOD report", "HTML (*.html)",
                                                                optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT_PLOT", "Histogram plot", "PNG image (*.png)",
                                                                optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT_JSON", "Numbers (histograms, KL, AUROC)",
                                                                "JSON (*.json)", optional=True))
        self.addOutput(QgsProcessingOutputString("SUMMARY", "One line per compared source: KL and AUROC"))

    def execute(self, parameters: dict[str, Any], context: QgsProcessingContext,
                feedback: QgsProcessingFeedback) -> dict[str, Any]:
        from jem_core.ood import ood_analysis

        compare = [layer.source() for layer in self.parameterAsLayerList(parameters, "COMPARE_RASTERS", context)]
        folders = self.parameterAsString(parameters, "COMPARE_FOLDERS", context)
        compare += [folder.strip() for folder in folders.split(";") if folder.strip()]
        if not compare:
            raise QgsProcessingException("Nothing to compare: choose at least one raster or folder to compare "
                                         "with the reference.")
        html_path = self.parameterAsFileOutput(parameters, "OUTPUT_HTML", context)
        plot_path = self.parameterAsFileOutput(parameters, "OUTPUT_PLOT", context)
        json_path = self.parameterAsFileOutput(parameters, "OUTPUT_JSON", context)
        if html_path and not plot_path:  # the report embeds the plot
            plot_path = str(Path(html_path).with_suffix(".png"))
        result = ood_analysis(
            self.model_file(parameters, context), self.parameterAsFile(parameters, "REFERENCE", context),
            compare, json_path=json_path or None, plot_path=plot_path or None,
            batch_size=self.parameterAsInt(parameters, "BATCH_SIZE", context), device=self.device(parameters, context),
            reference_split=self.parameterAsEnumString(parameters, "REFERENCE_SPLIT", context),
            statistic=self.parameterAsEnumString(parameters, "STATISTIC", context),
            bins=self.parameterAsInt(parameters, "BINS", context),
            stretch=self.parameterAsString(parameters, "STRETCH", context).strip() or "auto",
            progress=progress_reporter(feedback), should_stop=feedback.isCanceled)
        summary = summary_lines(result)
        for line in summary:
            feedback.pushInfo(line)
        for warning in result["warnings"]:
            feedback.reportError(f"Warning: {warning}", fatalError=False)
        outputs: dict[str, Any] = {"SUMMARY": "\n".join(summary)}
        for name, path in (("OUTPUT_PLOT", plot_path), ("OUTPUT_JSON", json_path)):
            if path:
                outputs[name] = path
        if html_path:
            write_report(html_path, result, Path(plot_path))
            outputs["OUTPUT_HTML"] = html_path
        return outputs


def summary_lines(result: dict[str, Any]) -> list[str]:
    ref = result["reference"]
    lines = [f"reference {ref['name']} ({ref['split']}, {ref['count']} images); score: {result['score']}"]
    for name, c in result["compare"].items():
        lines.append(f"{name} ({c['kind']}, {c['count']} images): KL to reference {c['kl_to_reference']:.3f} "
                     f"[{c['kl_interval'][0]:.3f}, {c['kl_interval'][1]:.3f}], AUROC {c['auroc']:.3f} "
                     f"[{c['auroc_interval'][0]:.3f}, {c['auroc_interval'][1]:.3f}]")
    return lines


def write_report(path: str, result: dict[str, Any], plot: Path) -> None:
    """A self-contained HTML page (plot inlined) that the Processing results viewer opens."""
    from jem_core.files import atomic_write

    ref = result["reference"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(c['kind'])}</td><td>{c['count']}</td>"
        f"<td>{c['mean']:.3f} ± {c['std']:.3f}</td><td>{c['kl_to_reference']:.3f} [{c['kl_interval'][0]:.3f}, "
        f"{c['kl_interval'][1]:.3f}]</td><td>{c['auroc']:.3f} [{c['auroc_interval'][0]:.3f}, "
        f"{c['auroc_interval'][1]:.3f}]</td></tr>"
        for name, c in result["compare"].items())
    image = base64.b64encode(plot.read_bytes()).decode("ascii")
    page = (f"<html><head><meta charset='utf-8'><title>JEM-EO OOD analysis</title></head><body>"
            f"<h2>Out-of-distribution analysis</h2><p>Score: {html.escape(result['score'])}.</p>"
            f"<p>Reference <b>{html.escape(ref['name'])}</b> ({html.escape(ref['split'])}, {ref['count']} images): "
            f"score {ref['mean']:.3f} ± {ref['std']:.3f}</p>"
            f"<table border='1' cellpadding='4' cellspacing='0'><tr><th>compared with</th><th>kind</th>"
            f"<th>images</th><th>score mean ± std</th><th>KL(compare ‖ reference) [95 %]</th><th>AUROC [95 %]</th>"
            f"</tr>{rows}</table><p>{html.escape(result['kl_definition'])}; "
            f"{html.escape(result['auroc_definition'])}; intervals: {html.escape(result['interval_definition'])}.</p>"
            f"<img src='data:image/png;base64,{image}'/></body></html>")
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), suffix=".html")
