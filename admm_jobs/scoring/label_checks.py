"""Per-class label checks: does a batch's confusion (given label x the published model's prediction) rise
above what the model shows on held-out data it never trained on (its validation split)?

Relabelled images, whether a broken labelling job, a partial flip of one class into another or a
planted trigger relabelled to a target class, move a few percent of a batch into one or a few
off-diagonal cells: the model still predicts what the images show, not the label they were given.

Two kinds of counts are compared with the reference, each by the same one-sided test of a share
of a row (:func:`risen_share`: Fisher's exact test, sized by both counts, plus a margin):

* the cells of the confusion (:func:`risen_cells`): a flip of one class into another fills one cell;
* the share of likely mislabelled images per class and over all classes (:func:`risen_mislabelled`),
  estimated by confident learning (Northcutt, Jiang and Chuang, *Confident Learning: Estimating
  Uncertainty in Dataset Labels*, JAIR 2021): uniform noise spreads thinly over every cell, but adds
  up in a class's row. The model outputs squared-hinge scores, so they are first calibrated into
  probabilities by temperature scaling on the validation split (:func:`temperature_tally`,
  :func:`fit_calibration`); an image labelled i counts as likely mislabelled as j when its calibrated
  probability of j reaches class j's threshold, the validation split's mean probability of j over the
  images labelled j, and is the largest such (the off-diagonal of the *confident joint*,
  :func:`confident_joint`; cleanlab's ``filter_by="confident_learning"``).

Validate tests the cells of the confident joint, the confusion of the *confident* predictions, not of every
argmax: a relabelled image is one the model is sure is another class, while natural drift makes it unsure.
Measured (``bench/label_checks.py``, a 0.97 ADMM model): shifting 36,000 clean images by one pixel raised the
argmax cell (9 given, 7 predicted) from 1.6 % to 9.2 % of its row, within 3.6x of the test's level, so a
larger shifted batch would have been quarantined; the confident joint's cells stayed over 4,000x away, and
half of a class relabelled still fills its cell (a third of the row).

Why not cleanlab: its ``find_label_issues`` needs the whole batch's probabilities in memory and takes
the thresholds from the batch itself, so a poisoned batch lowers its own thresholds and batch and
reference are counted by different rules. Here the thresholds are the reference's, fixed at publish,
and a batch is counted chunk by chunk in one pass (bounded memory) by the rule its reference was
counted with: the confident joint is a dozen lines of numpy, and cleanlab would add a dependency
(with its own pins) for a function we would have to feed differently than it is built for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import numpy as np
from scipy import special, stats

# Temperatures tried when calibrating: squared-hinge scores are near +-1, so the fitted temperature lies
# well inside; neighbours differ by 4 % (the negative log-likelihood is flat to well below that near its minimum).
TEMPERATURES = np.geomspace(1e-3, 1e2, 295)


@dataclasses.dataclass(frozen=True)
class RisenCell:
    """An off-diagonal cell (given label, predicted class) whose share of its row rose beyond sampling."""

    given: int
    predicted: int
    observed: float  # b_ij / b_i: the batch's share of images labelled ``given`` that the model calls ``predicted``
    expected: float  # r_ij / r_i: the same share on the reference (the model's validation split)
    bound: float  # the largest share of the row that sampling explains at the test's level (and the margin)
    p_value: float


@dataclasses.dataclass(frozen=True)
class RisenMislabelled:
    """A class (``given``; None: all classes together) whose share of likely mislabelled images rose beyond
    sampling; shares and bound as in :class:`RisenCell`."""

    given: int | None
    observed: float
    expected: float
    bound: float
    p_value: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Temperature scaling of a model's scores and the confident-learning thresholds of its classes."""

    temperature: float
    thresholds: np.ndarray  # t_j: mean calibrated probability of class j over the reference's images labelled j


@dataclasses.dataclass(frozen=True)
class TemperatureTally:
    """Sums over labelled images, per temperature of :data:`TEMPERATURES`: the negative log-likelihood of the
    given labels (``losses``, shape (T,)) and per class the probabilities of the given label (``confidences``,
    (T, K)); ``rows``: images per given label. Tallies of chunks add up (:meth:`plus`)."""

    losses: np.ndarray
    confidences: np.ndarray
    rows: np.ndarray

    def plus(self, other: TemperatureTally) -> TemperatureTally:
        return TemperatureTally(self.losses + other.losses, self.confidences + other.confidences,
                                self.rows + other.rows)


