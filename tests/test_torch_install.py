"""The plugin's PyTorch installer without a network: a tiny stand-in wheel goes through the same code path."""
from __future__ import annotations

import base64
import hashlib
import importlib
import sys
import zipfile
from pathlib import Path

import pytest

from jem_core import JEMError
from jem_qgis_plugin import torch_install
from jem_qgis_plugin.lazy_torch import TORCH_VERSION
from jem_qgis_plugin.torch_install import (
    CPU_INDEX,
    activate,
    index_arguments,
    install,
    interpreter,
    packages_dir,
    pip_command,
    shell_text,
)

STANDIN = "jem_standin_pkg"


def write_wheel(folder: Path, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (PEP 427), written by hand: module STANDIN with VALUE = 42."""
    dist = f"{STANDIN}-{version}"
    files = {
        f"{STANDIN}/__init__.py": "VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {STANDIN}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture
def clean_sys_path():
    """The stand-in package's folder leaves sys.path, and its module sys.modules, after the test."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    sys.modules.pop(STANDIN, None)


def test_stand_in_package_installs_and_imports_without_restart(tmp_path, clean_sys_path):
    wheels = write_wheel(tmp_path / "wheels").parent
    target = packages_dir(tmp_path / "profile")
    stages = []
    outcome = install(sys.executable, target, ["--no-index", "--find-links", str(wheels)], f"{STANDIN}==1.0",
                      module=STANDIN, progress=lambda share, line: stages.append(share))
    assert outcome.ok, outcome.message
    assert str(target) == sys.path[0]
    assert importlib.import_module(STANDIN).VALUE == 42
    assert stages[-1] == 1.0 and stages == sorted(stages)
    assert not target.with_name(target.name + ".partial").exists()


def test_reinstall_into_an_existing_folder_replaces_the_package(tmp_path, clean_sys_path):
    wheels = write_wheel(tmp_path / "wheels").parent
    target = packages_dir(tmp_path / "profile")
    sources = ["--no-index", "--find-links", str(wheels)]
    assert install(sys.executable, target, sources, f"{STANDIN}==1.0", module=STANDIN).ok
    assert install(sys.executable, target, sources, f"{STANDIN}==1.0", module=STANDIN).ok
    assert sorted(p.name for p in target.iterdir()) == [STANDIN, f"{STANDIN}-1.0.dist-info"]


def test_unknown_package_fails_clearly_and_leaves_nothing(tmp_path, clean_sys_path):
    wheels = write_wheel(tmp_path / "wheels").parent
    target = packages_dir(tmp_path / "profile")
    outcome = install(sys.executable, target, ["--no-index", "--find-links", str(wheels)], "jem-no-such-package==9.9",
                      module="jem_no_such_package")
    assert not outcome.ok
    assert "pip could not install jem-no-such-package==9.9" in outcome.message
    assert "No matching distribution" in outcome.message and "Nothing was installed" in outcome.message
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()
    assert str(target) not in sys.path


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell script stands in for a python without pip")
def test_python_without_pip_or_missing_python_is_named_with_the_fix(tmp_path):
    no_pip = tmp_path / "python3"
    no_pip.write_text("#!/bin/sh\necho \"$0: No module named pip\" >&2\nexit 1\n")
    no_pip.chmod(0o755)
    target = packages_dir(tmp_path / "profile")
    outcome = install(str(no_pip), target, [], "jem-standin-pkg==1.0", module=STANDIN)
    assert not outcome.ok and "has no pip" in outcome.message and "apt install python3-pip" in outcome.message
    outcome = install(str(tmp_path / "missing" / "python3"), target, [], "jem-standin-pkg==1.0", module=STANDIN)
    assert not outcome.ok and "was not found" in outcome.message
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()


def test_cancel_stops_pip_and_leaves_nothing(tmp_path, clean_sys_path):
    wheels = write_wheel(tmp_path / "wheels").parent
    target = packages_dir(tmp_path / "profile")
    outcome = install(sys.executable, target, ["--no-index", "--find-links", str(wheels)], f"{STANDIN}==1.0",
                      module=STANDIN, should_stop=lambda: True)
    assert not outcome.ok and "cancelled" in outcome.message
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()


def test_activate_only_adds_an_existing_folder_once(tmp_path, clean_sys_path):
    folder = tmp_path / "pkgs"
    assert not activate(folder)
    folder.mkdir()
    assert activate(folder) and not activate(folder)
    assert sys.path.count(str(folder)) == 1


def test_packages_dir_is_in_the_profile_per_python_version(tmp_path):
    assert packages_dir(tmp_path, (3, 9)) == tmp_path / "python" / "jem-eo-packages" / "python3.9"


@pytest.mark.parametrize("platform, build, expected", [
    ("linux", "cpu", ["--index-url", CPU_INDEX]),
    ("win32", "cpu", ["--index-url", CPU_INDEX]),
    ("darwin", "cpu", []),
    ("linux", "cuda", []),
])
def test_index_per_platform_and_build(platform, build, expected):
    assert index_arguments(build, platform) == expected


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_cuda_outside_linux_is_refused_with_where_to_go(platform):
    with pytest.raises(JEMError, match="pytorch.org/get-started"):
        index_arguments("cuda", platform)
    with pytest.raises(JEMError, match="Unknown PyTorch build 'rocm'"):
        index_arguments("rocm", platform)


def test_pip_command_and_its_terminal_text_per_platform():
    linux = pip_command("/usr/bin/python3", Path("/home/u/.local/share/QGIS/QGIS3/profiles/default/python/x"),
                        index_arguments("cpu", "linux"))
    assert linux[:5] == ["/usr/bin/python3", "-m", "pip", "install", "--target"]
    assert linux[-3:] == ["--index-url", CPU_INDEX, f"torch=={TORCH_VERSION}"]
    windows = pip_command(r"C:\OSGeo4W\bin\python3.exe", Path(r"C:\Users\A B\AppData\x"), [])
    assert shell_text(windows, "win32").startswith(r'C:\OSGeo4W\bin\python3.exe -m pip install --target "C:\Users\A B')
    mac = pip_command("/Applications/QGIS.app/Contents/MacOS/bin/python3", Path("/Users/a b/x"), [])
    assert shell_text(mac, "darwin").startswith("/Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install "
                                                "--target '/Users/a b/x'")


def test_interpreter_on_windows_is_the_python_beside_qgis(monkeypatch):
    assert interpreter("win32", r"C:\OSGeo4W\bin\qgis-bin.exe", lambda path: True) == r"C:\OSGeo4W\bin\python3.exe"
    assert interpreter("win32", r"C:\OSGeo4W\bin\python3.exe") == r"C:\OSGeo4W\bin\python3.exe"
    monkeypatch.setattr(torch_install, "qgis_python", lambda: r"C:\OSGeo4W\apps\Python39\python.exe")
    assert interpreter("win32", r"C:\OSGeo4W\bin\qgis-bin.exe", lambda path: False) == \
        r"C:\OSGeo4W\apps\Python39\python.exe"
