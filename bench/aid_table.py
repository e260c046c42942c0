"""The JEM-for-EO paper's Table IV rows for AID at 64x64 px, on a CPU budget.

  train    For one or more labels-per-class settings (all, 20, 3, 1), methods (JEM, CE baseline,
           JEM + consistency; on request the paper's configuration scaled down, "paper") and one seed,
           train the default network of `jem train` for a fixed wall-clock budget (default 20 minutes)
           on ONE CPU thread, save the model under --models and write
           docs/results/aid_table/<setting>_<method>_s<seed>.json (test accuracy, NLL, ECE, reliability
           bins, iterations, seconds, pseudo-label mask rate, validation history).
  analyse  From those JSONs: the table (mean and per-seed figures, JEM − CE per seed) written into
           docs/science.md between the aid-table markers, each variant run (a --results folder under
           docs/results/aid_variants/) beside the default run of its seed, reliability diagrams (seed 0) and the
           validation-accuracy-vs-minutes curves; SGLD sample grids when supervised ("all") models exist.

Usage (one thread per run; two runs may share the 2-core machine, one per core, see docs/science.md):
  .venv/bin/python bench/aid_table.py train --settings 20 --methods jem,ce --seed 0
  .venv/bin/python bench/aid_table.py analyse
The OOD comparison lives in bench/ood_statistics.py.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weight_average_probe import WeightAverageProbe

from jem_core import training
from jem_core.data import load_class_folder
from jem_core.files import write_json
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig

DATA = Path("../shared/data")
RESULTS = ROOT / "docs" / "results" / "aid_table"
VARIANTS = ROOT / "docs" / "results" / "aid_variants"  # one folder per variant, e.g. sgld2 (see --results)
# The default table's runs from before lr 2e-3 became jem train's default: variants measured at 1e-3 are
# compared with these, not with the 2e-3 defaults.
PREVIOUS_DEFAULT = VARIANTS / "lr1e-3"
UNRECORDED_LR = 1e-3  # the default when runs did not yet record their learning rate ('paper' kept its own)
IMAGES = ROOT / "docs" / "img"
SCIENCE_MD = ROOT / "docs" / "science.md"
TRAINING_AID_MD = ROOT / "docs" / "training_aid.md"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
METHODS = {
    "ce": {"baseline": True},
    "jem": {},
    "jem+cons": {"consistency_weight": 1.0},
    # Grathwohl et al.'s configuration scaled down (their WRN-28-10 → WRN-16-2), as bench/accuracy_vs_time.py;
    # validated every 5 iterations because it makes only a few dozen in 20 minutes on one thread.
    "paper": {"arch": "wrn-16-2", "stem_stride": 1, "lr": 1e-4, "epoch_iters": 5,
              "sgld": {"steps": 20, "init": "uniform"}},
}
METHOD_NAMES = {"ce": "CE baseline", "jem": "JEM", "jem+cons": "JEM + consistency",
                "paper": "JEM, paper's configuration scaled down"}
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


class EnergyEvery:
    """Variant instrument: the energy term (SGLD chains and the data batch) on every k-th iteration only;
    the iterations between are cross-entropy steps on the labelled batch, about 4× cheaper. Wraps
    training.training_step, as MaskRateRecorder does, so jem_core is unchanged until it is measured."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.original = training.training_step
        self.calls = 0

    def __enter__(self) -> "EnergyEvery":
        def sometimes_energy_step(model, sampler, *args, **kwargs):
            self.calls += 1
            return self.original(model, sampler if self.calls % self.every == 0 else None, *args, **kwargs)

        if self.every > 1:
            training.training_step = sometimes_energy_step
        return self

    def __exit__(self, *exc) -> None:
        training.training_step = self.original


