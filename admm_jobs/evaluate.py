"""Score a trained model (the challenger) and the published one (the champion); write the evaluation.

Both models are scored on the dataset's fixed test split and, when the dataset
manifest lists batches, on every row of the newest batch. The champion is the
model the registry pointer names when the evaluation runs (``--registry-uri``);
its version is recorded, so that publish can tell when the pointer moved since.

Outputs (``--output-uri``, normally ``RUN/evaluation``), committed together
through :func:`storage.staged_directory`, ``metrics.json`` last:

* ``metrics.json``: the challenger's test accuracy, per-class
  precision/recall/F1/support and confusion matrix (rows: true class,
  columns: predicted class) at the top level; ``newest_batch``: the same on
  the newest batch (with its id and date; null without batches); ``champion``:
  the champion's version, pointer and scores on both sets (null when nothing
  is published); ``comparison``: challenger minus champion per set (accuracy,
  macro F1, per-class deltas, and the examples only one of them gets right);
  the dataset (version, batch ids, as-of date) and the model's metadata.
* ``accuracy.png``, ``loss.png``: per-epoch curves from ``metrics.jsonl``
  (train/validation/test, warm-up epochs shaded); ``confusion_matrix.png``;
  ``champion_vs_challenger.png`` when there is a champion.
* ``report.html``: all of the above in one self-contained page.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import numpy as np

from admm_jobs import dataset, registry, report, storage
from admm_jobs import model as model_io
from admm_jobs.config import parse_config, setting, validate_fields

EVALUATION_FORMAT = "admm-evaluation/2"
METRICS_FILE = registry.EVALUATION_METRICS_FILE
REPORT_FILE = registry.REPORT_FILE
COMPARISON_PLOT = "champion_vs_challenger.png"
NEWEST_BATCH = "newest_batch"
CLASS_SCORES = ("precision", "recall", "f1")
ACCURACY_PLOT = "accuracy.png"
LOSS_PLOT = "loss.png"
CONFUSION_PLOT = "confusion_matrix.png"


class EvaluationError(ValueError):
    """An input of the evaluation is unusable; the message names the URI."""


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a trained model on the test split and write plots and an HTML report."""

    model_uri: str = setting(help="model directory (model.npz + model.json)", minLength=1)
    dataset_uri: str = setting(help="committed dataset directory (with manifest.json)", minLength=1)
    metrics_uri: str = setting(help="the run's per-epoch metrics.jsonl", minLength=1)
    output_uri: str = setting(help="directory to write the evaluation into", minLength=1)
    registry_uri: str | None = setting(None, "model registry, to compare with the published model")
    model_name: str = setting(registry.DEFAULT_MODEL_NAME, "registry entry name")
    batch_size: int = setting(4096, "test rows scored per forward pass", minimum=1)

    def __post_init__(self) -> None:
        validate_fields(self)


