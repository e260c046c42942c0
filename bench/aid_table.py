"""Reproduce the JEM-for-EO paper's Table IV rows for AID at 64x64 px, on a CPU budget.

Two phases, each loading AID once per process:

  train    For each labels-per-class setting (all, 20, 3, 1) and method (JEM, CE baseline,
           JEM + consistency), train the default network for a fixed wall-clock budget, save the model
           under --models and write docs/results/aid_table/<setting>_<method>.json (test accuracy,
           NLL, ECE, reliability bins, iterations, seconds, FixMatch mask rate).
  analyse  From the saved models: the OOD table (KL of the −E(x) histograms of AID test, OSCD
           Sentinel-2 patches and the Landsat scene to the AID training histogram, AUROC),
           reliability diagrams JEM vs CE, SGLD sample grids with their feature-space distances, and
           the markdown tables written into docs/science.md between the aid-table markers.

Usage (each run single-threaded, one at a time):
  .venv/bin/python bench/aid_table.py train --settings all,20 --budget-min 3.5
  .venv/bin/python bench/aid_table.py train --settings 3,1 --budget-min 3.5
  .venv/bin/python bench/aid_table.py analyse
  .venv/bin/python bench/aid_table.py analyse --tables-only     (plots and tables from the saved JSONs)
  .venv/bin/python bench/aid_table.py ood --model demo/model.pt --tag demo
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jem_core import training
from jem_core.data import load_class_folder
from jem_core.files import write_json
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig

DATA = Path("../shared/data")
RESULTS = ROOT / "docs" / "results" / "aid_table"
IMAGES = ROOT / "docs" / "img"
SCIENCE_MD = ROOT / "docs" / "science.md"
METHODS = {
    "ce": {"baseline": True},
    "jem": {},
    "jem+cons": {"consistency_weight": 1.0},
}
METHOD_NAMES = {"ce": "CE baseline", "jem": "JEM", "jem+cons": "JEM + consistency"}
SETTINGS = ("all", "20", "3", "1")
PAPER = {("all", "jem"): 74.1, ("all", "ce"): 78.7, ("20", "jem"): 50.2, ("20", "ce"): 41.1}


def command_line() -> str:
    return ".venv/bin/python bench/aid_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class MaskRateRecorder:
    """Wraps training.training_step to average the FixMatch mask rate of a run (bench-only instrument)."""

    def __init__(self) -> None:
        self.original = training.training_step
        self.rates: list[float] = []

    def __enter__(self) -> "MaskRateRecorder":
        def recording_step(*args, **kwargs):
            losses = self.original(*args, **kwargs)
            self.rates.append(losses.get("mask_rate", 0.0))
            return losses

        training.training_step = recording_step
        return self

    def __exit__(self, *exc) -> None:
        training.training_step = self.original


def run_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    args.models.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    dataset = load_class_folder(DATA / "aid", 64)
    print(f"AID loaded: {len(dataset)} images, {dataset.num_classes} classes, {time.monotonic() - start:.0f} s",
          flush=True)
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            config = TrainConfig(epochs=1000, time_budget_min=args.budget_min, patience=None, seed=args.seed,
                                 labels_per_class=None if setting == "all" else int(setting),
                                 warmup_iters=args.warmup_iters, sgld=SGLDConfig(buffer_size=args.buffer_size),
                                 consistency_threshold=args.threshold, **METHODS[method])
            print(f"--- {setting} labels/class, {METHOD_NAMES[method]}", flush=True)
            with MaskRateRecorder() as recorder:
                result = training.train(dataset, config, out_path=args.models / f"{setting}_{method}.pt",
                                        log=lambda m: print(m, flush=True))
            m = result.metrics
            record = {k: v for k, v in m.items() if k != "confusion_matrix"}
            record.update(setting=setting, method=method, budget_min=args.budget_min,
                          mean_mask_rate=float(np.mean(recorder.rates)) if recorder.rates else 0.0,
                          consistency_threshold=args.threshold if method == "jem+cons" else None,
                          history=result.history, command=command_line(),
                          warmup_iters=args.warmup_iters, buffer_size=args.buffer_size,
                          note="wrn-10-2, stem stride 2, 64 px, other settings the defaults of jem train; 1 CPU "
                               "thread on a shared machine, so the iteration count depends on the load")
            write_json(RESULTS / f"{setting}_{method}.json", record)
            print(f"=> test acc {m['accuracy']:.1%} ECE {m['ece']:.3f} in {m['iterations']} iterations "
                  f"(mask rate {record['mean_mask_rate']:.2f})", flush=True)


def stretch_to_8bit(band: np.ndarray) -> np.ndarray:
    low, high = np.percentile(band, (2, 98))
    return np.clip((band - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)


def oscd_rgb(city: str, out_dir: Path) -> Path:
    """Stack OSCD Sentinel-2 B04, B03, B02 (10 m) into an 8-bit RGB GeoTIFF, 2–98 % stretch per band."""
    import rasterio

    folder = DATA / "oscd" / city / "imgs_1"
    bands = []
    for name in ("B04", "B03", "B02"):
        (path,) = folder.glob(f"*_{name}.tif")
        with rasterio.open(path) as src:
            bands.append(stretch_to_8bit(src.read(1).astype(np.float64)))
            profile = src.profile
    profile.update(count=3, dtype="uint8", nodata=None)
    out = out_dir / f"oscd_{city}_rgb.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.stack(bands))
    return out


def run_analyse(args: argparse.Namespace) -> None:
    from jem_core.plots import reliability_diagram

    torch.set_num_threads(1)
    IMAGES.mkdir(parents=True, exist_ok=True)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    if args.tables_only:
        ood, samples = load_analysis()
    else:
        ood, samples = compute_analysis(args)
    for setting in SETTINGS:
        curves = {METHOD_NAMES[m]: runs[f"{setting}_{m}"] for m in METHODS if f"{setting}_{m}" in runs}
        if curves:
            reliability_diagram(curves, IMAGES / f"aid_reliability_{setting}.png")
    write_tables(runs, ood, samples)


def load_analysis() -> tuple[dict, dict]:
    """The OOD and sample results of an earlier `analyse` run."""
    ood = {m: json.loads(p.read_text()) for m in METHODS
           if (p := RESULTS.parent / f"aid_ood_{m.replace('+', '_')}.json").exists()}
    samples_path = RESULTS.parent / "aid_samples.json"
    samples = json.loads(samples_path.read_text()) if samples_path.exists() else {}
    samples.pop("command", None)
    return ood, samples


def compute_analysis(args: argparse.Namespace) -> tuple[dict, dict]:
    from jem_core.generation import sample_grid
    from jem_core.model_file import load_model

    dataset = load_class_folder(DATA / "aid", 64)
    ood = {}
    for method in ("jem", "ce", "jem+cons"):
        model_path = args.models / f"all_{method}.pt"
        if model_path.exists():
            print(f"OOD: {METHOD_NAMES[method]}", flush=True)
            ood[method] = ood_table(load_model(model_path), dataset, method.replace("+", "_"))
    samples = {}
    feature_path = args.models / "all_ce.pt"
    for method in ("jem", "jem+cons"):
        model_path = args.models / f"all_{method}.pt"
        if model_path.exists():
            print(f"samples: {METHOD_NAMES[method]}", flush=True)
            samples[method] = sample_grid(load_model(model_path),
                                          IMAGES / f"aid_samples_{method.replace('+', '_')}.png",
                                          per_class=args.per_class, steps=args.sample_steps, data=dataset,
                                          unconditional_count=2 * args.per_class,
                                          feature_model=feature_path if feature_path.exists() else None)
    write_json(RESULTS.parent / "aid_samples.json", {"command": command_line(), **samples})
    return ood, samples


def ood_table(loaded, dataset, tag: str) -> dict:
    """−E(x) of AID test, OSCD Beirut and Rio (B04/B03/B02, 8-bit) and the Landsat scene vs AID train."""
    from jem_core.ood import ood_analysis, reference_indices

    test = dataset.images[reference_indices(dataset, loaded, "test")[0]]
    with tempfile.TemporaryDirectory() as tmp:
        rasters = [str(oscd_rgb("beirut", Path(tmp))), str(oscd_rgb("rio", Path(tmp))),
                   str(DATA / "landsat" / "RGB.byte.tif")]
        return ood_analysis(loaded, dataset, [("AID test", test), *rasters], reference_split="train",
                            json_path=RESULTS.parent / f"aid_ood_{tag}.json", plot_path=IMAGES / f"aid_ood_{tag}.png")


def run_ood(args: argparse.Namespace) -> None:
    """The OOD table for any AID model (e.g. the bundled demo model), at the model's image size."""
    from jem_core.model_file import load_model

    torch.set_num_threads(1)
    loaded = load_model(args.model)
    result = ood_table(loaded, load_class_folder(DATA / "aid", loaded.meta.image_size), args.tag)
    for name, c in result["compare"].items():
        print(f"{name:22s} n={c['count']:5d}  KL {c['kl_to_reference']:6.2f}  AUROC {c['auroc']:.3f}")


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_tables(runs: dict, ood: dict, samples: dict) -> None:
    lines = ["| labels / class | method | test acc | ECE | NLL | iterations in the budget | train s | FixMatch mask "
             "| paper acc (GPU, 200 ep) |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for method in METHODS:
            r = runs.get(f"{setting}_{method}")
            if r is None:
                continue
            mask = fmt(r["mean_mask_rate"], ".2f") if method == "jem+cons" else "–"
            paper = PAPER.get((setting, method))
            lines.append(f"| {setting} | {METHOD_NAMES[method]} | {r['accuracy']:.1%} | {r['ece']:.3f} "
                         f"| {r['nll']:.2f} | {r['iterations']} | {r['train_seconds']:.0f} | {mask} "
                         f"| {fmt(paper, '.1f')}{'' if paper is None else ' %'} |")
    table = "\n".join(lines)
    if ood:
        names = list(next(iter(ood.values()))["compare"].keys())
        ood_lines = ["| model | " + " | ".join(f"{n}: KL / AUROC" for n in names) + " |",
                     "|---|" + "---|" * len(names)]
        for method, result in ood.items():
            cells = [f"{c['kl_to_reference']:.2f} / {c['auroc']:.3f}" for c in result["compare"].values()]
            ood_lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
        table += ("\n\nOOD: KL(compare ‖ AID train) of the −E(x) histograms and AUROC of −E(x) "
                  "(AID train = positive).\n\n")
        table += "\n".join(ood_lines)
    if samples:
        table += ("\n\nSample quality in the CE baseline's features (not Inception), against 1,000 AID training "
                  "images; Fréchet / kernel distance.\n\n")
        table += ("| sampler | SGLD samples | their chain starts (informative init, no SGLD) "
                  "| as many held-out real images |\n")
        table += "|---|---|---|---|\n"
        for method, s in samples.items():
            q = s["quality"]
            table += (f"| {METHOD_NAMES[method]} ({q['count']} samples) | {q['samples']['frechet']:.2f} / "
                      f"{q['samples']['kernel']:.2f} | {q['init']['frechet']:.2f} / {q['init']['kernel']:.2f} "
                      f"| {q['real']['frechet']:.2f} / {q['real']['kernel']:.2f} |\n")
    replace_between_markers(SCIENCE_MD, "aid-table", table)
    print(table)


def replace_between_markers(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    if begin not in doc:
        doc += f"\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "aid_table",
                        help="where the trained models go (default: build/aid_table, git-ignored)")
    sub = parser.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("train")
    t.add_argument("--settings", default=",".join(SETTINGS), help="labels per class: all,20,3,1")
    t.add_argument("--methods", default=",".join(METHODS), help="ce,jem,jem+cons")
    t.add_argument("--budget-min", type=float, default=3.5, help="wall-clock minutes per training run")
    t.add_argument("--threshold", type=float, default=0.8, help="FixMatch confidence threshold")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--warmup-iters", type=int, default=10, help="LR warm-up (jem train's 100 is longer than a "
                                                                "few-minute CPU run)")
    t.add_argument("--buffer-size", type=int, default=2000, help="SGLD replay buffer (filling 10,000 takes a "
                                                                 "minute of the budget on this CPU)")
    t.set_defaults(run=run_train)
    a = sub.add_parser("analyse")
    a.add_argument("--per-class", type=int, default=3)
    a.add_argument("--sample-steps", type=int, default=40)
    a.add_argument("--tables-only", action="store_true",
                   help="redo plots and tables from the saved JSONs (no model evaluation)")
    a.set_defaults(run=run_analyse)
    o = sub.add_parser("ood", help="the OOD table alone, for any AID model")
    o.add_argument("--model", type=Path, required=True)
    o.add_argument("--tag", required=True,
                   help="names the outputs: docs/results/aid_ood_TAG.json, docs/img/aid_ood_TAG.png")
    o.set_defaults(run=run_ood)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
