"""Hostile inputs for every entry point, built small on disk; shared by the tests and bench/hostile_inputs_table.py.

`build_inputs(root)` writes every bad input (and the good ones they are compared with) under root.
`CLI_CASES` lists (command, bad input, argv, expected message) for `jem_core.cli.main`; every case
must end in exit status 2, one error line naming the problem, and an output folder left empty.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PATCH = 16
RGB = ["red", "green", "blue"]
# A raster header may declare this many pixels a side in a file of a few hundred bytes.
HUGE_SIDE = 1_000_000


def write_raster(path: Path, pixels: np.ndarray, *, crs: str | None = "EPSG:32633", nodata: float | None = None,
                 options: list[str] | None = None) -> Path:
    """pixels (bands, H, W) as a GeoTIFF with GDAL; 10 m pixels at (500000, 4100000) when crs is set."""
    from osgeo import gdal, osr

    gdal.UseExceptions()
    kind = {np.dtype("uint8"): gdal.GDT_Byte, np.dtype("uint16"): gdal.GDT_UInt16,
            np.dtype("float32"): gdal.GDT_Float32}[pixels.dtype]
    bands, height, width = pixels.shape
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, kind, options or [])
    if crs is not None:
        dataset.SetGeoTransform((500000.0, 10.0, 0.0, 4100000.0, 0.0, -10.0))
        srs = osr.SpatialReference()
        srs.SetFromUserInput(crs)
        dataset.SetProjection(srs.ExportToWkt())
    for band in range(bands):
        if nodata is not None:
            dataset.GetRasterBand(band + 1).SetNoDataValue(nodata)
        dataset.GetRasterBand(band + 1).WriteArray(pixels[band])
    dataset = None
    return path


def rgb_pixels(width: int = 64, height: int = 64, bands: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (bands, height, width)).astype(np.uint8)


def write_huge_tiff(path: Path) -> Path:
    """A 500-byte GeoTIFF (EPSG:32633, 10 m) whose header declares HUGE_SIDE² RGB pixels in one 16-byte strip."""
    import struct

    at = {"bits": 300, "scale": 320, "tie": 350, "keys": 400, "strip": 450}
    geokeys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]
    # (tag, TIFF type, count, value or offset): 3 = SHORT, 4 = LONG, 12 = DOUBLE
    tags = [(256, 4, 1, HUGE_SIDE), (257, 4, 1, HUGE_SIDE), (258, 3, 3, at["bits"]), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, at["strip"]), (277, 3, 1, 3), (278, 4, 1, HUGE_SIDE), (279, 4, 1, 16), (284, 3, 1, 1),
            (33550, 12, 3, at["scale"]), (33922, 12, 6, at["tie"]), (34735, 3, len(geokeys), at["keys"])]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in tags) + struct.pack("<I", 0)
    blocks = {"bits": struct.pack("<3H", 8, 8, 8), "scale": struct.pack("<3d", 10.0, 10.0, 0.0),
              "tie": struct.pack("<6d", 0, 0, 0, 500000.0, 4100000.0, 0),
              "keys": struct.pack(f"<{len(geokeys)}H", *geokeys),
              "strip": b"\x11" * 16}
    data = bytearray(b"II*\x00" + struct.pack("<I", 8) + ifd)
    for name, block in blocks.items():
        data += bytes(at[name] - len(data)) + block
    path.write_bytes(bytes(data))
    return path


def write_huge_vrt(path: Path, source: Path) -> Path:
    """A 3-band VRT declaring HUGE_SIDE² px over a small source raster."""
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="0">{source}'
        f'</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>' for b in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{HUGE_SIDE}" rasterYSize="{HUGE_SIDE}"><SRS>EPSG:32633</SRS>'
                    f'<GeoTransform>500000, 10, 0, 4100000, 0, -10</GeoTransform>{bands}</VRTDataset>')
    return path


def truncate(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def write_model(path: Path, bands: list[str] | None = None, classes: tuple[str, ...] = ("class_a", "class_b")) -> Path:
    """An untrained (but valid) JEM model file of PATCH px patches."""
    from jem_core.model_file import ModelMeta, save_model
    from jem_core.models import ModelSpec, build_model

    bands = bands or RGB
    model = build_model(ModelSpec(arch="wrn-10-1", in_channels=len(bands), num_classes=len(classes)))
    meta = ModelMeta(list(classes), list(bands), PATCH, [127.0] * len(bands), [64.0] * len(bands))
    save_model(path, model, meta)
    return path


def write_bad_models(root: Path, good: Path) -> dict[str, Path]:
    import torch

    text = root / "not_a_model.pt"
    text.write_text("this is a text file, not a model\n")
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = 99
    future = root / "future.pt"
    torch.save(payload, future)
    payload = torch.load(good, weights_only=True)
    payload["labelled_features"] = {"features": torch.zeros(2, 3), "labels": torch.tensor([0, 7])}
    damaged = root / "damaged_labelled.pt"
    torch.save(payload, damaged)
    return {"model: not a model (text)": text, "model: truncated": truncate(good, root / "truncated.pt"),
            "model: PyTorch file, not JEM": foreign, "model: future format version": future,
            "model: damaged labelled features": damaged, "model: missing file": root / "missing.pt"}


def write_class_folder(root: Path, classes: int = 2, per_class: int = 10, bands: int = 3, size: int = PATCH) -> Path:
    from tests.conftest import make_class_folder

    return make_class_folder(root, classes=classes, per_class=per_class, size=size, bands=bands,
                             suffix=".png" if bands == 3 else ".tif")


def build_inputs(root: Path) -> dict[str, Path]:
    """Every input the cases use, by name."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = write_raster(root / "good.tif", rgb_pixels())
    floats = rng.uniform(0, 255, (3, 64, 64)).astype(np.float32)
    floats[:, :20, :20] = np.nan
    floats[1, 40:, 40:] = np.inf
    all_nan = np.full((3, 64, 64), np.nan, np.float32)
    uncompressed = write_raster(root / "uncompressed.tif", rgb_pixels(256, 256))
    inputs = {
        "good raster": good,
        "raster: corrupt bytes": root / "corrupt.tif",
        "raster: truncated GeoTIFF": truncate(uncompressed, root / "truncated.tif", 0.3),
        "raster: no CRS": write_raster(root / "no_crs.tif", rgb_pixels(), crs=None),
        "raster: smaller than one patch": write_raster(root / "small.tif", rgb_pixels(8, 8)),
        "raster: all nodata": write_raster(root / "all_nodata.tif", np.zeros((3, 64, 64), np.uint8), nodata=0),
        "raster: NaN/Inf pixels (float)": write_raster(root / "nan_inf.tif", floats),
        "raster: all NaN (float)": write_raster(root / "all_nan.tif", all_nan),
        "raster: 1 band vs RGB model": write_raster(root / "one_band.tif", rgb_pixels(bands=1)),
        "raster: 16 bands vs RGB model": write_raster(root / "sixteen_bands.tif", rgb_pixels(bands=16)),
        "raster: TIFF header declaring 10^6 x 10^6 px": write_huge_tiff(root / "huge.tif"),
        "raster: VRT declaring 10^6 x 10^6 px": write_huge_vrt(root / "huge.vrt", good),
        "raster: JPEG that is not an image": root / "not_an_image.jpg",
        "raster: missing file": root / "missing.tif",
        "good model": write_model(root / "model.pt"),
        "good dataset": write_class_folder(root / "scenes"),
    }
    inputs["raster: corrupt bytes"].write_bytes(os.urandom(4096))
    inputs["raster: JPEG that is not an image"].write_text("<html>404 not found</html>\n")
    uncompressed.unlink()
    inputs.update(write_bad_models(root, inputs["good model"]))
    inputs["good annotations"] = write_annotations(root / "annotations.gpkg")
    inputs["annotations: invalid geometry"] = write_annotations(root / "bow_tie.gpkg", invalid=True)
    inputs["annotations: not a vector file"] = inputs["raster: JPEG that is not an image"]
    inputs.update(bad_datasets(root))
    return inputs


