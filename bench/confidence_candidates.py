"""Which per-pixel score marks a retrained map's errors best?  Confidence candidates scored on scene
benchmark runs kept with `--keep`:

    .venv/bin/python bench/scene_benchmark.py ../shared/data/aid --labels 5 --seeds 0 1 2 3 4 5 \\
        --methods "jem=--minutes 0 --iterations 1100" forest2 --keep build/scenes
    .venv/bin/python bench/confidence_candidates.py ../shared/data/aid build/scenes --seeds 0 1 2 3 4 5

Each candidate is scored as the scene benchmark scores the confidence layer: the AUROC of correct vs
wrong scored pixels of the JEM's class map (which no candidate changes).  Candidates:

    max p                 each cell's own max p(y|x) (`jem map --confidence-box 0`)
    smoothed W            p(mapped class) averaged over a W × W scene-pixel box
    box B, p alone        `jem map --confidence-box B`'s layer for a model without labelled features:
                          p(y|x) of the mapped class over a box of B patches (in whole stride cells), the
                          kept model mapped again by this checkout's jem_core
    box B                 the same with label agreement (jem_core/label_agreement.py), the layer a
                          retrained model's map has, the labelled patches' features and places
                          computed as `jem retrain` computes them (the annotations with their
                          --label-shift copies, read by the model)
    box 1.25, sharpness S the default box with q ∝ d^-S instead of the default sharpness
    + second opinion      max p + the probability that a classifier of another kind, fitted to the same
                          labelled patches on colour/texture features (scene_benchmark.patch_features),
                          gives the mapped class: a logistic regression (C = 0.1, standardised
                          features) or the benchmark's random forest (300 trees)
    smoothed 49 + ...     both
    + reading 1/R         max p + the same model's p(mapped class) with the raster read at 1/R
                          (`jem map --target-gsd R`; the scene has 1 m pixels)
    box B + both readings the box B layer + the p(mapped class) read at both 1/R
    max logit             f_y(x) of the mapped class = log max p + (−E(x)) (Hendrycks et al. 2022): how
                          much the JEM's joint density p(x, y) favours the pixel, not only p(y|x)
    + A familiarity       z(max p) + A · z(−E(x)), both standardised over the scored pixels

With `--ensemble NAME` (a second kept retrain of the same scenes, e.g. another `--seed`), the mean of
the two models' p(y|x) is scored too, on its own class map: its accuracy, the AUROC of its max p and of
its max p smoothed over 49 × 49 px, and (for reference) the second model alone.

The kept runs must use scene_benchmark's default mosaic (SCENE_CLASSES, SCENE_GRID, SCENE_TILE).
scikit-learn is needed (benchmark only).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jem_core of this checkout
from scene_benchmark import (
    MAP_STRIDE,
    SCENE_CLASSES,
    SCENE_GRID,
    SCENE_TILE,
    Scene,
    build_scene,
    map_class_names,
    on_scene_grid,
    patch_classifier_probabilities,
    random_forest,
    read_raster,
)

from jem_core.active.retrain import RETRAIN_DEFAULTS  # noqa: E402
from jem_core.confidence_box import CONFIDENCE_BOX_PATCHES  # noqa: E402
from jem_core.model_file import LoadedModel  # noqa: E402

SMOOTHING = (33, 49, 65)  # scene pixels: about 1/2, 3/4 and 1 patch at the default 1/2 reading
BOXES = (0.75, 1.25, 1.75)  # patches: 3, 5 and 7 cells at the benchmark's stride of a quarter patch
SHARPNESS = (2.0, 8.0)  # besides the default
READINGS = (1.5, 3.0)


def jem_familiarity(work: Path, name: str, scene: Scene) -> np.ndarray:
    """(H, W) −E(x) of a kept JEM map."""
    return on_scene_grid(read_raster(work / f"{name}_familiarity.tif").astype(np.float64), scene)


def jem_probabilities(work: Path, name: str, scene: Scene, suffix: str = "") -> np.ndarray:
    """(scene classes, H, W) p(y|x) of a kept JEM map, in the scene's class order."""
    names = map_class_names(work / f"{name}{suffix}_classes.tif")
    probabilities = read_raster(work / f"{name}{suffix}_probabilities.tif").astype(np.float64)
    return on_scene_grid(probabilities[[names.index(c) for c in scene.class_names]], scene)


