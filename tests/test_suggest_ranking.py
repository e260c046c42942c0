"""`suggest` puts a planted anomalous patch first, at its true place on the ground (issue 15.4).

The model is hand-made so that the expected ranking is known exactly: its logits are
−5·|patch mean| plus class offsets that fade as the (normalised) patch mean leaves 0, so a patch far
from the scene's values has both the highest energy E(x) and the flattest p(y|x).
"""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from jem_core.active import suggest
from jem_core.model_file import LoadedModel, ModelMeta
from jem_core.models import ModelSpec

PATCH = 16
TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


class PlantedEnergy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spec = ModelSpec(arch="wrn-10-1", in_channels=3, num_classes=3)
        self.offsets = torch.nn.Parameter(torch.tensor([2.0, 0.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = x.mean(dim=(1, 2, 3)).abs()[:, None]
        return -5 * distance + self.offsets / (1 + 10 * distance)


def model() -> LoadedModel:
    meta = ModelMeta(class_names=["a", "b", "c"], band_names=["red", "green", "blue"], image_size=PATCH,
                     mean=[120.0] * 3, std=[50.0] * 3)
    return LoadedModel(PlantedEnergy().eval(), meta)


@pytest.mark.parametrize("anomaly", [(32, 48), (80, 84)], ids=["inside", "at the right edge"])
def test_suggest_ranks_a_planted_anomalous_patch_first(tmp_path, anomaly):
    height, width = 96, 100  # 100 is not a multiple of 16: the last patch column starts at 84
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(120, 15, (3, height, width)), 0, 255).astype(np.uint8)
    row, col = anomaly
    pixels[:, row:row + PATCH, col:col + PATCH] = 250
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(pixels)

    suggestions = suggest(model(), path, 3, min_distance=0)
    first = suggestions[0]
    assert (first.row, first.col) == anomaly
    assert first.score == 1.0 and first.unfamiliarity == 1.0 and first.uncertainty == 1.0
    left, top = TRANSFORM * (col, row)
    assert first.bounds == pytest.approx((left, top - PATCH * 10.0, left + PATCH * 10.0, top))
    assert [s.rank for s in suggestions] == [1, 2, 3] and suggestions[1].score < first.score
