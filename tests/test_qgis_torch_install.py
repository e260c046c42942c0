"""The plugin's PyTorch installer in QGIS: the background task (with a stand-in wheel) and the offer."""
from __future__ import annotations

import importlib
import sys
import time
from functools import partial

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import QCoreApplication

from jem_qgis_plugin import torch_install, torch_install_ui
from tests.test_torch_install import STANDIN, clean_sys_path, write_wheel  # noqa: F401 (fixture)


def run_task(task, seconds: float = 60.0) -> list:
    """Start a task on QGIS's task manager and pump events until it reported its outcome."""
    reported = []
    task.report = reported.append
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + seconds
    while not reported and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.05)
    return reported


def test_task_installs_in_the_background_and_the_package_imports_at_once(qgis_app, tmp_path, clean_sys_path):
    wheels = write_wheel(tmp_path / "wheels").parent
    target = torch_install.packages_dir(tmp_path / "profile")
    job = partial(torch_install.install, sys.executable, target, ["--no-index", "--find-links", str(wheels)],
                  f"{STANDIN}==1.0", STANDIN)
    task = torch_install_ui.TorchInstallTask("stand-in", job, target, report=None)
    reported = run_task(task)
    assert reported and reported[0].ok, reported
    assert task.progress() == 100.0
    assert importlib.import_module(STANDIN).VALUE == 42


def test_failed_task_reports_the_reason_in_the_message_bar(qgis_iface, tmp_path, clean_sys_path):
    target = torch_install.packages_dir(tmp_path / "profile")
    job = partial(torch_install.install, sys.executable, target, ["--no-index"], "jem-no-such-package==9.9",
                  "jem_no_such_package")
    ui = torch_install_ui.TorchInstallUi(qgis_iface)
    task = torch_install_ui.TorchInstallTask("bad", job, target, report=None)
    reported = run_task(task)
    ui.finished(reported[0])
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert critical and "pip could not install jem-no-such-package==9.9" in critical[-1]
    assert not target.exists()


def test_menu_action_and_offer_when_torch_is_missing(qgis_iface, monkeypatch):
    monkeypatch.setattr(torch_install_ui, "torch_available", lambda: False)
    ui = torch_install_ui.TorchInstallUi(qgis_iface)
    ui.initGui()
    try:
        assert ui.action is not None and ui.action.text() == "Install PyTorch…"
        item = qgis_iface.messageBar().currentItem()
        assert item is not None and "needs PyTorch" in item.text()
    finally:
        ui.unload()
    assert ui.action is None
