"""`jem map`: a class map, a confidence map (p(y|x) of the mapped class) and a familiarity map −E(x) of a raster."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..confidence_box import CONFIDENCE_BOX_PATCHES
from ..files import write_json
from ..label_agreement import AGREEMENT_PLACES, AGREEMENT_SHARPNESS
from ..map_preview import render_map_preview
from ..mapping import RESOLUTIONS, map_raster
from ..raster_io import parse_band_list
from .common import ProgressBar, add_device_option, log


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "map", help="classify a raster patch by patch: class map + confidence",
        description="Slide MODEL over RASTER (one multi-band raster, or several single-band files to stack on "
                    "the finest grid) and write a class map, a confidence map (p(y|x) of the mapped class — times its "
                    "label agreement for a model from `jem retrain` — averaged over a box of overlapping patches; low "
                    "where the class map is likely wrong) and a "
                    "familiarity map −E(x) (how much each patch looks like the training data) as GeoTIFFs.")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("inputs", type=Path, nargs="+", metavar="RASTER")
    p.add_argument("--out-classes", type=Path, required=True, help="class map GeoTIFF (Byte, colour table)")
    p.add_argument("--out-confidence", type=Path,
                   help="confidence GeoTIFF (Float32, 0–1): p(y|x) of the mapped class averaged over "
                        "--confidence-box; how sure the classifier is, low where the map is likely wrong. A model "
                        "from `jem retrain` holds its labelled patches' features, and its confidence is p(y|x) times "
                        "the label agreement q_y (how much nearer, in the network's features, the cell lies to the "
                        f"labelled patches of its class than to other classes': q_y ∝ d_y^-{AGREEMENT_SHARPNESS:g}, "
                        f"d_y the mean cosine distance to the {AGREEMENT_PLACES} nearest labelled places of class "
                        "y, a place being an annotation with its shifted copies): a score, not a probability, that "
                        "ranked wrong pixels below right ones with AUROC 0.824 and 0.808 against 0.775 and 0.770 for "
                        "p(y|x) alone on two sets of six scene-benchmark retrains (docs/labelling.md)")
    p.add_argument("--out-familiarity", type=Path,
                   help="familiarity −E(x) GeoTIFF (Float32): higher = more like the training data (OOD map); "
                        "it does not mark wrong classes")
    p.add_argument("--out-probabilities", type=Path, help="p(y|x) per class, one band each (Float32)")
    p.add_argument("--bands", help="bands in the model's order, by name or 1-based index, e.g. B04,B03,B02 "
                   "(default: the model's band names; for a red/green/blue model on Sentinel-2 or Landsat band "
                   "files, the sensor's bands by what they measure; else all bands when the counts match)")
    p.add_argument("--stride", type=int, help="pixels between patches; divides the patch size (default: patch size)")
    p.add_argument("--resolution", default="patch", choices=RESOLUTIONS,
                   help="patch: one pixel per stride cell; input: the input grid (default: %(default)s)")
    p.add_argument("--target-gsd", type=float,
                   help="resample to this pixel size (raster CRS units) first (default: read the raster as the model "
                        "was trained: a model from `jem retrain --coarsen N` reads it at 1/N resolution)")
    p.add_argument("--confidence-box", type=float, default=CONFIDENCE_BOX_PATCHES, metavar="PATCHES",
                   help="side of the box the confidence averages the mapped class's score (p(y|x), or p(y|x) "
                        "times the label agreement) over, in patches (the nearest odd number of stride cells); 0, or "
                        "a stride of a whole patch, gives each cell's own score. The default ranked wrong pixels "
                        "below right ones best on the scene benchmark "
                        "(docs/labelling.md) (default: %(default)s)")
    p.add_argument("--stretch", default="auto",
                   help="auto | none | percentile[:2,98] | linear:MIN,MAX — raster values → the model's value "
                        "range; auto stretches percentiles 2–98 when an 8-bit model meets non-8-bit data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--read-ahead", type=int, default=2, help="strips a reader thread keeps ready (0: no thread)")
    p.add_argument("--json", type=Path, help="also write the run summary as JSON here")
    p.add_argument("--preview", type=Path,
                   help="also write a PNG: input, class map with legend, confidence (and familiarity when written)")
    add_device_option(p)
    p.set_defaults(run=run_map)


def run_map(args: argparse.Namespace) -> int:
    bands = parse_band_list(args.bands)
    result = map_raster(args.model, args.inputs, args.out_classes, args.out_confidence, bands=bands,
                        stride=args.stride, batch_size=args.batch_size, device=args.device,
                        out_familiarity=args.out_familiarity, out_probabilities=args.out_probabilities,
                        resolution=args.resolution, target_gsd=args.target_gsd, stretch=args.stretch,
                        confidence_box=args.confidence_box,
                        read_ahead=args.read_ahead, progress=ProgressBar("map"))
    log(f"bands {','.join(result.bands)}; stretch {result.stretch}")
    for note in result.notes:
        log(note)
    log(result.summary())
    written = [p for p in (result.classes, result.confidence, result.familiarity, result.probabilities) if p]
    log("written: " + ", ".join(str(p) for p in written))
    if args.preview:
        render_map_preview(result.classes, result.confidence, args.preview, inputs=args.inputs, bands=result.bands,
                           title=f"{args.model.name}: {result.patch_size} px patches, stride {result.stride} px",
                           familiarity_path=result.familiarity)
        log(f"preview: {args.preview}")
    if args.json:
        write_json(args.json, {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()})
    return 0
