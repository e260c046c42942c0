"""The model that ships with JEM-EO, in the repository and inside the QGIS plugin zip.

`landcover_base.pt`: a JEM trained by our own `jem train` on AID scenes grouped into 8 land-cover
classes (recipe: recipes/aid_landcover.py; training log: docs/results/base_model/; model card:
docs/model_card.md).  It is the default model of every QGIS algorithm and of the labelling dock, and
`jem retrain` starts from it when the raster's bands fit it.
"""
from __future__ import annotations

from pathlib import Path

from . import JEMError

BASE_MODEL = Path(__file__).with_name("bundled") / "landcover_base.pt"


def base_model_path() -> Path:
    """The bundled base model's file; a clear error when an install lost it."""
    if not BASE_MODEL.is_file():
        raise JEMError(f"The bundled base model '{BASE_MODEL}' is missing from this installation. Reinstall "
                       "JEM-EO, or give a model file explicitly.")
    return BASE_MODEL
