"""Installing PyTorch for the plugin into a folder of its own, the way pip --target does it (no QGIS here).

QGIS's Python is often one the user may not (Debian: PEP 668) or cannot (macOS QGIS.app) install into,
so torch goes to `<QGIS profile>/python/jem-eo-packages/python3.X`: outside the plugin folder (which a
plugin upgrade replaces) and per Python version (torch is a compiled extension).  The folder is put on
sys.path, so torch imports in the running QGIS without a restart.

- `packages_dir(profile_dir)`: that folder.  `activate(folder)`: put it on sys.path.
- `interpreter()`: the python that runs pip for QGIS on Linux, Windows (OSGeo4W) and macOS.
- `index_arguments(build, platform)` and `pip_command(...)`: the command, also shown for a terminal.
- `install(...)`: runs pip into a staging folder and moves the result in only when pip succeeded,
  so a failed or cancelled install leaves nothing behind.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable, Sequence

from jem_core import JEMError

from .lazy_torch import TORCH_VERSION, qgis_python

TORCH_REQUIREMENT = f"torch=={TORCH_VERSION}"
# PyTorch's own index of CPU-only wheels (Linux and Windows); PyPI's Linux wheels are CUDA builds
# that pull several GB of NVIDIA libraries, its macOS wheels are the only macOS build.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUILDS = ("cpu", "cuda")
# pip output line start → share of the install done, to show progress without parsing pip's internals.
_STAGES = (("Collecting", 0.05), ("Downloading", 0.15), ("Installing collected packages", 0.7),
           ("Successfully installed", 0.95))

Progress = Callable[[float, str], None]


def packages_dir(profile_dir: str | Path, version: tuple[int, int] = sys.version_info[:2]) -> Path:
    """The plugin's package folder in a QGIS profile (QgsApplication.qgisSettingsDirPath())."""
    return Path(profile_dir) / "python" / "jem-eo-packages" / f"python{version[0]}.{version[1]}"


def activate(folder: Path) -> bool:
    """Put an existing package folder first on sys.path so its packages import now; True if added."""
    entry = str(folder)
    if not folder.is_dir() or entry in sys.path:
        return False
    sys.path.insert(0, entry)
    sys.path_importer_cache.pop(entry, None)  # a lookup made before the folder existed must not stick
    importlib.invalidate_caches()
    return True


def interpreter(platform: str | None = None, executable: str | None = None,
                exists: Callable[[str], bool] = os.path.exists) -> str:
    """The python that runs pip for QGIS's Python.

    Windows: sys.executable is QGIS itself; OSGeo4W and the standalone installer put python3.exe
    beside qgis-bin.exe (else: python.exe of the Python prefix).  macOS (QGIS.app's bundled Python)
    and Linux: the python of the running prefix (lazy_torch.qgis_python).
    """
    platform = platform or sys.platform
    executable = executable or sys.executable
    if platform == "win32":
        exe = PureWindowsPath(executable)
        beside = str(exe.with_name("python3.exe"))
        if exe.name.lower().startswith("qgis") and exists(beside):
            return beside
        if exe.name.lower().startswith("python"):
            return executable
    return qgis_python()


def index_arguments(build: str, platform: str | None = None) -> list[str]:
    """Where pip takes torch from for a build: 'cpu' (CPU-only wheels) or 'cuda' (NVIDIA GPUs)."""
    platform = platform or sys.platform
    if build not in BUILDS:
        raise JEMError(f"Unknown PyTorch build '{build}'. Choose one of {', '.join(BUILDS)}.")
    if build == "cpu":
        return [] if platform == "darwin" else ["--index-url", CPU_INDEX]
    if platform.startswith("linux"):
        return []  # PyPI's Linux wheels are the CUDA build
    raise JEMError("The plugin installs the CUDA build of PyTorch on Linux only. On Windows pick the command for "
                   "your CUDA version at https://pytorch.org/get-started/locally/ and run it in the OSGeo4W Shell; "
                   "macOS has no CUDA build (the CPU build uses Apple's GPU through MPS).")


