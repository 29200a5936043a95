"""Per-class label checks: no false alarms on clean batches, relabelled shares found and named."""

from __future__ import annotations

import numpy as np
import pytest
from fitted_model import FIT_ROWS, fitted_model
from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored

from admm_jobs import validate
from admm_jobs.scoring import label_checks
from admm_jobs.scoring.metrics import confusion_matrix

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


def softmax_labels(rng, logits: np.ndarray) -> np.ndarray:
    """One label per row drawn from softmax(logits): data whose calibrated scores are ``logits`` exactly."""
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return (probabilities.cumsum(axis=1) > rng.random((len(logits), 1))).argmax(axis=1)


def test_temperature_scaling_recovers_the_temperature_of_scores_chunk_by_chunk():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (20_000, CLASSES))
    labels = softmax_labels(rng, logits)
    scores = logits * 0.2  # squared-hinge scores are compressed like this: T = 0.2 undoes it
    chunks = [(scores[start:start + 3_000], labels[start:start + 3_000]) for start in range(0, len(labels), 3_000)]
    calibration, joint = label_checks.calibrate(lambda: iter(chunks))
    assert calibration.temperature == pytest.approx(0.2, rel=0.05)
    whole = label_checks.fit_calibration(label_checks.temperature_tally(scores, labels))
    assert whole.temperature == calibration.temperature
    np.testing.assert_allclose(whole.thresholds, calibration.thresholds)
    np.testing.assert_array_equal(joint, label_checks.confident_joint(scores, labels, calibration))
    # t_j: the mean calibrated probability of j over the images labelled j
    probabilities = label_checks.calibrated_probabilities(scores, calibration.temperature)
    assert calibration.thresholds[4] == pytest.approx(probabilities[labels == 4, 4].mean())


def test_the_confident_joint_counts_the_most_probable_class_above_its_threshold():
    calibration = label_checks.Calibration(1.0, np.array([0.9, 0.5, 0.3]))
    probabilities = np.array([[0.95, 0.04, 0.01],  # labelled 0, confidently 0
                              [0.10, 0.60, 0.30],  # labelled 0: 1 and 2 reach their thresholds, 1 is more probable
                              [0.80, 0.15, 0.05],  # labelled 1: reaches no threshold, not counted
                              [0.05, 0.45, 0.50]])  # labelled 2: confidently 2
    labels = np.array([0, 0, 1, 2])
    joint = label_checks.confident_joint(np.log(probabilities), labels, calibration)
    np.testing.assert_array_equal(joint, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(label_checks.mislabelled_counts(joint), [1, 0, 0])
    # a label outside the classes is not counted
    assert label_checks.confident_joint(np.log(probabilities), np.array([0, 0, 7, 2]), calibration).sum() == 3


def test_uniform_noise_rises_in_every_row_and_is_found_overall():
    rng = np.random.default_rng(8)
    reference_rows, batch_rows = np.full(CLASSES, 500), np.full(CLASSES, 300)
    reference = np.diag(reference_rows) - np.diag(np.full(CLASSES, 10))
    reference[:, 0] += 10 * (np.arange(CLASSES) != 0)  # 2 % of each row confidently another class
    reference[0, 1] += 10
    batch = np.diag(batch_rows) - np.diag(np.full(CLASSES, 6 + 15))
    for given in range(CLASSES):  # 2 % as in the reference plus 5 % noise, spread over the other classes
        others = np.flatnonzero(np.arange(CLASSES) != given)
        np.add.at(batch[given], rng.choice(others, 21), 1)
    level = FAMILY_ALPHA / label_checks.tests_per_batch(CLASSES)
    risen = label_checks.risen_mislabelled(batch, batch_rows, reference, reference_rows, level, 0.05, 0.02)
    assert [share.given for share in risen] == [None]  # all classes together: 3,000 images say what 300 cannot
    assert risen[-1].observed == pytest.approx(0.07) and risen[-1].expected == pytest.approx(0.02)
    assert risen[-1].expected + 0.02 <= risen[-1].bound < risen[-1].observed
    clean = np.diag(batch_rows) - np.diag(np.full(CLASSES, 6))
    clean[:, 1] += 6 * (np.arange(CLASSES) != 1)
    clean[1, 0] += 6
    assert label_checks.risen_mislabelled(clean, batch_rows, reference, reference_rows, level, 0.05, 0.02) == []


def test_clean_slices_of_mnist_and_dimmed_ones_raise_nothing_against_a_real_model():
    """The random-features model of the other tests (about 87 % on unseen digits), its reference 1,500 images
    it never fitted; clean batches of 2,000 to 10,000 later training images, and some with grey levels x 0.9."""
    model = fitted_model()
    images = read_vendored(TRAIN_IMAGES).reshape(-1, 784)
    labels = read_vendored(TRAIN_LABELS).astype(np.int64)

    def counts(rows: slice, scale: float = 1.0):
        scores, given = model.logits((images[rows] * scale).astype(np.uint8)), labels[rows]
        return confusion_matrix(given, scores.argmax(axis=1), CLASSES), scores, given

    confusion, scores, given = counts(slice(FIT_ROWS, FIT_ROWS + 1_500))
    calibration, joint = label_checks.calibrate(lambda: [(scores, given)])
    reference = label_checks.LabelReference(confusion, calibration, joint)
    config = validate.ValidateConfig(dataset_uri="unused")
    rng = np.random.default_rng(4)
    for size, scale in [(2_000, 1.0), (5_000, 1.0), (10_000, 1.0), (2_000, 0.9), (5_000, 0.9)] * 2:
        start = int(rng.integers(FIT_ROWS + 1_500, len(labels) - size))
        confusion, scores, given = counts(slice(start, start + size), scale)
        joint = label_checks.confident_joint(scores, given, calibration)
        assert validate.label_failures(confusion, joint, reference, config) == [], (size, scale, start)
