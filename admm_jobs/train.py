"""Spark job: train the network by ADMM on a dataset from the lake.

    spark-submit admm_jobs/train.py --dataset-uri LAKE/mnist/<version> --output-uri RUN [options]

Each Spark partition holds one block of training samples with their ADMM
state (see :mod:`admm_jobs.trainer.loop`) plus its share of the validation and
test splits (:mod:`admm_jobs.trainer.blocks`), kept on the executor that loaded it
(:mod:`admm_jobs.trainer.spark_backend`).
Executors read their own rows from storage, so no data passes through the driver; per pass only the
per-layer Gram matrices are summed, on the executors along a fixed tree of row chunks
(:mod:`admm_jobs.trainer.reduction`), and a bounded number of partial sums reaches the driver; the
solved weights are broadcast back. The weights do not depend on the partition count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from typing import Any

import numpy as np

from admm_jobs.cli.command import run_command
from admm_jobs.lake import dataset, storage
from admm_jobs.registry.model import Model, load_model, save_model
from admm_jobs.trainer.blocks import block_specs, default_partitions, load_block
from admm_jobs.trainer.checkpoint import CheckpointStore, fingerprint
from admm_jobs.trainer.config import TrainConfig, code_version
from admm_jobs.trainer.loop import INPUT_SCALE, AdmmTrainer, EpochReport, statistics_bytes
from admm_jobs.trainer.spark_backend import SparkBackend, driver_result_budget

log = logging.getLogger("admm_jobs.train")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"


def initial_network(config: TrainConfig, hp) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """The weights a warm start begins from ([W_l, b_l] per layer, raw-input layout) and how the run started.

    ``--init published`` with a model whose layer sizes and input scale match the run's; anything else
    starts from random weights (and says why).
    """
    if config.init == "random" or config.init_model_uri is None:
        reason = "--init random" if config.init == "random" else "no published model"
        return None, {"kind": "random", "reason": reason}
    model = load_model(config.init_model_uri)
    if tuple(model.layer_sizes) != tuple(hp.layer_sizes) or not math.isclose(model.input_scale, INPUT_SCALE):
        reason = (f"{config.init_model_uri} has layers {model.layer_sizes} and input scale {model.input_scale}, "
                  f"this run {list(hp.layer_sizes)} and {INPUT_SCALE}")
        log.warning("random start: %s", reason)
        return None, {"kind": "random", "reason": reason}
    weights = [np.hstack([w, b[:, None]]).astype(np.float32) for w, b in zip(model.weights, model.biases)]
    return weights, {"kind": "published", "model_uri": config.init_model_uri,
                     "weights_sha256": model.metadata.get("weights_sha256")}


def format_epoch(report: EpochReport, epochs: int) -> str:
    metrics = " ".join(f"{key}={value:.4f}" for key, value in report.metrics.items())
    return f"epoch {report.epoch}/{epochs} [{report.phase}] {metrics} seconds={report.seconds:.2f}"


def train(config: TrainConfig, spark_context) -> dict[str, Any]:
    """Run ADMM training on Spark and write the model and per-epoch metrics to ``config.output_uri``."""
    manifest = dataset.load_manifest(config.dataset_uri)
    hp = config.hyperparameters(dataset.PIXELS_PER_IMAGE, dataset.NUM_CLASSES)
    metrics_uri = storage.join(config.output_uri, METRICS_FILE)

    def on_epoch(report: EpochReport) -> None:
        log.info(format_epoch(report, config.epochs))
        # the whole history each time: after a resume or a re-run the file still holds exactly one line per epoch
        lines = "".join(json.dumps(r.as_record(), sort_keys=True) + "\n" for r in trainer.history)
        storage.write_bytes(metrics_uri, lines.encode())

    initial_weights, init = initial_network(config, hp)
    log.info("start: %s", json.dumps(init, sort_keys=True))
    rows = {split: int(manifest["splits"][split]["rows"]) for split in dataset.SPLITS}
    rows["train"] = min(rows["train"], config.train_limit or rows["train"])
    partitions = config.partitions or default_partitions(max(rows.values()), spark_context.defaultParallelism,
                                                         config.block_rows)
    trajectory = {**dataclasses.asdict(hp), "dataset_version": manifest["version"], "partitions": partitions,
                  "train_limit": config.train_limit, "init": init}
    checkpoints = CheckpointStore(storage.join(config.output_uri, CHECKPOINT_DIR), fingerprint(trajectory))
    specs = block_specs(config.dataset_uri, partitions, config.train_limit, config.chunk_rows)
    # a third of what Spark lets the driver receive: room for pickling and the evaluation splits' scores
    result_nodes = max(1, driver_result_budget(spark_context) // 3 // statistics_bytes(hp.layer_sizes))
    backend = SparkBackend(spark_context, specs, load_block, result_nodes)
    started = time.perf_counter()
    trainer = AdmmTrainer(hp, backend, on_epoch, checkpoints, config.checkpoint_every, initial_weights)
    try:
        result = trainer.fit()
    finally:
        try:
            backend.close()
        except Exception:  # the files go with the executors' scratch directories anyway; keep fit()'s outcome
            log.warning("could not remove the executors' block files", exc_info=True)
    best = next(report for report in result.history if report.epoch == result.best_epoch)
    model = Model(
        weights=[w[:, :-1].copy() for w in result.weights],
        biases=[w[:, -1].copy() for w in result.weights],
        input_scale=INPUT_SCALE,
        metadata={
            "hyperparameters": {**dataclasses.asdict(hp), "partitions": partitions,
                                "train_limit": config.train_limit},
            "dataset": {"uri": config.dataset_uri, "version": manifest["version"]},
            "final_metrics": best.metrics,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from,
            "train_seconds": round(time.perf_counter() - started, 3),
            "code_version": code_version(),
            "init": init,
        },
    )
    model_uri = storage.join(config.output_uri, MODEL_DIR)
    with storage.staged_directory(model_uri) as staging:
        save_model(model, staging)
    checkpoints.clear()
    return {"model_uri": model_uri, "metrics_uri": metrics_uri, "best_epoch": result.best_epoch, "init": init["kind"],
            "epochs_run": len(result.history), **{k: round(v, 6) for k, v in best.metrics.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def train_in_spark_session(config: TrainConfig) -> dict[str, Any]:
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.appName("admm-mnist-train").getOrCreate()
        spark.sparkContext.setLogLevel("WARN")
        try:
            return train(config, spark.sparkContext)
        finally:
            spark.stop()

    return run_command(TrainConfig, train_in_spark_session, argv, log_stream=sys.stdout)


if __name__ == "__main__":
    main()
