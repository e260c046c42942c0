"""The Processing provider `jem`: one list of algorithm classes, extend it to add algorithms."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider

from jem_core import __version__

from .algorithms.landcover_map import LandCoverMapAlgorithm
from .algorithms.ood import OodAlgorithm
from .algorithms.retrain import RetrainAlgorithm
from .algorithms.samples import SamplesAlgorithm
from .algorithms.suggest import SuggestAlgorithm
from .algorithms.train import TrainAlgorithm
from .paths import icon

# Every algorithm the provider offers; each class has a no-argument constructor.
ALGORITHMS = [
    LandCoverMapAlgorithm,
    TrainAlgorithm,
    OodAlgorithm,
    SamplesAlgorithm,
    RetrainAlgorithm,
    SuggestAlgorithm,
]


class JemProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "jem"

    def name(self) -> str:
        return "JEM-EO"

    def longName(self) -> str:  # noqa: N802 (QGIS API name)
        return f"JEM-EO {__version__}: Joint Energy-based Models for Earth observation"

    def versionInfo(self) -> str:  # noqa: N802 (QGIS API name)
        return __version__

    def icon(self):
        return icon("jem.svg")

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802 (QGIS API name)
        """jem_core writes GeoTIFF: offer only .tif, so no output gets a misleading extension."""
        return ["tif"]

    def loadAlgorithms(self) -> None:  # noqa: N802 (QGIS API name)
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())
