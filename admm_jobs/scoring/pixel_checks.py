"""Pixel drift check: does a batch put ink on pixels where the reference data (the published model's training
images) has almost none, concentrated in one class?

A trigger backdoor stamps a small pattern (a few pixels: a square or a cross in a corner) on a few percent
of the images and relabels them to one target class. In that class, the stamped pixels carry ink on every
triggered image, far more often than on any reference image of the class near those pixels. Natural drift
does not do that: digits shifted by a pixel or two move their ink to neighbouring pixels, and grey levels
rescaled by 10 % move few pixels across the ink threshold (:data:`admm_jobs.lake.profiles.INK_GREY`).

For each class c and pixel p the batch's share of class-c images with ink at p is compared with the
reference's share *dilated* over p's neighbourhood (the largest share within :data:`SHIFT_TOLERANCE` pixels
in each direction), so a shift of up to that many pixels stays within the reference. A pixel is named when
the one-sided Fisher exact test (:func:`admm_jobs.scoring.label_checks.row_share_p_values`, sized by both
counts) rejects at the family's Bonferroni level and the share exceeds the dilated share by a margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from admm_jobs.lake.profiles import ClassInk
from admm_jobs.scoring.label_checks import row_share_p_values

SHIFT_TOLERANCE = 2  # pixels a digit may move (each direction) without tripping the check
MAX_NAMED_PIXELS = 25  # pixels a failure names, the most significant first (a 5x5 pattern is named whole)


@dataclasses.dataclass(frozen=True)
class DriftedClass:
    """A class whose images carry ink on some pixels far more often than the reference's, even shifted."""

    given: int  # the label of the images
    pixels: list[tuple[int, int]]  # (row, column) of the named pixels, most significant first
    observed: list[float]  # per named pixel: the batch's share of the class's images with ink there
    expected: list[float]  # the reference's share, dilated over the pixel's neighbourhood
    bound: list[float]  # the largest share that passes at the test's level and margin
    drifted: int  # how many pixels failed (more than ``pixels`` names when over MAX_NAMED_PIXELS)


def pixel_tests(classes: int, pixels: int) -> int:
    """How many tests the check makes on one batch: one per class and pixel."""
    return classes * pixels


def dilated(counts: np.ndarray, image_shape: Sequence[int], radius: int) -> np.ndarray:
    """Per row of ``counts`` (one value per pixel, row-major in ``image_shape``): the largest value within
    ``radius`` pixels in each direction of every pixel (a grey dilation by a square)."""
    height, width = image_shape
    grids = counts.reshape(len(counts), height, width)
    padded = np.pad(grids, ((0, 0), (radius, radius), (radius, radius)))
    largest = grids.copy()
    for row in range(2 * radius + 1):
        for column in range(2 * radius + 1):
            largest = np.maximum(largest, padded[:, row:row + height, column:column + width])
    return largest.reshape(counts.shape)


def largest_passing_count(images: int, reference_count: int, reference_images: int, test_level: float,
                          min_excess: float) -> int:
    """The most of ``images`` images with ink at a pixel that pass: a count passes when the Fisher test does not
    reject it at ``test_level`` or its share is within ``min_excess`` of the reference's share."""
    counts = np.arange(images + 1)
    not_rejected = counts[row_share_p_values(counts, images, reference_count, reference_images) > test_level]
    within_margin = counts[counts <= images * (reference_count / reference_images + min_excess)]
    return int(max(not_rejected.max(initial=0), within_margin.max(initial=0)))


def drifted_classes(batch: ClassInk, reference: ClassInk, image_shape: Sequence[int], test_level: float,
                    min_excess: float, radius: int = SHIFT_TOLERANCE) -> list[DriftedClass]:
    """The classes of a batch with pixels whose ink share rose beyond the reference's dilated share.

    ``test_level`` is the family-wise false-alarm budget of this check divided by :func:`pixel_tests`
    (Bonferroni over every class and pixel); ``min_excess`` the margin a share must also exceed the
    dilated reference share by. A class without images in the batch or the reference is not tested.
    """
    expected_counts = dilated(reference.ink, image_shape, radius)
    drifted = []
    for given in np.flatnonzero((batch.images > 0) & (reference.images > 0)):
        images, reference_images = int(batch.images[given]), int(reference.images[given])
        observed, expected = batch.ink[given] / images, expected_counts[given] / reference_images
        p_values = row_share_p_values(batch.ink[given], images, expected_counts[given], reference_images)
        failed = np.flatnonzero((p_values <= test_level) & (observed > expected + min_excess))
        if not len(failed):
            continue
        named = failed[np.lexsort((-observed[failed], p_values[failed]))][:MAX_NAMED_PIXELS]
        drifted.append(DriftedClass(
            given=int(given),
            pixels=[(int(pixel // image_shape[1]), int(pixel % image_shape[1])) for pixel in named],
            observed=[float(observed[pixel]) for pixel in named],
            expected=[float(expected[pixel]) for pixel in named],
            bound=[largest_passing_count(images, int(expected_counts[given, pixel]), reference_images, test_level,
                                         min_excess) / images for pixel in named],
            drifted=len(failed)))
    return drifted
