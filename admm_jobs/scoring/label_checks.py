"""Per-class label checks: does a batch's confusion (given label x the published model's prediction) rise
above what the model shows on held-out data it never trained on (its validation split)?

Relabelled images, whether a broken labelling job, a partial flip of one class into another or a
planted trigger relabelled to a target class, move a few percent of a batch into one or a few
off-diagonal cells: the model still predicts what the images show, not the label they were given.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class RisenCell:
    """An off-diagonal cell (given label, predicted class) whose share of its row rose beyond sampling."""

    given: int
    predicted: int
    observed: float  # b_ij / b_i: the batch's share of images labelled ``given`` that the model calls ``predicted``
    expected: float  # r_ij / r_i: the same share on the reference (the model's validation split)
    bound: float  # the largest share of the row that sampling explains at the test's level (and the margin)
    p_value: float


def off_diagonal_cells(classes: int) -> int:
    """How many cells a K-class confusion matrix tests: K (K - 1)."""
    return classes * (classes - 1)


def row_share_p_values(batch_count: np.ndarray, batch_row: int, reference_count: int, reference_row: int) -> np.ndarray:
    """One-sided Fisher exact p-values that a cell's share of its row is larger in the batch than in the reference.

    For the 2 x 2 table [[k, b - k], [r_ij, r - r_ij]] (batch and reference rows, in the cell or not)
    and every batch count k in ``batch_count``: P(X >= k) for X hypergeometric with population
    b + r, k + r_ij of them in the cell, b drawn. Both counts size it: a small batch or a small
    reference row widens what sampling explains.
    """
    k = np.asarray(batch_count)
    return stats.hypergeom.sf(k - 1, batch_row + reference_row, k + reference_count, batch_row)


def risen_cells(batch: np.ndarray, reference: np.ndarray, test_level: float, min_excess: float) -> list[RisenCell]:
    """Off-diagonal cells where the batch's share of the row exceeds the reference's beyond sampling.

    A cell is named when its Fisher p-value (:func:`row_share_p_values`) is at most ``test_level``
    and its share exceeds the reference's by more than ``min_excess`` (a small drift of natural data
    moves shares a little; relabelling moves them a lot). ``test_level`` is the family-wise
    false-alarm rate divided by the number of tests in the family (Bonferroni): every cell
    (:func:`off_diagonal_cells`) and every other statistic the caller tests on the same batch.
    ``bound`` is the largest share of the row that passes both conditions.
    """
    batch, reference = np.asarray(batch, np.int64), np.asarray(reference, np.int64)
    risen = []
    for given, predicted in zip(*np.nonzero(~np.eye(*batch.shape, dtype=bool))):
        batch_row, reference_row = int(batch[given].sum()), int(reference[given].sum())
        if batch_row == 0 or reference_row == 0:
            continue
        rejected = functools.partial(_rejected, batch_row=batch_row, in_reference=int(reference[given, predicted]),
                                     reference_row=reference_row, test_level=test_level, min_excess=min_excess)
        count = int(batch[given, predicted])
        if not rejected(count):
            continue
        low, high = 0, count  # no share is above expected + min_excess at 0: rejected(high) and not rejected(low)
        while high - low > 1:  # rejection only grows with the count: bisect for the largest count passing
            middle = (low + high) // 2
            low, high = (low, middle) if rejected(middle) else (middle, high)
        risen.append(RisenCell(int(given), int(predicted), count / batch_row,
                               int(reference[given, predicted]) / reference_row, low / batch_row,
                               float(row_share_p_values(count, batch_row, int(reference[given, predicted]),
                                                        reference_row))))
    return risen


def _rejected(count: int, batch_row: int, in_reference: int, reference_row: int, test_level: float,
              min_excess: float) -> bool:
    """Whether ``count`` of ``batch_row`` images in a cell is beyond sampling and the margin (see :func:`risen_cells`)."""
    return (count / batch_row > in_reference / reference_row + min_excess
            and row_share_p_values(count, batch_row, in_reference, reference_row) <= test_level)