def pip_command(python: str, target: Path, sources: Sequence[str], requirement: str = TORCH_REQUIREMENT) -> list[str]:
    """`python -m pip install --target TARGET ...`: everything the requirement needs goes into TARGET."""
    return [python, "-m", "pip", "install", "--target", str(target), "--no-warn-script-location",
            "--disable-pip-version-check", *sources, requirement]


def shell_text(command: Sequence[str], platform: str | None = None) -> str:
    """The command as one line to paste into a terminal (cmd.exe quoting on Windows)."""
    if (platform or sys.platform) == "win32":
        return subprocess.list2cmdline(list(command))
    return shlex.join(command)


@dataclass
class InstallOutcome:
    ok: bool
    message: str
    log: list[str] = field(default_factory=list)


def install(python: str, target: Path, sources: Sequence[str], requirement: str = TORCH_REQUIREMENT,
            module: str = "torch", progress: Progress = lambda share, line: None,
            should_stop: Callable[[], bool] = lambda: False) -> InstallOutcome:
    """pip-install `requirement` into `target` (through a staging folder) and make `module` importable."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over from an install that was killed
    command = pip_command(python, staging, sources, requirement)
    log: list[str] = []
    try:
        try:
            returncode = _run_pip(command, log, progress, should_stop)
        except FileNotFoundError:
            return InstallOutcome(False, f"QGIS's Python '{python}' was not found, so pip cannot run. Install "
                                  f"{requirement} from a terminal with the python QGIS uses; nothing was installed.")
        if returncode is None:
            return InstallOutcome(False, f"Installing {requirement} was cancelled; nothing was installed.", log)
        if returncode != 0:
            return InstallOutcome(False, _pip_failure(python, target, sources, requirement, returncode, log), log)
        _move_into(staging, target)
    except OSError as error:
        return InstallOutcome(False, f"Cannot install {requirement} into '{target}': {error}. Nothing was installed; "
                              "check the free space and the write permission of that folder.", log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    activate(target)
    if importlib.util.find_spec(module) is None:
        return InstallOutcome(False, f"{requirement} was installed into '{target}' but '{module}' does not import; "
                              "restart QGIS and try again.", log)
    progress(1.0, "done")
    return InstallOutcome(True, f"{requirement} installed into '{target}' and ready to use.", log)


def _pip_failure(python: str, target: Path, sources: Sequence[str], requirement: str, returncode: int,
                 log: list[str]) -> str:
    """The failure message: pip's error lines and the likely fix."""
    if any("No module named pip" in line for line in log):
        return (f"QGIS's Python ({python}) has no pip, so {requirement} cannot be installed. Install pip "
                "(Debian/Ubuntu: sudo apt install python3-pip) and run again; nothing was installed.")
    errors = [line for line in log if line.startswith("ERROR")] or log[-3:]
    terminal = shell_text(pip_command(python, target, sources, requirement))
    return (f"pip could not install {requirement} (exit code {returncode}): {' '.join(errors)[:400]} Nothing was "
            f"installed. Check the network connection and run again, or run in a terminal: {terminal}")


def _run_pip(command: list[str], log: list[str], progress: Progress, should_stop: Callable[[], bool]) -> int | None:
    """pip's exit code, or None when stopped; its output lines go to `log` and stages to `progress`.

    A reader thread takes pip's output so a cancel is seen within 0.2 s even while a large
    download prints nothing.
    """
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window flashing up on Windows
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          creationflags=flags) as process:
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
        reader.start()
        done = 0.0
        while reader.is_alive() or not lines.empty():
            if should_stop():
                process.terminate()
                process.wait()
                return None
            try:
                line = lines.get(timeout=0.2).rstrip()
            except queue.Empty:
                continue
            if line:
                log.append(line)
                share = next((s for start, s in _STAGES if line.lstrip().startswith(start)), 0.0)
                done = max(done, share)  # pip collects each dependency in turn: never step back
                progress(done, line)
        process.wait()
    return process.returncode


def _move_into(staging: Path, target: Path) -> None:
    """Move what pip put in staging into target, replacing same-named entries (a reinstall)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
        return
    for entry in staging.iterdir():
        existing = target / entry.name
        if existing.is_dir() and not existing.is_symlink():
            shutil.rmtree(existing)
        elif existing.exists() or existing.is_symlink():
            existing.unlink()
        shutil.move(str(entry), str(existing))
