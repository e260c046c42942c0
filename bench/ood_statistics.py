"""Which familiarity score ranks foreign imagery as unfamiliar?  Candidates on AID vs other sensors.

Trains (or takes) a model on N classes of a class-folder dataset (default: the first 10 AID classes
alphabetically, 3 minutes of `jem train`), then scores, against the model's training split:
the held-out test split of the same classes (in-domain), OSCD Sentinel-2 Beirut and Rio (B04/B03/B02,
2–98 % stretch to 8 bits) and the Landsat 7 RGB scene (foreign sensors), cut into model-size patches.

Candidates (higher = more familiar):
  energy        −E(x) = logsumexp f(x), the paper's score
  knn-K         −(cosine distance to the K-th nearest training image) in the penultimate features
                (Sun et al. 2022; a training image leaves itself out)
  mahalanobis   −min over classes of the Mahalanobis distance to the class means (shared covariance,
                Lee et al. 2018), in the unit-length penultimate features
  png           PNG bits per pixel of the 8-bit patch (input complexity alone)
  energy+png    z(−E(x)) + z(PNG bits per pixel), an input-complexity correction after Serrà et al. 2020
                (z: standardised on the training split)
  layers-S-K    −Mahalanobis² of the per-channel mean and std of the stem's and every block's output to
                one Gaussian of the training split's, covariance shrunk by S towards its diagonal,
                cross-fitted over K folds; S = auto (chosen by held-out likelihood on the training split,
                jem_core.ood.choose_shrinkage) with K = 5 is what `jem ood` reports by default
For each: KL(set ‖ training split) of the histograms and AUROC (training split positive), with bootstrap
intervals, as `jem ood` reports them.  Then runs `jem ood` itself (its default statistic) and writes
its JSON and plot.

Usage (one thread, alone on the machine):
  .venv/bin/python bench/ood_statistics.py ../shared/data --json docs/results/ood/statistics.json
  .venv/bin/python bench/ood_statistics.py ../shared/data --model build/ood/model.pt   (skip training)
"""
from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from aid_table import oscd_rgb  # noqa: E402

from jem_core.data import load_class_folder, training_split  # noqa: E402
from jem_core.files import write_json  # noqa: E402
from jem_core.model_file import load_model  # noqa: E402
from jem_core.ood import (  # noqa: E402
    SHRINKAGE_GRID,
    cross_fitted_familiarity,
    held_out_log_likelihood,
    pair_numbers,
    reference_folds,
)
from jem_core.raster_io import choose_stretch, open_raster  # noqa: E402
from jem_core.windowing import iter_patches  # noqa: E402


def command_line() -> str:
    return ".venv/bin/python bench/ood_statistics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def class_subset(aid: Path, classes: int, out: Path) -> Path:
    """A class-folder dataset of the first `classes` classes (symbolic links)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in aid.iterdir() if p.is_dir())[:classes]:
        (out / folder.name).symlink_to(folder.resolve())
    return out


def train_model(subset: Path, minutes: float, seed: int, out: Path) -> None:
    command = [sys.executable, "-m", "jem_core", "train", str(subset), "--out", str(out),
               "--time-budget-min", str(minutes), "--seed", str(seed)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def raster_pixels(path: Path, loaded) -> torch.Tensor:
    with open_raster(path, expected_bands=loaded.meta.band_names) as source:
        stretch = choose_stretch(source, loaded.meta.value_range, "auto")
        batches = [torch.from_numpy(np.ascontiguousarray(b.pixels))
                   for b in iter_patches(source, loaded.meta.image_size, stretch=stretch)]
    return torch.cat(batches)


def png_bits_per_pixel(pixels: torch.Tensor) -> torch.Tensor:
    """Lossless PNG length of each 8-bit image in bits per pixel: the input-complexity term of Serrà et al."""
    sizes = []
    for image in pixels.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        sizes.append(8 * buffer.tell() / (image.shape[0] * image.shape[1]))
    return torch.tensor(sizes, dtype=torch.float64)


@torch.no_grad()
def network_outputs(loaded, pixels: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Unit-length pooled features, −E(x) and layer statistics of raw pixels."""
    parts = []
    for start in range(0, len(pixels), batch_size):
        pooled, layers = loaded.model.features.layer_statistics(loaded.normalise(pixels[start:start + batch_size]))
        parts.append((torch.nn.functional.normalize(pooled, dim=1), torch.logsumexp(loaded.model.head(pooled), 1),
                      layers))
    return {"features": torch.cat([p[0] for p in parts]).double(), "energy": torch.cat([p[1] for p in parts]).double(),
            "layers": torch.cat([p[2] for p in parts]).double()}


def knn_familiarity(bank: torch.Tensor, queries: torch.Tensor, rank: int, leave_one_out: bool) -> torch.Tensor:
    distances = 1 - queries @ bank.T
    return -distances.topk(rank + int(leave_one_out), dim=1, largest=False).values[:, -1]


def mahalanobis_familiarity(train_features: torch.Tensor, train_labels: torch.Tensor,
                            features: torch.Tensor) -> torch.Tensor:
    classes = train_labels.unique()
    means = torch.stack([train_features[train_labels == c].mean(0) for c in classes])
    centred = train_features - means[torch.searchsorted(classes, train_labels)]
    precision = torch.linalg.pinv(centred.T @ centred / len(train_features))
    distances = torch.stack([((features - m) @ precision * (features - m)).sum(1) for m in means], 1)
    return -distances.min(1).values


