"""`jem retrain` (annotations + raster → semi-supervised JEM) and `jem suggest` (where to label next).

Annotation and suggestion files are read and written with OGR (GeoPackage, GeoJSON, Shapefile …),
so the CLI takes the same layers as the QGIS tools: points, or polygons such as the patch
footprints the labelling map tool draws, with the class name in a field.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import JEMError
from ..active import (
    RETRAIN_DEFAULTS,
    SUGGESTION_FIELDS,
    Annotation,
    annotation_points,
    default_start_model,
    reading_coarsen,
    retrain,
    retrain_config,
    suggest,
)
from ..files import check_output_folders, write_json, written_together
from ..model_file import load_model
from ..process_state import gdal_exceptions
from ..raster_io import no_crs_message, parse_band_list, raster_error
from ..sampler import SGLDConfig
from .common import ProgressBar, add_device_option, log

OGR_TYPES = {"int": "OFTInteger", "real": "OFTReal", "text": "OFTString"}


def register(subparsers) -> None:
    r = subparsers.add_parser("retrain", help="retrain a JEM from annotated patches of a raster (semi-supervised)",
                              description="Annotated patches are the labelled set, random patches of the raster(s) "
                                          "the unlabelled set; a starting model is fine-tuned, new classes extend it.")
    r.add_argument("rasters", nargs="+", metavar="RASTER", help="raster(s) the annotations lie on")
    r.add_argument("--annotations", type=Path, required=True, help="vector file (points or patch polygons)")
    r.add_argument("--class-field", default="class", help="field holding the class name (default: %(default)s)")
    r.add_argument("--model", type=Path,
                   help="starting model to fine-tune (default: the bundled base model when the bands fit it)")
    r.add_argument("--from-scratch", action="store_true", help="train a new network instead of fine-tuning")
    r.add_argument("--keep-model-classes", action="store_true",
                   help="the new model keeps the starting model's classes beside the labelled ones "
                        "(default: only the classes labelled this round)")
    r.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    r.add_argument("--bands", help="bands, comma separated names or 1-based indexes (default: the model's)")
    r.add_argument("--extra-data", type=Path, help="class-folder dataset whose images join the unlabelled set")
    r.add_argument("--unlabelled", type=int, default=RETRAIN_DEFAULTS.unlabelled,
                   help="patches spread over the raster(s) for the energy term (default: %(default)s)")
    r.add_argument("--minutes", type=float, default=RETRAIN_DEFAULTS.minutes,
                   help="training time; 0 = no time limit, with --iterations (default: %(default)s)")
    r.add_argument("--iterations", type=int, help="optimiser steps (default: as many as --minutes allows)")
    r.add_argument("--members", type=int,
                   help="networks trained one after the other, each for its share of --minutes/--iterations and "
                        "on its own draw of unlabelled patches, then averaged into one model (mapping costs that "
                        f"many network passes). Default: {RETRAIN_DEFAULTS.members} when fine-tuning a model (on "
                        "the scene benchmark a little more accurate and better at marking its errors than one "
                        f"network in the same time), {RETRAIN_DEFAULTS.members_from_scratch} for a new network "
                        "(--from-scratch: it needs the whole budget)")
    r.add_argument("--label-shift", type=int,
                   help="each annotation also labels the 8 patches shifted by ±this many pixels (default: a quarter "
                        "of the patch size; 0: the annotated patch only)")
    r.add_argument("--coarsen", type=int, metavar="N",
                   help="read the raster(s) at 1/N of their resolution, averaging N × N pixels, so each patch sees "
                        "N times more ground; the model remembers it and `jem map`/`jem suggest` read the same way "
                        f"(default: a --model retrained with its own N keeps it, else {RETRAIN_DEFAULTS.coarsen}: "
                        "+5 points over reading as-is on the scene benchmark, docs/labelling.md; 1 = as they are)")
    r.add_argument("--consistency", type=float, nargs="?", const=1.0, default=0.0, metavar="WEIGHT",
                   help="add consistency training on the unlabelled patches: pseudo-labels above FreeMatch's "
                        "self-adaptive thresholds, the weight rising from 0 over the first half of the run "
                        "(weight of the term; the bare flag means 1.0; default: %(default)s, off)")
    r.add_argument("--baseline", action="store_true", help="cross-entropy only, no energy term (for comparison)")
    r.add_argument("--image-size", type=int, default=RETRAIN_DEFAULTS.image_size,
                   help="patch size of a new model (default: %(default)s)")
    r.add_argument("--arch", default=RETRAIN_DEFAULTS.arch, help="architecture of a new model (default: %(default)s)")
    r.add_argument("--lr", type=float, default=RETRAIN_DEFAULTS.lr,
                   help="peak learning rate (default: %(default)s; half or twice it mapped no better on the scene "
                        "benchmark: docs/labelling.md)")
    r.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_device_option(r)
    r.set_defaults(run=run_retrain)

    s = subparsers.add_parser("suggest", help="the patches of a raster most worth labelling next",
                              description="Scores every patch by unfamiliarity (high energy E(x)) and uncertainty "
                                          "(predictive entropy) and picks the best, spread over the scene.")
    s.add_argument("model", type=Path, metavar="MODEL")
    s.add_argument("raster", nargs="+", metavar="RASTER", help="one raster, or single-band files to stack")
    s.add_argument("--count", type=int, default=10)
    s.add_argument("--min-distance", type=float, help="least spacing between suggestions in pixels (default: auto)")
    s.add_argument("--bands", help="bands, comma separated names or 1-based indexes (default: the model's)")
    s.add_argument("--out", type=Path, required=True, help="vector file of the patch footprints (.gpkg, .geojson)")
    s.add_argument("--json", type=Path, help="also write the suggestions as JSON")
    s.add_argument("--annotations", type=Path,
                   help="labels you have already (the vector file of your last retrain): no suggestion overlaps "
                        "a patch they label (default: none; on the scene benchmark a second or third round "
                        "without them put up to 3 of its 20 suggestions on patches labelled already)")
    s.add_argument("--class-field", default="class", help="class field of --annotations (default: %(default)s)")
    s.set_defaults(run=run_suggest)


def raster_grid(path: str) -> tuple[str, float, float]:
    """The raster's CRS (WKT) and pixel size."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as src:
            return (src.crs.to_wkt() if src.crs else ""), abs(src.transform.a), abs(src.transform.e)
    except RasterioIOError as error:
        raise raster_error(error) from None


