"""JEM-EO core: Joint Energy-based Models for Earth observation (pure Python + PyTorch, no QGIS)."""

from __future__ import annotations

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


class Cancelled(JEMError):
    """The user stopped a long-running function (should_stop() returned True); nothing was written."""

    def __init__(self) -> None:
        super().__init__("Cancelled by the user; nothing was written.")


# should_stop(): the cancel poll every long-running function takes (None: never cancelled).
StopFn = Callable[[], bool]


def check_stop(should_stop: StopFn | None) -> None:
    """Raise Cancelled when the caller's should_stop() says so: the one stop check between batches."""
    if should_stop is not None and should_stop():
        raise Cancelled()