def run_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    args.models.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    dataset = load_class_folder(DATA / "aid", 64)
    print(f"AID loaded: {len(dataset)} images, {dataset.num_classes} classes, {time.monotonic() - start:.0f} s",
          flush=True)
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            options = dict(METHODS[method]) | ({"lr": args.lr} if args.lr is not None else {})
            sgld = {"buffer_size": args.buffer_size, "steps": args.sgld_steps, **options.pop("sgld", {})}
            # --iterations replaces the wall-clock budget: the reference machine's pace, on a slower one.
            config = TrainConfig(time_budget_min=None if args.iterations else args.budget_min,
                                 iterations=args.iterations, patience=None, seed=args.seed,
                                 labels_per_class=None if setting == "all" else int(setting),
                                 sgld=SGLDConfig(**sgld), consistency_threshold=args.threshold,
                                 weight_gen=args.weight_gen, consistency_rampup=args.consistency_rampup, **options)
            print(f"--- {setting} labels/class, {METHOD_NAMES[method]}", flush=True)
            name = f"{setting}_{method}_s{args.seed}"
            with MaskRateRecorder() as recorder, WeightAverageProbe(args.ema_probe) as probe, \
                    EnergyEvery(args.energy_every):
                result = training.train(dataset, config, out_path=args.models / f"{name}.pt",
                                        log=lambda m: print(m, flush=True))
            m = result.metrics
            record = {k: v for k, v in m.items() if k != "confusion_matrix"}
            record.update(setting=setting, method=method,
                          budget_min=config.time_budget_min, iteration_bound=config.iterations,
                          mean_mask_rate=float(np.mean(recorder.rates)) if recorder.rates else 0.0,
                          consistency_threshold=args.threshold if method == "jem+cons" else None,
                          history=result.history, command=command_line(),
                          buffer_size=config.sgld.buffer_size, sgld_steps=config.sgld.steps,
                          weight_gen=config.weight_gen, consistency_rampup=config.consistency_rampup,
                          lr=config.lr, energy_every=args.energy_every, torch_threads=torch.get_num_threads(),
                          **({"weight_average_probe": probe.results()} if args.ema_probe else {}),
                          note=describe_network(config) + ", other settings the defaults of jem train; "
                                                          "1 CPU thread, one run per core")
            write_json(args.results / f"{name}.json", record)
            print(f"=> test acc {m['accuracy']:.1%} ECE {m['ece']:.3f} in {m['iterations']} iterations "
                  f"(mask rate {record['mean_mask_rate']:.2f})", flush=True)
            for decay, scores in probe.results().items():
                print(f"   weight average {decay}: test acc {scores.get('accuracy', float('nan')):.1%} "
                      f"(best val round {scores['best_round']})", flush=True)


def describe_network(config: TrainConfig) -> str:
    sgld = config.sgld
    return (f"{config.arch}, stem stride {config.stem_stride}, {config.image_size} px, lr {config.lr:g}, "
            f"{sgld.steps} SGLD steps ({sgld.init} start)")


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


def load_runs(folder: Path = RESULTS) -> dict[tuple[str, str], list[dict]]:
    """(setting, method) → the runs of every seed, by seed."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(folder.glob("*_s*.json")):
        record = json.loads(path.read_text())
        record["seed"] = int(path.stem.rsplit("_s", 1)[1])
        runs.setdefault((record["setting"], record["method"]), []).append(record)
    return {key: sorted(records, key=lambda r: r["seed"]) for key, records in runs.items()}


def run_analyse(args: argparse.Namespace) -> None:
    from jem_core.plots import reliability_diagram

    torch.set_num_threads(1)
    IMAGES.mkdir(parents=True, exist_ok=True)
    runs = load_runs()
    samples = {} if args.tables_only else compute_samples(args)
    for setting in SETTINGS:
        curves = {METHOD_NAMES[m]: runs[(setting, m)][0] for m in METHODS if (setting, m) in runs}
        if curves:
            reliability_diagram(curves, IMAGES / f"aid_reliability_{setting}.png")
    validation_curves(runs, IMAGES / "aid_val_curves.png")
    write_tables(runs, samples)
    replace_between_markers(SCIENCE_MD, "aid-variants", variants_table(runs))
    replace_between_markers(PERFORMANCE_MD, "minutes-table", minutes_table(runs))


def compute_samples(args: argparse.Namespace) -> dict:
    """SGLD sample grids of the supervised JEMs, scored in the CE baseline's features (when trained)."""
    from jem_core.generation import sample_grid
    from jem_core.model_file import load_model

    models = {m: args.models / f"all_{m}_s0.pt" for m in ("jem", "jem+cons")}
    if not any(path.exists() for path in models.values()):
        return {}
    dataset = load_class_folder(DATA / "aid", 64)
    feature_path = args.models / "all_ce_s0.pt"
    samples = {}
    for method, model_path in models.items():
        if model_path.exists():
            print(f"samples: {METHOD_NAMES[method]}", flush=True)
            samples[method] = sample_grid(load_model(model_path),
                                          IMAGES / f"aid_samples_{method.replace('+', '_')}.png",
                                          per_class=args.per_class, steps=args.sample_steps, data=dataset,
                                          unconditional_count=2 * args.per_class,
                                          feature_model=feature_path if feature_path.exists() else None)
    write_json(RESULTS.parent / "aid_samples.json", {"command": command_line(), **samples})
    return samples


