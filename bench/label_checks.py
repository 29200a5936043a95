"""False alarms and detections of the per-class label checks (``admm_jobs.scoring.label_checks``), without a DAG.

1. An ADMM model (default settings, ``--epochs`` iterations, in this process) is trained on the first
   ``--train-rows`` images of MNIST's training file; the next ``--reference-rows`` are its validation split,
   the reference: its confusion, the calibration and the confident joint, as publish stores them.
2. Clean batches from the rest of the training file (never seen by the model): ``--slices`` random
   contiguous slices of sizes 2,000 up to all of the rest; the fixed test set (other writers); slices
   shifted by one pixel in each direction; slices with grey levels scaled by 0.9.
3. Poisoned batches: half of one class relabelled as another (several pairs), uniform label noise of 5 %
   (each affected label replaced by another class at random).

Every batch is checked as validate checks it (:func:`admm_jobs.validate.label_failures`, family-wise
false-alarm rate ``false_alarm_rate / 2``, Bonferroni over the 101 tests). Reported per kind of batch: how
many were flagged and the closest approach over all their tests: the largest excess of a share over the
reference's (what the margin must cover) and the smallest p-value as a multiple of the test level (below 1:
sampling alone would have flagged it).

    PYTHONPATH=. .venv/bin/python bench/label_checks.py [--train-rows 22000] [--reference-rows 2000] [--epochs 30]

Writes bench/results/label_checks.{json,md} (``--output``). Measured: ``--reference-rows 2000`` (default) and
``--reference-rows 5000 --output label_checks-reference5000`` (the validation split of full MNIST has 4,949).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import RESULTS, ROOT, WORK, machine

from admm_jobs import validate
from admm_jobs.lake import idx
from admm_jobs.registry.model import Model, load_model, save_model
from admm_jobs.scoring import label_checks
from admm_jobs.scoring.metrics import confusion_matrix
from admm_jobs.trainer.loop import INPUT_SCALE, AdmmTrainer, Hyperparameters, LocalBackend, cut_blocks

SIZES = (2_000, 5_000, 10_000, 20_000)


def train(pixels: np.ndarray, labels: np.ndarray, reference: tuple[np.ndarray, np.ndarray], epochs: int) -> Model:
    """The ADMM model of the default settings after ``epochs`` iterations, kept in bench/.work for the next run."""
    directory = WORK / f"label-checks-model-{len(labels)}-{epochs}"
    if (directory / "model.json").exists():
        return load_model(str(directory))
    hp = Hyperparameters(layer_sizes=(784, 256, 256, 10), epochs=epochs)
    result = AdmmTrainer(hp, LocalBackend(cut_blocks(pixels, labels, {"validation": reference}, 1))).fit()
    model = Model([w[:, :-1].copy() for w in result.weights], [w[:, -1].copy() for w in result.weights], INPUT_SCALE)
    save_model(model, str(directory))
    return model


def counts(model: Model, calibration: label_checks.Calibration, images: np.ndarray, labels: np.ndarray):
    scores = model.logits(images.reshape(len(images), -1))
    return (confusion_matrix(labels, scores.argmax(axis=1), 10),
            label_checks.confident_joint(scores, labels, calibration))


def closest_approach(batch: tuple[np.ndarray, np.ndarray], reference: label_checks.LabelReference,
                     level: float) -> tuple[float, float]:
    """Over every test of a batch: the largest excess of its share over the reference's, and the smallest
    p-value as a multiple of the test level (below 1: sampling alone would have failed it)."""
    confusion, joint = batch
    tests = [*label_checks.risen_cells(joint, reference.confident_joint, 1.0, -1.0, confusion.sum(axis=1),
                                       reference.confusion.sum(axis=1)),
             *label_checks.risen_mislabelled(joint, confusion.sum(axis=1), reference.confident_joint,
                                             reference.confusion.sum(axis=1), 1.0, -1.0, -1.0)]
    return (max(risen.observed - risen.expected for risen in tests),
            min(risen.p_value for risen in tests) / level)


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    return np.roll(images, (rows, columns), axis=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=22_000)
    parser.add_argument("--reference-rows", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="label_checks", help="name of the results in bench/results/")
    args = parser.parse_args()
    source = str(ROOT / "data" / "mnist")
    images = idx.read_array(source, "train-images-idx3-ubyte", 3)
    labels = idx.read_array(source, "train-labels-idx1-ubyte", 1).astype(np.int64)
    test_images = idx.read_array(source, "t10k-images-idx3-ubyte", 3)
    test_labels = idx.read_array(source, "t10k-labels-idx1-ubyte", 1).astype(np.int64)
    fit, held = slice(0, args.train_rows), slice(args.train_rows, args.train_rows + args.reference_rows)
    started = time.perf_counter()
    model = train(images[fit].reshape(-1, 784), labels[fit], (images[held].reshape(-1, 784), labels[held]),
                  args.epochs)
    train_seconds = time.perf_counter() - started
    held_images, held_labels = images[held].reshape(-1, 784), labels[held]
    held_scores = model.logits(held_images)
    calibration, joint = label_checks.calibrate(lambda: [(held_scores, held_labels)])
    reference = label_checks.LabelReference(confusion_matrix(held_labels, held_scores.argmax(axis=1), 10),
                                            calibration, joint)
    config = validate.ValidateConfig(dataset_uri="unused")
    level = validate.family_false_alarm_rate(config) / label_checks.tests_per_batch(10)
    rest_images, rest_labels = images[held.stop:], labels[held.stop:]
    rng = np.random.default_rng(args.seed)

    def slices(size: int, count: int):
        for start in rng.integers(0, len(rest_labels) - size + 1, size=count):
            yield rest_images[start:start + size], rest_labels[start:start + size]

    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        f"clean slice of {size:,}": list(slices(size, args.slices)) for size in SIZES}
    batches[f"clean: all {len(rest_labels):,} unseen training images"] = [(rest_images, rest_labels)]
    batches["clean: the fixed test set (10,000)"] = [(test_images, test_labels)]
    batches["clean, shifted by 1 pixel (4 directions, 5,000 each)"] = [
        (shifted(part, *offset), part_labels) for offset in ((0, 1), (0, -1), (1, 0), (-1, 0))
        for part, part_labels in slices(5_000, args.slices // 4)]
    batches[f"clean: all {len(rest_labels):,} shifted by 1 pixel (4 directions)"] = [
        (shifted(rest_images, *offset), rest_labels) for offset in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    batches[f"clean: all {len(rest_labels):,}, grey levels x 0.9"] = [((rest_images * 0.9).astype(np.uint8),
                                                                       rest_labels)]
    batches["clean, grey levels x 0.9 (5,000 each)"] = [
        ((part * 0.9).astype(np.uint8), part_labels) for part, part_labels in slices(5_000, args.slices // 4)]
    flips = [(3, 8), (7, 1), (4, 9), (5, 3), (2, 7)]
    half_flips = []
    for (given, into), (part, part_labels) in zip(flips * (args.slices // 10), slices(5_000, args.slices // 2)):
        relabelled = part_labels.copy()
        members = np.flatnonzero(part_labels == given)
        relabelled[rng.choice(members, len(members) // 2, replace=False)] = into
        half_flips.append((part, relabelled))
    batches["half of one class relabelled as another (5,000)"] = half_flips
    for size in (2_000, 3_000, 5_000):
        noisy = []
        for part, part_labels in slices(size, args.slices // 2):
            relabelled = part_labels.copy()
            chosen = rng.choice(size, int(0.05 * size), replace=False)
            relabelled[chosen] = (relabelled[chosen] + rng.integers(1, 10, len(chosen))) % 10
            noisy.append((part, relabelled))
        batches[f"uniform label noise 5 % ({size:,})"] = noisy

    rows = []
    for kind, members in batches.items():
        flagged, excess, p_ratio, checks = 0, -1.0, np.inf, set()
        for part, part_labels in members:
            counted = counts(model, reference.calibration, part, part_labels)
            failures = validate.label_failures(*counted, reference, config)
            flagged += bool(failures)
            checks.update(failure["check"] for failure in failures)
            largest, smallest = closest_approach(counted, reference, level)
            excess, p_ratio = max(excess, largest), min(p_ratio, smallest)
        rows.append({"batches": kind, "count": len(members), "flagged": flagged, "checks": sorted(checks),
                     "largest_excess": round(excess, 4), "smallest_p_over_level": float(f"{p_ratio:.3g}")})
        print(json.dumps(rows[-1]), flush=True)
    accuracy = float((model.predict(test_images.reshape(-1, 784)) == test_labels).mean())
    summary = {"machine": machine(), "args": vars(args), "train_seconds": round(train_seconds, 1),
               "test_accuracy": accuracy, "temperature": reference.calibration.temperature,
               "level": level, "margins": {key: getattr(config, key) for key in (
                   "min_cell_excess", "min_class_mislabelled_excess", "min_mislabelled_excess")},
               "reference_mislabelled_share": float(label_checks.mislabelled_counts(reference.confident_joint).sum()
                                                    / reference.confusion.sum()),
               "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [(f"Model: {args.train_rows:,} training images, {args.epochs} iterations, test accuracy {accuracy:.4f}; "
             f"reference: the next {args.reference_rows:,} (temperature {summary['temperature']:.3g}); test level "
             f"{level:.3g} per test; margins {summary['margins']}."), "",
             "| batches | count | flagged | checks | largest excess of a share | smallest p-value / level |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['batches']} | {row['count']} | {row['flagged']} | {', '.join(row['checks'])} | "
              f"{row['largest_excess']:+.4f} | {row['smallest_p_over_level']:.3g} |" for row in rows]
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