def off_diagonal_cells(classes: int) -> int:
    """How many cells a K-class confusion matrix tests: K (K - 1)."""
    return classes * (classes - 1)


def tests_per_batch(classes: int) -> int:
    """How many tests the label checks make on one batch: every off-diagonal cell, every class's mislabelled
    share and the overall one (the Bonferroni divisor of the family's false-alarm rate)."""
    return off_diagonal_cells(classes) + classes + 1


def row_share_p_values(batch_count: np.ndarray, batch_row: int, reference_count: int, reference_row: int) -> np.ndarray:
    """One-sided Fisher exact p-values that a cell's share of its row is larger in the batch than in the reference.

    For the 2 x 2 table [[k, b - k], [r_ij, r - r_ij]] (batch and reference rows, in the cell or not)
    and every batch count k in ``batch_count``: P(X >= k) for X hypergeometric with population
    b + r, k + r_ij of them in the cell, b drawn. Both counts size it: a small batch or a small
    reference row widens what sampling explains.
    """
    k = np.asarray(batch_count)
    return stats.hypergeom.sf(k - 1, batch_row + reference_row, k + reference_count, batch_row)


def risen_share(count: int, row: int, reference_count: int, reference_row: int, test_level: float,
                min_excess: float) -> tuple[float, float] | None:
    """(bound, p-value) when ``count`` of ``row`` batch images is a larger share than ``reference_count`` of
    ``reference_row`` beyond sampling and the margin; None otherwise (or when either row is empty).

    Beyond both means: the Fisher p-value (:func:`row_share_p_values`) is at most ``test_level`` and the
    share exceeds the reference's by more than ``min_excess`` (a small drift of natural data moves shares
    a little; relabelling moves them a lot). ``bound`` is the largest share of the row passing both.
    """
    if row == 0 or reference_row == 0:
        return None

    def rejected(k: int) -> bool:
        return (k / row > reference_count / reference_row + min_excess
                and row_share_p_values(k, row, reference_count, reference_row) <= test_level)

    if not rejected(count):
        return None
    low, high = 0, count  # no share is above expected + min_excess at 0: rejected(high) and not rejected(low)
    while high - low > 1:  # rejection only grows with the count: bisect for the largest count passing
        middle = (low + high) // 2
        low, high = (low, middle) if rejected(middle) else (middle, high)
    return low / row, float(row_share_p_values(count, row, reference_count, reference_row))


def risen_cells(batch: np.ndarray, reference: np.ndarray, test_level: float, min_excess: float,
                batch_rows: np.ndarray | None = None, reference_rows: np.ndarray | None = None) -> list[RisenCell]:
    """Off-diagonal cells where the batch's share of the row exceeds the reference's beyond sampling
    (:func:`risen_share`). ``test_level`` is the family-wise false-alarm rate divided by the number of tests
    in the family (Bonferroni: :func:`tests_per_batch`). A row's images are ``*_rows`` (None: the matrix's row
    sums, as in a confusion; a confident joint leaves out the images it does not count)."""
    batch, reference = np.asarray(batch, np.int64), np.asarray(reference, np.int64)
    batch_rows = batch.sum(axis=1) if batch_rows is None else np.asarray(batch_rows, np.int64)
    reference_rows = reference.sum(axis=1) if reference_rows is None else np.asarray(reference_rows, np.int64)
    risen = []
    for given, predicted in zip(*np.nonzero(~np.eye(*batch.shape, dtype=bool))):
        outcome = risen_share(int(batch[given, predicted]), int(batch_rows[given]), int(reference[given, predicted]),
                              int(reference_rows[given]), test_level, min_excess)
        if outcome is not None:
            risen.append(RisenCell(int(given), int(predicted), float(batch[given, predicted] / batch_rows[given]),
                                   float(reference[given, predicted] / reference_rows[given]), *outcome))
    return risen


