"""The AID land-cover recipe of the bundled base model: 30 AID scene classes grouped into 8 land-cover
classes, and a fixed hold-out of AID images that the base model never sees.

    python recipes/aid_landcover.py ../shared/data/aid runs/aid_landcover

links every training image (not held out) into runs/aid_landcover/<land-cover class>/, ready for
`jem train`.  A benchmark scoring such a model on AID must build its test scenes from the held-out
images only (is_held_out), so the model is never scored on images it saw.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from itertools import zip_longest
from pathlib import Path

# Land-cover class → the AID scene classes it holds.  Scene classes are grouped by what covers most of
# a 300 m patch seen from above, so the legend reads as a land-cover map.
LANDCOVER_GROUPS: dict[str, list[str]] = {
    "Water": ["Beach", "Pond", "River"],
    "Forest": ["Forest", "Mountain"],
    "Cropland-Meadow": ["Farmland", "Meadow"],
    "Bare": ["BareLand", "Desert"],
    "Dense-urban": ["Center", "Church", "Commercial", "DenseResidential", "School", "Square"],
    "Residential": ["MediumResidential", "SparseResidential", "Resort"],
    "Industrial-Transport": ["Airport", "Bridge", "Industrial", "Parking", "Port", "RailwayStation",
                             "StorageTanks", "Viaduct"],
    "Parks-Sports": ["BaseballField", "Park", "Playground", "Stadium"],
}
HELD_OUT_PERCENT = 30  # of every AID class, chosen by a hash of the file name
# At most this many images per land-cover class, taken in turns from its scene classes: without a cap the
# 8-class group outnumbers Forest 5 to 1 and the model leans towards it.
MAX_PER_CLASS = 700


def is_held_out(image: Path) -> bool:
    """True for the AID images no bundled model is trained on (stable across machines and Python runs)."""
    return zlib.crc32(image.name.encode()) % 100 < HELD_OUT_PERCENT


def training_images(aid_dir: Path, scene_classes: list[str]) -> list[tuple[str, Path]]:
    """(scene class, image) pairs of one land-cover class, taken in turns from its scene classes."""
    per_class = []
    for scene_class in scene_classes:
        folder = aid_dir / scene_class
        if not folder.is_dir():
            sys.exit(f"error: '{folder}' is missing: give the AID folder (one sub-folder per scene class).")
        per_class.append([(scene_class, p) for p in sorted(folder.iterdir()) if p.is_file() and not is_held_out(p)])
    interleaved = [pair for turn in zip_longest(*per_class) for pair in turn if pair is not None]
    return interleaved[:MAX_PER_CLASS]


def build(aid_dir: Path, out_dir: Path) -> dict[str, int]:
    """Symlink the training images into out_dir/<land-cover class>/; returns the count per class."""
    counts: dict[str, int] = {}
    for group, scene_classes in LANDCOVER_GROUPS.items():
        target = out_dir / group
        target.mkdir(parents=True, exist_ok=True)
        images = training_images(aid_dir, scene_classes)
        for scene_class, image in images:
            link = target / f"{scene_class}_{image.name}"
            if not link.exists():
                link.symlink_to(image.resolve())
        counts[group] = len(images)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("aid_dir", type=Path, help="AID class folders (e.g. ../shared/data/aid)")
    parser.add_argument("out_dir", type=Path, help="folder to fill with land-cover class folders of links")
    args = parser.parse_args()
    for group, count in build(args.aid_dir, args.out_dir).items():
        print(f"{group:22s} {count:5d} images")


if __name__ == "__main__":
    main()
