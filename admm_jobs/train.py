"""Spark job: train the network by ADMM on a dataset from the lake.

    spark-submit admm_jobs/train.py --dataset-uri LAKE/mnist/<version> --output-uri RUN [options]

Each Spark partition holds one block of training samples with their ADMM
state (see :mod:`admm_jobs.trainer`) plus its share of the validation and
test splits, kept on the executor that loaded it (:mod:`admm_jobs.spark_backend`).
Executors read their own rows from storage, so no data passes through the driver; per pass only the per-layer Gram matrices are reduced to
the driver (``aggregate``) and the solved weights are broadcast back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from admm_jobs import admm, dataset, storage
from admm_jobs.checkpoint import CheckpointStore, fingerprint
from admm_jobs.config import configure_logging, int_tuple, parse_config, require, setting, validate_fields
from admm_jobs.model import Model, load_model, save_model
from admm_jobs.spark_backend import SparkBackend
from admm_jobs.trainer import INPUT_SCALE, AdmmTrainer, Block, EpochReport, Hyperparameters, make_block

log = logging.getLogger("admm_jobs.train")

MAX_LAYER_WIDTH = 8192
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
INITS = ("published", "random")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a ReLU network with ADMM on Spark."""

    dataset_uri: str = setting(help="committed dataset directory (LAKE/<dataset>/<version>)", minLength=1)
    output_uri: str = setting(help="run directory; model/ and metrics.jsonl go here", minLength=1)
    hidden_layers: tuple[int, ...] = setting((256, 256), "hidden layer widths, e.g. 256,256",
                                             minItems=1, maxItems=16, items={"minimum": 1, "maximum": MAX_LAYER_WIDTH})
    loss: str = setting("squared_hinge", "output loss (its exact prox is the output update)", enum=list(admm.LOSSES))
    beta: float = setting(1.0, "penalty weight of the hidden layers' z_l = W_l [a_{l-1}, 1]", exclusiveMinimum=0, maximum=1e6)
    beta_output: float = setting(0.3, "penalty weight of the output layer's constraint", exclusiveMinimum=0, maximum=1e6)
    gamma: float = setting(10.0, "penalty weight of a_l = relu(z_l)", exclusiveMinimum=0, maximum=1e6)
    target_rounds: int = setting(5, "rounds of exact alternating a/z minimisation that place the last hidden layer's "
                                 "targets per sweep (1: the classic one-step ADMM update)", minimum=1, maximum=50)
    inner_target_rounds: int = setting(3, "the same for the hidden layers below the last one (each round there costs an "
                                       "n x width x width product)", minimum=1, maximum=50)
    multiplier_step: float = setting(1.6, "step length alpha of the multiplier updates u_l += alpha (z_l - W_l [a_{l-1}, 1]) "
                                     "(1: the plain ADMM step; above (1 + sqrt 5) / 2 even convex ADMM may diverge)",
                                     exclusiveMinimum=0, maximum=2)
    ridge_input: float = setting(1e-2, "ridge of the first layer's weight solve, per training sample", minimum=0, maximum=1e3)
    ridge: float = setting(1e-4, "ridge of the hidden layers' weight solves, per training sample", minimum=0, maximum=1e3)
    ridge_output: float = setting(1e-4, "ridge of the output layer's weight solve, per training sample", minimum=0, maximum=1e3)
    extrapolation: float = setting(0.9, "theta in W = W_new + theta (W_new - W_previous) in the first iterations",
                                   minimum=0, exclusiveMaximum=1)
    extrapolation_epochs: int = setting(7, "iterations up to which --extrapolation is used (the first iteration has "
                                        "nothing to extrapolate from)", minimum=0, maximum=10_000)
    extrapolation_late: float = setting(0.5, "theta in the later iterations", minimum=0, exclusiveMaximum=1)
    epochs: int = setting(100, "ADMM iterations (sweeps over the layers), warm-up included", minimum=1, maximum=10_000)
    warmup_epochs: int = setting(0, "first iterations without hidden-layer multiplier updates", minimum=0, maximum=10_000)
    patience: int = setting(10, "stop after this many iterations without a better validation loss (0: never)",
                            minimum=0, maximum=10_000)
    partitions: int | None = setting(None, "Spark partitions, i.e. sample blocks (none: one per executor core, "
                                     "Spark's default parallelism)", minimum=1, maximum=10_000)
    seed: int = setting(0, "seed of the weight initialisation", minimum=0)
    train_limit: int | None = setting(None, "use only the first N training samples (none: all)", minimum=1)
    checkpoint_every: int = setting(5, "save a resumable checkpoint every N iterations (0: never)", minimum=0, maximum=10_000)
    init: str = setting("published", "start from the published model's weights (--init-model-uri, when its layers "
                        "match) or from random weights", enum=list(INITS))
    init_model_uri: str | None = setting(None, "model directory to start from with --init published (the DAG's plan "
                                         "task passes the published model; none: random start)")

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", int_tuple(self.hidden_layers))
        validate_fields(self)
        require(self.warmup_epochs <= self.epochs,
                f"--warmup-epochs: {self.warmup_epochs} exceeds --epochs {self.epochs}")

    def hyperparameters(self, input_size: int, classes: int) -> Hyperparameters:
        shared = {f.name for f in dataclasses.fields(Hyperparameters)} & {f.name for f in dataclasses.fields(self)}
        return Hyperparameters(layer_sizes=(input_size, *self.hidden_layers, classes),
                               **{name: getattr(self, name) for name in shared})


