"""Label a few patches, retrain semi-supervised, and suggest where to label next (active learning).

patches: annotations → labelled patches, and unlabelled patches spread over the scene;
retrain: semi-supervised JEM on them; suggest: the patches most worth labelling next.
"""
from .patches import (
    MIN_VALID_FRACTION,
    Annotation,
    PatchReader,
    PatchWindow,
    RasterInput,
    annotation_points,
    cell_centres,
    open_patch_reader,
    patches_from_annotations,
    sample_unlabelled_patches,
)
from .retrain import (
    RETRAIN_DEFAULTS,
    RetrainDefaults,
    RetrainResult,
    default_start_model,
    fit_head,
    reading_coarsen,
    retrain,
    retrain_config,
    retrain_on_patches,
)
from .suggest import (
    SUGGESTION_FIELDS,
    Suggestion,
    percentile_rank,
    priority,
    spread_selection,
    suggest,
    uncertainty_scores,
)

__all__ = ["MIN_VALID_FRACTION", "Annotation", "PatchReader", "PatchWindow", "RasterInput", "annotation_points",
           "cell_centres", "open_patch_reader", "patches_from_annotations", "sample_unlabelled_patches",
           "RETRAIN_DEFAULTS", "RetrainDefaults", "RetrainResult", "default_start_model", "fit_head",
           "reading_coarsen", "retrain", "retrain_config", "retrain_on_patches", "SUGGESTION_FIELDS", "Suggestion",
           "percentile_rank", "priority", "spread_selection", "suggest", "uncertainty_scores"]
