"""Where the plugin's icons and QML styles live, in the source tree and in the installed zip."""
from __future__ import annotations

from pathlib import Path

from qgis.PyQt.QtGui import QIcon

_PLUGIN_DIR = Path(__file__).resolve().parent


def resource_path(*parts: str) -> Path:
    """resources/<parts>: inside the plugin folder once packaged, beside it in the source tree."""
    for root in (_PLUGIN_DIR / "resources", _PLUGIN_DIR.parent / "resources"):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"JEM-EO plugin resource {'/'.join(parts)} is missing; reinstall the plugin.")


def icon(name: str) -> QIcon:
    return QIcon(str(resource_path("icons", name)))
