"""One self-contained HTML page about a trained model: metrics, calibration, OOD, samples.

API
---
build_report(model, out_html, *, data=None, baseline=None, compare=(), samples=True, per_class=4,
             steps=60, batch_size=256, device="auto", progress=None, should_stop=None) -> dict

  model     a model file path (or LoadedModel).
  data      the class-folder dataset it was trained on: the test split (by the model's seed) is
            evaluated; without it the page shows the metrics stored in the model file.
  baseline  another model on the same classes (e.g. the CE baseline): evaluated too, its
            reliability diagram drawn beside the model's, and its features used for the sample
            quality score.
  compare   datasets / image folders / rasters for the OOD section (needs `data` as reference).
  samples   draw SGLD sample grids (needs no data; with data the chains start from the
            informative init and get a quality score).

Every figure is embedded as a base64 PNG, so the page is one file that can be mailed or archived.
The page is written atomically (temporary file, then rename).  Returns the numbers shown.
"""
from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from . import JEMError, ProgressFn, no_progress
from .files import atomic_write
from .metrics import classification_metrics, predict_logits
from .model_file import LoadedModel, as_loaded
from .ood import load_reference, ood_analysis, reference_indices

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4g}</td>'
        return f"<td>{esc(value)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def embed_png(path: str | os.PathLike, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def evaluate(loaded: LoadedModel, dataset, batch_size: int, should_stop) -> dict[str, Any]:
    """Metrics on the dataset's test split by the model's seed (every image if its classes differ)."""
    indices, split = reference_indices(dataset, loaded, "test")
    if not split.startswith("test"):
        raise JEMError("The dataset's classes are not the model's; give the dataset the model was trained on.")
    logits = predict_logits(loaded, dataset.images[indices], batch_size, should_stop)
    metrics = classification_metrics(logits, dataset.labels[indices], loaded.meta.class_names)
    metrics["split"] = split
    return metrics


def describe_model(name: str, loaded: LoadedModel) -> list[tuple[str, Any]]:
    cfg = loaded.meta.train_config
    mode = "CE baseline" if cfg.get("baseline") else "JEM"
    if cfg.get("consistency_weight"):
        mode += f" + consistency (weight {cfg['consistency_weight']}, threshold {cfg.get('consistency_threshold')})"
    labels = cfg.get("labels_per_class")
    return [("file", name), ("training", mode),
            ("labels", "all training images" if not labels else f"{labels} per class"),
            ("architecture", f"{loaded.spec.arch}, stem stride {loaded.spec.stem_stride}, norm {loaded.spec.norm}"
                             + (f"; {loaded.spec.members} networks averaged" if loaded.spec.members > 1 else "")),
            ("input", f"{loaded.meta.image_size} px, bands {', '.join(loaded.meta.band_names)}, "
                      f"values {loaded.meta.value_range}"),
            ("classes", f"{len(loaded.meta.class_names)}: {', '.join(loaded.meta.class_names)}"),
            ("trained", f"{loaded.meta.metrics.get('iterations', '?')} iterations, "
                        f"{loaded.meta.metrics.get('train_seconds', '?')} s "
                        f"({loaded.meta.metrics.get('stop_reason', '')})"),
            ("written by", loaded.meta.created_by)]


def stored_metrics_sections(name: str, stored: dict[str, Any], numbers: dict[str, Any]) -> list[str]:
    """The test metrics stored at training time; a model trained without a test split (a retrain uses
    every annotation) has none, and says so with its fit on its own labels instead of a 0 % accuracy."""
    if not stored.get("count"):
        fit = stored.get("label_fit")
        numbers["metrics"] = {}
        numbers["label_fit"] = fit
        why = ("this model was trained without a test split (a retrain trains on every annotation)"
               if "count" in stored else "the model file stores no test metrics")
        fit_text = f"; it fits {fit:.0%} of its labelled patches" if fit is not None else ""
        return [f'<p class="note">No dataset given, and {why}{fit_text}. Give a labelled dataset (--data) to '
                'measure it.</p>']
    numbers["metrics"] = {name: {k: stored.get(k) for k in ("accuracy", "nll", "ece", "count")}}
    return ['<p class="note">No dataset given: metrics as stored in the model file at training time.</p>',
            table(["test accuracy", "NLL", "ECE", "test images"],
                  [[stored.get(k, "–") for k in ("accuracy", "nll", "ece", "count")]])]


def history_plot(history: list[dict[str, float]], path: Path) -> None:
    from .plots import pyplot, save_figure

    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    ax.plot(epochs, [h["val_ece"] for h in history], "s--", label="val ECE")
    ax.set(xlabel="epoch", ylim=(0, 1), title="training history")
    ax.legend()
    save_figure(fig, path)


