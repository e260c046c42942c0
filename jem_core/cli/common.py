"""Helpers shared by the sub-commands: progress bar, log line, common options."""
from __future__ import annotations

import os
import sys
import time

from ..device import DEVICE_CHOICES


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn at most a few times a second."""

    def __init__(self, label: str, stream=None) -> None:
        # sys.stderr looked up now, not at import: it may have been replaced since (pytest capture).
        self.label, self.stream = label, stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.interactive = self.stream.isatty()

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.interactive else 10.0) and fraction < 1.0:
            return
        self.last = now
        filled = int(30 * min(max(fraction, 0.0), 1.0))
        line = f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:5.1%} {now - self.start:6.0f}s {message}"
        if self.interactive:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if fraction >= 1.0 else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def silence_gdal_printing() -> None:
    """GDAL prints its own errors and warnings on stderr; each one that matters reaches the user as the one
    JEMError line, so the CLI sends GDAL's printing to the null device (unless CPL_LOG names a log file)."""
    from osgeo import gdal

    if gdal.GetConfigOption("CPL_LOG") is None:
        gdal.SetConfigOption("CPL_LOG", os.devnull)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="compute device: auto picks CUDA when present (default: auto)")
