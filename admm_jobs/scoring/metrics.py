"""Scoring a model on labelled images: accuracy, per-class scores, confusion matrices, champion against
challenger (``metrics.json`` of an evaluation is built from these).

Sets are read and scored chunk by chunk (:func:`tally`); every score is computed from counts that add
exactly over the chunks, so the chunk size changes the memory, never a number."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from admm_jobs.lake import dataset
from admm_jobs.registry import model as model_io
from admm_jobs.scoring.challenger_checks import adoption_statistics
from admm_jobs.scoring import label_checks

EVALUATION_FORMAT = "admm-evaluation/2"


TEST, NEWEST_BATCH, VALIDATION = "test", "newest_batch", "validation"


CLASS_SCORES = ("precision", "recall", "f1")


class EvaluationError(ValueError):
    """An input of the evaluation is unusable; the message names the URI."""


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


def confusion_scores(confusion: np.ndarray, source: str) -> dict[str, Any]:
    """Accuracy ``trace(C) / sum(C)``, macro F1, per-class scores and the confusion matrix itself."""
    confusion = np.asarray(confusion, dtype=np.int64)
    examples = int(confusion.sum())
    if examples == 0:
        raise EvaluationError(f"{source}: no examples to score")
    scores = class_scores(confusion)
    correct = int(np.trace(confusion))
    return {
        "accuracy": correct / examples,
        "examples": examples,
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
            for k in range(len(confusion))
        ],
        "confusion_matrix": confusion.tolist(),
    }


def check_labels(classes: int, labels: np.ndarray, source: str) -> None:
    """Raise unless every label is one of ``classes`` classes."""
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise EvaluationError(
            f"{source}: labels span [{labels.min()}, {labels.max()}], the model has {classes} classes"
        )


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled set the models are scored on (the test split, the newest batch, the validation split),
    read from its part files chunk by chunk."""

    name: str  # "test", "newest_batch" or "validation"
    source: str  # for error messages: the dataset URI and what was read
    uris: list[str]  # its part files, in row order
    batch: dict[str, Any] | None = None  # the manifest entry of the newest batch


def evaluation_sets(dataset_uri: str, manifest: dict[str, Any]) -> list[Examples]:
    """The fixed test split and, when the manifest lists batches, every row of the newest batch."""
    sets = [Examples(TEST, f"{dataset_uri} (test split)", dataset.split_file_uris(dataset_uri, TEST))]
    if manifest.get("batches"):
        batch = dataset.newest_batch(manifest)
        uris = dataset.batch_file_uris(dataset_uri, batch["id"])
        sets.append(Examples(NEWEST_BATCH, f"{dataset_uri} (batch {batch['id']})", uris, batch))
    return sets


def validation_set(dataset_uri: str) -> Examples:
    """The validation split: rows the trainer holds out of its fit (it only picks the best epoch on them)."""
    return Examples(VALIDATION, f"{dataset_uri} (validation split)", dataset.split_file_uris(dataset_uri, VALIDATION))


@dataclasses.dataclass(frozen=True)
class Tally:
    """Counts over one labelled set for one or more models; counts add exactly, so summing them chunk by chunk
    gives the same numbers for any chunk size.

    ``confusions[m]``: model m's confusion matrix. ``right_by_class[k, mask]``: how many examples of true class
    k exactly the models in the bit mask get right (bit m: model m), e.g. with two models ``right_by_class[k, 1]``
    only the first; ``right_by`` sums it over the classes.
    """

    confusions: list[np.ndarray]
    right_by_class: np.ndarray

    @property
    def right_by(self) -> np.ndarray:
        return self.right_by_class.sum(axis=0)

    @property
    def examples(self) -> int:
        return int(self.confusions[0].sum())


