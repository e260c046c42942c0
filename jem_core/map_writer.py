"""The GeoTIFF outputs of a map: class map (Byte, colour table), confidence, familiarity −E(x), p(y|x).

- `MapOutputs(targets, profile, class_names, tags)`: the output files, written under temporary names
  beside the targets and renamed together by commit() only when every one is complete (abort()
  removes them).
- `RowWriter(outputs, grid, resolution)`: writes cell rows in blocks, at patch or input resolution.
- `class_colours(class_names)`: a thematic colour per class (water blue, forest green, ...).
"""
from __future__ import annotations

import colorsys
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import JEMError
from .files import publish
from .raster_io import GdalFailures
from .windowing import PatchGrid

CLASS_NODATA = 255


_PALETTE_GROUPS = [  # word prefix → base colour (first match wins: Parking before Park)
    (("water", "river", "pond", "lake", "sea", "port", "harbo", "ocean"), (31, 105, 180)),
    (("forest", "tree", "wood"), (24, 110, 40)),
    (("bare", "desert", "mountain", "beach", "sand"), (200, 170, 110)),
    (("industrial", "storage", "commercial", "airport", "railway", "station", "parking", "viaduct", "bridge",
      "highway", "road"), (140, 140, 150)),
    (("meadow", "grass", "park", "farm", "crop", "pasture", "herbaceous", "vegetation", "golf"), (120, 190, 70)),
    (("residential", "center", "church", "school", "square", "urban", "building", "resort"), (205, 60, 45)),
    (("stadium", "playground", "baseball", "sport", "tennis"), (230, 140, 200)),
]


def class_colours(class_names: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """A colour per class: a thematic base colour when a word of the name matches, varied within a group."""
    colours = {}
    used: dict[int, int] = {}
    for i, name in enumerate(class_names):
        words = [w.lower() for w in re.findall(r"[A-Za-z][a-z]*", name)]
        group = next((g for g, (keys, _) in enumerate(_PALETTE_GROUPS)
                      if any(w.startswith(k) for w in words for k in keys)), None)
        if group is None:
            hue, saturation, value = (i * 0.618034) % 1.0, 0.55, 0.85  # golden-ratio hues for unmatched names
        else:
            member = used.get(group, 0)
            used[group] = member + 1
            hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in _PALETTE_GROUPS[group][1]))
            hue = (hue + 0.035 * ((member + 1) // 2) * (1 if member % 2 else -1)) % 1.0
            value = 0.55 + 0.4 * ((value + 0.37 * member) % 1.0)
        colours[i] = (*(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value)), 255)
    return colours


@dataclass
class _Output:
    final: Path
    tmp: Path
    dataset: Any


class MapOutputs:
    """The output GeoTIFFs, written under temporary names and renamed together by commit()."""

    def __init__(self, targets: dict[str, Path | None], profile: dict[str, Any], class_names: list[str],
                 tags: dict[str, str]) -> None:
        import rasterio

        self.files: dict[str, _Output] = {}
        self.gdal_failures = GdalFailures().start()
        try:
            for kind, target in targets.items():
                if target is None:
                    continue
                target = Path(target)
                if not target.parent.is_dir():
                    raise JEMError(f"Output folder '{target.parent}' does not exist. Create it or choose another path.")
                handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.tif", dir=target.parent)
                os.close(handle)
                self.files[kind] = _Output(target, Path(tmp), None)
                kind_profile = dict(profile, **_KIND_PROFILE[kind](len(class_names)))
                dataset = rasterio.open(tmp, "w", **kind_profile)
                self.files[kind].dataset = dataset
                dataset.update_tags(**tags)
                self._describe(kind, dataset, class_names)
        except OSError as error:  # no permission, disk full, read-only file system
            self.abort()
            raise _write_failed(target, str(getattr(error, "strerror", None) or error)) from None
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _describe(kind: str, dataset: Any, class_names: list[str]) -> None:
        if kind == "classes":
            dataset.set_band_description(1, "class")
            dataset.write_colormap(1, class_colours(class_names))
            dataset.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(class_names)})
        elif kind == "probabilities":
            for i, name in enumerate(class_names):
                dataset.set_band_description(i + 1, f"p({name})")
        else:
            dataset.set_band_description(1, _DESCRIPTIONS[kind])

    def write(self, row_off: int, arrays: dict[str, np.ndarray]) -> None:
        from rasterio.windows import Window

        for kind, output in self.files.items():
            data = arrays[kind]
            if data.ndim == 2:
                data = data[None]
            output.dataset.write(data, window=Window(0, row_off, data.shape[2], data.shape[1]))

    def commit(self) -> None:
        for output in self.files.values():
            output.dataset.close()
        self.gdal_failures.stop()
        if self.gdal_failures.messages:
            raise _write_failed(next(iter(self.files.values())).final, self.gdal_failures.messages[0])
        for output in self.files.values():
            publish(output.tmp, output.final)

    def abort(self) -> None:
        self.gdal_failures.stop()
        for output in self.files.values():
            try:
                if output.dataset is not None and not output.dataset.closed:
                    output.dataset.close()
            finally:
                output.tmp.unlink(missing_ok=True)
                Path(str(output.tmp) + ".aux.xml").unlink(missing_ok=True)