def reading_probabilities(work: Path, name: str, scene: Scene, reading: float) -> np.ndarray:
    """The kept model's p(y|x) with the raster read at 1/reading (mapped once, then kept)."""
    from jem_core.mapping import map_raster

    suffix = f"_read{reading:g}"
    if not (work / f"{name}{suffix}_probabilities.tif").exists():
        map_raster(str(work / f"{name}.pt"), str(scene.raster), str(work / f"{name}{suffix}_classes.tif"),
                   out_probabilities=str(work / f"{name}{suffix}_probabilities.tif"), stride=MAP_STRIDE,
                   target_gsd=reading, resolution="input")
    return jem_probabilities(work, name, scene, suffix)


def with_labelled_features(work: Path, name: str, scene: Scene, label_shift: int | None) -> LoadedModel:
    """The kept model with its labelled patches' features and places computed as `jem retrain` computes
    them (the same features a retrain stores, to 6e-8), so models kept by any version are scored alike."""
    from jem_core.active.patches import patches_from_annotations
    from jem_core.cli.label_cmd import raster_grid, read_annotations
    from jem_core.label_agreement import labelled_features
    from jem_core.model_file import load_model

    loaded = load_model(work / f"{name}.pt")
    meta = loaded.meta
    wkt, pixel_x, pixel_y = raster_grid(str(scene.raster))
    footprint = meta.coarsen * meta.image_size
    annotations = read_annotations(scene.annotations, "class", wkt, pixel_x * footprint, pixel_y * footprint)
    shift = round(RETRAIN_DEFAULTS.label_shift_fraction * meta.image_size) if label_shift is None else label_shift
    labelled = patches_from_annotations([str(scene.raster)], annotations, meta.image_size, None, meta,
                                        meta.class_names, "auto", shift, meta.coarsen)
    loaded.labelled = labelled_features(loaded, labelled.images, labelled.labels, labelled.places)
    return loaded


def boxed_confidence(work: Path, name: str, scene: Scene, box: float, model: LoadedModel,
                     tag: str = "") -> np.ndarray:
    """The confidence layer `jem map --confidence-box box` writes for `model` (mapped once, then kept
    as {name}_box{box}{tag}_confidence.tif)."""
    from jem_core.mapping import map_raster

    path = work / f"{name}_box{box:g}{tag}_confidence.tif"
    if not path.exists():
        map_raster(model, str(scene.raster), str(work / f"{name}_box{box:g}{tag}_classes.tif"), str(path),
                   stride=MAP_STRIDE, resolution="input", confidence_box=box)
    return on_scene_grid(read_raster(path).astype(np.float64), scene)


def boxed_layers(work: Path, name: str, scene: Scene, label_shift: int | None) -> dict[str, np.ndarray]:
    """The confidence layers of the kept model: p alone and with label agreement at each box size, and
    with other sharpness at the default box."""
    model = with_labelled_features(work, name, scene, label_shift)
    labelled = model.labelled
    layers = {}
    for box in BOXES:
        layers[f"box {box:g}, p alone"] = boxed_confidence(work, name, scene, box, replace(model, labelled=None))
    for box in BOXES:
        layers[f"box {box:g}"] = boxed_confidence(work, name, scene, box, model, "_agreement")
    for sharpness in SHARPNESS:
        sharper = replace(model, labelled=replace(labelled, sharpness=sharpness))
        layers[f"box {CONFIDENCE_BOX_PATCHES:g}, sharpness {sharpness:g}"] = boxed_confidence(
            work, name, scene, CONFIDENCE_BOX_PATCHES, sharper, f"_agreement{sharpness:g}")
    return layers


def logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


FAMILIARITY_WEIGHTS = (0.25, 0.5)


def smoothed_of_mapped(p: np.ndarray, width: int) -> np.ndarray:
    """(H, W) p(y|x) of each pixel's mapped class, averaged over a width × width box."""
    from scipy.ndimage import uniform_filter

    return np.take_along_axis(uniform_filter(p, (1, width, width)), p.argmax(0)[None], 0)[0]