def risen_mislabelled(batch_joint: np.ndarray, batch_rows: np.ndarray, reference_joint: np.ndarray,
                      reference_rows: np.ndarray, test_level: float, min_excess: float,
                      min_overall_excess: float) -> list[RisenMislabelled]:
    """Classes, and all classes together (``given`` None, tested last), whose share of likely mislabelled
    images (the off-diagonal of their row of the confident joint, :func:`mislabelled_counts`, over the
    images with that label, ``*_rows``) exceeds the reference's beyond sampling (:func:`risen_share`); the
    margin of a class is ``min_excess``, of all classes together ``min_overall_excess`` (natural drift moves
    one class's share more than the average)."""
    batch_issues, reference_issues = mislabelled_counts(batch_joint), mislabelled_counts(reference_joint)
    rows = [(given, int(batch_issues[given]), int(batch_rows[given]), int(reference_issues[given]),
             int(reference_rows[given])) for given in range(len(batch_rows))]
    rows.append((None, int(batch_issues.sum()), int(np.sum(batch_rows)), int(reference_issues.sum()),
                 int(np.sum(reference_rows))))
    risen = []
    for given, count, row, reference_count, reference_row in rows:
        margin = min_excess if given is not None else min_overall_excess
        outcome = risen_share(count, row, reference_count, reference_row, test_level, margin)
        if outcome is not None:
            risen.append(RisenMislabelled(given, count / row, reference_count / reference_row, *outcome))
    return risen


# ---------------------------------------------------------------- calibration and the confident joint


def calibrated_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling: softmax(scores / T) per row."""
    return special.softmax(np.asarray(scores, np.float64) / temperature, axis=1)


def temperature_tally(scores: np.ndarray, labels: np.ndarray) -> TemperatureTally:
    """The :class:`TemperatureTally` of one chunk of scored images (labels outside the classes are left out)."""
    classes = scores.shape[1]
    valid = (labels >= 0) & (labels < classes)
    scores, labels = np.asarray(scores[valid], np.float64), labels[valid].astype(np.int64)
    losses, confidences = np.zeros(len(TEMPERATURES)), np.zeros((len(TEMPERATURES), classes))
    given = scores[np.arange(len(labels)), labels]
    for index, temperature in enumerate(TEMPERATURES):
        scaled = scores / temperature
        log_norm = special.logsumexp(scaled, axis=1)
        losses[index] = float(np.sum(log_norm - given / temperature))
        confidences[index] = np.bincount(labels, np.exp(given / temperature - log_norm), minlength=classes)
    return TemperatureTally(losses, confidences, np.bincount(labels, minlength=classes))


def fit_calibration(tally: TemperatureTally) -> Calibration:
    """The temperature of least negative log-likelihood on the tallied images (Guo et al. 2017, *On Calibration
    of Modern Neural Networks*), and at it each class's threshold: its mean probability over the images given
    its label (a class without images gets 1: nothing is counted as mislabelled into it)."""
    best = int(np.argmin(tally.losses))
    rows = tally.rows.astype(np.float64)
    thresholds = np.divide(tally.confidences[best], rows, out=np.ones_like(rows), where=rows > 0)
    return Calibration(float(TEMPERATURES[best]), thresholds)


def confident_joint(scores: np.ndarray, labels: np.ndarray, calibration: Calibration) -> np.ndarray:
    """C[i, j]: images given label i whose calibrated probability of j reaches threshold t_j, j the most probable
    such class (images reaching no threshold are not counted; labels outside the classes are left out).
    Counts of chunks add up."""
    classes = scores.shape[1]
    valid = (labels >= 0) & (labels < classes)
    probabilities = calibrated_probabilities(scores[valid], calibration.temperature)
    confident = np.where(probabilities >= calibration.thresholds, probabilities, -1.0)
    counted = confident.max(axis=1) >= 0
    pairs = labels[valid][counted].astype(np.int64) * classes + confident[counted].argmax(axis=1)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def mislabelled_counts(joint: np.ndarray) -> np.ndarray:
    """Per given label: images confidently of another class (the off-diagonal of its row of the confident joint)."""
    joint = np.asarray(joint, np.int64)
    return joint.sum(axis=1) - np.diag(joint)


def calibrate(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]) -> tuple[Calibration, np.ndarray]:
    """The calibration fitted on held-out scored images and their confident joint counted with it: two passes
    over ``chunks()`` ((scores, labels) pairs, e.g. a validation split scored chunk by chunk), so memory holds
    one chunk whatever the split's size."""
    calibration = fit_calibration(functools.reduce(
        TemperatureTally.plus, (temperature_tally(scores, labels) for scores, labels in chunks())))
    return calibration, functools.reduce(np.add, (confident_joint(scores, labels, calibration)
                                                  for scores, labels in chunks()))


@dataclasses.dataclass(frozen=True)
class LabelReference:
    """What a published version's label checks compare a batch with: its confusion, calibration and confident
    joint on its validation split (stored with the version at publish)."""

    confusion: np.ndarray
    calibration: Calibration
    confident_joint: np.ndarray