def bad_datasets(root: Path) -> dict[str, Path]:
    not_image = write_class_folder(root / "ds_not_image")
    (not_image / "class_a" / "zz_broken.jpg").write_text("<html>404 not found</html>\n")
    huge = write_class_folder(root / "ds_huge")
    write_huge_tiff(huge / "class_b" / "zz_huge.tif")
    truncated = write_class_folder(root / "ds_truncated")
    big = write_raster(root / "big.tif", rgb_pixels(256, 256))
    truncate(big, truncated / "class_a" / "zz_truncated.tif", 0.3)
    big.unlink()
    one_band = write_class_folder(root / "ds_one_band", bands=1)
    empty = root / "ds_empty"
    empty.mkdir()
    return {"dataset: JPEG that is not an image": not_image,
            "dataset: image declaring 10^6 x 10^6 px": huge,
            "dataset: truncated GeoTIFF": truncated,
            "dataset: 1-band images vs RGB model": one_band,
            "dataset: no class folders": empty,
            "dataset: missing folder": root / "ds_missing"}


@dataclass
class CliCase:
    command: str
    bad_input: str
    argv: Callable[[dict[str, Path], Path], list[str]]  # (inputs, empty output folder) → argv
    message: str  # regex the error line must match
    setup: Callable | None = None  # setup(monkeypatch, inputs, out): simulate disk full, permissions
    # Run in a subprocess whose files may not grow past this many bytes (RLIMIT_FSIZE): every write past
    # it fails (EFBIG) deep inside GDAL, as on a full disk.
    file_size_limit: int | None = None


