"""Scoring a model on labelled images: accuracy, per-class scores, confusion matrices, champion against
challenger (``metrics.json`` of an evaluation is built from these)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from admm_jobs.lake import dataset
from admm_jobs.registry import model as model_io

EVALUATION_FORMAT = "admm-evaluation/2"


NEWEST_BATCH = "newest_batch"


CLASS_SCORES = ("precision", "recall", "f1")


class EvaluationError(ValueError):
    """An input of the evaluation is unusable; the message names the URI."""


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


def score_champion(champion_model_uri: str, dataset_uri: str, batch_size: int = 4096) -> dict[str, Any]:
    """A champion's scores on the test split and the newest batch (None without batches), as in ``metrics.json``.

    For publish, when the published model changed after the evaluation.
    """
    model = model_io.load_model(champion_model_uri)
    scored = score_sets(model, evaluation_sets(dataset_uri, dataset.load_manifest(dataset_uri)), batch_size)
    return {name: scored[name][0] if name in scored else None for name in ("test", NEWEST_BATCH)}