RowSlice = tuple[str, int, int]  # (part file URI, first row, end row)


def partition_slices(files: list[tuple[str, int]], limit: int | None, partitions: int) -> list[list[RowSlice]]:
    """Cut the first ``limit`` rows of a split (part files with row counts) into near-equal contiguous ranges."""
    total = sum(rows for _, rows in files)
    total = total if limit is None else min(total, limit)
    bounds = [round(i * total / partitions) for i in range(partitions + 1)]
    slices: list[list[RowSlice]] = [[] for _ in range(partitions)]
    offset = 0
    for uri, rows in files:
        for part in range(partitions):
            start, end = max(bounds[part], offset), min(bounds[part + 1], offset + rows)
            if start < end:
                slices[part].append((uri, start - offset, end - offset))
        offset += rows
    return slices


def read_slices(row_slices: list[RowSlice]) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate row ranges of part files (runs on the executors)."""
    pixels, labels = [], []
    for uri, start, end in row_slices:
        file_pixels, file_labels = dataset.read_parquet_file(uri)
        pixels.append(file_pixels[start:end])
        labels.append(file_labels[start:end])
    if not pixels:
        return np.zeros((0, dataset.PIXELS_PER_IMAGE), np.uint8), np.zeros(0, np.int8)
    return np.concatenate(pixels), np.concatenate(labels)


def load_block(spec: dict[str, Any]) -> Block:
    """Build one partition's block from its row ranges of every split."""
    pixels, labels = read_slices(spec["train"])
    evaluation = {split: read_slices(spec[split]) for split in ("validation", "test")}
    return make_block(spec["index"], pixels, labels, evaluation)


def block_specs(dataset_uri: str, partitions: int, train_limit: int | None) -> list[dict[str, Any]]:
    """Per partition, which rows of which part files it reads (computed from the manifest only)."""
    manifest = dataset.load_manifest(dataset_uri)
    per_split = {}
    for split in dataset.SPLITS:
        files = [(storage.join(dataset_uri, entry["path"]), int(entry["rows"]))
                 for entry in manifest["splits"][split]["files"]]
        per_split[split] = partition_slices(files, train_limit if split == "train" else None, partitions)
    return [{"index": part, **{split: per_split[split][part] for split in dataset.SPLITS}} for part in range(partitions)]


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib import metadata

    try:
        version = metadata.version("admm-mnist")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{version}+{commit}"
    except (OSError, subprocess.SubprocessError):
        return version


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
    # one block per core: every pass is then one wave of tasks, and each task's fixed cost is paid once per core
    partitions = config.partitions or spark_context.defaultParallelism
    trajectory = {**dataclasses.asdict(hp), "dataset_version": manifest["version"], "partitions": partitions,
                  "train_limit": config.train_limit, "init": init}
    checkpoints = CheckpointStore(storage.join(config.output_uri, CHECKPOINT_DIR), fingerprint(trajectory))
    backend = SparkBackend(spark_context, block_specs(config.dataset_uri, partitions, config.train_limit), load_block)
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
    configure_logging(sys.stdout)
    config = parse_config(TrainConfig, argv)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("admm-mnist-train").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    try:
        result = train(config, spark.sparkContext)
    finally:
        spark.stop()
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
