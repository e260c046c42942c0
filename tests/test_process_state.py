"""GDAL/OGR error modes and torch's thread count are changed only inside the block, then put back."""
from __future__ import annotations

import threading

import pytest
import torch
from osgeo import gdal, ogr

from jem_core.process_state import gdal_exceptions, torch_threads


def set_modes(on: bool) -> None:
    """GDAL 3.6 keeps the two modes on a stack, gdal's below ogr's: switch them in that order."""
    if on:
        gdal.UseExceptions()
        ogr.UseExceptions()
    else:
        ogr.DontUseExceptions()
        gdal.DontUseExceptions()


@pytest.fixture
def modes_restored():
    before = bool(gdal.GetUseExceptions()) and bool(ogr.GetUseExceptions())
    yield
    set_modes(before)


@pytest.mark.parametrize("before", [False, True])
def test_gdal_and_ogr_modes_come_back(before, modes_restored):
    set_modes(before)
    with pytest.raises(RuntimeError):
        with gdal_exceptions():
            assert gdal.GetUseExceptions() and ogr.GetUseExceptions()
            gdal.Open("/nonexistent/raster.tif")
    assert bool(gdal.GetUseExceptions()) == before and bool(ogr.GetUseExceptions()) == before


def test_overlapping_thread_blocks_restore_the_count_from_before_the_first():
    before = torch.get_num_threads()
    first_in, second_done = threading.Event(), threading.Event()

    def second() -> None:
        first_in.wait()
        with torch_threads(1):
            pass
        second_done.set()

    worker = threading.Thread(target=second)
    worker.start()
    with torch_threads(1):
        first_in.set()
        second_done.wait()
        assert torch.get_num_threads() == 1  # the other block ended first: not restored under our feet
    worker.join()
    assert torch.get_num_threads() == before
