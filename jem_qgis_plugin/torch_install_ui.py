"""The desktop side of installing PyTorch: a menu action and a message-bar offer, a dialog showing the
exact command, and a background QgsTask whose outcome lands in the message bar.  The mechanics
(folder, command, staging, sys.path) are in torch_install, which has no QGIS import."""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Callable

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsTask
from qgis.PyQt.QtWidgets import QAction, QMessageBox, QPushButton

from jem_core import JEMError

from . import torch_install
from .lazy_torch import torch_available

MENU = "JEM-EO"


def plugin_packages_dir() -> Path:
    """The plugin's package folder in the active QGIS profile."""
    return torch_install.packages_dir(QgsApplication.qgisSettingsDirPath())


def activate_installed_packages() -> None:
    """At plugin start: a torch installed by an earlier session is found again."""
    torch_install.activate(plugin_packages_dir())


class TorchInstallTask(QgsTask):
    """pip in the background: progress in the task manager, cancellable, outcome reported on finish.

    job is torch_install.install with everything but progress and should_stop bound.
    """

    def __init__(self, description: str, job: Callable[..., torch_install.InstallOutcome], target: Path,
                 report: Callable[[torch_install.InstallOutcome], None]) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.job = job
        self.target = target
        self.report = report
        self.outcome: torch_install.InstallOutcome | None = None

    def run(self) -> bool:
        self.outcome = self.job(progress=lambda share, line: self.setProgress(100.0 * share),
                                should_stop=self.isCanceled)
        return self.outcome.ok

    def finished(self, result: bool) -> None:  # noqa: ARG002 (the outcome says more than the flag)
        outcome = self.outcome or torch_install.InstallOutcome(False, "The PyTorch install was cancelled "
                                                                       "before it began.")
        if outcome.ok:
            torch_install.activate(self.target)  # no-op after install() did it; sys.path as QGIS sees it
        QgsMessageLog.logMessage("\n".join(outcome.log) or outcome.message, MENU,
                                 Qgis.Info if outcome.ok else Qgis.Warning)
        self.report(outcome)


class TorchInstallUi:
    """Plugins ▸ JEM-EO ▸ Install PyTorch…, and an offer in the message bar when torch is missing."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.action: QAction | None = None
        self.task: TorchInstallTask | None = None

    def initGui(self) -> None:  # noqa: N802 (QGIS API name)
        self.action = QAction("Install PyTorch…", self.iface.mainWindow())
        self.action.triggered.connect(self.offer)
        self.iface.addPluginToMenu(MENU, self.action)
        if not torch_available():
            bar = self.iface.messageBar()
            item = bar.createMessage(MENU, "needs PyTorch, which is not installed for QGIS's Python.")
            button = QPushButton("Install PyTorch…", item)
            button.clicked.connect(self.offer)
            item.layout().addWidget(button)
            bar.pushWidget(item, Qgis.Warning)

    def unload(self) -> None:
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.action = None

    def offer(self) -> None:
        """Ask which build, show the exact command, then start the task."""
        if self.task is not None:
            self.iface.messageBar().pushInfo(MENU, "PyTorch is being installed; see the task manager.")
            return
        target = plugin_packages_dir()
        python = torch_install.interpreter()
        box = QMessageBox(self.iface.mainWindow())
        box.setWindowTitle(f"{MENU}: install PyTorch {torch_install.TORCH_VERSION}")
        status = "is already importable; installing adds a copy" if torch_available() else "is not installed"
        box.setText(f"PyTorch {status} for QGIS's Python. The plugin can install it into\n{target}\n"
                    "in the background, usable without restarting QGIS (the CPU build for Linux x86-64 is a "
                    "192 MB download and takes 880 MB on disk).")
        commands = {build: self._command_text(python, target, build) for build in torch_install.BUILDS}
        box.setDetailedText("Or run one of these in a terminal"
                            f"{' (the OSGeo4W Shell)' if sys.platform == 'win32' else ''}:\n\n"
                            + "\n\n".join(f"{build}: {text}" for build, text in commands.items()))
        cpu = box.addButton("Install CPU build", QMessageBox.AcceptRole)
        cuda = box.addButton("Install CUDA build (NVIDIA GPU)", QMessageBox.AcceptRole)
        cuda.setEnabled(sys.platform.startswith("linux"))
        box.addButton(QMessageBox.Cancel)
        box.exec_()
        build = {cpu: "cpu", cuda: "cuda"}.get(box.clickedButton())
        if build is not None:
            self.start(build)

    @staticmethod
    def _command_text(python: str, target: Path, build: str) -> str:
        try:
            return torch_install.shell_text(torch_install.pip_command(python, target,
                                                                      torch_install.index_arguments(build)))
        except JEMError as error:
            return str(error)

    def start(self, build: str) -> None:
        target = plugin_packages_dir()
        job = partial(torch_install.install, torch_install.interpreter(), target,
                      torch_install.index_arguments(build))
        self.task = TorchInstallTask(f"Installing PyTorch {torch_install.TORCH_VERSION} ({build}) for JEM-EO", job,
                                     target, self.finished)
        QgsApplication.taskManager().addTask(self.task)
        self.iface.messageBar().pushInfo(MENU, "Installing PyTorch in the background; progress in the task manager.")

    def finished(self, outcome: torch_install.InstallOutcome) -> None:
        self.task = None
        bar = self.iface.messageBar()
        if outcome.ok:
            bar.pushSuccess(MENU, f"{outcome.message} The JEM-EO algorithms can run now.")
        else:
            bar.pushCritical(MENU, f"{outcome.message} (pip's output: View ▸ Panels ▸ Log Messages ▸ {MENU})")
