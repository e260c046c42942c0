"""Which bands of a known sensor a model wants, when the model names its bands by colour.

A model trained on RGB photos stores its bands as red, green, blue; a Sentinel-2 or Landsat scene
names them B04/B03/B02 or B4/B3/B2 (B3/B2/B1 on Landsat 4-7).  Taking the first bands of such a
stack gives false colours, so the sensor is recognised from its file and band names and the bands
are picked by what they measure.

- `sensor_of(band_names, file_names)` → the sensor name, or None when nothing identifies one.
- `pick_bands(expected, band_names, file_names)` → (band names to use, a note saying so), or None.
- `band_hint(expected, band_names, file_names)` → the --bands advice for an error message.

Nothing here reads a raster: raster_io.open_raster passes the names it found.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

# Band names per sensor, by what the band measures (USGS / ESA band numbering).
SENSOR_BANDS: dict[str, dict[str, str]] = {
    "Sentinel-2": {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"},
    "Landsat 8/9": {"blue": "B2", "green": "B3", "red": "B4", "nir": "B5"},
    "Landsat 4-7": {"blue": "B1", "green": "B2", "red": "B3", "nir": "B4"},
}
# Landsat product ids start with the sensor and mission: LC08_L1TP_..., LE07_..., LT05_...
_LANDSAT_ID = re.compile(r"^L([COTE])0?(\d)", re.IGNORECASE)
_SENTINEL2_ID = re.compile(r"(^|_)(S2[ABCD]|MSI|T\d{2}[A-Z]{3})_", re.IGNORECASE)


def _canonical(name: str) -> str:
    """'B04' == 'b4' == 'B4'; other names compare case-insensitively."""
    return re.sub(r"^b0*(\d)", r"b\1", name.strip().lower())


def sensor_of(band_names: Sequence[str], file_names: Sequence[str]) -> str | None:
    """The sensor the names identify: a Landsat or Sentinel-2 product id in a file name, or
    Sentinel-2's own band names (B8A, or numbers written with two digits such as B04)."""
    for file_name in file_names:
        stem = Path(file_name).name
        landsat = _LANDSAT_ID.match(stem)
        if landsat and landsat.group(1).upper() in "CO" and landsat.group(2) in "89":
            return "Landsat 8/9"
        if landsat and landsat.group(1).upper() in "TE" and landsat.group(2) in "4567":
            return "Landsat 4-7"
        if _SENTINEL2_ID.search(stem):
            return "Sentinel-2"
    if any(re.fullmatch(r"B8A|B0\d", name.strip(), re.IGNORECASE) for name in band_names):
        return "Sentinel-2"
    return None


def pick_bands(expected: Sequence[str], band_names: Sequence[str],
               file_names: Sequence[str]) -> tuple[list[str], str] | None:
    """The sensor's bands for the model's colour names, when the raster has them all and lacks the
    model's own names; else None."""
    have = {_canonical(name) for name in band_names}
    if all(_canonical(name) in have for name in expected):
        return None
    sensor = sensor_of(band_names, file_names)
    if sensor is None:
        return None
    table = SENSOR_BANDS[sensor]
    wanted = [table.get(name.strip().lower()) for name in expected]
    if any(name is None or _canonical(name) not in have for name in wanted):
        return None
    chosen = [str(name) for name in wanted]
    pairs = ", ".join(f"{colour}={band}" for colour, band in zip(expected, chosen))
    return chosen, f"{sensor} bands chosen by what they measure: {pairs} (override with --bands)"


def band_hint(expected: Sequence[str], band_names: Sequence[str], file_names: Sequence[str]) -> str:
    """How to choose bands for the model: the sensor's bands when the model's names are colours."""
    if len(band_names) < len(expected):
        return (f"Give an input with the {len(expected)} bands the model needs ({', '.join(expected)}), as one "
                "raster or one file per band.")
    colours = [name.strip().lower() for name in expected]
    sensor = sensor_of(band_names, file_names)
    if all(colour in SENSOR_BANDS["Sentinel-2"] for colour in colours):
        if sensor is not None:
            bands = ",".join(SENSOR_BANDS[sensor][c] for c in colours)
            return f"For {sensor} that is --bands {bands} (the input must include those bands)."
        examples = "; ".join(f"{name}: --bands {','.join(table[c] for c in colours)}"
                             for name, table in SENSOR_BANDS.items())
        return f"Pass the bands that measure {', '.join(expected)}, in that order ({examples})."
    return (f"Pass the bands the model was trained on, in its order: --bands {','.join(expected)} "
            "or their 1-based indexes.")
