"""Process-wide switches set for a block of code and put back after it.

QGIS runs several Processing tasks in one process, next to its own GDAL calls: flipping GDAL/OGR's
error mode or torch's thread count for good would change them for everything else running there.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 0


@contextmanager
def gdal_exceptions() -> Iterator[None]:
    """GDAL and OGR raise RuntimeError on failure inside the block; their previous modes come back after."""
    from osgeo import gdal, ogr

    gdal_before, ogr_before = gdal.GetUseExceptions(), ogr.GetUseExceptions()
    gdal.UseExceptions()
    ogr.UseExceptions()
    try:
        yield
    finally:
        if not ogr_before:
            ogr.DontUseExceptions()
        if not gdal_before:
            gdal.DontUseExceptions()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch uses `count` intra-op threads inside the block.

    Blocks on several threads (two Processing tasks, the slices of one batch) overlap: the count
    from before the first one began is restored when the last one ends, whoever ends last.
    """
    import torch

    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        _threads_users += 1
        torch.set_num_threads(count)
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)
