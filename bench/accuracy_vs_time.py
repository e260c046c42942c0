"""Accuracy per wall-clock minute: the default CPU configuration versus the JEM paper's, scaled down.

Trains each configuration on AID (30 classes) at 64 px for the same time budget, validating every
`epoch_iters` iterations (val accuracy vs training minutes is the curve), then reports the test
accuracy of the best-validated weights.  All runs share one split (seed 0, 5 % val, 10 % test).

    .venv/bin/python bench/accuracy_vs_time.py --minutes 10 --out docs/results/accuracy_vs_time_idle
        → accuracy_vs_time.json and accuracy_vs_time.png in --out (default docs/results)

Configurations:
  default           TrainConfig() — wrn-10-2, stem stride 2, 5 SGLD steps from the informative
                    (per-class Gaussian) init, lr 1e-3
  default-20-uniform the same network with the paper's sampler: 20 SGLD steps from uniform noise
  paper-scaled      Grathwohl et al. 2019 scaled down: wrn-16-2 (paper: wrn-28-10), stem stride 1,
                    20 SGLD steps from uniform noise, lr 1e-4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from jem_core.data import load_class_folder
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig, train

CONFIGS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "default-20-uniform": TrainConfig(sgld=SGLDConfig(steps=20, init="uniform")),
    "paper-scaled": TrainConfig(arch="wrn-16-2", stem_stride=1, lr=1e-4, sgld=SGLDConfig(steps=20, init="uniform")),
}
# Validate often enough for a curve: the slow configurations get shorter "epochs".
EPOCH_ITERS = {"default": 30, "default-20-uniform": 15, "paper-scaled": 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/aid")
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget per configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()

    start = time.monotonic()
    dataset = load_class_folder(args.data, 64)
    print(f"AID: {len(dataset)} images, {dataset.num_classes} classes, loaded in {time.monotonic() - start:.0f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    results = {"command": " ".join([".venv/bin/python"] + sys.argv),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU thread(s), "
                          f"load average {os.getloadavg()[0]:.1f} at the start",
               "minutes_budget": args.minutes, "runs": {}}
    for name in args.configs:
        config = replace(CONFIGS[name], epochs=1000, patience=None, time_budget_min=args.minutes,
                         epoch_iters=EPOCH_ITERS[name], val_fraction=0.05, test_fraction=0.1, device="cpu")
        result = train(dataset, config, log=lambda message, name=name: print(f"[{name}] {message}", flush=True))
        results["runs"][name] = {
            "config": {k: v for k, v in config.to_dict().items() if k in ("arch", "stem_stride", "lr", "epoch_iters")}
            | {"sgld_steps": config.sgld.steps, "sgld_init": config.sgld.init},
            "curve": [{"minutes": round(r["minutes"], 2), "iteration": r["iteration"],
                       "val_accuracy": round(r["val_accuracy"], 4)} for r in result.history],
            "test_accuracy": round(result.metrics["accuracy"], 4), "test_nll": round(result.metrics["nll"], 4),
            "test_ece": round(result.metrics["ece"], 4), "iterations": result.metrics["iterations"]}
        print(f"[{name}] test accuracy {result.metrics['accuracy']:.1%} after {result.metrics['iterations']} "
              f"iterations", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_vs_time.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "accuracy_vs_time.png")
    print(f"\n{'configuration':20s} {'iterations':>10s} {'best val':>9s} {'test acc':>9s}")
    for name, run in results["runs"].items():
        best = max((p["val_accuracy"] for p in run["curve"]), default=0.0)
        print(f"{name:20s} {run['iterations']:10d} {best:9.1%} {run['test_accuracy']:9.1%}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in results["runs"].items():
        xs = [0.0] + [p["minutes"] for p in run["curve"]]
        ys = [1 / 30] + [p["val_accuracy"] for p in run["curve"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} (test {run['test_accuracy']:.1%})")
    ax.set_xlabel(f"training minutes ({results['machine']})", fontsize=8)
    ax.set_ylabel("validation accuracy (AID, 30 classes, 64 px)")
    ax.set_title("JEM accuracy vs wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