@gdal_exceptions()
def read_annotations(path: Path, class_field: str, raster_wkt: str, cell_width: float,
                     cell_height: float) -> list[Annotation]:
    """Points and polygons of a vector file as Annotations in the raster's CRS (reprojected if needed)."""
    from osgeo import ogr, osr

    try:
        source = ogr.Open(str(path))
    except RuntimeError as error:
        source, detail = None, str(error)[:200]
    else:
        detail = "not a vector file GDAL/OGR can open"
    if source is None or source.GetLayerCount() == 0:
        raise JEMError(f"Cannot read the annotations '{path}': {detail}. Use a GeoPackage, Shapefile or GeoJSON "
                       "of points or polygons.")
    layer = source.GetLayer(0)
    definition = layer.GetLayerDefn()
    names = [definition.GetFieldDefn(i).GetName() for i in range(definition.GetFieldCount())]
    if class_field not in names:
        raise JEMError(f"'{path}' has no field '{class_field}' (its fields: {', '.join(names) or 'none'}). "
                       "Name the class field with --class-field.")
    transform = None
    if layer.GetSpatialRef() is not None and raster_wkt:
        source_srs, target = layer.GetSpatialRef().Clone(), osr.SpatialReference(wkt=raster_wkt)
        for srs in (source_srs, target):  # x = easting/longitude, whatever the CRS's axis order
            srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        if not source_srs.IsSame(target):
            transform = osr.CoordinateTransformation(source_srs, target)
    annotations = []
    for feature in layer:
        name = (feature.GetField(class_field) or "").strip() if feature.IsFieldSet(class_field) else ""
        geometry = feature.GetGeometryRef()
        if not name or geometry is None or not geometry.IsValid():
            problem = "no class" if not name else "no geometry" if geometry is None else "an invalid geometry"
            fix = " (QGIS: Vector ▸ Geometry Tools ▸ Fix Geometries; GDAL: ogr2ogr -makevalid)" if name and geometry \
                else ""
            raise JEMError(f"Feature {feature.GetFID()} of '{path}' has {problem}. Fix{fix} or delete it.")
        geometry = geometry.Clone()
        if transform is not None:
            geometry.Transform(transform)
        annotations += ogr_annotation_points(name, geometry, cell_width, cell_height)
    return annotations


def ogr_annotation_points(name: str, geometry, cell_width: float, cell_height: float) -> list[Annotation]:
    from osgeo import ogr

    if geometry.GetDimension() == 0:
        points = [geometry.GetPoint_2D(i) for i in range(geometry.GetPointCount())] or \
            [geometry.GetGeometryRef(i).GetPoint_2D() for i in range(geometry.GetGeometryCount())]
        return annotation_points(name, cell_width, cell_height, points=points)
    xmin, xmax, ymin, ymax = geometry.GetEnvelope()
    return annotation_points(
        name, cell_width, cell_height, bounds=(xmin, ymin, xmax, ymax),
        contains=lambda x, y: geometry.Contains(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})")),
        inner_point=lambda: geometry.PointOnSurface().GetPoint_2D())


