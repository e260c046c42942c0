"""torch is optional at plugin load: algorithms check for it when they run and say how to install it.

Nothing here imports torch or a jem_core module that does, so QGIS starts fast and the provider
registers even where torch is missing.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import sysconfig
from pathlib import Path
from typing import Any

from jem_core import JEMError

# The torch release the project is tested with (the Makefile installs the same pin).
TORCH_VERSION = "2.13.0"


class TorchMissing(JEMError):
    pass


def qgis_python() -> str:
    """The interpreter whose site-packages QGIS's Python uses.

    Not sys.executable: embedded in QGIS that is the QGIS binary, or whatever `python3` is first on
    PATH (a pyenv shim, another Python), so it is rebuilt from the prefix of the running Python.
    """
    in_venv = sys.prefix != sys.base_prefix
    prefix = Path(sys.prefix if in_venv else sys.base_exec_prefix)
    if sys.platform == "win32":
        return str(prefix / ("Scripts" if in_venv else "") / "python.exe")
    return str(prefix / "bin" / ("python" if in_venv else f"python{sys.version_info.major}"))


def externally_managed() -> bool:
    """PEP 668 marker (Debian/Ubuntu system Python): pip refuses --user installs without an override."""
    if sys.prefix != sys.base_prefix:  # a virtual environment is never externally managed
        return False
    return (Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED").is_file()


def install_command(platform: str | None = None, python: str | None = None,
                    pep668: bool | None = None, in_venv: bool | None = None) -> str:
    """The pip command that installs torch for the Python QGIS runs, on this platform."""
    platform = platform or sys.platform
    python = python or qgis_python()
    pep668 = externally_managed() if pep668 is None else pep668
    in_venv = (sys.prefix != sys.base_prefix) if in_venv is None else in_venv
    user = [] if in_venv else ["--user"]
    override = ["--break-system-packages"] if pep668 else []
    quoted = f'"{python}"' if " " in python else python
    command = " ".join([quoted, "-m", "pip", "install", *user, *override, f"torch=={TORCH_VERSION}"])
    if platform == "win32":
        return f"{command}   (run it in the OSGeo4W Shell that comes with QGIS)"
    return command


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def require_torch() -> None:
    """Raise TorchMissing, naming the install command, unless torch can be imported."""
    if torch_available():
        return
    raise TorchMissing(f"JEM-EO needs PyTorch, which is not installed for QGIS's Python ({qgis_python()}). "
                       "In the QGIS desktop, Plugins ▸ JEM-EO ▸ Install PyTorch… installs it in the background, "
                       f"usable without a restart. Or install it with:  {install_command()}  and restart QGIS.")


def core_constant(module: str, name: str) -> Any:
    """A literal of a jem_core module, read from its source without importing it (and torch).

    name is a module constant ("ARCHITECTURES") or a dataclass field default ("TrainConfig.epochs"),
    so parameter choices and defaults have one definition, in jem_core.
    """
    spec = importlib.util.find_spec("jem_core")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("jem_core is not importable")
    source = Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
    body = ast.parse(source.read_text(encoding="utf-8")).body
    *owners, attribute = name.split(".")
    for owner in owners:
        body = next(node.body for node in body if isinstance(node, ast.ClassDef) and node.name == owner)
    for node in body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"jem_core/{module}.py defines no literal {name}")