def validation_curves(runs: dict[tuple[str, str], list[dict]], path: Path) -> None:
    """Validation accuracy against training minutes, one panel per setting, one line per run."""
    from jem_core.plots import pyplot, save_figure

    settings = [s for s in SETTINGS if any((s, m) in runs for m in METHODS)]
    if not settings:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    colours = {"ce": "#dd8452", "jem": "#4c72b0", "jem+cons": "#55a868", "paper": "#8172b3"}
    for ax, setting in zip(axes[0], settings):
        for method in METHODS:
            for i, run in enumerate(runs.get((setting, method), [])):
                history = run["history"]
                ax.plot([h["minutes"] for h in history], [100 * h["val_accuracy"] for h in history],
                        color=colours[method], linestyle="-" if i == 0 else "--", linewidth=1.2,
                        label=f"{METHOD_NAMES[method]}, seed {run['seed']}")
        ax.set(xlabel="training minutes (one CPU thread)", ylabel="validation accuracy (%)",
               title=f"AID, 30 classes, 64 px, {setting} label{'' if setting == '1' else 's'} / class")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


MINUTE_MARKS = (2.5, 5, 10, 15, 20)


def minutes_table(runs: dict[tuple[str, str], list[dict]]) -> str:
    """Best validation accuracy reached by each minute mark, per run."""
    lines = ["| labels / class | method | seed | " + " | ".join(f"val by {m:g} min" for m in MINUTE_MARKS)
             + " | iterations | test acc |", "|---|---|---|" + "---|" * len(MINUTE_MARKS) + "---|---|"]
    for setting in SETTINGS:
        for method in METHODS:
            for run in runs.get((setting, method), []):
                best = [max([h["val_accuracy"] for h in run["history"] if h["minutes"] <= mark], default=None)
                        for mark in MINUTE_MARKS]
                lines.append(f"| {setting} | {METHOD_NAMES[method]} | {run['seed']} | "
                             + " | ".join("–" if b is None else f"{b:.1%}" for b in best)
                             + f" | {run['iterations']} | {run['accuracy']:.1%} |")
    return "\n".join(lines)


def accuracy_by_seed(runs: dict[tuple[str, str], list[dict]], setting: str, method: str) -> dict[int, float]:
    return {r["seed"]: r["accuracy"] for r in runs.get((setting, method), [])}


def learning_rate(run: dict) -> float:
    return run.get("lr") or METHODS[run["method"]].get("lr", UNRECORDED_LR)


def same_seed_and_rate(sources: list[dict[tuple[str, str], list[dict]]], setting: str, method: str,
                       seed: int, lr: float) -> dict | None:
    """The first source's run of this setting, method and seed at learning rate `lr`; failing that, the first
    source's run of that seed at any rate (a learning-rate variant is compared with the default itself)."""
    matches = [run for runs in sources for run in runs.get((setting, method), []) if run["seed"] == seed]
    same_rate = [run for run in matches if math.isclose(learning_rate(run), lr)]
    return (same_rate or matches or [None])[0]


def variants_table(runs: dict[tuple[str, str], list[dict]], variants: Path = VARIANTS,
                   previous_default: Path = PREVIOUS_DEFAULT) -> str:
    """Each variant run beside the default run of the same setting, method, seed and learning rate (the
    previous default's, for a variant measured at the old rate), and the CE baseline of that seed (the
    variant's own CE run when the folder has one, e.g. a longer budget; else the default's at that rate).
    A run with weight averages (--ema-probe) gets a row per average, compared with the CE run's same average."""
    lines = ["| variant | labels / class | method | seed | test acc | ECE | iterations | − default, same seed "
             "and lr | − CE, same seed |", "|---|---|---|---|---|---|---|---|---|"]
    previous = load_runs(previous_default) if previous_default.is_dir() else {}
    for folder in sorted(p for p in variants.iterdir() if p.is_dir()) if variants.is_dir() else []:
        variant_runs = load_runs(folder)
        sources = [runs] + ([previous] if folder != previous_default else [])
        for (setting, method), records in sorted(variant_runs.items(), key=lambda kv: SETTINGS.index(kv[0][0])):
            own_ce = {run["seed"]: {name: scores["accuracy"] for name, scores in run_views(run)}
                      for run in variant_runs.get((setting, "ce"), [])}
            for run in records:
                lr = learning_rate(run)
                default = same_seed_and_rate(sources, setting, method, run["seed"], lr)
                shared_ce = same_seed_and_rate(sources, setting, "ce", run["seed"], lr)
                ce = own_ce.get(run["seed"], {} if shared_ce is None else {"": shared_ce["accuracy"]})
                for name, scores in run_views(run):
                    ce_base = None if method == "ce" else ce.get(name)
                    gaps = [None if base is None else 100 * (scores["accuracy"] - base)
                            for base in (None if default is None else default["accuracy"], ce_base)]
                    lines.append(f"| {folder.name} | {setting} | {METHOD_NAMES[method]}{name} | {run['seed']} "
                                 f"| {scores['accuracy']:.1%} | {scores['ece']:.3f} | {run['iterations']} "
                                 f"| {fmt(gaps[0], '+.1f')} | {fmt(gaps[1], '+.1f')} |")
    return "\n".join(lines)