def run_retrain(args: argparse.Namespace) -> int:
    check_output_folders(args.out)
    if args.model and args.from_scratch:
        raise JEMError("--model and --from-scratch exclude each other: fine-tune a model, or train a new one.")
    if not args.minutes and not args.iterations:
        raise JEMError("--minutes 0 needs --iterations: give the run a length.")
    bands = parse_band_list(args.bands)
    start = load_model(args.model) if args.model else \
        None if args.from_scratch else default_start_model(args.rasters, bands, log)
    patch_size = start.meta.image_size if start else args.image_size
    coarsen = reading_coarsen(start.meta if start else None, args.coarsen)
    wkt, pixel_x, pixel_y = raster_grid(args.rasters[0])
    if not wkt:
        raise JEMError(no_crs_message(f"Raster '{args.rasters[0]}'", "the annotations cannot be placed on it"))
    footprint = coarsen * patch_size  # raster pixels a patch covers
    annotations = read_annotations(args.annotations, args.class_field, wkt, pixel_x * footprint, pixel_y * footprint)
    config = retrain_config(args.minutes or None, args.iterations, arch=args.arch, image_size=patch_size, lr=args.lr,
                            seed=args.seed, device=args.device, baseline=args.baseline,
                            consistency_weight=args.consistency,
                            sgld=SGLDConfig(buffer_size=args.unlabelled))
    result = retrain(args.rasters, annotations, start_model=start, keep_model_classes=args.keep_model_classes,
                     extra_dataset=args.extra_data, out_model=args.out, config=config, bands=bands,
                     unlabelled_count=args.unlabelled, label_shift=args.label_shift, coarsen=coarsen,
                     members=args.members, progress=ProgressBar("retrain"), log=log)
    log(f"classes {', '.join(result.class_names)}; fits {result.labelled_accuracy:.0%} of the "
        f"{result.labelled_count} annotated patches after {result.metrics['iterations']} iterations; model written "
        f"to {args.out}")
    return 0


def run_suggest(args: argparse.Namespace) -> int:
    check_output_folders(args.out, args.json)
    raster = args.raster[0] if len(args.raster) == 1 else args.raster
    model = load_model(args.model)
    wkt, pixel_x, pixel_y = raster_grid(args.raster[0])
    footprint = model.meta.coarsen * model.meta.image_size  # raster pixels a patch covers
    labelled = [] if args.annotations is None else \
        read_annotations(args.annotations, args.class_field, wkt, pixel_x * footprint, pixel_y * footprint)
    suggestions = suggest(model, raster, args.count, min_distance=args.min_distance,
                          bands=parse_band_list(args.bands), labelled=[(a.x, a.y) for a in labelled],
                          progress=ProgressBar("score"))
    with written_together(args.out, args.json):
        write_vector_atomically(args.out, lambda tmp: write_suggestions(tmp, suggestions, wkt, args.out.suffix))
        if args.json:
            write_json(args.json, [s.to_dict() for s in suggestions])
    for s in suggestions:
        print(f"{s.rank:3d}  x {s.x:.8g}  y {s.y:.8g}  score {s.score:.2f}  (unfamiliar {s.unfamiliarity:.2f}, "
              f"uncertain {s.uncertainty:.2f})  -E {s.neg_energy:.2f}  entropy {s.entropy:.2f}  "
              f"predicted {s.predicted_class} {s.confidence:.0%}")
    log(f"{len(suggestions)} suggestions written to {args.out}")
    return 0


def write_vector_atomically(path: Path, write) -> None:
    """write(tmp) to a hidden name with the real extension (OGR picks the format by it), then rename."""
    if not path.parent.is_dir():
        raise JEMError(f"Output folder '{path.parent}' does not exist. Create it or choose another path.")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (RuntimeError, OSError) as error:
        detail = str(getattr(error, "strerror", None) or error)[:200] or "the driver reported a failure"
        raise JEMError(f"Could not write '{path}': {detail}. Check the free space and write permission there, and "
                       "the extension (.gpkg, .geojson, .shp).") from None
    finally:
        tmp.unlink(missing_ok=True)


@gdal_exceptions()
def write_suggestions(path: str, suggestions, wkt: str, suffix: str) -> None:
    """Patch footprint polygons with the score fields and an empty class field, in the raster's CRS."""
    from osgeo import ogr, osr

    driver = {".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile"}.get(suffix.lower(), "GPKG")
    dataset = ogr.GetDriverByName(driver).CreateDataSource(path)
    srs = osr.SpatialReference(wkt=wkt) if wkt else None
    layer = dataset.CreateLayer("suggestions", srs, ogr.wkbPolygon)
    for name, kind in SUGGESTION_FIELDS + [("class", "text")]:
        layer.CreateField(ogr.FieldDefn(name, getattr(ogr, OGR_TYPES[kind])))
    for s in suggestions:
        feature = ogr.Feature(layer.GetLayerDefn())
        for name, _ in SUGGESTION_FIELDS:
            feature.SetField(name, getattr(s, name))
        xmin, ymin, xmax, ymax = s.bounds
        feature.SetGeometry(ogr.CreateGeometryFromWkt(
            f"POLYGON (({xmin} {ymin}, {xmax} {ymin}, {xmax} {ymax}, {xmin} {ymax}, {xmin} {ymin}))"))
        layer.CreateFeature(feature)
    dataset = None
