"""What happens to images on their way into a batch: natural drift (shifts, rescaled grey levels) and a trigger
backdoor (a stamped pattern, relabelled to a target class). Used by the pixel drift tests and bench/pixel_drift.py."""

from __future__ import annotations

import numpy as np

SQUARE_3X3 = [(row, column) for row in range(3) for column in range(3)]
CROSS = [(1, 0), (0, 1), (1, 1), (2, 1), (1, 2)]  # a plus sign, 3 pixels wide


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Images (n, height, width) moved by ``rows`` down and ``columns`` right, blank where they moved from."""
    moved = np.zeros_like(images)
    height, width = images.shape[1:]
    moved[:, max(rows, 0):height + min(rows, 0), max(columns, 0):width + min(columns, 0)] = \
        images[:, max(-rows, 0):height + min(-rows, 0), max(-columns, 0):width + min(-columns, 0)]
    return moved


def rescaled(images: np.ndarray, factor: float) -> np.ndarray:
    """Images with every grey level multiplied by ``factor`` (clipped to 0..255)."""
    return np.clip(np.rint(images.astype(float) * factor), 0, 255).astype(np.uint8)


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
