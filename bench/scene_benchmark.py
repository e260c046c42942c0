"""Scene benchmark: a few labels on the analyst's own scene → how good is the map, and its confidence?

Builds a labelled mosaic (GeoTIFF) of real aerial images from a class-folder dataset, draws k point
labels per class, runs the real CLI loop (`jem retrain` → `jem map`) and the baselines on the same
labels, and scores every map against the mosaic's known classes:

    .venv/bin/python bench/scene_benchmark.py ../shared/data/aid --labels 5 --seeds 0 1 2

Methods (`--methods`, default: jem jem-scratch ce ce-scratch forest forest2):
    jem           `jem retrain` with its defaults (the bundled base model when the bands fit)
    jem-scratch   `jem retrain --from-scratch`
    ce            `jem retrain --baseline` (cross-entropy only, no energy term), same time budget
    ce-scratch    `jem retrain --baseline --from-scratch`
    forest        random forest (300 trees) on per-patch features: band mean/std/percentiles, 8-bin
                  histograms, gradient magnitude — what dzetsaka / SCP users do
    forest2       the same forest on the scene read at 1/2 resolution (averaging 2 × 2 pixels), as
                  `jem retrain` reads it by default: each patch sees as much ground as the JEM's
    NAME=ARGS     any other retrain command line, e.g. `--methods "jem10=--minutes 10"`

`--round N` adds labelling rounds after `jem` (`--rounds R` of them, default 1): each round, N more labels
where `jem suggest` points on the suggested arm's latest model (skipping the patches labelled already,
`--annotations`, as the labelling dock does), against N more random ones, each labelled
with the mosaic's true class and retrained on all of its arm's labels with `jem`'s own retrain arguments.

Scoring: pixel accuracy and macro-F1 over the scored pixels (tiles that hold a label and a border of
half a patch along every tile edge are left out; unmapped pixels count as wrong), and the AUROC of
each per-pixel score at separating correct from wrong pixels (1 = every wrong pixel is less
confident than every correct one, 0.5 = no better than chance): the map's confidence layer (max
p(y|x); the forest's own max probability), its familiarity layer (−E(x)), the top-2 margin and the
negative entropy of p(y|x).

The mosaic uses only images the bundled base model never saw (recipes/aid_landcover.is_held_out),
so a base-model start is not scored on its own training images.  Each seed draws its own classes,
tile layout and labels.  Measure alone on the machine: a second job halves every time-budgeted run.
scikit-learn is needed for the forest and the scores (benchmark only: `pip install scikit-learn`).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))
from aid_landcover import is_held_out  # noqa: E402  (the recipe is a script folder, not a package)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
DEFAULT_METHODS = ["jem", "jem-scratch", "ce", "ce-scratch", "forest", "forest2"]
FORESTS = {"forest": 1, "forest2": 2}  # name → the coarsening its patches are read at
NAMED_METHODS = {"jem": "", "jem-scratch": "--from-scratch", "ce": "--baseline",
                 "ce-scratch": "--baseline --from-scratch"}
SCENE_CLASSES, SCENE_GRID, SCENE_TILE = 10, 12, 150  # the default mosaic: 10 classes, 12 × 12 tiles of 150 px
PATCH = 32  # the retrain default patch size; labels and borders are placed for it
MAP_STRIDE = 8  # a quarter of the patch, the mapping default
PIXEL_SIZE = 1.0  # metres; AID's own ground sampling distance is 0.5–8 m


@dataclass
class Scene:
    raster: Path
    annotations: Path
    truth: np.ndarray  # (H, W) class index per pixel
    scored: np.ndarray  # (H, W) bool: pixels that count
    class_names: list[str]
    label_windows: list[tuple[int, int, int]]  # (row, col, class) of each labelled patch's top-left


@dataclass
class Result:
    method: str
    labels_per_class: int
    seed: int
    accuracy: float
    macro_f1: float
    seconds: float
    auroc: dict[str, float] = field(default_factory=dict)
    note: str = ""


# ------------------------------------------------------------------------------------------ the scene
def class_images(data_dir: Path) -> dict[str, list[Path]]:
    """Held-out images per class folder."""
    images = {}
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and is_held_out(p)]
        if files:
            images[folder.name] = files
    return images


def read_tile(path: Path, tile: int) -> np.ndarray:
    from osgeo import gdal

    dataset = gdal.Open(str(path))
    pixels = dataset.ReadAsArray(buf_xsize=tile, buf_ysize=tile, resample_alg=gdal.GRIORA_Average)
    return pixels[:3] if pixels.ndim == 3 else np.repeat(pixels[None], 3, 0)


def build_scene(data_dir: Path, out_dir: Path, classes: int, grid: int, tile: int, labels_per_class: int,
                seed: int) -> Scene:
    """A grid × grid mosaic of tile-px images of `classes` classes (as many tiles each as fits), k labels each."""
    rng = np.random.default_rng(seed)
    per_class = -(-grid * grid // classes)
    available = class_images(data_dir)
    eligible = sorted(name for name, files in available.items() if len(files) >= per_class)
    if len(eligible) < classes:
        sys.exit(f"error: only {len(eligible)} classes have {per_class} held-out images; use fewer classes or a "
                 "smaller grid.")
    names = sorted(rng.choice(eligible, classes, replace=False).tolist())
    layout = rng.permutation(np.resize(np.arange(classes), grid * grid)).reshape(grid, grid)
    picks = {c: iter(rng.permutation(available[names[c]])) for c in range(classes)}
    size = grid * tile
    mosaic = np.zeros((3, size, size), np.uint8)
    truth = np.zeros((size, size), np.int16)
    for i in range(grid):
        for j in range(grid):
            c = int(layout[i, j])
            mosaic[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = read_tile(next(picks[c]), tile)
            truth[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = c
    raster = out_dir / "scene.tif"
    write_rgb(raster, mosaic)

    labelled_tiles, windows = set(), []
    for c in range(classes):
        tiles = np.argwhere(layout == c)
        for i, j in tiles[rng.choice(len(tiles), min(labels_per_class, len(tiles)), replace=False)]:
            labelled_tiles.add((int(i), int(j)))
            row = i * tile + int(rng.integers(0, tile - PATCH + 1))  # the whole patch inside the tile
            col = j * tile + int(rng.integers(0, tile - PATCH + 1))
            windows.append((row, col, c))
    annotations = out_dir / "labels.geojson"
    write_points(annotations, [(col + PATCH / 2, row + PATCH / 2, names[c]) for row, col, c in windows], size)

    scored = np.ones((size, size), bool)
    border = PATCH // 2
    for k in range(grid + 1):  # half a patch either side of every tile edge
        scored[max(k * tile - border, 0):k * tile + border, :] = False
        scored[:, max(k * tile - border, 0):k * tile + border] = False
    for i, j in labelled_tiles:
        scored[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = False
    return Scene(raster, annotations, truth, scored, names, windows)


def write_rgb(path: Path, pixels: np.ndarray) -> None:
    from osgeo import gdal, osr

    bands, height, width = pixels.shape
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, gdal.GDT_Byte,
                                                   ["TILED=YES", "COMPRESS=DEFLATE"])
    dataset.SetGeoTransform((500000.0, PIXEL_SIZE, 0.0, 4000000.0, 0.0, -PIXEL_SIZE))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    dataset.SetProjection(srs.ExportToWkt())
    for b, interpretation in enumerate((gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)):
        band = dataset.GetRasterBand(b + 1)
        band.WriteArray(pixels[b])
        band.SetColorInterpretation(interpretation)
    dataset = None


def write_points(path: Path, points: list[tuple[float, float, str]], size: int) -> None:
    """Points given in pixel (col, row) → GeoJSON in the raster's CRS, field `class`."""
    features = [{"type": "Feature", "properties": {"class": name},
                 "geometry": {"type": "Point", "coordinates": [500000.0 + x * PIXEL_SIZE, 4000000.0 - y * PIXEL_SIZE]}}
                for x, y, name in points]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features,
                                "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}))


