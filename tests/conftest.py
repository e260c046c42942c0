"""Shared fixtures: small synthetic datasets and models the tests make themselves.

The QGIS profile is made by the test run too: pytest-qgis creates `.qgis-settings/profiles/default`
in the checkout before QGIS starts (and before this file is imported); it is git-ignored, never
committed (a profile holds an authentication database).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qgis.core import QgsProcessingFeedback

from jem_core.models import SpeedOptions

torch.set_num_threads(2)


# Without the threaded speed-ups (batch-split chains, channels-last oneDNN layouts, fused Adam), two identical
# runs on one thread (the one_thread fixture) match bit for bit.
UNTHREADED_SPEED = SpeedOptions(split_batches=False, channels_last=False, fused=False)


@pytest.fixture
def one_thread():
    """Threaded float sums differ between identical runs; comparisons of two runs' weights need one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_image(path: Path, pixels: np.ndarray, driver: str | None = None) -> None:
    """pixels (bands, H, W); driver from the suffix (PNG/JPEG/GTiff)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    driver = driver or {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "GTiff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=driver, width=pixels.shape[2], height=pixels.shape[1],
                           count=pixels.shape[0], dtype=pixels.dtype) as dst:
            dst.write(pixels)


def make_class_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 20, bands: int = 3,
                      suffix: str = ".png", dtype: str = "uint8", seed: int = 0) -> Path:
    """Classes told apart by their mean colour plus a texture, with noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    high = 255 if dtype == "uint8" else 4000
    for c in range(classes):
        folder = root / f"class_{chr(ord('a') + c)}"
        folder.mkdir(exist_ok=True)
        base = rng.uniform(0.2, 0.8, size=bands)
        base[c % bands] = 0.95
        for i in range(per_class):
            stripes = 0.1 * np.sin(np.arange(size) * (c + 1) / 2.0)[None, None, :]
            img = base[:, None, None] + stripes + rng.normal(0, 0.05, (bands, size, size))
            write_image(folder / f"img_{i:03d}{suffix}", (np.clip(img, 0, 1) * high).astype(dtype))
    return root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "scenes")


class CancelAfter(QgsProcessingFeedback):
    """Feedback that reports 'cancelled' from the n-th poll on, like a user pressing Cancel mid-run."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls_left = polls

    def isCanceled(self) -> bool:  # QGIS API name
        self.polls_left -= 1
        if self.polls_left < 0 and not super().isCanceled():
            self.cancel()
        return super().isCanceled()


@pytest.fixture(scope="module")
def provider(qgis_processing):
    import jem_qgis_plugin

    plugin = jem_qgis_plugin.classFactory(None)
    plugin.initGui()
    yield plugin.provider
    plugin.unload()
