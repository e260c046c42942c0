"""`jem train` and `jem evaluate`."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import distributed
from ..data import check_band_count, load_class_folder, training_split
from ..device import resolve_device
from ..files import check_output_folders, write_json, written_together
from ..metrics import classification_metrics, predict_logits
from ..model_file import load_model
from ..models import AMP_CHOICES, ARCHITECTURES, NORMS, SpeedOptions
from ..plots import reliability_diagram
from ..sampler import INIT_CHOICES, SGLDConfig
from ..training import DEFAULT_ITERATIONS, MIN_VAL_FOR_SELECTION, TrainConfig, train
from .common import ProgressBar, add_device_option, log


def register(subparsers) -> None:
    defaults, sgld = TrainConfig(), SGLDConfig()
    p = subparsers.add_parser("train", help="train a JEM (or the CE baseline) on a class-folder dataset",
                              description="Train a Joint Energy-based Model on DATA_DIR (one folder per class).")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    p.add_argument("--labels-per-class", type=int, default=0,
                   help="semi-supervised: keep K labels per class, the rest unlabelled (0 = all labelled)")
    p.add_argument("--arch", default=defaults.arch, choices=list(ARCHITECTURES))
    p.add_argument("--stem-stride", type=int, default=defaults.stem_stride, choices=(1, 2),
                   help="2 halves every feature map (4x cheaper) (default: %(default)s)")
    p.add_argument("--norm", default=defaults.norm, choices=NORMS)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--iterations", type=int, default=None,
                   help=f"optimiser steps of the run (default: {DEFAULT_ITERATIONS} unless --epochs or "
                        "--time-budget-min bound it; whichever limit comes first ends the run)")
    p.add_argument("--epochs", type=int, default=None, help="upper bound in passes over the training images "
                                                            "(default: none)")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop after this many minutes (default: none)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help="peak Adam learning rate, reached after the warm-up (default: %(default)s; on AID, 20 "
                        "minutes, it beat 1e-3 for JEM at 1, 3, 20 and all labels per class, for --baseline at 3, 20 "
                        "and all, 0.6 points short at 1: docs/science.md)")
    p.add_argument("--baseline", action="store_true", help="plain cross-entropy training of the same network")
    p.add_argument("--sgld-steps", type=int, default=sgld.steps)
    p.add_argument("--sgld-step-size", type=float, default=sgld.step_size)
    p.add_argument("--sgld-noise", type=float, default=sgld.noise)
    p.add_argument("--sgld-batch-size", type=int, default=defaults.sgld_batch_size)
    p.add_argument("--sgld-init", default=sgld.init, choices=INIT_CHOICES)
    p.add_argument("--buffer-size", type=int, default=sgld.buffer_size)
    p.add_argument("--reinit-prob", type=float, default=sgld.reinit_prob)
    p.add_argument("--energy-reg", type=float, default=defaults.energy_reg)
    p.add_argument("--weight-gen", type=float, default=defaults.weight_gen)
    p.add_argument("--consistency", type=float, nargs="?", const=1.0, default=defaults.consistency_weight,
                   metavar="WEIGHT", help="JEM + consistency: pseudo-labels on unlabelled images "
                                          "(weight of the term; the bare flag means 1.0; default: %(default)s, off)")
    p.add_argument("--consistency-threshold", type=float, default=defaults.consistency_threshold,
                   help="fixed confidence a weak view needs to become a pseudo-label (FixMatch: 0.95); default: "
                        "FreeMatch's self-adaptive class-wise thresholds")
    p.add_argument("--consistency-rampup", type=float, default=defaults.consistency_rampup, metavar="FRACTION",
                   help="the consistency weight rises linearly from 0 over this first fraction of the run "
                        "(default: %(default)s)")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help=f"early-stopping patience in epochs, with at least {MIN_VAL_FOR_SELECTION} validation images "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--metrics-json", type=Path, help="also write the test metrics here")
    p.add_argument("--checkpoint", type=Path, help="training-state checkpoint (default: OUT with .ckpt added)")
    p.add_argument("--checkpoint-every-min", type=float, default=10.0,
                   help="also checkpoint mid-epoch every this many minutes (default: %(default)s; 0 = every iteration)")
    p.add_argument("--resume", action="store_true", help="continue the killed run from its checkpoint")
    p.add_argument("--max-recoveries", type=int, default=defaults.max_recoveries,
                   help="automatic roll-backs after a divergence before giving up (default: %(default)s)")
    speed = SpeedOptions()
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors (channels_last is faster)")
    p.add_argument("--amp", default=speed.amp, choices=AMP_CHOICES,
                   help="bf16 autocast; auto = on for CUDA, off on CPU (default: %(default)s)")
    p.add_argument("--no-batch-split", action="store_true",
                   help="CPU: run each SGLD chain with intra-op threads instead of one batch slice per core")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (GPU; needs a C++ compiler on CPU)")
    add_device_option(p)
    p.set_defaults(run=run_train)

    e = subparsers.add_parser("evaluate", help="accuracy, NLL, ECE and a reliability diagram of a model",
                              description="Evaluate MODEL on DATA_DIR (the test split by the model's seed, or all).")
    e.add_argument("model", type=Path, metavar="MODEL")
    e.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    e.add_argument("--split", default="test", choices=("test", "all"),
                   help="test: the held-out split of training (same seed); all: every image")
    e.add_argument("--json", type=Path, help="write the metrics as JSON here")
    e.add_argument("--plot", type=Path, help="write a reliability diagram PNG here")
    e.add_argument("--batch-size", type=int, default=256)
    add_device_option(e)
    e.set_defaults(run=run_evaluate)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    sgld = SGLDConfig(steps=args.sgld_steps, step_size=args.sgld_step_size, noise=args.sgld_noise,
                      buffer_size=args.buffer_size, reinit_prob=args.reinit_prob, init=args.sgld_init)
    return TrainConfig(arch=args.arch, stem_stride=args.stem_stride, norm=args.norm, image_size=args.image_size,
                       iterations=args.iterations, epochs=args.epochs, time_budget_min=args.time_budget_min,
                       batch_size=args.batch_size,
                       sgld_batch_size=args.sgld_batch_size, lr=args.lr,
                       labels_per_class=args.labels_per_class or None, baseline=args.baseline,
                       energy_reg=args.energy_reg, weight_gen=args.weight_gen, patience=args.patience,
                       consistency_weight=args.consistency, consistency_threshold=args.consistency_threshold,
                       consistency_rampup=args.consistency_rampup,
                       seed=args.seed, device=args.device, sgld=sgld, max_recoveries=args.max_recoveries,
                       speed=SpeedOptions(channels_last=not args.no_channels_last, amp=args.amp, compile=args.compile,
                                          split_batches=not args.no_batch_split))


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_output_folders(args.out, args.metrics_json)
    log(f"reading {args.data_dir} at {config.image_size} px ...")
    dataset = load_class_folder(args.data_dir, config.image_size)
    ctx = distributed.init_from_env(config.device)  # joins the torchrun group, if any
    checkpoint = args.checkpoint or args.out.with_name(args.out.name + ".ckpt")
    result = train(dataset, config, out_path=args.out, progress=ProgressBar("train"), log=log,
                   checkpoint_path=checkpoint, checkpoint_every_min=args.checkpoint_every_min, resume=args.resume)
    if not ctx.is_main:
        return 0
    m = result.metrics
    log(f"test accuracy {m['accuracy']:.1%}, NLL {m['nll']:.3f}, ECE {m['ece']:.3f} "
        f"({m['count']} test images); model written to {args.out}")
    if args.metrics_json:
        write_json(args.metrics_json, m)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    check_output_folders(args.json, args.plot)
    loaded = load_model(args.model, resolve_device(args.device))
    meta = loaded.meta
    dataset = load_class_folder(args.data_dir, meta.image_size, class_names=meta.class_names)
    check_band_count(dataset.images, meta.band_names, args.data_dir)
    indices = torch.arange(len(dataset))
    if args.split == "test":
        indices = training_split(dataset.labels, meta.train_config).test
    logits = predict_logits(loaded, dataset.images[indices], batch_size=args.batch_size)
    metrics = classification_metrics(logits, dataset.labels[indices], meta.class_names)
    metrics["split"] = args.split
    print(f"accuracy {metrics['accuracy']:.1%}  NLL {metrics['nll']:.3f}  ECE {metrics['ece']:.3f}  "
          f"({metrics['count']} images, split {args.split})")
    with written_together(args.json, args.plot):
        if args.json:
            write_json(args.json, metrics)
        if args.plot:
            reliability_diagram({args.model.stem: metrics}, args.plot)
    return 0
