"""Plugin object QGIS creates through classFactory: registers the Processing provider."""
from __future__ import annotations

from qgis.core import QgsApplication

from .provider import JemProvider


class JemPlugin:
    """initProcessing() is what qgis_process calls; the desktop calls initGui(), which adds to it.

    GUI pieces (docks, map tools, menu actions) belong in initGui() and must be removed again in
    unload(); initProcessing() must stay GUI-free because qgis_process has no iface.
    """

    def __init__(self, iface) -> None:
        self.iface = iface
        self.provider: JemProvider | None = None
        self.annotation_ui = None

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

    def unload(self) -> None:
        if self.annotation_ui is not None:
            self.annotation_ui.unload()
            self.annotation_ui = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
