"""`jem demo` (what `make demo` runs): map the bundled Sentinel-2 crop of Beirut with the bundled
AID-trained model.

Needs nothing outside the project checkout (no network, no ../shared): demo/model.pt and
demo/beirut/*.tif.  Writes OUT/classes.tif, OUT/confidence.tif (p(y|x) of the mapped class: low where the map is
likely wrong), OUT/familiarity.tif (−E(x): how much each patch looks like the training data) and
OUT/preview.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import JEMError
from ..map_preview import render_map_preview
from ..mapping import map_raster
from .common import ProgressBar, log

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
BANDS = ["B04", "B03", "B02"]  # true colour, the order of the AID RGB model


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="map the bundled Sentinel-2 crop of Beirut (what `make demo` runs)",
                              description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder, created if missing")
    p.add_argument("--stride", type=int, default=16, help="pixels between patches; divides the model's patch size")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="the demo assets (model.pt, beirut/*.tif)")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    model = args.demo_dir / "model.pt"
    inputs = sorted((args.demo_dir / "beirut").glob("*_B0[234].tif"))
    if not model.is_file() or len(inputs) != 3:
        raise JEMError(f"The demo assets are missing from '{args.demo_dir}' (model.pt and beirut/*_B02/B03/B04.tif). "
                       "Restore them from the repository, or point --demo-dir at them.")
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"mapping {len(inputs)} Sentinel-2 bands ({', '.join(BANDS)}) of Beirut with {model.name}, "
        f"stride {args.stride} px")
    result = map_raster(model, inputs, out_dir / "classes.tif", out_dir / "confidence.tif", bands=BANDS,
                        stride=args.stride, out_familiarity=out_dir / "familiarity.tif", progress=ProgressBar("map"))
    log(f"stretch: {result.stretch}")
    log(result.summary())
    preview = render_map_preview(result.classes, result.confidence, out_dir / "preview.png", inputs=inputs,
                                 bands=BANDS, title="Beirut, Sentinel-2 L1C (crop), AID-trained JEM: "
                                                    f"{result.patch_size} px patches, stride {result.stride} px",
                                 familiarity_path=result.familiarity)
    print(f"demo done: {result.classes}, {result.confidence}, {result.familiarity}, {preview}")
    return 0