def candidates(p: np.ndarray, familiarity: np.ndarray, readings: dict[float, np.ndarray],
               boxed: dict[str, np.ndarray], scene: Scene, seed: int) -> dict[str, np.ndarray]:
    """p: the JEM map's p(y|x); familiarity: its −E(x); readings: the same model's p(y|x) at other
    readings (reading → map); boxed: its confidence layers (boxed_layers)."""
    mapped = p.argmax(0)[None]
    of_mapped = lambda q: np.take_along_axis(q, mapped, 0)[0]  # noqa: E731
    max_p = p.max(0)
    scores = {"max p": max_p}
    for width in SMOOTHING:
        scores[f"smoothed {width}"] = smoothed_of_mapped(p, width)
    scores.update(boxed)
    reading = RETRAIN_DEFAULTS.coarsen  # the second opinion reads the scene as the JEM did
    opinions = {"logreg": patch_classifier_probabilities(scene, logistic_regression(), reading),
                "forest": patch_classifier_probabilities(scene, random_forest(seed), reading)}
    for kind, q in opinions.items():
        scores[f"+ {kind}"] = max_p + of_mapped(q)
        scores[f"smoothed 49 + {kind}"] = scores["smoothed 49"] + of_mapped(q)
    at_readings = {r: of_mapped(q) for r, q in readings.items()}
    for r, q in at_readings.items():
        scores[f"+ reading 1/{r:g}"] = max_p + q
    scores["+ both readings"] = max_p + sum(at_readings.values())
    for box in BOXES:
        scores[f"box {box:g}, p alone + both readings"] = boxed[f"box {box:g}, p alone"] + sum(at_readings.values())
    scores["max logit"] = np.log(np.clip(max_p, 1e-12, None)) + familiarity
    z = lambda v: (v - v[scene.scored].mean()) / v[scene.scored].std()  # noqa: E731
    for weight in FAMILIARITY_WEIGHTS:
        scores[f"+ {weight:g} familiarity"] = z(max_p) + weight * z(familiarity)
    return scores


def ensemble_aurocs(p: np.ndarray, q: np.ndarray, scene: Scene) -> dict[str, float]:
    """Accuracy and confidence AUROCs of the second model alone and of the mean of both models' p(y|x)."""
    from sklearn.metrics import roc_auc_score

    record = {}
    for name, probabilities in (("second model", q), ("ensemble", (p + q) / 2)):
        correct = (probabilities.argmax(0) == scene.truth)[scene.scored]
        smoothed = smoothed_of_mapped(probabilities, 49)
        record[f"{name} accuracy"] = round(float(correct.mean()), 3)
        record[f"{name}: max p"] = round(float(roc_auc_score(correct, probabilities.max(0)[scene.scored])), 3)
        record[f"{name}: smoothed 49"] = round(float(roc_auc_score(correct, smoothed[scene.scored])), 3)
    return record


def main() -> None:
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the class-folder dataset the scenes were built from")
    parser.add_argument("kept", type=Path, help="scene_benchmark.py's --keep folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=5, help="labels per class of the kept runs")
    parser.add_argument("--method", default="jem", help="the kept JEM run's method name (default: %(default)s)")
    parser.add_argument("--ensemble", metavar="NAME", help="a second kept JEM run to average with --method")
    parser.add_argument("--label-shift", type=int, help="the kept runs' --label-shift, for a kept model without "
                        "labelled features (default: jem retrain's)")
    parser.add_argument("--json", type=Path, help="write the AUROCs here")
    args = parser.parse_args()
    table: dict[str, list[float]] = {}
    accuracies, reading_accuracies = [], []
    for seed in args.seeds:
        work = args.kept / f"k{args.labels}_seed{seed}"
        scene = build_scene(args.data, work, SCENE_CLASSES, SCENE_GRID, SCENE_TILE, args.labels, seed)
        p = jem_probabilities(work, args.method, scene)
        correct = (p.argmax(0) == scene.truth)[scene.scored]
        accuracies.append(float(correct.mean()))
        readings = {r: reading_probabilities(work, args.method, scene, r) for r in READINGS}
        familiarity = jem_familiarity(work, args.method, scene)
        boxed = boxed_layers(work, args.method, scene, args.label_shift)
        for candidate, values in candidates(p, familiarity, readings, boxed, scene, seed).items():
            table.setdefault(candidate, []).append(round(float(roc_auc_score(correct, values[scene.scored])), 3))
        if args.ensemble:
            for key, value in ensemble_aurocs(p, jem_probabilities(work, args.ensemble, scene), scene).items():
                table.setdefault(key, []).append(value)
        reading_accuracies.append({r: float((q.argmax(0) == scene.truth)[scene.scored].mean())
                                   for r, q in readings.items()})
        at = ", ".join(f"read at 1/{r:g} {a:.1%}" for r, a in reading_accuracies[-1].items())
        print(f"seed {seed}: map accuracy {correct.mean():.1%} ({at})", flush=True)
    print("| score | AUROC, mean | per seed |\n|---|---|---|")
    for candidate, values in table.items():
        print(f"| {candidate} | {np.mean(values):.3f} | {' / '.join(f'{v:.3f}' for v in values)} |")
    if args.json:
        record = {"seeds": args.seeds, "accuracy": accuracies, "accuracy_at_readings": reading_accuracies,
                  "auroc": table}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
