"""The installable zip: its contents, metadata, and that it registers `jem` in a clean QGIS profile."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import jem_core
from jem_core.model_file import load_model
from jem_qgis_plugin.lazy_torch import TORCH_VERSION, core_constant, install_command

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
OUR_ALGORITHMS = {"jem:landcovermap": "JEM land cover map", "jem:train": "Train JEM model",
                  "jem:ood": "Out-of-distribution analysis", "jem:samples": "Generate samples"}
REQUIRED_METADATA = ["name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker", "homepage", "category", "tags", "icon", "experimental",
                     "hasProcessingProvider"]


def read_metadata(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return dict(parser["general"])


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory) -> Path:
    """Built by the real `make package` target, into a temporary folder."""
    target = tmp_path_factory.mktemp("dist") / "jem_qgis_plugin.zip"
    subprocess.run(["make", "-s", "package", f"PLUGIN_ZIP={target}"], cwd=REPO, check=True, capture_output=True)
    return target


def test_zip_holds_plugin_metadata_resources_and_engine(plugin_zip):
    names = set(zipfile.ZipFile(plugin_zip).namelist())
    assert all(name.startswith("jem_qgis_plugin/") for name in names)
    engine = {f"jem_qgis_plugin/vendor/jem_core/{p.relative_to(REPO / 'jem_core').as_posix()}"
              for p in (REPO / "jem_core").rglob("*.py")}
    assert engine <= names
    assert {"jem_qgis_plugin/__init__.py", "jem_qgis_plugin/metadata.txt", "jem_qgis_plugin/LICENSE",
            "jem_qgis_plugin/provider.py",
            "jem_qgis_plugin/resources/icons/icon.png", "jem_qgis_plugin/resources/styles/class_map.qml",
            "jem_qgis_plugin/resources/styles/confidence.qml",
            "jem_qgis_plugin/resources/styles/familiarity.qml"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", "packaging.py"))]


def test_zip_ships_the_bundled_base_model(plugin_zip):
    shipped = zipfile.ZipFile(plugin_zip).read("jem_qgis_plugin/vendor/jem_core/bundled/landcover_base.pt")
    assert shipped == (REPO / "jem_core" / "bundled" / "landcover_base.pt").read_bytes()


def test_metadata_has_every_required_field(plugin_zip):
    metadata = read_metadata(zipfile.ZipFile(plugin_zip).read("jem_qgis_plugin/metadata.txt").decode())
    missing = [key for key in REQUIRED_METADATA if not metadata.get(key.lower())]
    assert not missing
    assert metadata["hasprocessingprovider"] == "yes" and metadata["qgisminimumversion"] == "3.22"
    assert metadata["version"] == jem_core.__version__
    assert f"jem_qgis_plugin/{metadata['icon']}" in zipfile.ZipFile(plugin_zip).namelist()


def test_torch_pin_matches_the_makefile():
    assert f"torch=={TORCH_VERSION}" in (REPO / "Makefile").read_text()


@pytest.mark.parametrize("platform, python, pep668, venv, expected", [
    ("linux", "/usr/bin/python3", True, False,
     f"/usr/bin/python3 -m pip install --user --break-system-packages torch=={TORCH_VERSION}"),
    ("linux", "/opt/venv/bin/python", False, True, f"/opt/venv/bin/python -m pip install torch=={TORCH_VERSION}"),
    ("darwin", "/Applications/QGIS.app/Contents/MacOS/bin/python3", False, False,
     f"/Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install --user torch=={TORCH_VERSION}"),
    ("win32", r"C:\Program Files\QGIS 3.22\apps\Python39\python.exe", False, False,
     rf'"C:\Program Files\QGIS 3.22\apps\Python39\python.exe" -m pip install --user torch=={TORCH_VERSION}'),
])
def test_install_command_per_platform(platform, python, pep668, venv, expected):
    assert install_command(platform, python, pep668, venv).startswith(expected)


def test_choices_read_from_core_source_match_the_imported_values():
    from jem_core.device import DEVICE_CHOICES
    from jem_core.models import ARCHITECTURES
    from jem_core.training import TrainConfig

    assert core_constant("models", "ARCHITECTURES") == ARCHITECTURES
    assert tuple(core_constant("device", "DEVICE_CHOICES")) == DEVICE_CHOICES
    assert core_constant("training", "TrainConfig.epochs") == TrainConfig().epochs


# The scripts below run under the system Python (as QGIS does), from a folder outside the repository, with a
# fresh profile: the plugin must come only from the unpacked zip.  BOOT_PROFILE starts a headless QGIS on the
# profile given as the first argument, with Processing up and plugins from that profile only.
BOOT_PROFILE = textwrap.dedent("""
    import json, os, sys
    profile = sys.argv[1]
    sys.path.insert(0, "/usr/share/qgis/python/plugins")
    from qgis.core import QgsApplication, QgsProcessingException, QgsRasterLayer
    app = QgsApplication([], False, profile)
    app.initQgis()
    from processing.core.Processing import Processing
    Processing.initialize()
    import qgis.utils
    plugins = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins")
    qgis.utils.plugin_paths = [plugins]
    sys.path.insert(0, plugins)
    qgis.utils.updateAvailablePlugins()
