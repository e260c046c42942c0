"""Plugin object QGIS creates through classFactory: registers the Processing provider."""
from __future__ import annotations

from qgis.core import QgsApplication

from .provider import JemProvider
from .torch_install_ui import TorchInstallUi, activate_installed_packages


class JemPlugin:
    """initProcessing() is what qgis_process calls; the desktop calls initGui(), which adds to it.

    GUI pieces (docks, map tools, menu actions) belong in initGui() and must be removed again in
    unload(); initProcessing() must stay GUI-free because qgis_process has no iface.
    """

    def __init__(self, iface) -> None:
        self.iface = iface
        self.provider: JemProvider | None = None
        self.annotation_ui = None
        self.torch_ui: TorchInstallUi | None = None
        activate_installed_packages()  # torch installed by the plugin in an earlier session

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API name)
        if self.provider is None:
            self.provider = JemProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 (QGIS API name)
        self.initProcessing()
        if self.iface is not None:  # the labelling dock and map tool (issue 5)
            from .annotation import AnnotationUi

            self.annotation_ui = AnnotationUi(self.iface)
            self.annotation_ui.initGui()
            self.torch_ui = TorchInstallUi(self.iface)
            self.torch_ui.initGui()

    def unload(self) -> None:
        if self.torch_ui is not None:
            self.torch_ui.unload()
            self.torch_ui = None
        if self.annotation_ui is not None:
            self.annotation_ui.unload()
            self.annotation_ui = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
