"""`jem ood`, `jem sample` and `jem report`: the paper's science on a trained model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..ood import (
    BOOTSTRAP_ROUNDS,
    DEFAULT_STATISTIC,
    MIN_REFERENCE_IMAGES,
    REFERENCE_SPLITS,
    STATISTICS,
)
from .common import ProgressBar, add_device_option, log


def register(subparsers) -> None:
    o = subparsers.add_parser("ood", help="is other imagery like the training data? familiarity histograms, KL, "
                                          "AUROC",
                              description="Compare the familiarity histogram of a reference dataset (by default the "
                                          "model's training split) with those of other datasets, image folders or "
                                          "rasters (cut into the model's patches): KL divergence to the reference "
                                          "and AUROC, each with a bootstrap interval "
                                          f"({BOOTSTRAP_ROUNDS} resamples). Two scores are computed and plotted: "
                                          "'layers', how far the image's per-channel statistics in the network's "
                                          "early and middle layers lie from the reference's (Mahalanobis), and "
                                          "'energy', the paper's −E(x) = logsumexp f(x). On AID vs Sentinel-2 and "
                                          "Landsat scenes only the first ranks the foreign imagery as less "
                                          "familiar (docs/science.md).")
    o.add_argument("model", type=Path, metavar="MODEL")
    o.add_argument("--reference", type=Path, required=True, metavar="DATA_DIR",
                   help="class-folder dataset the model was trained on")
    o.add_argument("--compare", type=Path, nargs="+", required=True, metavar="PATH",
                   help="class-folder dataset, folder of images, or raster; several allowed")
    o.add_argument("--reference-split", default="train", choices=REFERENCE_SPLITS,
                   help="which reference images: the training split by the model's seed (the paper's reference; "
                        f"default), the held-out test split, or all; at least {MIN_REFERENCE_IMAGES} images")
    o.add_argument("--statistic", default=DEFAULT_STATISTIC, choices=STATISTICS,
                   help="the score whose KL and AUROC are printed first (default: %(default)s; both are in the "
                        "JSON and the plot)")
    o.add_argument("--json", type=Path, help="write the numbers (per PATH: KL, AUROC, counts) here")
    o.add_argument("--plot", type=Path, help="write the histogram plot PNG here")
    o.add_argument("--bins", type=int, default=50, help="histogram bins (default: %(default)s)")
    o.add_argument("--stretch", default="auto", help="rasters only, as in `jem map`: auto, none, percentile[:2,98], "
                                                      "linear:MIN,MAX (default: auto)")
    o.add_argument("--batch-size", type=int, default=256)
    add_device_option(o)
    o.set_defaults(run=run_ood)

    s = subparsers.add_parser("sample", help="SGLD samples of a JEM as a PNG grid, with a sample-quality score",
                              description="Draw class-conditional and unconditional SGLD samples from MODEL. With "
                                          "--data the chains start from the per-class Gaussian of the data (as in "
                                          "training) and a Fréchet / kernel distance in classifier features is "
                                          "computed (not Inception FID).")
    s.add_argument("model", type=Path, metavar="MODEL")
    s.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    s.add_argument("--data", type=Path, metavar="DATA_DIR", help="the dataset the model was trained on")
    s.add_argument("--feature-model", type=Path, metavar="MODEL",
                   help="classifier whose features score the samples, e.g. the CE baseline (default: MODEL itself)")
    s.add_argument("--per-class", type=int, default=4, help="samples per class (columns of the grid)")
    s.add_argument("--steps", type=int, default=60, help="SGLD steps per chain (default: %(default)s)")
    s.add_argument("--unconditional-count", type=int, help="unconditional samples (default: per-class × 10)")
    s.add_argument("--no-conditional", action="store_true")
    s.add_argument("--no-unconditional", action="store_true")
    s.add_argument("--step-size", type=float, help="SGLD step size (default: the training run's)")
    s.add_argument("--noise", type=float, help="SGLD noise (default: the training run's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", type=Path, help="write the numbers here")
    add_device_option(s)
    s.set_defaults(run=run_sample)

    r = subparsers.add_parser("report", help="one self-contained HTML page: metrics, calibration, OOD, samples",
                              description="Write an HTML report of MODEL (figures embedded).")
    r.add_argument("model", type=Path, metavar="MODEL")
    r.add_argument("--out", type=Path, required=True, help="HTML file to write")
    r.add_argument("--data", type=Path, metavar="DATA_DIR", help="the dataset the model was trained on")
    r.add_argument("--baseline", type=Path, metavar="MODEL", help="a second model (e.g. the CE baseline) to compare")
    r.add_argument("--compare", type=Path, nargs="*", default=[], metavar="PATH", help="data for the OOD section")
    r.add_argument("--per-class", type=int, default=4)
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--no-samples", action="store_true", help="skip the SGLD sample grids")
    r.add_argument("--batch-size", type=int, default=256)
    add_device_option(r)
    r.set_defaults(run=run_report)


def run_ood(args: argparse.Namespace) -> int:
    from ..ood import ood_analysis, statistics_in_order

    result = ood_analysis(args.model, args.reference, args.compare, json_path=args.json, plot_path=args.plot,
                          batch_size=args.batch_size, device=args.device, reference_split=args.reference_split,
                          statistic=args.statistic, bins=args.bins, stretch=args.stretch, progress=ProgressBar("ood"))
    ref = result["reference"]
    print(f"reference {ref['name']} ({ref['split']}, {ref['count']} images); KL and AUROC with 95 % bootstrap "
          "intervals")
    for statistic in statistics_in_order(result["statistic"]):
        print(f"{statistic}: {result['statistics'][statistic]['definition']}")
        for name, c in result["statistics"][statistic]["compare"].items():
            print(f"  {name:30s} {result['compare'][name]['kind']:13s} n={result['compare'][name]['count']:6d}  "
                  f"KL {c['kl_to_reference']:7.3f} [{c['kl_interval'][0]:.3f}, {c['kl_interval'][1]:.3f}]  "
                  f"AUROC {c['auroc']:.3f} [{c['auroc_interval'][0]:.3f}, {c['auroc_interval'][1]:.3f}]")
    for warning in result["warnings"]:
        log(f"warning: {warning}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from ..generation import sample_grid

    result = sample_grid(args.model, args.out, per_class=args.per_class, steps=args.steps,
                         conditional=not args.no_conditional, unconditional=not args.no_unconditional,
                         unconditional_count=args.unconditional_count, data=args.data,
                         feature_model=args.feature_model, json_path=args.json, step_size=args.step_size,
                         noise=args.noise, seed=args.seed, device=args.device, progress=ProgressBar("sample"))
    log(f"{result['steps']} SGLD steps from {result['init']}; grid written to {args.out}")
    if "conditional" in result:
        share = result["conditional"]["classified_as_their_class"]
        print(f"conditional samples classified as their class: {share:.1%}")
    if "quality" in result:
        q = result["quality"]
        print(f"feature space: {q['feature_space']}")
        if "warning" in q:
            log(f"warning: {q['warning']}")
        for key in ("samples", "init", "real"):
            if key in q:
                quality = q[key]
                print(f"{key:8s} n={quality['count']:5d}  Fréchet {quality['frechet']:10.3f}  "
                      f"kernel {quality['kernel']:.5f}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..report import build_report

    numbers = build_report(args.model, args.out, data=args.data, baseline=args.baseline, compare=args.compare,
                           samples=not args.no_samples, per_class=args.per_class, steps=args.steps,
                           batch_size=args.batch_size, device=args.device, progress=ProgressBar("report"))
    log(f"report written to {args.out}")
    for name, m in numbers.get("metrics", {}).items():
        if m.get("accuracy") is not None:
            print(f"{name}: accuracy {m['accuracy']:.1%}  ECE {m['ece']:.3f}")
    if numbers.get("label_fit") is not None:
        print(f"{numbers['model']}: no test split (give --data to measure it); fits {numbers['label_fit']:.0%} "
              "of its labelled patches")
    return 0

