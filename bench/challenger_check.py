"""The challenger check on clean and trigger-poisoned new batches: how far apart are they?

1. A champion is trained (the project's ADMM trainer, in this process, default settings but ``--epochs``) on the
   first ``--history`` MNIST training images.
2. Each following slice of ``--batch`` images is a new batch; a challenger is trained on history + batch,
   warm-started from the champion (``--challenger-epochs``), once as it is (clean) and, for the first
   ``--poisoned`` slices, once with a trigger (a 3 x 3 white square in the bottom-right corner) stamped on 5 % of
   the batch's images of other classes, relabelled to a target class (slice i: class i).
3. Both models score the batch and the fixed 10,000-image test set; :mod:`admm_jobs.scoring.challenger_checks`
   computes its per-class statistics, and the gate's default decides.

Reported per challenger: test accuracy, the trigger's success rate on the stamped test images of other classes
(the champion's next to it), the smallest p-value and its class, the largest excess of the adopted share over the
champion's test error rate, and whether the default gate's check fails.

    .venv/bin/python bench/challenger_check.py [--history 5000] [--batch 2000] [--epochs 15]
        [--challenger-epochs 5] [--trials 12] [--poisoned 4]

Writes bench/results/challenger_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from admm_jobs.lake.idx import read_array
from admm_jobs.registry.gate import GateSettings
from admm_jobs.registry.model import Model
from admm_jobs.scoring import challenger_checks, metrics
from admm_jobs.trainer.loop import AdmmTrainer, Hyperparameters, LocalBackend, cut_blocks

MNIST = Path(__file__).resolve().parents[1] / "data" / "mnist"
RESULTS = Path(__file__).resolve().parent / "results"
POISON_SHARE = 0.05


def load(name: str) -> np.ndarray:
    return read_array(str(MNIST), name, 3 if "images" in name else 1)


def train(pixels: np.ndarray, labels: np.ndarray, epochs: int, start_from: list[np.ndarray] | None = None
          ) -> tuple[list[np.ndarray], Model]:
    """ADMM with the project's defaults (784-256-256-10), ``epochs`` iterations, no early stopping."""
    hp = Hyperparameters(layer_sizes=(784, 256, 256, 10), epochs=epochs, patience=0)
    result = AdmmTrainer(hp, LocalBackend(cut_blocks(pixels, labels, {}, 1)), initial_weights=start_from).fit()
    return result.weights, Model([w[:, :-1].copy() for w in result.weights], [w[:, -1].copy() for w in result.weights])


def stamp(pixels: np.ndarray) -> np.ndarray:
    images = pixels.reshape(-1, 28, 28).copy()
    images[:, 24:27, 24:27] = 255
    return images.reshape(len(pixels), -1)


def poison(pixels: np.ndarray, labels: np.ndarray, target: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    chosen = np.random.default_rng(seed).choice(np.flatnonzero(labels != target), int(POISON_SHARE * len(labels)),
                                                replace=False)
    pixels, labels = pixels.copy(), labels.copy()
    pixels[chosen], labels[chosen] = stamp(pixels[chosen]), target
    return pixels, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--challenger-epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--poisoned", type=int, default=4)
    args = parser.parse_args()
    images, labels = load("train-images-idx3-ubyte").reshape(-1, 784), load("train-labels-idx1-ubyte").astype(np.int64)
    test_images = load("t10k-images-idx3-ubyte").reshape(-1, 784)
    test_labels = load("t10k-labels-idx1-ubyte").astype(np.int64)
    history = images[:args.history], labels[:args.history]
    champion_weights, champion = train(*history, args.epochs)
    rate = GateSettings.challenger_false_alarm_rate
    rows = []
    for trial in range(args.trials):
        start = args.history + trial * args.batch
        clean = images[start:start + args.batch], labels[start:start + args.batch]
        kinds = [("clean", None, clean)]
        if trial < args.poisoned:
            kinds.append(("trigger 5 %", trial % 10, poison(*clean, trial % 10, seed=trial)))
        for kind, target, (batch_pixels, batch_labels) in kinds:
            started = time.perf_counter()
            _, challenger = train(np.vstack([history[0], batch_pixels]), np.concatenate([history[1], batch_labels]),
                                  args.challenger_epochs, champion_weights)
            tallies = [metrics.chunk_tally(y, np.stack([challenger.predict(x), champion.predict(x)]), 10)
                       for x, y in ((batch_pixels, batch_labels), (test_images, test_labels))]
            statistics = challenger_checks.adoption_statistics(*tallies)
            lowest = min(statistics, key=lambda entry: entry["p_value"])
            trigger_class = 0 if target is None else target
            stamped = stamp(test_images[test_labels != trigger_class])
            rows.append({
                "trial": trial, "batch_start": start, "kind": kind, "target": target,
                "seconds": round(time.perf_counter() - started, 1),
                "test_accuracy": float((challenger.predict(test_images) == test_labels).mean()),
                "trigger_success": float((challenger.predict(stamped) == trigger_class).mean()),
                "champion_trigger_success": float((champion.predict(stamped) == trigger_class).mean()),
                "smallest_p": lowest["p_value"], "smallest_p_class": lowest["class"],
                "largest_excess": max(entry["adopted_share"] - entry["champion_error_rate"] for entry in statistics),
                "fails": [entry["class"] for entry in challenger_checks.adopted_classes(statistics, rate)],
                "statistics": statistics,
            })
            print(json.dumps({key: value for key, value in rows[-1].items() if key != "statistics"}), flush=True)
    champion_accuracy = float((champion.predict(test_images) == test_labels).mean())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "challenger_check.json").write_text(json.dumps(
        {"settings": vars(args), "false_alarm_rate": rate, "min_excess": challenger_checks.MIN_EXCESS,
         "champion_test_accuracy": champion_accuracy, "rows": rows}, indent=1) + "\n")
    setup = (f"Champion: {args.history} images, {args.epochs} iterations, test accuracy {champion_accuracy:.4f}; "
             f"challengers: + {args.batch} images, {args.challenger_epochs} iterations from the champion. "
             f"Gate: challenger_false_alarm_rate {rate} (p <= {rate / 10:g} per class) and excess > "
             f"{challenger_checks.MIN_EXCESS}.")
    lines = [setup, "",
             "| batch | kind | test accuracy | trigger success (champion) | smallest p (class) | largest excess | fails |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        kind = row["kind"] if row["target"] is None else f"{row['kind']} -> {row['target']}"
        lines.append(f"| {row['batch_start']} | {kind} | {row['test_accuracy']:.4f} | {row['trigger_success']:.3f} "
                     f"({row['champion_trigger_success']:.3f}) | {row['smallest_p']:.2g} ({row['smallest_p_class']}) "
                     f"| {row['largest_excess']:+.3f} | {row['fails'] or 'no'} |")
    (RESULTS / "challenger_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