Argv = Callable[[dict[str, Path], Path], list[str]]  # (inputs, empty output folder) → argv


def map_argv(raster: str = "good raster", model: str = "good model") -> Argv:
    return lambda inputs, out: ["map", str(inputs[model]), str(inputs[raster]), "--out-classes",
                                str(out / "classes.tif"), "--out-confidence", str(out / "confidence.tif"),
                                "--out-familiarity", str(out / "familiarity.tif"), "--read-ahead", "0"]


def evaluate_argv(dataset: str = "good dataset", model: str = "good model",
                  extra: Callable[[Path], list[str]] | None = None) -> Argv:
    return lambda inputs, out: ["evaluate", str(inputs[model]), str(inputs[dataset]), "--split", "all",
                                "--json", str(out / "metrics.json"), *(extra(out) if extra else [])]


def train_argv(dataset: str = "good dataset", out_name: str = "model.pt") -> Argv:
    return lambda inputs, out: ["train", str(inputs[dataset]), "--out", str(out / out_name), "--image-size",
                                str(PATCH), "--epochs", "1", "--arch", "wrn-10-1", "--baseline", "--batch-size", "4",
                                "--device", "cpu"]


def ood_argv(compare: str = "good raster", model: str = "good model", dataset: str = "good dataset",
             out_name: str = "ood.json") -> Argv:
    return lambda inputs, out: ["ood", str(inputs[model]), "--reference", str(inputs[dataset]), "--reference-split",
                                "all", "--compare", str(inputs[compare]), "--json", str(out / out_name),
                                "--plot", str(out / "ood.png"), "--device", "cpu"]


def sample_argv(model: str = "good model", out_name: str = "samples.png") -> Argv:
    return lambda inputs, out: ["sample", str(inputs[model]), "--out", str(out / out_name), "--per-class", "1",
                                "--steps", "2", "--unconditional-count", "2", "--device", "cpu"]


def report_argv(model: str = "good model", dataset: str = "good dataset", out_name: str = "report.html") -> Argv:
    return lambda inputs, out: ["report", str(inputs[model]), "--out", str(out / out_name), "--data",
                                str(inputs[dataset]), "--no-samples", "--device", "cpu"]


def retrain_argv(raster: str = "good raster", annotations: str = "good annotations", model: str = "good model",
                 out_name: str = "retrained.pt") -> Argv:
    return lambda inputs, out: ["retrain", str(inputs[raster]), "--annotations", str(inputs[annotations]),
                                "--out", str(out / out_name), "--iterations", "1", "--unlabelled", "8",
                                "--image-size", str(PATCH), "--arch", "wrn-10-1", "--device", "cpu",
                                "--model", str(inputs[model])]


