"""JEM-EO core: Joint Energy-based Models for Earth observation (pure Python + PyTorch, no QGIS)."""

from typing import Callable

__version__ = "0.1.0"

# progress(fraction done in 0..1, message): the callback every long-running function takes.
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The progress callback of a caller that gave none."""


class JEMError(Exception):
    """A problem the user can fix; its message names the problem and the fix.

    Entry points (CLI, QGIS algorithms) show the message alone, without a traceback.
    """