""")
STARTUP_SCRIPT = BOOT_PROFILE + textwrap.dedent("""
    report = {"available": "jem_qgis_plugin" in qgis.utils.available_plugins,
              "loaded": qgis.utils.loadPlugin("jem_qgis_plugin"),
              "started": qgis.utils.startPlugin("jem_qgis_plugin")}
    provider = QgsApplication.processingRegistry().providerById("jem")
    report["algorithms"] = sorted(a.id() for a in provider.algorithms()) if provider else []
    report["torch_imported"] = "torch" in sys.modules
    import jem_core
    report["jem_core"] = jem_core.__file__
    import processing
    try:
        processing.run("jem:landcovermap", {"INPUT": sys.argv[2], "MODEL": "missing.pt", "OUTPUT": "out.tif"})
        report["run"] = "ran"
    except QgsProcessingException as error:
        report["run"] = str(error)
    qgis.utils.unloadPlugin("jem_qgis_plugin")
    report["after_unload"] = QgsApplication.processingRegistry().providerById("jem") is None
    print("REPORT " + json.dumps(report))
""")


def profile_with_zip(plugin_zip: Path, tmp_path: Path) -> Path:
    """A fresh QGIS profile folder with the zip unpacked into its plugins, as "Install from ZIP" does."""
    profile = tmp_path / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    zipfile.ZipFile(plugin_zip).extractall(plugins)
    return profile


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs the system Python that QGIS uses")
def test_zip_registers_the_provider_in_a_clean_profile(plugin_zip, tmp_path):
    profile = profile_with_zip(plugin_zip, tmp_path)
    (tmp_path / "startup.py").write_text(STARTUP_SCRIPT)
    raster = shutil.copy(REPO / "resources" / "icons" / "icon.png", tmp_path / "input.png")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    done = subprocess.run([SYSTEM_PYTHON, "startup.py", str(profile), str(raster)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout + done.stderr
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["available"] and report["loaded"] and report["started"]
    assert set(OUR_ALGORITHMS) <= set(report["algorithms"])
    vendor = profile / "python" / "plugins" / "jem_qgis_plugin" / "vendor"
    assert Path(report["jem_core"]).is_relative_to(vendor)  # the bundled engine
    assert not report["torch_imported"]  # start-up stays light: torch only when an algorithm runs
    if importable_by_system_python("torch"):
        assert "does not exist" in report["run"]
    else:  # the system Python has no torch here: the algorithm explains how to get it
        assert re.search(rf"needs PyTorch.*{re.escape(SYSTEM_PYTHON)} -m pip install .*torch=={TORCH_VERSION}",
                         report["run"])
    assert report["after_unload"]


def importable_by_system_python(module: str) -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", f"import {module}"], capture_output=True, cwd="/").returncode == 0


@pytest.mark.skipif(not shutil.which("qgis_process.bin") and not shutil.which("qgis_process"),
                    reason="qgis_process is not installed")
def test_qgis_process_lists_the_algorithms_of_the_installed_zip(plugin_zip, tmp_path):
    profile = tmp_path / "profiles" / "default"
    zipfile.ZipFile(plugin_zip).extractall(profile / "python" / "plugins")
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\njem_qgis_plugin=true\n")
    # Debian's qgis_process wrapper adds --noversioncheck, which qgis_process 3.22 rejects: call the binary.
    binary = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(tmp_path), HOME=str(tmp_path))
    done = subprocess.run([binary, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    section = done.stdout.split("JEM-EO", 1)[-1].strip().split("\n\n")[0]
    listed = dict(line.strip().split("\t") for line in section.splitlines())
    assert OUR_ALGORITHMS.items() <= listed.items()


# The same clean profile, run by a Python that has torch: jem:landcovermap with no MODEL maps with the
# bundled model that came in the zip.
MAP_SCRIPT = BOOT_PROFILE + textwrap.dedent("""
    raster, out = sys.argv[2:4]
    qgis.utils.loadPlugin("jem_qgis_plugin") and qgis.utils.startPlugin("jem_qgis_plugin")
    import processing
    result = processing.run("jem:landcovermap", {"INPUT": raster, "DEVICE": "cpu", "OUTPUT": out})
    from jem_core.bundled import base_model_path
    layer = QgsRasterLayer(result["OUTPUT"], "classes")
    print("REPORT " + json.dumps({"model": str(base_model_path()), "valid": layer.isValid(),
                                  "labels": [c.label for c in layer.renderer().classes()]}))
""")


def test_zip_maps_with_the_bundled_model_when_no_model_is_given(plugin_zip, tmp_path):
    from tests.test_active import write_scene

    profile = profile_with_zip(plugin_zip, tmp_path)
    (tmp_path / "map.py").write_text(MAP_SCRIPT)
    raster = write_scene(tmp_path / "scene.tif")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "map.py", str(profile), str(raster), str(tmp_path / "classes.tif")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout + done.stderr
    report = json.loads(lines[-1][len("REPORT "):])
    assert Path(report["model"]).is_relative_to(profile / "python" / "plugins" / "jem_qgis_plugin" / "vendor")
    assert report["valid"] and report["labels"]
    bundled = load_model(REPO / "jem_core" / "bundled" / "landcover_base.pt")
    assert set(report["labels"]) <= set(bundled.meta.class_names)
