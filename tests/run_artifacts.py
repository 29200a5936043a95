"""Test helpers: hand-built run directories (model, metrics.jsonl, evaluation) for evaluate/publish tests."""

from __future__ import annotations

import json

import numpy as np

from admm_jobs.lake import storage
from admm_jobs.registry import store as registry
from admm_jobs.registry.model import Model, save_model

HYPERPARAMETERS = {"beta": 1.0, "gamma": 10.0, "epochs": 6, "warmup_epochs": 2, "note": "<b>not bold</b>"}


def random_model(seed: int, layer_sizes=(784, 32, 10), constant_class: int | None = None) -> Model:
    """A model with small random weights; with ``constant_class`` it always predicts that class."""
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(0, 0.05, (n_out, n_in)).astype(np.float32)
        for n_in, n_out in zip(layer_sizes, layer_sizes[1:])
    ]
    biases = [np.zeros(n_out, np.float32) for n_out in layer_sizes[1:]]
    if constant_class is not None:
        # Random logits stay within a few units; this bias outweighs them for every input.
        biases[-1][constant_class] = 1e4
    metadata = {
        "hyperparameters": dict(HYPERPARAMETERS, seed=seed),
        "dataset": {"uri": "lake/mnist/0000000000000000", "version": "0000000000000000"},
        "final_metrics": {"test_accuracy": 0.5},
        "code_version": "test",
        "best_epoch": 5,
    }
    return Model(weights=weights, biases=biases, metadata=metadata)


def epoch_records(epochs: int = 6, warmup: int = 2) -> list[dict]:
    """Per-epoch metrics in the train stage's format: accuracy rising, loss falling."""
    records = []
    for epoch in range(1, epochs + 1):
        record = {
            "epoch": epoch,
            "phase": "warmup" if epoch <= warmup else "admm",
            "seconds": 1.0,
            "timers": {"solve": 0.5},
        }
        for offset, split in enumerate(("train", "validation", "test")):
            record[f"{split}_loss"] = 10.0 / epoch**2 + offset * 0.01
            record[f"{split}_accuracy"] = 0.5 + 0.07 * epoch - offset * 0.01
        records.append(record)
    return records


def write_epoch_metrics(uri: str, records: list[dict] | None = None) -> str:
    lines = [json.dumps(record) for record in (records or epoch_records())]
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri


def make_trained_run(run_uri: str, seed: int, constant_class: int | None = None) -> Model:
    """RUN/model and RUN/metrics.jsonl, as the train stage leaves them."""
    model = random_model(seed, constant_class=constant_class)
    model.metadata = save_model(model, storage.join(run_uri, "model"))
    write_epoch_metrics(storage.join(run_uri, "metrics.jsonl"))
    return model


def make_evaluated_run(
    run_uri: str, seed: int, test_accuracy: float, dataset_version: str = "d" * 16, batches: list[str] = ()
) -> str:
    """A trained run plus a minimal evaluation/metrics.json claiming ``test_accuracy``
    (no champion, no newest batch: the gate compares with the pointer's recorded accuracy).

    Returns the run's model version.
    """
    model = make_trained_run(run_uri, seed)
    sha256 = model.metadata["weights_sha256"]
    evaluation = {
        "test_accuracy": test_accuracy,
        "dataset": {"uri": "lake", "version": dataset_version, "batches": list(batches)},
        "model": {"weights_sha256": sha256, "version": registry.model_version(sha256)},
    }
    storage.write_json(storage.join(run_uri, "evaluation", "metrics.json"), evaluation)
    storage.write_bytes(storage.join(run_uri, "evaluation", "report.html"), b"<html></html>")
    return registry.model_version(sha256)