def suggest_argv(raster: str = "good raster", model: str = "good model", out_name: str = "suggestions.gpkg") -> Argv:
    return lambda inputs, out: ["suggest", str(inputs[model]), str(inputs[raster]), "--count", "3",
                                "--out", str(out / out_name)]


def write_annotations(path: Path, invalid: bool = False) -> Path:
    """A GeoPackage of labelled points on the good raster (EPSG:32633); invalid adds a self-crossing polygon."""
    from osgeo import ogr, osr

    ogr.UseExceptions()
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    dataset = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = dataset.CreateLayer("annotations", srs, ogr.wkbUnknown)
    layer.CreateField(ogr.FieldDefn("class", ogr.OFTString))
    shapes = [("class_a", "POINT (500100 4099900)"), ("class_b", "POINT (500500 4099500)")]
    if invalid:  # a bow tie: its edges cross, GEOS calls it invalid
        shapes.append(("class_a", "POLYGON ((500200 4099800, 500400 4099600, 500400 4099800, 500200 4099600, "
                                  "500200 4099800))"))
    for name, wkt in shapes:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("class", name)
        feature.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        layer.CreateFeature(feature)
    dataset = None
    return path


def disk_full(monkeypatch, inputs, out) -> None:
    """Every file write through Python, torch and GDAL fails as on a full disk (ENOSPC)."""
    import errno

    import torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(Path, "write_bytes", full)


def unreadable_dataset(monkeypatch, inputs, out) -> None:
    """Listing the dataset folder raises PermissionError, as chmod 000 does for a non-root user."""
    target = inputs["good dataset"]
    original = Path.iterdir

    def iterdir(self):
        if self == target or self.parent == target:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


RASTER_CASES = [  # (input, message); "no CRS" only where outputs are placed on the ground
    ("raster: corrupt bytes", r"Cannot read"),
    ("raster: truncated GeoTIFF", r"truncated.tif"),
    ("raster: smaller than one patch", r"8 ?× ?8 px.*smaller than"),
    ("raster: all nodata", r"nodata"),
    ("raster: all NaN (float)", r"nodata"),
    ("raster: 1 band vs RGB model", r"1 band\(s\).*expects 3"),
    ("raster: 16 bands vs RGB model", r"16 band\(s\).*expects 3"),
    ("raster: JPEG that is not an image", r"Cannot read"),
    ("raster: TIFF header declaring 10^6 x 10^6 px", r"huge.tif"),
    ("raster: missing file", r"does not exist|No such file"),
]
NO_CRS = ("raster: no CRS", r"no coordinate reference system")
MODEL_CASES = [
    ("model: not a model (text)", r"not a readable JEM-EO model"),
    ("model: truncated", r"truncated"),
    ("model: PyTorch file, not JEM", r"not a JEM-EO model file"),
    ("model: future format version", r"version 99"),
    ("model: damaged labelled features", r"labelled features in model file .*damaged_labelled.pt. do not fit"),
    ("model: missing file", r"does not exist"),
]
DATASET_CASES = [
    ("dataset: JPEG that is not an image", r"zz_broken.jpg"),
    ("dataset: image declaring 10^6 x 10^6 px", r"zz_huge.tif.*too large"),
    ("dataset: truncated GeoTIFF", r"zz_truncated.tif"),
    ("dataset: no class folders", r"No class folders"),
    ("dataset: missing folder", r"does not exist"),
]
MISSING_FOLDER = "output folder does not exist"
DISK_FULL = "disk full while writing"
NO_SPACE = r"No space left on device"


