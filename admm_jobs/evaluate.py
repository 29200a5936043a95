"""Score a trained model on the test split and write the evaluation of a run.

Outputs (``--output-uri``, normally ``RUN/evaluation``), committed together
through :func:`storage.staged_directory`, ``metrics.json`` last:

* ``metrics.json``: test accuracy, per-class precision/recall/F1/support,
  the confusion matrix (rows: true class, columns: predicted class), the
  dataset version and the model's metadata, and the comparison with the
  published model when ``--registry-uri`` is given.
* ``accuracy.png``, ``loss.png``: per-epoch curves from ``metrics.jsonl``
  (train/validation/test, warm-up epochs shaded); ``confusion_matrix.png``.
* ``report.html``: all of the above in one self-contained page.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import numpy as np

from admm_jobs import dataset, publish, report, storage
from admm_jobs import model as model_io
from admm_jobs.config import parse_config, setting, validate_fields

EVALUATION_FORMAT = "admm-evaluation/1"
METRICS_FILE = publish.EVALUATION_METRICS_FILE
REPORT_FILE = "report.html"
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
    model_name: str = setting(publish.DEFAULT_MODEL_NAME, "registry entry name")
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
    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{uri}: line {number} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise EvaluationError(f"{uri}: line {number} has no integer 'epoch'")
        records.append(record)
    if not records:
        raise EvaluationError(f"{uri}: no epochs recorded")
    return sorted(records, key=lambda record: record["epoch"])


def compare_with_published(registry_uri: str, model_name: str, test_accuracy: float) -> dict[str, Any] | None:
    """The published model's pointer plus ``delta`` = this accuracy - published accuracy; None if none."""
    pointer = publish.read_pointer(registry_uri, model_name)
    if pointer is None:
        return None
    return {
        **pointer,
        "registry_uri": registry_uri,
        "model_name": model_name,
        "delta": test_accuracy - float(pointer["test_accuracy"]),
    }


def score_model(model: model_io.Model, dataset_uri: str, batch_size: int) -> dict[str, Any]:
    """Accuracy, confusion matrix and per-class scores of ``model`` on the test split."""
    pixels, labels = dataset.read_split(dataset_uri, "test")
    classes = model.layer_sizes[-1]
    if len(labels) == 0:
        raise EvaluationError(f"{dataset_uri}: the test split is empty")
    if labels.min() < 0 or labels.max() >= classes:
        raise EvaluationError(
            f"{dataset_uri}: test labels span [{labels.min()}, {labels.max()}], "
            f"the model has {classes} classes"
        )
    confusion = confusion_matrix(labels, predict(model, pixels, batch_size), classes)
    scores = class_scores(confusion)
    correct = int(np.trace(confusion))
    return {
        "test_accuracy": correct / len(labels),
        "test_examples": len(labels),
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


def evaluate_run(
    model_uri: str,
    dataset_uri: str,
    metrics_uri: str,
    output_uri: str,
    registry_uri: str | None = None,
    model_name: str = publish.DEFAULT_MODEL_NAME,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Score the model, draw the plots, write ``output_uri``; returns the ``metrics.json`` dict."""
    model = model_io.load_model(model_uri)
    manifest = dataset.load_manifest(dataset_uri)
    epochs = read_epoch_metrics(metrics_uri)
    scores = score_model(model, dataset_uri, batch_size)
    metadata = model.metadata
    evaluation = {
        "format": EVALUATION_FORMAT,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **scores,
        "dataset": {"uri": dataset_uri, "version": manifest["version"]},
        "model": {
            "uri": model_uri,
            "version": publish.model_version(metadata["weights_sha256"]),
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
        "published_model": (
            compare_with_published(registry_uri, model_name, scores["test_accuracy"])
            if registry_uri
            else None
        ),
        "files": {"report": REPORT_FILE, "plots": [ACCURACY_PLOT, LOSS_PLOT, CONFUSION_PLOT]},
    }
    best_epoch = metadata.get("best_epoch")
    images = {
        ACCURACY_PLOT: report.curve_png(epochs, "accuracy", best_epoch),
        LOSS_PLOT: report.curve_png(epochs, "loss", best_epoch),
        CONFUSION_PLOT: report.confusion_matrix_png(np.array(scores["confusion_matrix"])),
    }
    with storage.staged_directory(output_uri) as staging:
        for name, png in images.items():
            storage.write_bytes(storage.join(staging, name), png)
        storage.write_bytes(
            storage.join(staging, REPORT_FILE), report.render_report(evaluation, images).encode()
        )
        storage.write_json(storage.join(staging, METRICS_FILE), evaluation)
    return evaluation


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
    published = evaluation["published_model"]
    result = {
        "test_accuracy": evaluation["test_accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "model_version": evaluation["model"]["version"],
        "dataset_version": evaluation["dataset"]["version"],
        "output_uri": config.output_uri,
        "metrics_uri": storage.join(config.output_uri, METRICS_FILE),
        "report_uri": storage.join(config.output_uri, REPORT_FILE),
        "published_version": published["version"] if published else None,
        "delta_vs_published": published["delta"] if published else None,
    }
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
