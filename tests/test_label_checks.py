"""Per-class label checks: no false alarms on clean batches, relabelled shares found and named."""

from __future__ import annotations

import numpy as np
import pytest

from admm_jobs.scoring import label_checks

CLASSES = 10
FAMILY_ALPHA = 1e-3
TEST_LEVEL = FAMILY_ALPHA / label_checks.off_diagonal_cells(CLASSES)
MIN_EXCESS = 0.01


def model_confusion(rng) -> np.ndarray:
    """Row-stochastic confusion of a ~97 % accurate model whose errors favour a few class pairs."""
    errors = rng.dirichlet(np.full(CLASSES - 1, 0.5), size=CLASSES) * rng.uniform(0.01, 0.06, size=(CLASSES, 1))
    confusion = np.zeros((CLASSES, CLASSES))
    for given in range(CLASSES):
        confusion[given, np.arange(CLASSES) != given] = errors[given]
        confusion[given, given] = 1 - errors[given].sum()
    return confusion


def draw(rng, probabilities: np.ndarray, images: int) -> np.ndarray:
    """Counts of a batch of ``images`` with uniform labels scored by a model with confusion ``probabilities``."""
    per_class = rng.multinomial(images, np.full(CLASSES, 1 / CLASSES))
    return np.stack([rng.multinomial(n, row) for n, row in zip(per_class, probabilities)])


def test_clean_batches_raise_no_cell():
    rng = np.random.default_rng(11)
    probabilities = model_confusion(rng)
    reference = draw(rng, probabilities, 5_000)  # a validation split
    for images in [2_000, 5_000, 20_000, 50_000] * 15:
        assert label_checks.risen_cells(draw(rng, probabilities, images), reference, TEST_LEVEL, MIN_EXCESS) == []


@pytest.mark.parametrize("images", [2_000, 50_000])
def test_a_partial_flip_of_three_percent_is_named_with_its_shares_and_bound(images):
    rng = np.random.default_rng(5)
    probabilities = model_confusion(rng)
    reference = draw(rng, probabilities, 5_000)
    batch = draw(rng, probabilities, images)
    flipped = int(0.03 * images)  # images of 3 given the label 8: the model still calls them 3
    batch[8, 3] += flipped
    [cell] = label_checks.risen_cells(batch, reference, TEST_LEVEL, MIN_EXCESS)
    assert (cell.given, cell.predicted) == (8, 3)
    assert cell.observed == batch[8, 3] / batch[8].sum() and cell.expected == reference[8, 3] / reference[8].sum()
    assert cell.expected + MIN_EXCESS <= cell.bound < cell.observed and cell.p_value <= TEST_LEVEL


def test_the_bound_is_the_largest_share_that_passes():
    reference = np.diag(np.full(CLASSES, 500))
    reference[2, 7] = 10  # 2 % of row 2
    batch = np.diag(np.full(CLASSES, 400))
    batch[2, 7] = 40
    level = 1e-4
    [cell] = label_checks.risen_cells(batch, reference, level, 0.0)
    row = int(batch[2].sum())
    largest_passing = round(cell.bound * row)
    assert label_checks.row_share_p_values(largest_passing, row, 10, 510) > level
    assert label_checks.row_share_p_values(largest_passing + 1, row, 10, 510) <= level
    # a smaller reference row explains more
    small = reference.copy()
    small[2] = reference[2] // 5
    assert all(other.bound > cell.bound for other in label_checks.risen_cells(batch, small, level, 0.0))