def chunk_tally(labels: np.ndarray, predictions: np.ndarray, classes: int) -> Tally:
    """The tally of one chunk: ``predictions[m]`` are model m's predicted classes of the examples ``labels``."""
    masks = labels.astype(np.int64) * 2 ** len(predictions) + 2 ** np.arange(len(predictions)) @ (predictions == labels)
    right_by_class = np.bincount(masks, minlength=classes * 2 ** len(predictions)).reshape(classes, -1)
    return Tally([confusion_matrix(labels, predicted, classes) for predicted in predictions], right_by_class)


def tally(models: list[model_io.Model], examples: Examples, chunk_rows: int) -> Tally:
    """Score ``models`` on ``examples``, reading and predicting ``chunk_rows`` rows at a time (one pass over the
    data for all models): memory depends on ``chunk_rows``, not on the size of the set."""
    classes = models[0].layer_sizes[-1]
    confusions = [np.zeros((classes, classes), np.int64) for _ in models]
    right_by_class = np.zeros((classes, 2 ** len(models)), np.int64)
    for pixels, labels in dataset.iter_file_chunks(examples.uris, chunk_rows):
        for model in models:
            check_labels(model.layer_sizes[-1], labels, examples.source)
        chunk = chunk_tally(labels, np.stack([model.predict(pixels) for model in models]), classes)
        for confusion, counted in zip(confusions, chunk.confusions):
            confusion += counted
        right_by_class += chunk.right_by_class
    return Tally(confusions, right_by_class)


def held_out_calibration(model: model_io.Model, examples: Examples,
                         chunk_rows: int = 4096) -> tuple[label_checks.Calibration, np.ndarray]:
    """The model's calibration and confident joint on held-out ``examples`` (:func:`label_checks.calibrate`):
    two passes, each reading and scoring ``chunk_rows`` rows at a time."""
    def scored_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for pixels, labels in dataset.iter_file_chunks(examples.uris, chunk_rows):
            check_labels(model.layer_sizes[-1], labels, examples.source)
            yield model.logits(pixels), labels

    return label_checks.calibrate(scored_chunks)


def tally_sets(models: list[model_io.Model], sets: list[Examples], chunk_rows: int) -> dict[str, Tally]:
    """Per set name: its tally of ``models``."""
    return {examples.name: tally(models, examples, chunk_rows) for examples in sets}


def score_deltas(challenger: dict[str, Any], champion: dict[str, Any], both: Tally) -> dict[str, Any]:
    """Challenger minus champion: accuracy, macro F1 and per-class precision/recall/F1 deltas, plus the
    discordant pairs (examples only one of the two gets right) from ``both``, their tally (challenger first).
    """
    return {
        "accuracy": challenger["accuracy"] - champion["accuracy"],
        "macro_f1": challenger["macro_f1"] - champion["macro_f1"],
        "per_class": [
            {"class": mine["class"], **{key: mine[key] - theirs[key] for key in CLASS_SCORES}}
            for mine, theirs in zip(challenger["per_class"], champion["per_class"])
        ],
        "challenger_only_correct": int(both.right_by[0b01]),
        "champion_only_correct": int(both.right_by[0b10]),
    }


def score_champion(champion_model_uri: str, dataset_uri: str, challenger_model_uri: str,
                   chunk_rows: int = 4096) -> dict[str, Any]:
    """A champion's scores on the test split and the newest batch (None without batches), as in ``metrics.json``,
    and the challenger check of the challenger against it (``challenger_check``: the per-class statistics of
    :func:`admm_jobs.scoring.challenger_checks.adoption_statistics`; None without batches).

    For publish, when the published model changed after the evaluation.
    """
    models = [model_io.load_model(challenger_model_uri), model_io.load_model(champion_model_uri)]
    sets = evaluation_sets(dataset_uri, dataset.load_manifest(dataset_uri))
    tallies = tally_sets(models, sets, chunk_rows)
    scored = {examples.name: confusion_scores(tallies[examples.name].confusions[1], examples.source)
              for examples in sets}
    return {**{name: scored.get(name) for name in (TEST, NEWEST_BATCH)},
            "challenger_check": (adoption_statistics(tallies[NEWEST_BATCH], tallies[TEST])
                                 if NEWEST_BATCH in tallies else None)}
