"""JEM-EO QGIS plugin: Joint Energy-based Models for Earth observation in the Processing Toolbox.

QGIS imports this package at start-up, so it must stay cheap and must not import torch:
torch (and every jem_core module that needs it) is imported only when an algorithm runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_DIR = Path(__file__).resolve().parent

# The installable zip ships jem_core in vendor/ inside the plugin folder; that copy wins so the
# plugin always runs the engine it was packaged with (vendor/ holds nothing else, so no plugin
# module becomes importable under a top-level name).  In the source tree jem_core sits beside us.
_VENDOR = _PLUGIN_DIR / "vendor"
if (_VENDOR / "jem_core").is_dir() and str(_VENDOR) not in sys.path:
    sys.path.insert(0, str(_VENDOR))


def classFactory(iface):  # noqa: N802 (QGIS plugin entry point name)
    from .plugin import JemPlugin

    return JemPlugin(iface)