# ------------------------------------------------------------------------------------------ scoring
def read_raster(path: Path) -> np.ndarray:
    from osgeo import gdal

    return gdal.Open(str(path)).ReadAsArray()


def on_scene_grid(values: np.ndarray, scene: Scene) -> np.ndarray:
    """A map written on a coarser grid than the scene (a model that reads the raster at 1/N resolution)
    brought to the scene's pixels by nearest neighbour; a map on the scene grid is returned as it is."""
    height, width = scene.truth.shape
    if values.shape[-2:] == (height, width):
        return values
    rows = np.arange(height) * values.shape[-2] // height
    cols = np.arange(width) * values.shape[-1] // width
    return values[..., rows[:, None], cols[None, :]]


def map_class_names(classes_tif: Path) -> list[str]:
    """The class names a `jem map` class raster carries (value i is names[i]; also its probability bands' order)."""
    from osgeo import gdal

    return json.loads(gdal.Open(str(classes_tif)).GetMetadataItem("jem_class_names"))


def class_index_map(classes_tif: Path, scene: Scene) -> np.ndarray:
    """The map's class values translated to the scene's class indexes (−1: unmapped or a foreign class)."""
    values = read_raster(classes_tif).astype(np.int64)
    lookup = np.full(256, -1)
    for value, name in enumerate(map_class_names(classes_tif)):
        if name in scene.class_names:
            lookup[value] = scene.class_names.index(name)
    return on_scene_grid(lookup[values], scene)