def build_report(model: str | os.PathLike | LoadedModel, out_html: str | os.PathLike, *,
                 data: str | os.PathLike | None = None, baseline: str | os.PathLike | LoadedModel | None = None,
                 compare: Sequence[str | os.PathLike] = (), samples: bool = True, per_class: int = 4, steps: int = 60,
                 batch_size: int = 256, device: str = "auto", progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Evaluate, analyse and sample a model; write everything as one HTML page."""
    from .generation import sample_grid
    from .plots import reliability_diagram

    progress = progress or no_progress
    if compare and data is None:
        raise JEMError("The OOD section compares with the training data: give the dataset (--data) as well.")
    loaded = as_loaded(model, device)
    name = Path(model).name if not isinstance(model, LoadedModel) else "model"
    other = as_loaded(baseline, device) if baseline is not None else None
    other_name = (Path(baseline).name if not isinstance(baseline, LoadedModel) else "baseline") if other else None
    numbers: dict[str, Any] = {"model": name}
    sections = [f"<h1>JEM-EO model report: {esc(name)}</h1>",
                table(["", ""], describe_model(name, loaded))]
    with tempfile.TemporaryDirectory(prefix="jem-report-") as tmp_dir:
        tmp = Path(tmp_dir)
        dataset = None
        if data is not None:
            progress(0.02, "reading the dataset")
            dataset = load_reference(data, loaded)
        sections.append("<h2>Accuracy and calibration</h2>")
        if dataset is not None:
            progress(0.1, "evaluating")
            evaluated = {name: evaluate(loaded, dataset, batch_size, should_stop)}
            if other is not None:
                evaluated[other_name] = evaluate(other, dataset, batch_size, should_stop)
            numbers["metrics"] = {k: {m: v[m] for m in ("accuracy", "nll", "ece", "count", "mean_neg_energy")}
                                  for k, v in evaluated.items()}
            sections.append(table(["model", "test accuracy", "NLL", "ECE (15 bins)", "mean −E(x)", "test images"],
                                  [(k, f"{v['accuracy']:.1%}", v["nll"], v["ece"], v["mean_neg_energy"], v["count"])
                                   for k, v in evaluated.items()]))
            reliability_diagram(evaluated, tmp / "reliability.png")
            sections.append(embed_png(tmp / "reliability.png", "reliability diagrams"))
            per_class_rows = [(c, *(v["per_class_accuracy"][c] if v["per_class_accuracy"][c] is not None else "–"
                                    for v in evaluated.values())) for c in loaded.meta.class_names]
            sections.append("<details><summary>per-class test accuracy</summary>"
                            + table(["class", *evaluated], per_class_rows) + "</details>")
        else:
            sections += stored_metrics_sections(name, loaded.meta.metrics, numbers)
        history = loaded.meta.train_config.get("history") or []
        if history:
            history_plot(history, tmp / "history.png")
            sections.append(embed_png(tmp / "history.png", "training history"))
        if compare:
            progress(0.3, "OOD analysis")
            result = ood_analysis(loaded, dataset, list(compare), plot_path=tmp / "ood.png", batch_size=batch_size,
                                  reference_split="train", should_stop=should_stop)
            numbers["ood"] = {k: {m: v[m] for m in ("count", "kl_to_reference", "auroc")}
                              for k, v in result["compare"].items()}
            sections.append("<h2>Out-of-distribution: familiarity histograms</h2>")
            sections.append(f'<p class="note">Reference: the training split ({result["reference"]["count"]} images). '
                            f'Score: {esc(result["score"])}. {esc(result["kl_definition"])}; '
                            f'{esc(result["auroc_definition"])}.</p>')
            sections.append(table(["data", "kind", "images / patches", "KL to reference", "AUROC"],
                                  [(k, v["kind"], v["count"], v["kl_to_reference"], v["auroc"])
                                   for k, v in result["compare"].items()]))
            sections.append(embed_png(tmp / "ood.png", "OOD histograms"))
        if samples:
            progress(0.5, "SGLD samples")
            result = sample_grid(loaded, tmp / "samples.png", per_class=per_class, steps=steps, data=dataset,
                                 feature_model=baseline, batch_size=min(batch_size, 64), device=device,
                                 should_stop=should_stop,
                                 progress=lambda f, m: progress(0.5 + 0.45 * f, m))
            numbers["samples"] = result
            sections.append("<h2>SGLD samples</h2>")
            sections.append(f'<p class="note">{result["steps"]} SGLD steps (step size {result["step_size"]:g}, '
                            f'noise {result["noise"]:g}) from {esc(result["init"])}.</p>')
            if "quality" in result:
                q = result["quality"]
                sections.append(f'<p class="note">Sample quality in the {esc(q["feature_space"])}, against '
                                f'{esc(q["reference"])}; lower is closer. {esc(q.get("warning", ""))}</p>')
                sections.append(table(["images", "count", "Fréchet distance", "kernel distance (MMD², KID estimator)"],
                                      [(label, q[key]["count"], q[key]["frechet"], q[key]["kernel"])
                                       for key, label in (("samples", "SGLD samples"),
                                                          ("init", "chain starts (no SGLD)"),
                                                          ("real", "held-out real images")) if key in q]))
            sections.append(embed_png(tmp / "samples.png", "SGLD samples"))
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>JEM-EO report: {esc(name)}</title>"
                f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    atomic_write(out_html, lambda tmp_path: Path(tmp_path).write_text(page, encoding="utf-8"), suffix=".html")
    progress(1.0, "done")
    return numbers