def cases_for(command: str, argv: Callable[..., Argv], *, raster: bool = False, model: bool = True,
              dataset: bool = False, out_name: str | None = None, crs: bool = False,
              dataset_key: str = "dataset", disk_full_limit: int | None = None) -> list[CliCase]:
    """The cases that apply to one command, from its argv builder's keyword arguments."""
    cases = []
    if raster:
        key = "compare" if command == "ood" else "raster"
        cases += [CliCase(command, name, argv(**{key: name}), message)
                  for name, message in RASTER_CASES + ([NO_CRS] if crs else [])]
    if model:
        cases += [CliCase(command, name, argv(model=name), message) for name, message in MODEL_CASES]
    if dataset:
        cases += [CliCase(command, name, argv(**{dataset_key: name}), message) for name, message in DATASET_CASES]
        cases.append(CliCase(command, "dataset: unreadable folder", argv(), r"permission denied",
                             setup=unreadable_dataset))
    if out_name:
        cases.append(CliCase(command, MISSING_FOLDER, argv(out_name=f"nowhere/{out_name}"), r"does not exist"))
        cases.append(CliCase(command, DISK_FULL, argv(), NO_SPACE, setup=disk_full) if disk_full_limit is None else
                     CliCase(command, DISK_FULL, argv(), r"[Ff]ile too large|free space",
                             file_size_limit=disk_full_limit))
    return cases


CLI_CASES: list[CliCase] = [
    *cases_for("train", train_argv, model=False, dataset=True, out_name="model.pt"),
    *cases_for("evaluate", evaluate_argv, dataset=True),
    CliCase("evaluate", "dataset: 1-band images vs RGB model", evaluate_argv("dataset: 1-band images vs RGB model"),
            r"1-band images but the model expects 3"),
    CliCase("evaluate", MISSING_FOLDER, evaluate_argv(extra=lambda out: ["--plot", str(out / "nowhere" / "p.png")]),
            r"does not exist"),
    CliCase("evaluate", DISK_FULL, evaluate_argv(), NO_SPACE, setup=disk_full),
    *cases_for("map", map_argv, raster=True, crs=True),
    CliCase("map", MISSING_FOLDER,
            lambda inputs, out: ["map", str(inputs["good model"]), str(inputs["good raster"]),
                                 "--out-classes", str(out / "nowhere" / "classes.tif")], r"does not exist"),
    CliCase("map", DISK_FULL, lambda inputs, out: [*map_argv()(inputs, out), "--resolution", "input"],
            r"Could not write the maps.*free space", file_size_limit=1024),
    CliCase("map", "confidence box: inf", lambda inputs, out: [*map_argv()(inputs, out), "--confidence-box", "inf"],
            r"confidence box must be 0 to 10 patches"),
    *cases_for("ood", ood_argv, raster=True, dataset=True, out_name="ood.json"),
    *cases_for("sample", sample_argv, out_name="samples.png", disk_full_limit=2048),
    *cases_for("report", report_argv, dataset=True, out_name="report.html"),
    *cases_for("retrain", retrain_argv, raster=True, crs=True, out_name="retrained.pt"),
    CliCase("retrain", "annotations: invalid geometry", retrain_argv(annotations="annotations: invalid geometry"),
            r"invalid geometry"),
    CliCase("retrain", "annotations: not a vector file", retrain_argv(annotations="annotations: not a vector file"),
            r"Cannot read the annotations"),
    *cases_for("suggest", suggest_argv, raster=True, crs=True, out_name="suggestions.gpkg", disk_full_limit=4096),
]


def run_case(case: CliCase, inputs: dict[str, Path], out: Path, monkeypatch) -> tuple[int, str]:
    """(exit status, stderr) of one case, with its simulated failure in place."""
    argv = case.argv(inputs, out)
    if case.file_size_limit is not None:
        return run_cli_subprocess(argv, case.file_size_limit)
    if case.setup is not None:
        case.setup(monkeypatch, inputs, out)
    try:
        return run_cli(argv)
    finally:
        monkeypatch.undo()


def run_cli_subprocess(argv: list[str], file_size_limit: int | None = None, timeout: float = 120) -> tuple[int, str]:
    """`python -m jem_core ARGV` in a fresh process: (exit status, stderr)."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "jem_core", *argv], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit_file_size, env=env, cwd=Path(__file__).resolve().parents[1])
    return done.returncode, done.stderr


def run_cli(argv: list[str]) -> tuple[int, str]:
    """jem_core.cli.main in-process: (exit status, stderr)."""
    from jem_core.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, stderr.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line or "Traceback" in line]