def score(predicted: np.ndarray, confidences: dict[str, np.ndarray], scene: Scene) -> tuple[float, float, dict]:
    from sklearn.metrics import f1_score, roc_auc_score

    truth, mask = scene.truth[scene.scored], scene.scored
    guess = predicted[mask]
    accuracy = float((guess == truth).mean())
    macro_f1 = float(f1_score(truth, guess, labels=range(len(scene.class_names)), average="macro", zero_division=0))
    correct = guess == truth
    aurocs = {}
    for name, values in confidences.items():
        values = values[mask]
        finite = np.isfinite(values) & (guess >= 0)
        if 0 < correct[finite].sum() < finite.sum():
            aurocs[name] = round(float(roc_auc_score(correct[finite], values[finite])), 3)
    return accuracy, macro_f1, aurocs


def candidate_scores(probabilities: np.ndarray, confidence: np.ndarray,
                     familiarity: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel confidence candidates: the map's confidence layer (max p(y|x)), its familiarity layer
    (−E(x)), and the top-2 margin and negative entropy of its p(y|x) bands."""
    top2 = np.sort(probabilities, axis=0)[-2:]
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(0)
    return {"confidence": confidence, "familiarity": familiarity, "margin": top2[1] - top2[0],
            "neg_entropy": -entropy}


# ------------------------------------------------------------------------------------------ methods
def jem_cli() -> list[str]:
    return [sys.executable, "-m", "jem_core"]


def run_jem(name: str, retrain_args: str, scene: Scene, work: Path, seed: int,
            annotations: Path | None = None) -> Result:
    model = work / f"{name}.pt"
    annotations = annotations or scene.annotations
    command = jem_cli() + ["retrain", str(scene.raster), "--annotations", str(annotations), "--out", str(model),
                           "--seed", str(seed)] + shlex.split(retrain_args)
    start = time.monotonic()
    retrain = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if retrain.returncode != 0:
        raise SystemExit(f"{name}: jem retrain failed:\n{retrain.stderr[-2000:]}")
    outputs = {kind: work / f"{name}_{kind}.tif" for kind in ("classes", "confidence", "familiarity", "probabilities")}
    mapped = subprocess.run(jem_cli() + ["map", str(model), str(scene.raster), "--out-classes", str(outputs["classes"]),
                                         "--out-confidence", str(outputs["confidence"]), "--out-familiarity",
                                         str(outputs["familiarity"]), "--out-probabilities",
                                         str(outputs["probabilities"]), "--stride", str(MAP_STRIDE),
                                         "--resolution", "input"], capture_output=True, text=True)
    if mapped.returncode != 0:
        raise SystemExit(f"{name}: jem map failed:\n{mapped.stderr[-2000:]}")
    predicted = class_index_map(outputs["classes"], scene)
    confidences = candidate_scores(*(on_scene_grid(read_raster(outputs[kind]), scene)
                                     for kind in ("probabilities", "confidence", "familiarity")))
    accuracy, macro_f1, aurocs = score(predicted, confidences, scene)
    notes = [line for line in retrain.stderr.splitlines() if "warning" in line.lower()]
    return Result(name, 0, seed, accuracy, macro_f1, round(seconds, 1), aurocs, " | ".join(notes)[:300])


def patch_features(patches: np.ndarray) -> np.ndarray:
    """(N, 3, P, P) uint8 → per-patch features: band mean/std/p10/p50/p90, 8-bin histograms, gradients."""
    x = patches.astype(np.float32)
    flat = x.reshape(len(x), x.shape[1], -1)
    stats = [flat.mean(2), flat.std(2)] + list(np.percentile(flat, [10, 50, 90], axis=2))
    bins = np.minimum((flat // 32).astype(np.int64), 7)
    histograms = np.stack([(bins == b).mean(2) for b in range(8)], axis=2).reshape(len(x), -1)
    grey = x.mean(1)
    gradient = np.hypot(np.diff(grey, axis=1)[:, :, :-1], np.diff(grey, axis=2)[:, :-1, :]).reshape(len(x), -1)
    return np.concatenate(stats + [histograms, gradient.mean(1, keepdims=True), gradient.std(1, keepdims=True)], 1)


def patch_classifier_probabilities(scene: Scene, classifier, coarsen: int = 1) -> np.ndarray:
    """(classes, H, W) per-pixel probabilities of a scikit-learn classifier fitted on the labelled patches'
    features (patch_features); each stride cell averages the probabilities of the patches covering it (as
    `jem map` averages logits).  coarsen: read the scene at 1/coarsen resolution (averaging), the labelled
    patches centred where the labels are."""
    from numpy.lib.stride_tricks import sliding_window_view

    image = read_raster(scene.raster)
    if coarsen > 1:
        bands, height, width = image.shape
        image = image[:, :height // coarsen * coarsen, :width // coarsen * coarsen].reshape(
            bands, height // coarsen, coarsen, width // coarsen, coarsen).mean((2, 4))
    limit = image.shape[1] - PATCH
    corners = [(min(max(round((r + PATCH / 2) / coarsen - PATCH / 2), 0), limit),
                min(max(round((c + PATCH / 2) / coarsen - PATCH / 2), 0), limit)) for r, c, _ in scene.label_windows]
    train = np.stack([image[:, r:r + PATCH, c:c + PATCH] for r, c in corners])
    classifier.fit(patch_features(train), [c for _, _, c in scene.label_windows])
    size = image.shape[1]
    n = (size - PATCH) // MAP_STRIDE + 1
    windows = sliding_window_view(image, (PATCH, PATCH), axis=(1, 2))[:, ::MAP_STRIDE, ::MAP_STRIDE]
    probabilities = np.zeros((n, n, len(scene.class_names)))
    for row in range(n):
        proba = classifier.predict_proba(patch_features(np.ascontiguousarray(windows[:, row].transpose(1, 0, 2, 3))))
        probabilities[row][:, classifier.classes_] = proba
    k = PATCH // MAP_STRIDE
    cells = np.zeros((n + k - 1, n + k - 1, probabilities.shape[2]))
    counts = np.zeros((n + k - 1, n + k - 1, 1))
    for dy in range(k):
        for dx in range(k):
            cells[dy:dy + n, dx:dx + n] += probabilities
            counts[dy:dy + n, dx:dx + n] += 1
    cells /= counts
    pixels = cells.repeat(MAP_STRIDE, 0).repeat(MAP_STRIDE, 1)[:size, :size]
    missing = size - pixels.shape[0]  # a margin narrower than a stride: the nearest cells cover it
    pixels = np.pad(pixels, ((0, missing), (0, missing), (0, 0)), mode="edge")
    return on_scene_grid(pixels.transpose(2, 0, 1), scene)


def random_forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=-1)


def run_forest(scene: Scene, seed: int, coarsen: int = 1) -> Result:
    """Random forest (300 trees) on the labelled patches' features, scored like a JEM map."""
    start = time.monotonic()
    pixels = patch_classifier_probabilities(scene, random_forest(seed), coarsen)
    seconds = time.monotonic() - start
    accuracy, macro_f1, aurocs = score(pixels.argmax(0), {"confidence": pixels.max(0)}, scene)
    return Result("forest" if coarsen == 1 else f"forest{coarsen}", 0, seed, accuracy, macro_f1, round(seconds, 1),
                  aurocs)


# ------------------------------------------------------------------------------------------ a labelling round
def label_points(points: list[tuple[float, float]], scene: Scene) -> list[tuple[float, float, str]]:
    """(col, row) pixel points labelled with the mosaic's true class under them."""
    return [(col, row, scene.class_names[int(scene.truth[int(row), int(col)])]) for col, row in points]


def existing_points(scene: Scene) -> list[tuple[float, float, str]]:
    return [(col + PATCH / 2, row + PATCH / 2, scene.class_names[c]) for row, col, c in scene.label_windows]


def suggested_points(model: Path, scene: Scene, count: int, labelled: Path, out: Path) -> list[tuple[float, float]]:
    """`jem suggest`'s patch centres, in pixels (its footprints written to `out`), skipping the patches the
    `labelled` annotations cover, as the labelling dock asks it to."""
    done = subprocess.run(jem_cli() + ["suggest", str(model), str(scene.raster), "--count", str(count), "--annotations",
                                       str(labelled), "--out", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"jem suggest failed:\n{done.stderr[-2000:]}")
    features = json.loads(out.read_text())["features"]
    centres = []
    for feature in features:
        ring = feature["geometry"]["coordinates"][0]
        x, y = np.mean([p[0] for p in ring[:4]]), np.mean([p[1] for p in ring[:4]])
        centres.append(((x - 500000.0) / PIXEL_SIZE, (4000000.0 - y) / PIXEL_SIZE))
    return centres


def random_points(scene: Scene, count: int, seed: int, round_number: int) -> list[tuple[float, float]]:
    """`count` uniform points, a fresh draw per seed and round (round 2 keeps the draw of the one-round runs)."""
    rng = np.random.default_rng(seed + 1000 + 100 * (round_number - 2))
    size = scene.truth.shape[0]
    return [(float(c), float(r)) for r, c in rng.integers(PATCH // 2, size - PATCH // 2, (count, 2))]


def run_labelling_rounds(scene: Scene, work: Path, seed: int, count: int, rounds: int,
                         retrain_args: str) -> list[Result]:
    """`rounds` more rounds from the `jem` method's model (work/jem.pt): each adds `count` labels where
    `jem suggest` points on the suggested arm's latest model, or `count` random ones, and retrains on all of
    the arm's labels so far with the same retrain arguments as `jem`."""
    results = []
    labels = {"suggested": existing_points(scene), "random": existing_points(scene)}
    latest_suggested, suggested_labels = work / "jem.pt", scene.annotations
    for round_number in range(2, rounds + 2):
        for arm in ("suggested", "random"):
            name = f"round{round_number}-{arm}"
            points = suggested_points(latest_suggested, scene, count, suggested_labels,
                                      work / f"{name}_suggestions.geojson") \
                if arm == "suggested" else random_points(scene, count, seed, round_number)
            labels[arm] = labels[arm] + label_points(points, scene)
            annotations = work / f"{name}.geojson"
            write_points(annotations, labels[arm], scene.truth.shape[0])
            results.append(run_jem(name, retrain_args, scene, work, seed, annotations))
        latest_suggested = work / f"round{round_number}-suggested.pt"
        suggested_labels = work / f"round{round_number}-suggested.geojson"
    return results


# ------------------------------------------------------------------------------------------ main
def parse_methods(items: list[str]) -> dict[str, str | None]:
    """name → retrain arguments (None for the forest)."""
    methods: dict[str, str | None] = {}
    for item in items:
        name, _, args = item.partition("=")
        if name in FORESTS:
            methods[name] = None
        elif args or name not in NAMED_METHODS:
            methods[name] = args
        else:
            methods[name] = NAMED_METHODS[name]
    return methods


def summarise(results: list[Result]) -> str:
    rows = ["| method | labels/class | seeds | pixel accuracy | macro-F1 | time (s) | confidence AUROC |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r.labels_per_class, r.method) for r in results}, key=lambda k: (k[0], list(
        dict.fromkeys(r.method for r in results)).index(k[1])))
    for k, method in keys:
        group = [r for r in results if r.method == method and r.labels_per_class == k]
        acc = np.array([r.accuracy for r in group]) * 100
        f1 = np.array([r.macro_f1 for r in group]) * 100
        names = sorted({name for r in group for name in r.auroc})
        auroc = ", ".join(f"{name} {np.mean([r.auroc[name] for r in group if name in r.auroc]):.2f}" for name in names)
        rows.append(f"| {method} | {k} | {len(group)} | {acc.mean():.1f} % (± {acc.std():.1f}) | {f1.mean():.1f} % | "
                    f"{np.mean([r.seconds for r in group]):.0f} | {auroc} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="class-folder dataset, e.g. ../shared/data/aid")
    parser.add_argument("--labels", type=int, nargs="+", default=[5], help="labels per class (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    parser.add_argument("--classes", type=int, default=SCENE_CLASSES, help="(default: %(default)s)")
    parser.add_argument("--grid", type=int, default=SCENE_GRID, help="tiles per side (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=SCENE_TILE, help="tile side in pixels (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="(default: %(default)s)")
    parser.add_argument("--round", type=int, default=0, metavar="N",
                        help="also labelling rounds after `jem` (which must be among the methods): N labels where "
                             "`jem suggest` points vs N random ones per round (default: off)")
    parser.add_argument("--rounds", type=int, default=1, metavar="R",
                        help="how many such rounds, each on the previous round's labels (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--keep", type=Path, help="keep scenes, models and maps in this folder")
    args = parser.parse_args()
    methods = parse_methods(args.methods)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)
        for k in args.labels:
            for seed in args.seeds:
                work = root / f"k{k}_seed{seed}"
                work.mkdir(parents=True, exist_ok=True)
                scene = build_scene(args.data, work, args.classes, args.grid, args.tile, k, seed)
                for name, retrain_args in methods.items():
                    first = run_forest(scene, seed, FORESTS[name]) if retrain_args is None else \
                        run_jem(name, retrain_args, scene, work, seed)
                    round_results = run_labelling_rounds(scene, work, seed, args.round, args.rounds, retrain_args) \
                        if name == "jem" and args.round else []
                    for result in [first] + round_results:
                        result.labels_per_class = k
                        results.append(result)
                        print(json.dumps(asdict(result)), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
