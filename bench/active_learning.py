"""One round of active learning on AID: labelling suggested patches vs random patches.

Round 0: semi-supervised JEM from K labels per class (the rest of the pool unlabelled).
Round 1: fine-tune that model after adding N labels, chosen
  - "suggested": by the suggest score of jem_core.active (mean percentile of high energy E(x) and
    high predictive entropy), spread over the predicted classes (at most ⌈N / classes⌉ per
    predicted class: AID images have no map position, so class spread stands in for the spatial
    spacing `suggest` uses on a raster);
  - "random": N pool images drawn at random (two draws);
  - "none": no new labels, the same fine-tuning (separates the labels' effect from more training).
Accuracy is measured on a held-out test split that no arm ever sees.

    .venv/bin/python bench/active_learning.py --data ../shared/data/aid \\
        --json docs/active_learning.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jem_core.active import priority, retrain_on_patches, uncertainty_scores
from jem_core.data import SceneDataset, choose_labelled, load_class_folder, split_dataset
from jem_core.metrics import classification_metrics, predict_logits
from jem_core.sampler import SGLDConfig
from jem_core.training import TrainConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="AID class-folder dataset")
    p.add_argument("--classes", type=int, default=10, help="use this many AID classes (every k-th by name)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--initial", type=int, default=3, help="labels per class in round 0")
    p.add_argument("--add", type=int, default=30, help="labels added in round 1")
    p.add_argument("--epochs0", type=int, default=6, help="round-0 epochs (over the whole pool)")
    p.add_argument("--epochs1", type=int, default=4, help="round-1 fine-tuning epochs")
    p.add_argument("--lr0", type=float, default=1e-3, help="round-0 learning rate")
    p.add_argument("--lr1", type=float, default=3e-4, help="round-1 (fine-tuning) learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="none,suggested,random #1,random #2", help="round-1 arms to run")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args()


def load_subset(root: Path, classes: int, size: int) -> SceneDataset:
    """Every k-th class folder (sorted by name), read through a folder of symlinks."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    step = max(1, len(folders) // classes)
    chosen = folders[::step][:classes]
    with tempfile.TemporaryDirectory() as tmp:
        for folder in chosen:
            (Path(tmp) / folder.name).symlink_to(folder.resolve())
        return load_class_folder(tmp, size)


def subset(dataset: SceneDataset, indices: torch.Tensor) -> SceneDataset:
    return SceneDataset(dataset.images[indices], dataset.labels[indices], dataset.class_names,
                        dataset.band_names, dataset.value_range, [dataset.paths[i] for i in indices.tolist()])


def suggested(loaded, dataset: SceneDataset, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best-scoring candidates, at most ⌈count / classes⌉ per predicted class."""
    scores = uncertainty_scores(predict_logits(loaded, dataset.images[candidates]))
    order = priority(scores)["score"].argsort(descending=True)
    cap = math.ceil(count / dataset.num_classes)
    taken: list[int] = []
    per_class = torch.zeros(dataset.num_classes, dtype=torch.long)
    for i in order.tolist():
        predicted = int(scores["predicted"][i])
        if per_class[predicted] < cap:
            taken.append(i)
            per_class[predicted] += 1
        if len(taken) == count:
            break
    return candidates[torch.tensor(taken)]


def evaluate(loaded, dataset: SceneDataset, test: torch.Tensor) -> dict[str, float]:
    m = classification_metrics(predict_logits(loaded, dataset.images[test]), dataset.labels[test], dataset.class_names)
    return {"accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    start = time.monotonic()
    dataset = load_subset(args.data, args.classes, args.image_size)
    split = split_dataset(dataset.labels, args.seed, val_fraction=0.0, test_fraction=0.3)
    pool, test = split.train, split.test
    labelled0 = choose_labelled(pool, dataset.labels, args.initial, args.seed)
    print(f"{dataset.num_classes} classes ({', '.join(dataset.class_names)}), {len(pool)} pool, {len(test)} test, "
          f"{len(labelled0)} initial labels; loaded in {time.monotonic() - start:.0f} s", flush=True)

    sgld = SGLDConfig(steps=5, buffer_size=2000)
    base = TrainConfig(arch="wrn-10-2", stem_stride=2, image_size=args.image_size, batch_size=32, sgld_batch_size=16,
                       warmup_iters=20, seed=args.seed, device="cpu", sgld=sgld)

    def run(labelled: torch.Tensor, start_model, epochs: int, lr: float, name: str) -> tuple[object, dict]:
        t0 = time.monotonic()
        unlabelled = pool[~torch.isin(pool, labelled)]
        result = retrain_on_patches(subset(dataset, labelled), dataset.images[unlabelled], start_model=start_model,
                                    config=TrainConfig(**{**base.__dict__, "epochs": epochs, "lr": lr}))
        row = {"arm": name, "labels": len(labelled), **evaluate(result.loaded, dataset, test),
               "minutes": round((time.monotonic() - t0) / 60, 2)}
        print(json.dumps(row), flush=True)
        return result.loaded, row

    model0, row0 = run(labelled0, None, args.epochs0, args.lr0, "round 0")
    candidates = pool[~torch.isin(pool, labelled0)]
    wrong0 = predict_logits(model0, dataset.images[candidates]).argmax(1) != dataset.labels[candidates]
    generator = torch.Generator().manual_seed(args.seed + 100)
    picks = {"none": candidates[:0], "suggested": suggested(model0, dataset, candidates, args.add)}
    for draw in (1, 2):
        picks[f"random #{draw}"] = candidates[torch.randperm(len(candidates), generator=generator)[:args.add]]
    rows = [row0]
    for name, added in picks.items():
        if name not in args.arms.split(","):
            continue
        _, row = run(torch.cat([labelled0, added]), model0, args.epochs1, args.lr1, name)
        was_wrong = wrong0[torch.isin(candidates, added)]
        row.update(added=len(added), added_classes=int(dataset.labels[added].unique().numel()),
                   added_misclassified_by_round0=float(was_wrong.double().mean()) if len(added) else None)
        rows.append(row)

    print(f"\n{'arm':12s} {'labels':>6s} {'test acc':>9s} {'NLL':>6s} {'ECE':>6s} {'classes added':>13s} "
          f"{'added wrong@r0':>14s} {'min':>5s}")
    for r in rows:
        wrong = r.get("added_misclassified_by_round0")
        print(f"{r['arm']:12s} {r['labels']:6d} {r['accuracy']:9.1%} {r['nll']:6.3f} {r['ece']:6.3f} "
              f"{r.get('added_classes', '-')!s:>13s} {'-' if wrong is None else f'{wrong:.0%}':>14s} "
              f"{r['minutes']:5.1f}")
    print(f"total {(time.monotonic() - start) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "classes": dataset.class_names, "pool": len(pool), "test": len(test),
                                         "train_config": base.to_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