def shrinkage_likelihoods(reference: torch.Tensor) -> dict[str, float]:
    """Held-out log-likelihood per image of every SHRINKAGE_GRID value, on the folds `jem ood` uses."""
    fold_of = reference_folds(len(reference), torch.Generator().manual_seed(0))
    return {f"{s:g}": round(held_out_log_likelihood(reference, fold_of, s), 1) for s in SHRINKAGE_GRID}


def candidate_scores(sets: dict[str, dict], reference: str, train_labels: torch.Tensor) -> dict[str, dict]:
    ref = sets[reference]
    names = list(sets)
    scores: dict[str, dict] = {"energy": {n: s["energy"] for n, s in sets.items()}}
    for rank in (1, 10, 50):
        scores[f"knn-{rank}"] = {n: knn_familiarity(ref["features"], s["features"], rank, n == reference)
                                 for n, s in sets.items()}
    scores["mahalanobis"] = {n: mahalanobis_familiarity(ref["features"], train_labels, s["features"])
                             for n, s in sets.items()}
    scores["png"] = {n: s["png"] for n, s in sets.items()}
    mean_e, std_e, mean_c, std_c = ref["energy"].mean(), ref["energy"].std(), ref["png"].mean(), ref["png"].std()
    scores["energy+png"] = {n: (s["energy"] - mean_e) / std_e + (s["png"] - mean_c) / std_c for n, s in sets.items()}
    others = [n for n in names if n != reference]
    for shrinkage, folds in ((None, 5), (0.0, 5), (1e-3, 5), (0.01, 2), (0.01, 5), (0.01, 10), (0.1, 5), (0.5, 5)):
        ref_scores, other_scores, used = cross_fitted_familiarity(ref["layers"], [sets[n]["layers"] for n in others],
                                                                  torch.Generator().manual_seed(0), shrinkage, folds)
        name = f"layers-{'auto' if shrinkage is None else f'{shrinkage:g}'}-{folds}"
        print(f"{name}: shrinkage {used:g}", flush=True)
        scores[name] = {reference: ref_scores, **dict(zip(others, other_scores))}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the shared data folder (holds aid/, oscd/, landsat/)")
    parser.add_argument("--classes", type=int, default=10, help="first N AID classes (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--model", type=Path, help="score this model instead of training one")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "ood", help="(default: build/ood)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="the `jem ood` plot (default: next to --json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    subset = class_subset(args.data / "aid", args.classes, Path(tempfile.mkdtemp()) / "aid")
    model_path = args.model or args.work / f"aid{args.classes}_{args.minutes:g}min_s{args.seed}.pt"
    if args.model is None:
        train_model(subset, args.minutes, args.seed, model_path)
    loaded = load_model(model_path)
    dataset = load_class_folder(subset, loaded.meta.image_size)
    split = training_split(dataset.labels, loaded.meta.train_config)
    with tempfile.TemporaryDirectory() as tmp:
        rasters = {"OSCD Beirut": oscd_rgb("beirut", Path(tmp)), "OSCD Rio": oscd_rgb("rio", Path(tmp)),
                   "Landsat 7": args.data / "landsat" / "RGB.byte.tif"}
        pixels = {"AID train": dataset.images[split.train], "AID test": dataset.images[split.test],
                  **{name: raster_pixels(path, loaded) for name, path in rasters.items()}}
        sets = {}
        for name, images in pixels.items():
            sets[name] = {**network_outputs(loaded, images), "png": png_bits_per_pixel(images)}
        scores = candidate_scores(sets, "AID train", dataset.labels[split.train])
        likelihoods = shrinkage_likelihoods(sets["AID train"]["layers"])
        print(f"held-out log-likelihood per image by shrinkage: {likelihoods}", flush=True)
        generator = torch.Generator().manual_seed(0)
        table = {}
        print(f"{'score':12s} " + " ".join(f"{n:>30s}" for n in list(pixels)[1:]))
        for score, by_set in scores.items():
            row = {name: pair_numbers(by_set["AID train"], values, 50, generator)
                   for name, values in by_set.items() if name != "AID train"}
            table[score] = row
            print(f"{score:12s} " + " ".join(
                f"KL {r['kl_to_reference']:5.2f} [{r['kl_interval'][0]:5.2f},{r['kl_interval'][1]:5.2f}] "
                f"AUROC {r['auroc']:.3f}" for r in row.values()), flush=True)
        plot = args.plot or (args.json.with_suffix(".png") if args.json else args.work / "ood.png")
        jem_ood = [sys.executable, "-m", "jem_core", "ood", str(model_path), "--reference", str(subset),
                   "--compare", *map(str, rasters.values()), "--plot", str(plot),
                   "--json", str(args.work / "jem_ood.json")]
        print("$", " ".join(jem_ood), flush=True)
        subprocess.run(jem_ood, check=True, cwd=ROOT)
    if args.json:
        write_json(args.json, {"command": command_line(), "model": str(model_path),
                               "model_accuracy": loaded.meta.metrics.get("accuracy"),
                               "counts": {name: len(images) for name, images in pixels.items()},
                               "reference": "AID train (the model's training split)",
                               "shrinkage_held_out_log_likelihood": likelihoods, "scores": table})


if __name__ == "__main__":
    main()
