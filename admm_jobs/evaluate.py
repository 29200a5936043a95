"""Score a trained model (the challenger) and the published one (the champion); write the evaluation.

Both models are scored on the dataset's fixed test split and, when the dataset
manifest lists batches, on every row of the newest batch; the challenger also on
the validation split. The champion is the model the registry pointer names when
the evaluation runs (``--registry-uri``); its version is recorded, so that
publish can tell when the pointer moved since.

Every set is read ``--batch-size`` rows at a time and both models score each chunk
as it is read; only counts (confusion matrices, discordant pairs) are kept, so
memory does not grow with the size of the test split or of the newest batch.

Outputs (``--output-uri``, normally ``RUN/evaluation``), committed together
through :func:`storage.staged_directory`, ``metrics.json`` last:

* ``metrics.json``: the challenger's test accuracy, per-class
  precision/recall/F1/support and confusion matrix (rows: true class,
  columns: predicted class) at the top level; ``newest_batch``: the same on
  the newest batch (with its id and date; null without batches); ``champion``:
  the champion's version, pointer and scores on both sets (null when nothing
  is published); ``comparison``: challenger minus champion per set (accuracy,
  macro F1, per-class deltas, and the examples only one of them gets right);
  ``challenger_check``: per class, the newest batch's images whose given label the challenger adopts and the
  champion does not, against the champion's test error rate (:mod:`admm_jobs.scoring.challenger_checks`; null
  without a champion or a newest batch): publish's gate tests it;
  ``validation``: the challenger's scores on the validation split, rows it never
  fitted (null when the split is empty): publish stores its confusion matrix with
  the version as the reference for the batch checks;
  the dataset (version, batch ids, as-of date) and the model's metadata.
* ``accuracy.png``, ``loss.png``: per-epoch curves from ``metrics.jsonl``
  (train/validation/test, warm-up epochs shaded); ``confusion_matrix.png``;
  ``champion_vs_challenger.png`` when there is a champion.
* ``report.html``: all of the above in one self-contained page.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import numpy as np

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import setting, validate_fields
from admm_jobs.lake import dataset, storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.scoring import report
from admm_jobs.scoring.challenger_checks import adoption_statistics
from admm_jobs.scoring.metrics import (
    EVALUATION_FORMAT,
    NEWEST_BATCH,
    TEST,
    VALIDATION,
    EvaluationError,
    confusion_scores,
    evaluation_sets,
    score_deltas,
    tally,
    tally_sets,
    validation_set,
)

METRICS_FILE = registry.EVALUATION_METRICS_FILE
REPORT_FILE = registry.REPORT_FILE
COMPARISON_PLOT = "champion_vs_challenger.png"
ACCURACY_PLOT = "accuracy.png"
LOSS_PLOT = "loss.png"
CONFUSION_PLOT = "confusion_matrix.png"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a trained model on the test split and write plots and an HTML report."""

    model_uri: str = setting(help="model directory (model.npz + model.json)", minLength=1)
    dataset_uri: str = setting(help="committed dataset directory (with manifest.json)", minLength=1)
    metrics_uri: str = setting(help="the run's per-epoch metrics.jsonl", minLength=1)
    output_uri: str = setting(help="directory to write the evaluation into", minLength=1)
    registry_uri: str | None = setting(None, "model registry, to compare with the published model")
    model_name: str = setting(registry.DEFAULT_MODEL_NAME, "registry entry name")
    batch_size: int = setting(4096, "rows read and scored at a time (bounds the memory whatever the data's size)",
                              minimum=1)

    def __post_init__(self) -> None:
        validate_fields(self)


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
    champion = champion_of(registry_uri, model_name)
    # Both models score each chunk as it is read: one pass over every set, in memory bounded by batch_size.
    tallies = tally_sets([model] if champion is None else [model, champion[1]], sets, batch_size)
    scored = {examples.name: [confusion_scores(confusion, examples.source)
                              for confusion in tallies[examples.name].confusions] for examples in sets}
    test_scores = scored[TEST][0]
    held_out = validation_set(dataset_uri)
    validation_confusion = tally([model], held_out, batch_size).confusions[0]
    newest = next((examples for examples in sets if examples.name == NEWEST_BATCH), None)
    champion_section = comparison = challenger_check = None
    if champion is not None:
        pointer = champion[0]
        champion_section = {"version": pointer["version"], "pointer": pointer, TEST: None, NEWEST_BATCH: None}
        comparison = {TEST: None, NEWEST_BATCH: None}
        for name, (mine, theirs) in scored.items():
            champion_section[name] = theirs
            comparison[name] = score_deltas(mine, theirs, tallies[name])
        if newest is not None:
            challenger_check = {"batch": newest.batch["id"], "champion": pointer["version"],
                                "classes": adoption_statistics(tallies[NEWEST_BATCH], tallies[TEST])}
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
        VALIDATION: confusion_scores(validation_confusion, held_out.source) if validation_confusion.sum() else None,
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
        "challenger_check": challenger_check,
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


def run(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate as ``config`` says; return the summary the command prints."""
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
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(EvaluateConfig, run, argv)


if __name__ == "__main__":
    main()
