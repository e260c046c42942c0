"""The confidence layer of a map: each cell's score for its mapped class, averaged over a box of cells around it.

The score is p(y|x), or for a model that holds its labelled patches' features p(y|x) times the label
agreement q_y (label_agreement.py); mapping.cell_values gives it per class as a row's "support".

A retrained map goes wrong in blotches about a patch wide or wider (a field, a block of houses the model
reads as another class), and one cell's own max p(y|x) is a noisy reading of them: on the scene benchmark
the mapped class's probability averaged over a box 1.25 patches wide ranked wrong pixels below right
ones better than each cell's own max p: AUROC 0.775 against 0.765 over six seeds, 3/4 of a patch 0.772,
1.75 patches 0.773 (docs/labelling.md). The class map, the familiarity and the probabilities are not
changed; only the confidence layer is smoothed.

Streamed like the map itself: cell rows come in order and leave `radius` rows later, so memory holds
2 · radius + 1 rows of per-class scores.  Cells no patch covers (nodata) take no part in their neighbours'
averages and stay nodata.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

CONFIDENCE_BOX_PATCHES = 1.25  # box side in patches: 5 cells at a stride of a quarter patch
# In a confidence raster's jem_confidence tag when its score is p(y|x) times the label agreement (here, not in
# label_agreement.py, because the QGIS plugin reads it before torch may be installed).
AGREEMENT_TAG_WORDS = "label agreement"
MAX_CONFIDENCE_BOX = 10  # patches; the rows the box holds back grow with it

Row = dict[str, np.ndarray]


def box_cells(patch_size: int, stride: int, box_patches: float = CONFIDENCE_BOX_PATCHES) -> int:
    """Cells per side of the box: the odd count nearest to box_patches patches; 1 = each cell alone."""
    if box_patches < 0:
        raise ValueError(f"box_patches must be ≥ 0 (got {box_patches})")
    cells = box_patches * patch_size / stride
    return 1 + 2 * max(0, round((cells - 1) / 2))


def box_of_mapped(support: np.ndarray, classes: np.ndarray, radius: int) -> np.ndarray:
    """(cols,) mean support of class classes[j] over the rows given and the columns j − radius … j + radius.

    support: (rows, cols, C) per-class scores, NaN where no patch covers a cell; classes: (cols,) the centre
    row's mapped class, out of range (nodata) where that cell is not covered, which gives NaN there.
    """
    covered = ~np.isnan(support[..., 0])
    sums = np.concatenate([np.nan_to_num(support).sum(0), covered.sum(0)[:, None]], axis=1)
    running = np.cumsum(np.pad(sums, ((radius + 1, radius), (0, 0))), axis=0)
    box = running[2 * radius + 1:] - running[:-(2 * radius + 1)]  # (cols, C + 1): class sums, cell count
    mapped = classes < box.shape[1] - 1
    picked = np.take_along_axis(box, np.where(mapped, classes, 0)[:, None].astype(np.int64), 1)[:, 0]
    return np.where(mapped, picked / np.maximum(box[:, -1], 1), np.nan).astype(np.float32)


class ConfidenceBox:
    """Between the cell rows and the writer: replaces each row's confidence by its box average.

    add(row) takes the rows in order, each with its "classes", "confidence" and "support" (C, cols): the
    per-class score whose value for the mapped class is a cell's confidence (p(y|x), or p(y|x) times the
    label agreement q_y, label_agreement.py), NaN where uncovered; the support does not go on to `emit`.
    finish() emits the last `radius` rows.  `emit` receives every row exactly once, in order.
    """

    def __init__(self, cells: int, emit: Callable[[Row], None]) -> None:
        self.radius = cells // 2
        self.emit = emit
        self.rows: deque[tuple[Row, np.ndarray]] = deque()  # the rows a pending row's box can still reach
        self.received = self.emitted = 0

    def add(self, row: Row) -> None:
        support = row["support"].T
        self.rows.append(({kind: values for kind, values in row.items() if kind != "support"}, support))
        self.received += 1
        if self.received - self.emitted > self.radius:  # the next row's box is complete below it
            self._emit_next()

    def finish(self) -> None:
        while self.emitted < self.received:
            self._emit_next()

    def _emit_next(self) -> None:
        first = self.received - len(self.rows)  # row index of self.rows[0]
        centre = self.emitted - first
        window = list(self.rows)[max(0, centre - self.radius):centre + self.radius + 1]
        row = dict(self.rows[centre][0])
        row["confidence"] = box_of_mapped(np.stack([p for _, p in window]), row["classes"], self.radius)
        self.emit(row)
        self.emitted += 1
        while self.emitted - (self.received - len(self.rows)) > self.radius:  # no pending box reaches it
            self.rows.popleft()
