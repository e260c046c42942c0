"""Build the installable plugin zip: `python -m jem_qgis_plugin.packaging [OUT.zip]` (what `make package` runs).

Layout inside the zip (what QGIS's "Install from ZIP" expects: one top folder named like the package):

    jem_qgis_plugin/            plugin code (this file excluded: it is a build tool)
    jem_qgis_plugin/metadata.txt
    jem_qgis_plugin/resources/  icons and QML style templates
    jem_qgis_plugin/vendor/jem_core/   the engine, so the plugin imports it without a pip install
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PLUGIN = "jem_qgis_plugin"
REPO_ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"__pycache__"}
BUILD_ONLY = f"{PLUGIN}/packaging.py"
SKIP_SUFFIXES = {".pyc", ".pyo"}


def _files(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not SKIP_DIRS & set(path.parts) and path.suffix not in SKIP_SUFFIXES \
                and not path.name.startswith("."):
            yield path


def package_entries(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Name inside the zip → source file."""
    entries: dict[str, Path] = {}
    for source, target in ((root / PLUGIN, PLUGIN), (root / "resources", f"{PLUGIN}/resources"),
                           (root / "jem_core", f"{PLUGIN}/vendor/jem_core")):
        for path in _files(source):
            entries[f"{target}/{path.relative_to(source).as_posix()}"] = path
    entries.pop(BUILD_ONLY, None)
    entries[f"{PLUGIN}/metadata.txt"] = root / "metadata.txt"
    entries[f"{PLUGIN}/LICENSE"] = root / "LICENSE"
    return entries


def build_zip(out_path: Path, root: Path = REPO_ROOT) -> Path:
    """Write the zip to a temporary name, then rename it: never a half-written zip."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, path in sorted(package_entries(root).items()):
                archive.write(path, name)
        tmp_path.replace(out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out_path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "dist" / f"{PLUGIN}.zip"
    print(build_zip(target))