def _write_failed(target: Path, detail: str) -> JEMError:
    return JEMError(f"Could not write the maps in '{target.parent}': {detail[:200]}. Check the free space and "
                    "the write permission there; no output was kept.")


_DESCRIPTIONS = {  # band 1 of the single-band outputs: what the layer means
    "confidence": "confidence: p(y|x) of the mapped class, times its label agreement for a retrained model (tag "
                  "jem_confidence); low where the class is likely wrong",
    "familiarity": "familiarity: -E(x) = logsumexp f(x), higher = more like the training data",
}

_KIND_PROFILE: dict[str, Callable[[int], dict[str, Any]]] = {
    "classes": lambda n: {"count": 1, "dtype": "uint8", "nodata": CLASS_NODATA},
    "confidence": lambda n: {"count": 1, "dtype": "float32", "nodata": float("nan")},
    "familiarity": lambda n: {"count": 1, "dtype": "float32", "nodata": float("nan")},
    "probabilities": lambda n: {"count": n, "dtype": "float32", "nodata": float("nan"), "interleave": "band"},
}


class RowWriter:
    """Turns cell rows, in order, into output rows (patch or input resolution), written in blocks.

    At input resolution each cell's value fills its pixels, clipped at the raster's edge (grid.cell_window).
    """

    BLOCK_ROWS = 256  # the output tile height: whole tiles per write when memory allows
    BLOCK_BYTES = 64 << 20  # but never hold more than this (wide rasters, many probability bands)

    def __init__(self, outputs: MapOutputs, grid: PatchGrid, resolution: str) -> None:
        self.outputs, self.grid, self.resolution = outputs, grid, resolution
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.cell_row = self.row_off = 0

    def add_cell_row(self, values: dict[str, np.ndarray]) -> None:
        if self.resolution == "input":
            _, _, _, height = self.grid.cell_window(self.cell_row, 0)
            values = {kind: self._expand(array, height) for kind, array in values.items()}
        else:
            values = {kind: array[..., None, :] for kind, array in values.items()}
        self.cell_row += 1
        self.buffer.append(values)
        self.buffered_rows += next(iter(values.values())).shape[-2]
        self.buffered_bytes += sum(array.nbytes for array in values.values())
        if self.buffered_rows >= self.BLOCK_ROWS or self.buffered_bytes >= self.BLOCK_BYTES:
            self.flush()

    def _expand(self, array: np.ndarray, height: int) -> np.ndarray:
        """A cell row (..., cell_cols) → pixel rows (..., height, width)."""
        wide = np.repeat(array, self.grid.stride, axis=-1)[..., :self.grid.width]
        return np.repeat(wide[..., None, :], height, axis=-2)

    def flush(self) -> None:
        if not self.buffer:
            return
        block = {kind: np.concatenate([b[kind] for b in self.buffer], axis=-2) for kind in self.buffer[0]}
        self.outputs.write(self.row_off, block)
        self.row_off += self.buffered_rows
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0
