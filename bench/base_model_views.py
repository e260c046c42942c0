"""How a model trained on whole scenes classifies its own test images seen as mapping sees them.

`jem train` shrinks every image of a class-folder dataset to the patch size, so the bundled base model
learnt whole AID scenes at 32 px. A map patch shows something else: part of a scene, at a finer ground
resolution (the scene benchmark's 150 px tiles read at 1/2 are scenes of 75 px, of which a 32 px
patch shows 0.43 of the side). This scores the model's test split (the split its file records) seen
whole at the patch size and as patch-sized crops (centre, top-left, bottom-right) of the images loaded
at larger sizes: accuracy and the mean max p(y|x), i.e. how much it knows and how sure it thinks it is.

    python recipes/aid_landcover.py ../shared/data/aid runs/aid_landcover
    .venv/bin/python bench/base_model_views.py runs/aid_landcover --sizes 64 75 150
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from jem_core.bundled import BASE_MODEL
from jem_core.data import load_class_folder, training_split
from jem_core.model_file import LoadedModel, load_model


def views(images: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """The whole image when it is patch-sized, else three patch-sized crops of it."""
    size = images.shape[-1]
    if size == patch:
        return {"whole scene": images}
    centre = (size - patch) // 2
    return {"centre crop": images[..., centre:centre + patch, centre:centre + patch],
            "top-left crop": images[..., :patch, :patch],
            "bottom-right crop": images[..., -patch:, -patch:]}


def score(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean max p(y|x)."""
    with torch.no_grad():
        logits = torch.cat([loaded.model(loaded.normalise(batch)) for batch in images.float().split(128)])
    probabilities = logits.softmax(1)
    accuracy = (probabilities.argmax(1) == labels).float().mean().item()
    return accuracy, probabilities.max(1).values.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="the class-folder dataset the model was trained on")
    parser.add_argument("--model", type=Path, default=BASE_MODEL, help="default: the bundled base model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 75, 150],
                        help="image sizes (px) to crop patches from, besides the patch size itself")
    args = parser.parse_args()
    loaded = load_model(args.model)
    patch = loaded.meta.image_size
    test = None
    print("| image loaded at | view | share of the scene's side | accuracy | mean max p |\n|---|---|---|---|---|")
    for size in [patch, *args.sizes]:
        data = load_class_folder(args.dataset, size, class_names=loaded.meta.class_names)
        test = training_split(data.labels, loaded.meta.train_config).test if test is None else test
        for name, images in views(data.images[test], patch).items():
            accuracy, confidence = score(loaded, images, data.labels[test])
            print(f"| {size} px | {name} | {patch / size:.2f} | {accuracy:.1%} | {confidence:.3f} |", flush=True)


if __name__ == "__main__":
    main()
