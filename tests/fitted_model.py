"""Test helper: a small MNIST model that actually recognises digits, fitted in well under a second.

Random ReLU features ``h = relu(W_1 x)`` of the first training images and a
ridge-regression read-out ``W_2 = argmin ||H W_2^T - Y||^2 + lambda ||W_2||^2``
onto one-hot labels (a random-features model, not ADMM): about 80 % test
accuracy, so predictions on real digits mean something.
"""

from __future__ import annotations

import functools

import numpy as np

from admm_jobs.registry.model import Model

from idx_files import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_vendored

FIT_ROWS = 2_000
HIDDEN_UNITS = 256
RIDGE = 1.0


@functools.lru_cache(maxsize=1)
def mnist_test_digits(rows: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` t10k images (uint8, (rows, 28, 28)) and labels."""
    return read_vendored(TEST_IMAGES)[:rows], read_vendored(TEST_LABELS)[:rows]


@functools.lru_cache(maxsize=4)
def fitted_model(seed: int = 0, rows: int = FIT_ROWS) -> Model:
    """The random-features model described in the module docstring (784 -> 256 -> 10), fitted on the
    first ``rows`` training images."""
    rng = np.random.default_rng(seed)
    images = read_vendored(TRAIN_IMAGES)[:rows].reshape(rows, -1)
    labels = read_vendored(TRAIN_LABELS)[:rows]
    model = Model(
        weights=[
            rng.normal(0, 0.1, (HIDDEN_UNITS, 784)).astype(np.float32),
            np.zeros((10, HIDDEN_UNITS), np.float32),
        ],
        biases=[np.zeros(HIDDEN_UNITS, np.float32), np.zeros(10, np.float32)],
    )
    hidden = np.maximum(images.astype(np.float64) * model.input_scale @ model.weights[0].T, 0.0)
    targets = np.eye(10)[labels]
    readout = np.linalg.solve(hidden.T @ hidden + RIDGE * np.eye(HIDDEN_UNITS), hidden.T @ targets)
    model.weights[1] = readout.T.astype(np.float32)
    return model