def run_views(run: dict) -> list[tuple[str, dict]]:
    """The run's own weights ("") and, for an --ema-probe run, each weight average (", EMA 0.99")."""
    averages = run.get("weight_average_probe", {})
    return [("", run)] + [(f", EMA {decay}", scores) for decay, scores in averages.items() if "accuracy" in scores]


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_tables(runs: dict[tuple[str, str], list[dict]], samples: dict) -> None:
    lines = ["| labels / class | method | seeds | test acc, mean (per seed) | ECE | NLL | iterations | "
             "pseudo-label mask | paper acc (GPU, 200 ep) |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for method in METHODS:
            records = runs.get((setting, method))
            if not records:
                continue
            accuracies = [r["accuracy"] for r in records]
            mask = fmt(float(np.mean([r["mean_mask_rate"] for r in records])), ".2f") if method == "jem+cons" else "–"
            paper = PAPER.get((setting, method))
            lines.append(f"| {setting} | {METHOD_NAMES[method]} | {len(records)} | {np.mean(accuracies):.1%} "
                         f"({', '.join(f'{a:.1%}' for a in accuracies)}) | {np.mean([r['ece'] for r in records]):.3f} "
                         f"| {np.mean([r['nll'] for r in records]):.2f} "
                         f"| {np.mean([r['iterations'] for r in records]):.0f} | {mask} "
                         f"| {fmt(paper, '.1f')}{'' if paper is None else ' %'} |")
    twenty = lines[:2] + [row for row in lines[2:] if row.startswith("| 20 |")]
    lines += ["", "Difference to the CE baseline on the same seed (split, labelled images, initialisation):", "",
              "| labels / class | method | JEM-side − CE, per seed | mean |", "|---|---|---|---|"]
    for setting in SETTINGS:
        ce = accuracy_by_seed(runs, setting, "ce")
        for method in ("jem", "jem+cons"):
            gaps = [100 * (r["accuracy"] - ce[r["seed"]]) for r in runs.get((setting, method), []) if r["seed"] in ce]
            if gaps:
                lines.append(f"| {setting} | {METHOD_NAMES[method]} | {', '.join(f'{g:+.1f}' for g in gaps)} "
                             f"| {np.mean(gaps):+.1f} points |")
    table = "\n".join(lines)
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
    replace_between_markers(TRAINING_AID_MD, "aid20", "\n".join(twenty))
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
    t.add_argument("--methods", default="ce,jem,jem+cons", help=",".join(METHODS))
    t.add_argument("--budget-min", type=float, default=20.0, help="wall-clock minutes per training run")
    t.add_argument("--iterations", type=int, default=None,
                   help="train this many iterations instead of --budget-min minutes: what the budget gave on the "
                        "machine the tables were measured on, for a machine that runs slower or is shared")
    t.add_argument("--threshold", type=float, default=None,
                   help="fixed pseudo-label threshold for JEM + consistency (default: FreeMatch's adaptive ones)")
    t.add_argument("--seed", type=int, default=0, help="split, labelled subset and initialisation")
    t.add_argument("--buffer-size", type=int, default=SGLDConfig().buffer_size, help="SGLD replay buffer")
    t.add_argument("--sgld-steps", type=int, default=SGLDConfig().steps, help="SGLD steps per iteration")
    t.add_argument("--weight-gen", type=float, default=TrainConfig().weight_gen,
                   help="weight of the generative (energy) term")
    t.add_argument("--consistency-rampup", type=float, default=TrainConfig().consistency_rampup,
                   help="JEM + consistency: fraction of the run over which the consistency weight rises from 0")
    t.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: each method's own, {TrainConfig().lr:g} for all but 'paper')")
    t.add_argument("--energy-every", type=int, default=1, metavar="K",
                   help="JEM variant: the energy term on every K-th iteration only, cross-entropy steps between")
    t.add_argument("--ema-probe", type=lambda text: [float(d) for d in text.split(",")], default=[],
                   help="also score exponential moving averages of the weights with these decays, e.g. 0.99,0.998 "
                        "(bench/weight_average_probe.py; recorded beside the live run's figures)")
    t.add_argument("--results", type=Path, default=RESULTS,
                   help="folder for the per-run JSON (default: the tables' own; put variants elsewhere, e.g. "
                        "docs/results/aid_variants, so the tables keep showing the defaults)")
    t.set_defaults(run=run_train)
    a = sub.add_parser("analyse")
    a.add_argument("--per-class", type=int, default=3)
    a.add_argument("--sample-steps", type=int, default=40)
    a.add_argument("--tables-only", action="store_true",
                   help="tables and plots from the saved JSONs only (no sample grids)")
    a.set_defaults(run=run_analyse)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
