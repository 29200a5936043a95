"""False alarms and detections of the pixel drift check (admm_jobs.scoring.pixel_checks) on MNIST, in numpy.

    python bench/pixel_drift.py [--margin 0.05] [--slices 20]

The reference is MNIST's first 20,000 training images; batches are drawn from the other 40,000 (so never the
reference's images) and from the 10,000 test images (other writers): clean slices of 2,000 to 40,000 images,
the same shifted by up to 2 pixels, with grey levels rescaled by 0.9 and 1.1, or both, and trigger backdoors
(patterns stamped on 1 to 10 % of a batch, relabelled to one class). For every batch it reports whether the check fails and, for the
clean and drifted ones, the largest excess of a share over the dilated reference share among the pixels the
Fisher test rejects: the margin (``min_excess``) must stay above it. Results: bench/results/pixel_drift.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from admm_jobs.lake import profiles
from admm_jobs.lake.idx import read_array
from admm_jobs.scoring import pixel_checks
from admm_jobs.validate import ValidateConfig

from common import RESULTS, ROOT

sys.path.insert(0, str(ROOT / "tests"))  # the image transforms the tests use
from image_drift import CROSS, SQUARE_3X3, rescaled, shifted, stamped

CLASSES, SHAPE = 10, (28, 28)
REFERENCE_IMAGES = 20_000
DIRECTIONS = [(rows, columns) for rows in (-1, 0, 1) for columns in (-1, 0, 1) if (rows, columns) != (0, 0)]


def mnist(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    source = str(ROOT / "data" / "mnist")
    images = read_array(source, f"{prefix}-images-idx3-ubyte", 3)
    return images, read_array(source, f"{prefix}-labels-idx1-ubyte", 1)


def class_ink(images: np.ndarray, labels: np.ndarray) -> profiles.ClassInk:
    pixels = images.reshape(len(images), -1)
    groups = pd.DataFrame({"images": np.bincount(labels, minlength=CLASSES)})
    return profiles.class_ink(groups, profiles.ink_by_label(pixels, labels), CLASSES)


def outcome(batch: profiles.ClassInk, reference: profiles.ClassInk, level: float, margin: float) -> dict:
    """Which classes fail, and the largest excess over the dilated reference among Fisher-rejected pixels."""
    failed = pixel_checks.drifted_classes(batch, reference, SHAPE, level, margin)
    beyond_sampling = pixel_checks.drifted_classes(batch, reference, SHAPE, level, 0.0)
    excess = max((max(np.subtract(found.observed, found.expected)) for found in beyond_sampling), default=0.0)
    return {"failed": [{"given": found.given, "drifted": found.drifted, "pixels": found.pixels[:9]}
                       for found in failed], "largest_excess": round(float(excess), 4)}


def natural_drift(check, size: int, images: np.ndarray, labels: np.ndarray, **detail) -> None:
    """Shifts by 1 and 2 pixels in the 8 directions, alone and with grey levels rescaled by 0.9 and 1.1."""
    for factor in (0.9, 1.1):
        check("rescaled", size, rescaled(images, factor), labels, factor=factor, **detail)
    for distance in (1, 2):
        for rows_moved, columns_moved in DIRECTIONS:
            moved = shifted(images, distance * columns_moved, distance * rows_moved)
            for factor in (1.0, 0.9, 1.1):
                check("shifted" if factor == 1.0 else "shifted and rescaled", size,
                      moved if factor == 1.0 else rescaled(moved, factor), labels,
                      shift=[distance * rows_moved, distance * columns_moved], factor=factor, **detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=float, default=ValidateConfig.pixel_drift_margin)
    parser.add_argument("--slices", type=int, default=10, help="clean slices per size")
    args = parser.parse_args()
    level = ValidateConfig.false_alarm_rate / 2 / pixel_checks.pixel_tests(CLASSES, SHAPE[0] * SHAPE[1])
    train_images, train_labels = mnist("train")
    test_images, test_labels = mnist("t10k")
    reference = class_ink(train_images[:REFERENCE_IMAGES], train_labels[:REFERENCE_IMAGES])
    pool_images, pool_labels = train_images[REFERENCE_IMAGES:], train_labels[REFERENCE_IMAGES:]
    rng = np.random.default_rng(0)
    rows = []

    def check(kind: str, size: int, images: np.ndarray, labels: np.ndarray, **detail) -> None:
        row = {"kind": kind, "size": size, **detail, **outcome(class_ink(images, labels), reference, level,
                                                                args.margin)}
        if "target" in detail:  # a trigger is found when its target class is named
            row["given_found"] = detail["target"] in [found["given"] for found in row["failed"]]
        rows.append(row)

    for size in (2_000, 5_000, 10_000, 20_000, 40_000):
        for index in range(args.slices if size < 40_000 else 1):
            chosen = rng.choice(len(pool_images), size, replace=False)
            images, labels = pool_images[chosen], pool_labels[chosen]
            check("clean", size, images, labels)
            if index == 0 and size in (2_000, 20_000):
                natural_drift(check, size, images, labels)
            if index == 0 and size in (2_000, 10_000):
                for share in (0.01, 0.02, 0.03, 0.05, 0.1):
                    for pattern, corner, target in ((SQUARE_3X3, (24, 24), 7), (SQUARE_3X3, (1, 1), 0),
                                                    (CROSS, (1, 24), 3), (CROSS, (23, 2), 9), (SQUARE_3X3, (12, 1), 1)):
                        check("trigger", size, *stamped(images, labels, share, pattern, corner, target, seed=size),
                              share=share, pattern="square 3x3" if pattern is SQUARE_3X3 else "cross",
                              corner=list(corner), target=target)
    # another population of writers: MNIST's test set (half of it from NIST's test writers)
    check("clean", len(test_images), test_images, test_labels, slice="MNIST test set")
    natural_drift(check, len(test_images), test_images, test_labels, slice="MNIST test set")
    summary = {}
    for kind in ("clean", "shifted", "rescaled", "shifted and rescaled", "trigger"):
        of_kind = [row for row in rows if row["kind"] == kind]
        summary[kind] = {"batches": len(of_kind), "failed": sum(bool(row["failed"]) for row in of_kind),
                         "largest_excess": max(row["largest_excess"] for row in of_kind)}
    triggers = [row for row in rows if row["kind"] == "trigger"]
    summary["trigger"]["found_by_share"] = {
        share: f"{sum(row['given_found'] for row in triggers if row['share'] == share)} of "
               f"{sum(row['share'] == share for row in triggers)}" for share in sorted({row["share"] for row in triggers})}
    summary["trigger"]["missed"] = [{key: row[key] for key in ("size", "share", "pattern", "corner", "target")}
                                    for row in triggers if not row["given_found"]]
    result = {"margin": args.margin, "test_level": level, "reference_images": REFERENCE_IMAGES,
              "summary": summary, "batches": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pixel_drift.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
