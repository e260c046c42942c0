"""`make demo`: map the bundled Sentinel-2 crop of Beirut with the bundled AID-trained model.

Needs nothing outside the project (no network, no ../shared): demo/model.pt and demo/beirut/*.tif.
Writes OUT/classes.tif, OUT/confidence.tif and OUT/preview.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import JEMError
from .cli.common import ProgressBar, log
from .map_preview import render_map_preview
from .mapping import map_raster

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
BANDS = ["B04", "B03", "B02"]  # true colour, the order of the AID RGB model


def run_demo(out_dir: Path, demo_dir: Path = DEMO_DIR, stride: int = 16) -> int:
    model = demo_dir / "model.pt"
    inputs = sorted((demo_dir / "beirut").glob("*_B0[234].tif"))
    if not model.is_file() or len(inputs) != 3:
        raise JEMError(f"The demo assets are missing from '{demo_dir}' (model.pt and beirut/*_B02/B03/B04.tif). "
                       "Restore them from the repository.")
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"mapping {len(inputs)} Sentinel-2 bands ({', '.join(BANDS)}) of Beirut with {model.name}, stride {stride} px")
    result = map_raster(model, inputs, out_dir / "classes.tif", out_dir / "confidence.tif", bands=BANDS,
                        stride=stride, progress=ProgressBar("map"))
    log(f"stretch: {result.stretch}")
    log(result.summary())
    preview = render_map_preview(result.classes, result.confidence, out_dir / "preview.png", inputs=inputs,
                                 bands=BANDS, title="Beirut, Sentinel-2 L1C (crop), AID-trained JEM: "
                                                    f"{result.patch_size} px patches, stride {result.stride} px")
    print(f"demo done: {result.classes}, {result.confidence}, {preview}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--stride", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        return run_demo(args.out, stride=args.stride)
    except JEMError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
