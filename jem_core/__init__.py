"""JEM-EO core: Joint Energy-based Models for Earth observation (pure Python + PyTorch, no QGIS)."""

__version__ = "0.1.0"


class JEMError(Exception):
    """A problem the user can fix; its message names the problem and the fix.

    Entry points (CLI, QGIS algorithms) show the message alone, without a traceback.
    """
