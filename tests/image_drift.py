"""What happens to images on their way into a batch: natural drift (shifts, rescaled grey levels) and a trigger
backdoor (a stamped pattern, relabelled to a target class). Used by the pixel drift tests and bench/pixel_drift.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ holds scripts, not a package
from poisons import scaled_grey as rescaled  # noqa: F401  (re-exported for the tests and bench/pixel_drift.py)
from poisons import shifted  # noqa: F401  (re-exported: shifted(images, dx, dy), dx right, dy down)

SQUARE_3X3 = [(row, column) for row in range(3) for column in range(3)]
CROSS = [(1, 0), (0, 1), (1, 1), (2, 1), (1, 2)]  # a plus sign, 3 pixels wide


def stamped(images: np.ndarray, labels: np.ndarray, share: float, pattern: list[tuple[int, int]],
            corner: tuple[int, int], target: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A trigger backdoor: ``pattern`` (pixel offsets) stamped in white at ``corner`` (row, column) on a random
    ``share`` of the images, which are relabelled ``target``."""
    images, labels = images.copy(), labels.copy()
    chosen = np.random.default_rng(seed).choice(len(images), round(share * len(images)), replace=False)
    for row, column in pattern:
        images[chosen, corner[0] + row, corner[1] + column] = 255
    labels[chosen] = target
    return images, labels
