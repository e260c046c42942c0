"""Run a batch on the CPU as slices on parallel threads, each slice with its share of the cores.

oneDNN parallelises each convolution over all intra-op threads; for the small feature maps of
these networks that leaves cores idle between and inside layers. Giving every core its own slice
of the batch keeps them busy. Used for SGLD chains, where it pays: on the 2-core build machine a
5-step chain of 64 WRN-16-2 images at 32 px takes 1.27 s instead of 1.38 s (docs/performance.md).
For inference (mapping, evaluation) it measured no gain there, so those stay intra-op.

Slicing changes nothing but speed because every network here treats images independently (no
batch norm). PyTorch releases the GIL inside its kernels, and autograd is thread-safe for separate
graphs. Grad mode is per thread, so each slice function sets its own.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from .process_state import torch_threads

T = TypeVar("T")

# Images per slice below which per-call overhead outweighs what another thread gains.
MIN_SLICE = 8


def slice_count(n: int, device: torch.device, enabled: bool = True) -> int:
    """How many slices a batch of n images on device is run as: one per intra-op thread on the CPU."""
    if not enabled or device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n // MIN_SLICE))


def map_slices(fn: Callable[[int, slice], T], n: int, count: int) -> list[T]:
    """fn(i, part) for the i-th of `count` contiguous slices covering range(n), on parallel threads
    sharing this process's intra-op threads; results in slice order."""
    if count <= 1:
        return [fn(0, slice(0, n))]
    threads_per_slice = max(1, torch.get_num_threads() // count)
    edges = [round(i * n / count) for i in range(count + 1)]

    def run(i: int) -> T:
        # The thread count is process-wide: torch_threads puts the caller's back once the last slice
        # (of this batch or of another task's running at the same time) is done.
        with torch_threads(threads_per_slice):
            return fn(i, slice(edges[i], edges[i + 1]))

    with ThreadPoolExecutor(count, thread_name_prefix="jem-slice") as pool:
        return list(pool.map(run, range(count)))

