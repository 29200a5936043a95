"""Warm start against cold start after one new batch, side by side in one run.

1. The vendored MNIST training file is cut into ``--batches`` dated batches (admm_jobs.operations.demo.cut_batches).
2. The dataset of all batches but the newest is trained from random weights (default settings,
   ``--epochs`` iterations): the "published" model, with test accuracy A.
3. The dataset with the newest batch added is trained twice with the same settings: from random
   weights (cold) and from the published model's weights (warm: ``--init published``, i.e.
   ``AdmmTrainer(initial_weights=...)`` plus the trainer's forward-pass restart).

Reported: for each start, the iterations and seconds (cumulative wall clock of the Spark trainer,
block loading and per-iteration scoring included) until the test accuracy reaches A, and until it
reaches the cold start's final accuracy C (A may lie beyond a cold start's reach in ``--epochs``),
and the final and best test accuracies. Validation accuracy is reported next to it: the defaults are
chosen on validation, never on test.

    .venv/bin/python bench/warm_start.py [--cores 2] [--batches 6] [--epochs 50] [--partitions 4]
    .venv/bin/python bench/warm_start.py --summarise   # rewrite the tables from the JSON's curves

Writes bench/results/warm_start.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time

from admm_jobs import ingest
from admm_jobs.operations import demo
from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer
from admm_jobs.trainer.spark_backend import SparkBackend

from common import RESULTS, ROOT, WORK, machine, spark_session


def curve_of(spark, dataset_uri: str, epochs: int, partitions: int, initial_weights=None):
    """Train with the default settings; per-iteration accuracies against cumulative seconds, and the weights."""
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=epochs, partitions=partitions,
                               patience=0)
    curve = []
    started = time.perf_counter()

    def record(report):
        curve.append({"epoch": report.epoch, "seconds": round(time.perf_counter() - started, 2),
                      "test_accuracy": report.metrics["test_accuracy"],
                      "validation_accuracy": report.metrics["validation_accuracy"]})
        print(f"  iteration {report.epoch}: {curve[-1]['seconds']:.1f}s test {report.metrics['test_accuracy']:.4f}",
              flush=True)

    backend = SparkBackend(spark.sparkContext, block_specs(dataset_uri, partitions, None), load_block)
    try:
        result = AdmmTrainer(config.hyperparameters(784, 10), backend, record, initial_weights=initial_weights).fit()
    finally:
        backend.close()
    return curve, result.weights


def reached(curve: list[dict], target: float) -> dict | None:
    return next(({"iterations": point["epoch"], "seconds": point["seconds"]} for point in curve
                 if point["test_accuracy"] >= target), None)


def summary(curve: list[dict], target: float, cold_final: float) -> dict:
    return {"to_published_accuracy": reached(curve, target), "to_cold_final_accuracy": reached(curve, cold_final),
            "final_test_accuracy": curve[-1]["test_accuracy"],
            "best_test_accuracy": max(point["test_accuracy"] for point in curve),
            "best_validation_accuracy": max(point["validation_accuracy"] for point in curve), "curve": curve}


def ratios(results: dict) -> None:
    for goal in ("to_published_accuracy", "to_cold_final_accuracy"):
        cold, warm = results["cold"][goal], results["warm"][goal]
        if cold and warm:
            results[f"warm_to_cold_iterations_{goal}"] = round(warm["iterations"] / cold["iterations"], 3)


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "warm_start.json").write_text(json.dumps(results, indent=2) + "\n")

    def cell(hit):
        return f"{hit['iterations']} iterations, {hit['seconds']:.1f} s" if hit else "not reached"

    published, new = results["published"], results["new_dataset"]
    cold_final = results["cold"]["final_test_accuracy"]
    lines = [
        "# Warm vs cold start after one new batch", "",
        f"Command: `{results['command']}`  ", f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} "
        f"cores; load after the run: `{results['uptime_after']}`", "",
        f"Published model: batches {published['batches'][0]}..{published['batches'][-1]} "
        f"({published['train_rows']} training images), {published['iterations']} iterations from random weights, "
        f"test accuracy A = {published['test_accuracy']:.4f}. New dataset: + batch {new['batches'][-1]} "
        f"({new['train_rows']} training images); the cold start's final test accuracy C = {cold_final:.4f}.", "",
        "| start | reaches A | reaches C | final test accuracy | best validation accuracy |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | {cell(results[name]['to_published_accuracy'])} | {cell(results[name]['to_cold_final_accuracy'])} "
          f"| {results[name]['final_test_accuracy']:.4f} | {results[name]['best_validation_accuracy']:.4f} |"
          for name in ("cold", "warm")),
    ]
    (RESULTS / "warm_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--summarise", action="store_true", help="rewrite the results from the JSON's curves")
    args = parser.parse_args()
    if args.summarise:
        results = json.loads((RESULTS / "warm_start.json").read_text())
        target, cold_final = results["published"]["test_accuracy"], results["cold"]["curve"][-1]["test_accuracy"]
        for name in ("cold", "warm"):
            results[name] = summary(results[name]["curve"], target, cold_final)
        ratios(results)
        write_results(results)
        return

    landing, lake = WORK / "warm-start" / "landing", WORK / "warm-start" / "lake"
    dates = [datetime.date(2026, 1, 4) + datetime.timedelta(weeks=week) for week in range(args.batches)]
    demo.cut_batches(str(ROOT / "data" / "mnist"), str(landing), dates, 60_000 // args.batches)
    before = ingest.ingest_dataset(str(landing), str(lake), as_of=dates[-2].isoformat())
    after = ingest.ingest_dataset(str(landing), str(lake), as_of=dates[-1].isoformat())

    spark = spark_session(args.cores, "bench-warm-start")
    try:
        print(f"published model: batches {before['batches'][0]}..{before['batches'][-1]}", flush=True)
        published_curve, published = curve_of(spark, before["dataset_uri"], args.epochs, args.partitions)
        target = published_curve[-1]["test_accuracy"]
        print(f"cold start on {len(after['batches'])} batches", flush=True)
        cold, _ = curve_of(spark, after["dataset_uri"], args.epochs, args.partitions)
        print("warm start from the published model", flush=True)
        warm, _ = curve_of(spark, after["dataset_uri"], args.epochs, args.partitions, initial_weights=published)
    finally:
        spark.stop()

    command = "bench/warm_start.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "summarise")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {
        "command": command, "machine": machine(), "uptime_after": load,
        "published": {"batches": before["batches"], "train_rows": before["rows"]["train"],
                      "test_accuracy": target, "iterations": args.epochs},
        "new_dataset": {"batches": after["batches"], "train_rows": after["rows"]["train"]},
        "cold": summary(cold, target, cold[-1]["test_accuracy"]),
        "warm": summary(warm, target, cold[-1]["test_accuracy"]),
    }
    ratios(results)
    write_results(results)


if __name__ == "__main__":
    main()
