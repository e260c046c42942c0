"""Reading rasters for mapping: band selection, stacking single-band files, value stretch, strips.

- `open_raster(inputs, bands, expected_bands)` → RasterSource: one multi-band raster, or several
  files stacked on the finest grid through a temporary GDAL VRT (the Sentinel-2 / OSCD layout of one
  file per band at 10/20/60 m).  Bands are chosen by name (band description, colour interpretation,
  or a filename suffix such as `_B04`; `B4` matches `B04`) or by 1-based index.
- `choose_stretch(source, meta, mode)` → Stretch: how raster values are mapped to the model's value
  range (percentile 2–98 per band, a fixed linear range, or none).
- `read_strips(...)` yields horizontal strips of rows, optionally from a reader thread that runs ahead
  of the model, so disk/decompression overlaps the network's compute.

Nothing here ever reads a whole raster: strips are `patch_size` rows high (each row read once).
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import JEMError
from .process_state import gdal_exceptions
from .sensor_bands import band_hint, pick_bands

STRETCH_MODES = ("auto", "none", "percentile", "linear")
# Longest side of the decimated read used to estimate percentiles: cheap even on huge rasters.
STATS_READ_SIDE = 1024
_BAND_SUFFIX = re.compile(r"[_\-.](B\d{1,2}A?)$", re.IGNORECASE)


def _canonical(name: str) -> str:
    """'B04' == 'b4' == 'B4'; other names compare case-insensitively."""
    name = name.strip().lower()
    return re.sub(r"^b0*(\d)", r"b\1", name)


@dataclass
class RasterSource:
    """A raster ready to read: the path GDAL opens, which bands in which order, and its grid."""

    path: str
    band_indexes: list[int]
    band_names: list[str]
    width: int
    height: int
    transform: Any  # affine.Affine
    crs: Any
    dtype: str
    has_mask: bool
    description: str
    # Set when the raster is resampled on read to another ground sampling distance (see resample).
    resample_to: tuple[Any, int, int] | None = None
    resampling: str = ""  # how, and the size before and after
    notes: list[str] = field(default_factory=list)

    @contextmanager
    def open(self) -> Iterator[Any]:
        """A rasterio dataset (or WarpedVRT) over the source grid; one per thread."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.errors import NotGeoreferencedWarning
        from rasterio.vrt import WarpedVRT

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(self.path) as src:
                if self.resample_to is None:
                    yield src
                else:
                    transform, width, height = self.resample_to
                    with WarpedVRT(src, crs=src.crs, transform=transform, width=width, height=height,
                                   resampling=Resampling.average) as vrt:
                        yield vrt

    def read_rows(self, dataset: Any, row_off: int, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (bands, rows, width) float32 and a validity mask (rows, width) for a row window."""
        from rasterio.windows import Window

        window = Window(0, row_off, width, rows)
        pixels = dataset.read(self.band_indexes, window=window, out_dtype="float32")
        return pixels, valid_pixels(self, dataset, pixels, window=window)


def valid_pixels(source: RasterSource, dataset: Any, pixels: np.ndarray, **read_args: Any) -> np.ndarray:
    """(rows, cols) bool: the pixel is finite in every chosen band and, when the raster has a mask
    (nodata value, mask band, alpha), unmasked in every one.  read_args: the window or
    out_shape/resampling that `pixels` were read from `dataset` with."""
    valid = np.isfinite(pixels).all(axis=0)
    if source.has_mask:
        valid &= (dataset.read_masks(source.band_indexes, **read_args) > 0).all(axis=0)
    return valid


def parse_band_list(text: str | None) -> list[str] | None:
    """'B04, B03,B02' → ['B04', 'B03', 'B02'] (names or 1-based indexes); empty or None → None (the model's bands)."""
    return [token.strip() for token in (text or "").split(",") if token.strip()] or None


def _single_raster_names(src: Any) -> list[list[str]]:
    """Every name a band answers to: description, colour interpretation, B<i>."""
    names = []
    for i in range(src.count):
        aliases = [f"B{i + 1}"]
        if src.descriptions[i]:
            aliases.insert(0, src.descriptions[i])
        interp = src.colorinterp[i].name
        if interp in ("red", "green", "blue", "alpha"):
            aliases.append(interp)
        names.append(aliases)
    return names


def _file_band_name(path: Path, description: str | None) -> str:
    match = _BAND_SUFFIX.search(path.stem)
    if match:
        return match.group(1).upper()
    return description or path.stem


def _resolve_bands(requested: Sequence[str] | None, aliases: list[list[str]], expected: Sequence[str] | None,
                   source: str, file_names: Sequence[str] = ()) -> list[int]:
    """0-based positions of the chosen bands, in the order asked for (or the model's order)."""
    # A band's own name (first alias) wins over another band's positional alias ("B2" of band 2
    # must not shadow a band described as "B02"): fill the lookup rank by rank.
    lookup: dict[str, int] = {}
    for rank in range(max(map(len, aliases), default=0)):
        for i, names in enumerate(aliases):
            if rank < len(names):
                lookup.setdefault(_canonical(names[rank]), i)
    available = ", ".join(names[0] for names in aliases)
    if requested:
        chosen = []
        for token in requested:
            token = str(token).strip()
            if token.isdigit():
                index = int(token) - 1
                if not 0 <= index < len(aliases):
                    raise JEMError(f"Band index {token} is out of range: '{source}' has {len(aliases)} band(s) "
                                   f"({available}). Use 1-based indexes or band names.")
                chosen.append(index)
            elif _canonical(token) in lookup:
                chosen.append(lookup[_canonical(token)])
            else:
                raise JEMError(f"Band '{token}' is not in '{source}' (its bands: {available}). "
                               "Name bands by description, filename suffix (e.g. B04) or 1-based index.")
        if expected is not None and len(chosen) != len(expected):
            raise JEMError(f"{len(chosen)} band(s) chosen ({', '.join(requested)}) but the model expects "
                           f"{len(expected)} ({', '.join(expected)}). Pass exactly {len(expected)} bands with --bands.")
        return chosen
    if expected is None:
        return list(range(len(aliases)))
    by_name = [lookup.get(_canonical(name)) for name in expected]
    if all(index is not None for index in by_name):
        return [int(index) for index in by_name]  # type: ignore[arg-type]
    if len(aliases) == len(expected):
        return list(range(len(aliases)))
    raise JEMError(f"'{source}' has {len(aliases)} band(s) ({available}) but the model expects {len(expected)} "
                   f"({', '.join(expected)}). {band_hint(expected, [names[0] for names in aliases], file_names)}")


@contextmanager
def open_raster(inputs: Sequence[str | os.PathLike] | str | os.PathLike, bands: Sequence[str] | None = None,
                expected_bands: Sequence[str] | None = None, target_gsd: float | None = None,
                coarsen: int = 1) -> Iterator[RasterSource]:
    """Describe the input as one RasterSource; stacks several files through a temporary VRT.

    bands: names or 1-based indexes, in the order the model wants them; None picks the model's
    band names when the raster has them, or all bands when the count matches.  expected_bands:
    the model's band names (None: no check).  target_gsd: resample on read to this pixel size
    (in the raster CRS's units) with averaging.  coarsen: read at 1/coarsen of the raster's resolution
    (averaging coarsen × coarsen pixels), as a model retrained that way expects; target_gsd wins when
    both are given.  The temporary VRT is removed on exit.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise JEMError("No input raster given. Pass one multi-band raster or several single-band files.")
    for path in paths:
        if not path.exists() and not str(path).startswith("/vsi"):
            raise JEMError(f"Input raster '{path}' does not exist.")
    tmp_dir = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if len(paths) == 1:
                path = str(paths[0])
                with rasterio.open(path) as src:
                    aliases = _single_raster_names(src)
                description = path
            else:
                aliases = []
                for p in paths:
                    with rasterio.open(p) as src:
                        if src.count != 1:
                            raise JEMError(f"'{p}' has {src.count} bands; several inputs are stacked as one band "
                                           "each. Pass one multi-band raster alone, or single-band files.")
                        aliases.append([_file_band_name(p, src.descriptions[0])])
                description = f"{len(paths)} stacked files ({paths[0].parent})"
            # A model naming its bands by colour gets a known sensor's bands by what they measure.
            file_names = [str(p) for p in paths]
            picked = None if bands or not expected_bands else pick_bands(expected_bands, [a[0] for a in aliases],
                                                                          file_names)
            positions = _resolve_bands(picked[0] if picked else bands, aliases, expected_bands, description,
                                       file_names)
            names = [aliases[i][0] for i in positions]
            if len(paths) == 1:
                band_indexes = [i + 1 for i in positions]
            else:
                tmp_dir = tempfile.mkdtemp(prefix="jem-stack-")
                path = _stack_vrt([paths[i] for i in positions], names, Path(tmp_dir) / "stack.vrt")
                band_indexes = list(range(1, len(positions) + 1))
            source = _describe(path, band_indexes, names, description, target_gsd, coarsen)
            if picked:
                source.notes.append(picked[1])
        yield source
    except RasterioIOError as error:
        raise raster_error(error) from None
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def raster_error(error: Exception) -> JEMError:
    """One JEMError for a GDAL failure to open, read or write a raster, with the likely fix."""
    detail = str(error).strip().rstrip(".")[:240]
    if re.search(r"IWriteBlock|TIFFWrite|WriteProc|write error", detail):
        fix = "Check the free space and the write permission of the output folder"
    elif "not recognized as a supported file format" in detail or "No such file" in detail:
        fix = "Check the path, and that the file is a raster GDAL reads (GeoTIFF, JPEG 2000, VRT, ...)"
    else:
        fix = "The file looks damaged or truncated (an interrupted download or copy?): re-download or re-export it"
    return JEMError(f"Cannot read the raster: {detail}. {fix}.")


def no_crs_message(raster: str, outcome: str) -> str:
    """The one message for a raster without a CRS: raster names it (e.g. "Raster 'a.tif'"), outcome says
    what cannot be done (e.g. "the maps could not be placed on the ground")."""
    return (f"{raster} has no coordinate reference system (CRS), so {outcome}. Assign one (QGIS: Raster ▸ "
            "Projections ▸ Assign Projection; GDAL: gdal_edit.py -a_srs EPSG:CODE FILE) and run again.")


def require_crs(source: RasterSource, outcome: str) -> None:
    """JEMError naming the fix when a raster whose outputs go on the ground has no CRS."""
    if source.crs is None:
        raise JEMError(no_crs_message(f"'{source.description}'", outcome))


class GdalFailures:
    """GDAL failures reported only to its error handler, never raised by rasterio (a full disk while
    flushing output blocks, for one): collected from start() to stop(), on this thread (GDAL's
    handler stack is per thread), so a writer can refuse to publish a damaged file."""

    def __init__(self) -> None:
        from osgeo import gdal

        self.messages: list[str] = []
        self._gdal = gdal
        self._active = False

    def _handle(self, level: int, number: int, message: str) -> None:
        if level >= self._gdal.CE_Failure:
            self.messages.append(str(message))

    def start(self) -> "GdalFailures":
        self._gdal.PushErrorHandler(self._handle)
        self._active = True
        return self

    def stop(self) -> None:
        if self._active:
            self._gdal.PopErrorHandler()
            self._active = False


def _stack_vrt(paths: list[Path], names: list[str], vrt_path: Path) -> str:
    """One band per file on the finest grid (nearest-neighbour for coarser bands), as a VRT file."""
    from osgeo import gdal

    options = gdal.BuildVRTOptions(separate=True, resolution="highest", resampleAlg="nearest")
    try:
        with gdal_exceptions():
            vrt = gdal.BuildVRT(str(vrt_path), [str(p.resolve()) for p in paths], options=options)
    except RuntimeError as error:
        raise JEMError(f"Cannot stack the input files: {str(error)[:200]}. "
                       "They must overlap and share a CRS.") from None
    if vrt is None or vrt.RasterCount != len(paths):
        raise JEMError("Cannot stack the input files into one raster. They must overlap and share a CRS.")
    for i, name in enumerate(names):
        vrt.GetRasterBand(i + 1).SetDescription(name)
    vrt.FlushCache()
    vrt = None
    return str(vrt_path)


def _describe(path: str, band_indexes: list[int], names: list[str], description: str,
              target_gsd: float | None, coarsen: int = 1) -> RasterSource:
    import rasterio
    from rasterio.enums import MaskFlags

    with rasterio.open(path) as src:
        flags = [src.mask_flag_enums[i - 1] for i in band_indexes]
        has_mask = any(MaskFlags.all_valid not in f for f in flags)
        source = RasterSource(path=path, band_indexes=band_indexes, band_names=names, width=src.width,
                              height=src.height, transform=src.transform, crs=src.crs, dtype=src.dtypes[0],
                              has_mask=has_mask, description=description)
    if target_gsd is not None:
        if not source.transform.is_rectilinear:
            raise JEMError(f"'{description}' is rotated (its geotransform is not north-up), so it has no single "
                           "pixel size for --target-gsd. Map it without --target-gsd, or warp it north-up first "
                           "(gdalwarp, or QGIS: Raster ▸ Projections ▸ Warp).")
        current = abs(source.transform.a)
        if target_gsd <= 0 or current == 0:
            raise JEMError(f"--target-gsd must be a positive pixel size in the raster's CRS units (got {target_gsd}).")
        resample(source, target_gsd / current,
                 f"resampled by averaging from {current:g} to {target_gsd:g} CRS units per pixel")
    elif coarsen > 1:
        resample(source, coarsen, f"read at 1/{coarsen} of its resolution (averaging {coarsen} × {coarsen} pixels), "
                                  "as the model was trained")
    return source


def resample(source: RasterSource, factor: float, how: str) -> None:
    """Make the source read with pixels `factor` times larger (averaging on read); `how` (why and how it
    is resampled) and the two sizes become source.resampling, one of its notes."""
    width, height = int(source.width / factor), int(source.height / factor)
    if width < 1 or height < 1:
        raise JEMError(f"'{source.description}' ({source.width} × {source.height} px) is too small to read at "
                       f"1/{factor:g} of its resolution. Use a larger raster or a finer pixel size.")
    transform = source.transform * source.transform.scale(factor)
    source.resample_to = (transform, width, height)
    source.resampling = f"{how}: {source.width} × {source.height} px read as {width} × {height}"
    source.notes.append(source.resampling)
    source.transform, source.width, source.height = transform, width, height


@dataclass
class Stretch:
    """Linear map of each band from [low, high] (raster units) to the model's [out_low, out_high], clipped."""

    mode: str
    low: list[float]
    high: list[float]
    out_low: float
    out_high: float

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """pixels (bands, ...) float32, in place."""
        if self.mode == "none":
            return pixels
        for b in range(pixels.shape[0]):
            span = max(self.high[b] - self.low[b], 1e-12)
            scale = (self.out_high - self.out_low) / span
            band = pixels[b]
            band -= self.low[b]
            band *= scale
            band += self.out_low
            np.clip(band, self.out_low, self.out_high, out=band)
        return pixels

    def describe(self) -> str:
        if self.mode == "none":
            return "none (raster values used as they are)"
        ranges = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in zip(self.low, self.high))
        return f"{self.mode}: per band {ranges} → [{self.out_low:g}, {self.out_high:g}]"


def parse_stretch(text: str) -> tuple[str, tuple[float, float]]:
    """'auto' | 'none' | 'percentile[:LOW,HIGH]' | 'linear:MIN,MAX' → (mode, numbers)."""
    mode, _, numbers = str(text).strip().lower().partition(":")
    if mode not in STRETCH_MODES:
        raise JEMError(f"Unknown stretch '{text}'. Use auto, none, percentile[:2,98] or linear:MIN,MAX.")
    defaults = {"percentile": (2.0, 98.0)}
    if not numbers:
        if mode == "linear":
            raise JEMError("--stretch linear needs the raster range, e.g. linear:0,3000.")
        return mode, defaults.get(mode, (0.0, 0.0))
    try:
        low, high = (float(v) for v in numbers.split(","))
    except ValueError:
        raise JEMError(f"Cannot read the stretch range in '{text}'. Write two numbers, e.g. {mode}:2,98.") from None
    if not low < high or (mode == "percentile" and not 0 <= low < high <= 100):
        raise JEMError(f"The stretch range in '{text}' must be LOW < HIGH (percentiles within 0–100).")
    return mode, (low, high)


def choose_stretch(source: RasterSource, value_range: Sequence[float], stretch: str | Stretch = "auto") -> Stretch:
    """The stretch to apply.  auto: 8-bit model on a non-8-bit raster → percentile 2–98, else none."""
    if isinstance(stretch, Stretch):
        return stretch
    mode, (low, high) = parse_stretch(stretch)
    out_low, out_high = float(value_range[0]), float(value_range[1])
    bands = len(source.band_indexes)
    if mode == "auto":
        eight_bit_model = (out_low, out_high) == (0.0, 255.0)
        stretch_needed = eight_bit_model and source.dtype != "uint8"
        mode, (low, high) = ("percentile", (2.0, 98.0)) if stretch_needed else ("none", (0, 0))
    if mode == "none":
        return Stretch("none", [0.0] * bands, [1.0] * bands, out_low, out_high)
    if mode == "linear":
        return Stretch("linear", [low] * bands, [high] * bands, out_low, out_high)
    lows, highs = band_percentiles(source, low, high)
    return Stretch(f"percentile {low:g}–{high:g}", lows, highs, out_low, out_high)


def band_percentiles(source: RasterSource, low: float, high: float) -> tuple[list[float], list[float]]:
    """Per-band percentiles from a decimated read (overviews when present), nodata excluded."""
    from rasterio.enums import Resampling

    factor = max(1.0, max(source.width, source.height) / STATS_READ_SIDE)
    shape = (max(1, int(source.height / factor)), max(1, int(source.width / factor)))
    with source.open() as dataset:
        read_args = {"out_shape": (len(source.band_indexes), *shape), "resampling": Resampling.nearest}
        pixels = dataset.read(source.band_indexes, out_dtype="float32", **read_args)
        valid = valid_pixels(source, dataset, pixels, **read_args)
    if not valid.any():
        raise JEMError(f"'{source.description}' has no valid pixels (all nodata, NaN or masked). Check the raster "
                       "and its nodata value.")
    values = pixels[:, valid]
    lows = np.percentile(values, low, axis=1)
    highs = np.percentile(values, high, axis=1)
    return [float(v) for v in lows], [float(v) for v in np.maximum(highs, lows + 1e-6)]


@dataclass
class Strip:
    """Rows [row_off, row_off + pixels.shape[1]) of the raster, stretched, with a validity mask."""

    index: int
    row_off: int
    pixels: np.ndarray  # (bands, rows, width) float32, already stretched
    valid: np.ndarray  # (rows, width) bool


def _strips(source: RasterSource, starts: Sequence[int], height: int, width: int,
            stretch: Stretch | None) -> Iterator[Strip]:
    """Strips of `height` rows at the given row offsets; overlapping rows are read only once."""
    with source.open() as dataset:
        pixels = valid = None
        end = -1
        for index, row_off in enumerate(starts):
            if pixels is not None and row_off < end:  # overlap with the previous strip: keep its tail
                keep = end - row_off
                new_pixels, new_valid = source.read_rows(dataset, end, height - keep, width)
                if stretch is not None:
                    stretch.apply(new_pixels)
                pixels = np.concatenate([pixels[:, -keep:], new_pixels], axis=1)
                valid = np.concatenate([valid[-keep:], new_valid], axis=0)
            else:
                pixels, valid = source.read_rows(dataset, row_off, height, width)
                if stretch is not None:
                    stretch.apply(pixels)
            end = row_off + height
            yield Strip(index, row_off, pixels, valid)


def read_strips(source: RasterSource, starts: Sequence[int], height: int, width: int,
                stretch: Stretch | None = None, read_ahead: int = 2) -> Iterator[Strip]:
    """Strips in order; with read_ahead > 0 a reader thread (its own GDAL handle) keeps that many ready.

    GDAL reads and decompression release the GIL, so they overlap the network's forward pass.
    Errors in the reader surface in the consumer; closing the generator stops the reader.
    """
    if read_ahead <= 0:
        yield from _strips(source, starts, height, width, stretch)
        return
    ready: queue.Queue = queue.Queue(maxsize=read_ahead)
    stop = threading.Event()
    done = object()

    def reader() -> None:
        try:
            for strip in _strips(source, starts, height, width, stretch):
                while not stop.is_set():
                    try:
                        ready.put(strip, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as error:  # handed to the consumer, which re-raises it
            ready.put(error)

    thread = threading.Thread(target=reader, name="jem-raster-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so a blocked put() can finish
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()

