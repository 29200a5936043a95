"""Seconds per ADMM epoch: the Spark trainer against the same math in one numpy process, same cores.

    .venv/bin/python bench/backend_ratio.py [--epochs 4] [--partitions CORES] [--cores 2]

Writes bench/results/backend_ratio.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from admm_jobs import train
from admm_jobs.spark_backend import SparkBackend
from admm_jobs.trainer import AdmmTrainer, LocalBackend
from common import RESULTS, machine, mnist_dataset_uri, spark_session, uptime


def epoch_seconds(backend, hp) -> list[dict]:
    reports = []
    AdmmTrainer(hp, backend, reports.append).fit()
    return [{"epoch": r.epoch, "seconds": r.seconds, **r.timers, "test_accuracy": r.metrics["test_accuracy"]}
            for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=None,
                        help="sample blocks (default: one per core, as the trainer's own default)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None)
    args = parser.parse_args()
    args.partitions = args.partitions or args.cores

    dataset_uri = mnist_dataset_uri()
    config = train.TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=args.epochs,
                               partitions=args.partitions, patience=0, train_limit=args.train_limit)
    hp = config.hyperparameters(784, 10)
    specs = train.block_specs(dataset_uri, config.partitions, config.train_limit)

    load_before = uptime()
    started = time.perf_counter()
    numpy_epochs = epoch_seconds(LocalBackend(train.load_block(spec) for spec in specs), hp)
    numpy_total = time.perf_counter() - started

    spark = spark_session(args.cores, "bench-backend-ratio")
    try:
        started = time.perf_counter()
        backend = SparkBackend(spark.sparkContext, specs, train.load_block)
        spark_epochs = epoch_seconds(backend, hp)
        spark_total = time.perf_counter() - started
        backend.close()
    finally:
        spark.stop()

    # the first epoch carries start-up costs (block loading, JIT of the JVM): compare steady state
    steady = lambda epochs: statistics.median(e["seconds"] for e in epochs[1:] or epochs)
    result = {
        "command": "bench/backend_ratio.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine(), "uptime_before": load_before, "uptime_after": uptime(),
        "hyperparameters": {k: v for k, v in vars(config).items() if k not in ("dataset_uri", "output_uri")},
        "numpy": {"epochs": numpy_epochs, "median_epoch_seconds": steady(numpy_epochs), "total_seconds": numpy_total},
        "spark": {"epochs": spark_epochs, "median_epoch_seconds": steady(spark_epochs), "total_seconds": spark_total},
    }
    result["ratio_spark_to_numpy"] = result["spark"]["median_epoch_seconds"] / result["numpy"]["median_epoch_seconds"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backend_ratio.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| trainer | median s/epoch | total s |\n| --- | --- | --- |")
    for name in ("numpy", "spark"):
        print(f"| {name} | {result[name]['median_epoch_seconds']:.2f} | {result[name]['total_seconds']:.1f} |")
    print(f"ratio spark/numpy = {result['ratio_spark_to_numpy']:.2f}")


if __name__ == "__main__":
    main()