def predict(model: model_io.Model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Predicted class of every row, ``argmax_k logits_k(x)``, computed ``batch_size`` rows at a time."""
    parts = [model.predict(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """``C[i, j] = #{n : y_n = i and yhat_n = j}`` (rows: true class, columns: predicted)."""
    pairs = labels.astype(np.int64) * classes + predictions.astype(np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class scores from a confusion matrix ``C`` (rows true, columns predicted).

    precision_k = C_kk / sum_i C_ik,  recall_k = C_kk / sum_j C_kj,
    F1_k = 2 P_k R_k / (P_k + R_k),   support_k = sum_j C_kj;
    a ratio with a zero denominator is 0 (no predictions / no examples of k).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def read_epoch_metrics(uri: str) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl``, ordered by epoch."""
    records = []
    for number, record in storage.json_lines(storage.read_bytes(uri), uri, EvaluationError):
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise EvaluationError(f"{uri}: line {number} has no integer 'epoch'")
        records.append(record)
    if not records:
        raise EvaluationError(f"{uri}: no epochs recorded")
    return sorted(records, key=lambda record: record["epoch"])


def score_predictions(labels: np.ndarray, predictions: np.ndarray, classes: int) -> dict[str, Any]:
    """Accuracy ``#{yhat_n = y_n} / N``, macro F1, per-class scores and the confusion matrix."""
    confusion = confusion_matrix(labels, predictions, classes)
    scores = class_scores(confusion)
    correct = int(np.trace(confusion))
    return {
        "accuracy": correct / len(labels),
        "examples": len(labels),
        "correct": correct,
        "macro_f1": float(scores["f1"].mean()),
        "per_class": [
            {
                "class": k,
                "support": int(scores["support"][k]),
                "precision": float(scores["precision"][k]),
                "recall": float(scores["recall"][k]),
                "f1": float(scores["f1"][k]),
            }
            for k in range(classes)
        ],
        "confusion_matrix": confusion.tolist(),
    }


def check_labels(model: model_io.Model, labels: np.ndarray, source: str) -> None:
    """Raise unless there are labels and every one is a class of ``model``."""
    classes = model.layer_sizes[-1]
    if len(labels) == 0:
        raise EvaluationError(f"{source}: no examples to score")
    if labels.min() < 0 or labels.max() >= classes:
        raise EvaluationError(
            f"{source}: labels span [{labels.min()}, {labels.max()}], the model has {classes} classes"
        )


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled set the models are scored on: the test split or the newest batch."""

    name: str  # "test" or "newest_batch"
    source: str  # for error messages: the dataset URI and what was read
    pixels: np.ndarray
    labels: np.ndarray
    batch: dict[str, Any] | None = None  # the manifest entry of the newest batch


def evaluation_sets(dataset_uri: str, manifest: dict[str, Any]) -> list[Examples]:
    """The fixed test split and, when the manifest lists batches, every row of the newest batch."""
    pixels, labels = dataset.read_split(dataset_uri, "test")
    sets = [Examples("test", f"{dataset_uri} (test split)", pixels, labels)]
    if manifest.get("batches"):
        batch = dataset.newest_batch(manifest)
        pixels, labels = dataset.read_batch(dataset_uri, batch["id"])
        sets.append(Examples(NEWEST_BATCH, f"{dataset_uri} (batch {batch['id']})", pixels, labels, batch))
    return sets


def score_sets(model: model_io.Model, sets: list[Examples], batch_size: int) -> dict[str, tuple[dict, np.ndarray]]:
    """Per set name: the scores of ``model`` and its predictions."""
    scored = {}
    for examples in sets:
        check_labels(model, examples.labels, examples.source)
        predictions = predict(model, examples.pixels, batch_size)
        scored[examples.name] = (score_predictions(examples.labels, predictions, model.layer_sizes[-1]), predictions)
    return scored


def score_deltas(
    challenger: dict[str, Any],
    champion: dict[str, Any],
    labels: np.ndarray,
    challenger_predictions: np.ndarray,
    champion_predictions: np.ndarray,
) -> dict[str, Any]:
    """Challenger minus champion: accuracy, macro F1 and per-class precision/recall/F1 deltas,
    plus the discordant pairs (examples only one of the two models gets right).
    """
    challenger_right = challenger_predictions == labels
    champion_right = champion_predictions == labels
    return {
        "accuracy": challenger["accuracy"] - champion["accuracy"],
        "macro_f1": challenger["macro_f1"] - champion["macro_f1"],
        "per_class": [
            {"class": mine["class"], **{key: mine[key] - theirs[key] for key in CLASS_SCORES}}
            for mine, theirs in zip(challenger["per_class"], champion["per_class"])
        ],
        "challenger_only_correct": int(np.sum(challenger_right & ~champion_right)),
        "champion_only_correct": int(np.sum(champion_right & ~challenger_right)),
    }


def champion_of(registry_uri: str | None, model_name: str) -> tuple[dict[str, Any], model_io.Model] | None:
    """The published model (pointer and loaded weights) at this moment; None if nothing is published."""
    if not registry_uri:
        return None
    pointer = registry.read_pointer(registry_uri, model_name)
    if pointer is None:
        return None
    model_uri = storage.join(registry.version_uri(registry_uri, pointer["version"], model_name), registry.MODEL_DIR)
    return {**pointer, "model_uri": model_uri, "registry_uri": registry_uri, "model_name": model_name}, (
        model_io.load_model(model_uri)
    )


def score_champion(champion_model_uri: str, dataset_uri: str, batch_size: int = 4096) -> dict[str, Any]:
    """A champion's scores on the test split and the newest batch (None without batches), as in ``metrics.json``.

    For publish, when the published model changed after the evaluation.
    """
    model = model_io.load_model(champion_model_uri)
    scored = score_sets(model, evaluation_sets(dataset_uri, dataset.load_manifest(dataset_uri)), batch_size)
    return {name: scored[name][0] if name in scored else None for name in ("test", NEWEST_BATCH)}


def evaluate_run(
    model_uri: str,
    dataset_uri: str,
    metrics_uri: str,
    output_uri: str,
    registry_uri: str | None = None,
    model_name: str = registry.DEFAULT_MODEL_NAME,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Score the model (and the published one), draw the plots, write ``output_uri``; returns ``metrics.json``."""
    model = model_io.load_model(model_uri)
    manifest = dataset.load_manifest(dataset_uri)
    epochs = read_epoch_metrics(metrics_uri)
    sets = evaluation_sets(dataset_uri, manifest)
    scored = score_sets(model, sets, batch_size)
    test_scores = scored["test"][0]
    newest = next((examples for examples in sets if examples.name == NEWEST_BATCH), None)
    champion = champion_of(registry_uri, model_name)
    champion_section = comparison = None
    if champion is not None:
        pointer, champion_model = champion
        champion_scored = score_sets(champion_model, sets, batch_size)
        champion_section = {"version": pointer["version"], "pointer": pointer, "test": None, NEWEST_BATCH: None}
        comparison = {"test": None, NEWEST_BATCH: None}
        for examples in sets:
            (mine, my_predictions), (theirs, their_predictions) = scored[examples.name], champion_scored[examples.name]
            champion_section[examples.name] = theirs
            comparison[examples.name] = score_deltas(mine, theirs, examples.labels, my_predictions, their_predictions)
    metadata = model.metadata
    evaluation = {
        "format": EVALUATION_FORMAT,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "test_accuracy": test_scores["accuracy"],
        "test_examples": test_scores["examples"],
        **{key: test_scores[key] for key in ("correct", "macro_f1", "per_class", "confusion_matrix")},
        "newest_batch": (
            {"id": newest.batch["id"], "date": newest.batch.get("date"), **scored[NEWEST_BATCH][0]}
            if newest
            else None
        ),
        "dataset": {
            "uri": dataset_uri,
            "version": manifest["version"],
            "as_of": manifest.get("as_of"),
            "batches": [batch["id"] for batch in manifest.get("batches", [])],
        },
        "model": {
            "uri": model_uri,
            "version": registry.model_version(metadata["weights_sha256"]),
            "weights_sha256": metadata["weights_sha256"],
            "layer_sizes": model.layer_sizes,
            "hyperparameters": metadata.get("hyperparameters", {}),
            "best_epoch": metadata.get("best_epoch"),
            "code_version": metadata.get("code_version"),
            "final_metrics": metadata.get("final_metrics"),
            "training_dataset": metadata.get("dataset"),
        },
        "training": {
            "metrics_uri": metrics_uri,
            "epochs": len(epochs),
            "warmup_epochs": sum(record.get("phase") == report.WARMUP_PHASE for record in epochs),
        },
        "champion": champion_section,
        "comparison": comparison,
    }
    best_epoch = metadata.get("best_epoch")
    images = {
        ACCURACY_PLOT: report.curve_png(epochs, "accuracy", best_epoch),
        LOSS_PLOT: report.curve_png(epochs, "loss", best_epoch),
        CONFUSION_PLOT: report.confusion_matrix_png(np.array(test_scores["confusion_matrix"])),
    }
    if champion_section is not None:
        images[COMPARISON_PLOT] = report.comparison_png(evaluation)
    evaluation["files"] = {"report": REPORT_FILE, "plots": list(images)}
    with storage.staged_directory(output_uri) as staging:
        for name, png in images.items():
            storage.write_bytes(storage.join(staging, name), png)
        storage.write_bytes(
            storage.join(staging, REPORT_FILE), report.render_report(evaluation, images).encode()
        )
        storage.write_json(storage.join(staging, METRICS_FILE), evaluation)
    return evaluation


def _accuracy_delta(comparison: dict[str, Any] | None, name: str) -> float | None:
    deltas = (comparison or {}).get(name)
    return deltas["accuracy"] if deltas else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(EvaluateConfig, argv)
    evaluation = evaluate_run(
        config.model_uri,
        config.dataset_uri,
        config.metrics_uri,
        config.output_uri,
        registry_uri=config.registry_uri,
        model_name=config.model_name,
        batch_size=config.batch_size,
    )
    champion, comparison, newest = evaluation["champion"], evaluation["comparison"], evaluation["newest_batch"]
    result = {
        "test_accuracy": evaluation["test_accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "model_version": evaluation["model"]["version"],
        "dataset_version": evaluation["dataset"]["version"],
        "output_uri": config.output_uri,
        "metrics_uri": storage.join(config.output_uri, METRICS_FILE),
        "report_uri": storage.join(config.output_uri, REPORT_FILE),
        "newest_batch": newest["id"] if newest else None,
        "newest_batch_accuracy": newest["accuracy"] if newest else None,
        "published_version": champion["version"] if champion else None,
        "delta_vs_published": _accuracy_delta(comparison, "test"),
        "batch_delta_vs_published": _accuracy_delta(comparison, NEWEST_BATCH),
    }
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
