"""What one pass costs as the partition count grows, and what the driver receives: the chunk-tree reduction.

On full MNIST (chunks of 64 rows, so 512 partitions all hold rows), Spark local[2] with the training job's
own settings and Spark's default ``spark.driver.maxResultSize`` (1 GiB):

* per partition count P: the median seconds of a pass whose blocks return statistics as large as the
  initialisation pass's (every Gram, the 785 x 785 input Gram included, per chunk), the bytes of task
  results the driver received for it (from Spark's REST API), and what ``RDD.aggregate`` of one partial
  per partition would have made the driver receive (P times one block's statistics);
* a training run of 2 iterations with 512 partitions, which must finish under the default maxResultSize.

    .venv/bin/python bench/reduction_cost.py [--partitions 2,8,32,128,512] [--repeats 5]

Writes bench/results/reduction_cost.{json,md}; ``bench/scaling_model.py`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

import numpy as np
from common import RESULTS, machine, mnist_dataset_uri

from admm_jobs import train
from admm_jobs.operations.deploy import TRAINING_SPARK_CONF
from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import chunked, statistics_bytes
from admm_jobs.trainer.spark_backend import SparkBackend, driver_result_budget

LAYERS = (784, 256, 256, 10)
CHUNK_ROWS = 64


def init_sized_pass(block, params):
    """Statistics shaped like the initialisation pass's (the largest), one set per chunk."""
    shapes = [(size + 1, size + 1) for size in LAYERS[:-1]] + [(LAYERS[-1], LAYERS[-2] + 1)]
    return block, chunked(block, "train", lambda rows: {f"s{i}": np.ones(shape) for i, shape in enumerate(shapes)})


def api(spark, path: str):
    """One answer of the Spark UI's REST API for this application."""
    base = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}"
    return json.load(urllib.request.urlopen(f"{base}/{path}"))


def last_job_id(spark) -> int:
    return max((job["jobId"] for job in api(spark, "jobs")), default=-1)


def result_bytes(spark, after_job_id: int) -> int:
    """Bytes of task results the driver received for the jobs after ``after_job_id`` (their result stages'
    tasks), from Spark's REST API. (The backend names each pass's job group itself, so jobs are told by id.)"""
    total = 0
    for job in api(spark, "jobs"):
        if job["jobId"] <= after_job_id:
            continue
        last_stage = max(job["stageIds"])  # the result stage
        for attempt in api(spark, f"stages/{last_stage}"):
            tasks = api(spark, f"stages/{last_stage}/{attempt['attemptId']}/taskList?length=100000")
            total += sum(task.get("taskMetrics", {}).get("resultSize", 0) for task in tasks)
    return total


def measure_pass(spark, dataset_uri: str, partitions: int, repeats: int) -> dict:
    specs = block_specs(dataset_uri, partitions, None, CHUNK_ROWS)
    nodes = max(1, driver_result_budget(spark.sparkContext) // 3 // statistics_bytes(LAYERS))
    backend = SparkBackend(spark.sparkContext, specs, load_block, nodes)
    try:
        seconds, received = [], []
        for _ in range(repeats):
            before = last_job_id(spark)
            started = time.perf_counter()
            backend.inspect(init_sized_pass, {})
            seconds.append(time.perf_counter() - started)
            received.append(result_bytes(spark, before))
    finally:
        backend.close()
    return {"partitions": partitions, "result_nodes": nodes, "median_pass_seconds": round(statistics.median(seconds), 3),
            "pass_seconds": [round(s, 3) for s in seconds], "driver_received_bytes": max(received),
            "aggregate_would_receive_bytes": partitions * statistics_bytes(LAYERS)}


def measure_training(spark, dataset_uri: str) -> dict:
    """Two iterations with 512 partitions under the session's maxResultSize (Spark's default unless set)."""
    with tempfile.TemporaryDirectory() as run:
        config = TrainConfig(dataset_uri=dataset_uri, output_uri=run, epochs=2, patience=0, partitions=512,
                             chunk_rows=CHUNK_ROWS, init="random")
        started = time.perf_counter()
        trained = train.train(config, spark.sparkContext)
    return {"partitions": 512, "epochs": 2, "seconds": round(time.perf_counter() - started, 1),
            "max_result_size": spark.sparkContext.getConf().get("spark.driver.maxResultSize", "1g (default)"),
            "test_accuracy": trained.get("test_accuracy")}


def write(result: dict) -> None:
    (RESULTS / "reduction_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = []
    if "passes" in result:
        passes = result["passes"]
        lines += [f"`{passes['command']}`, {passes['date']}, load average {passes['load_average']}", "",
                  "| partitions | median pass seconds | driver received | `aggregate` would receive |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['partitions']} | {r['median_pass_seconds']} | {r['driver_received_bytes'] / 2**20:.1f} MiB | "
                  f"{r['aggregate_would_receive_bytes'] / 2**20:.0f} MiB |" for r in passes["rows"]]
    if "training_512_partitions" in result:
        training = result["training_512_partitions"]
        lines.append(f"\nTraining, 512 partitions, 2 iterations, maxResultSize {training['max_result_size']}: "
                     f"{training['seconds']} s, test accuracy {training['test_accuracy']} (`{training['command']}`, "
                     f"{training['date']}, load average {training['load_average']}).")
    (RESULTS / "reduction_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("all", "passes", "training"), default="all",
                        help="what to measure; the other part's last results are kept")
    parser.add_argument("--partitions", default="2,8,32,128,512")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the Python workers': this venv's
    spark = (SparkSession.builder.master("local[2]").appName("reduction-cost").config(map=TRAINING_SPARK_CONF)
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    dataset_uri = mnist_dataset_uri()
    path = RESULTS / "reduction_cost.json"
    result = {**(json.loads(path.read_text()) if path.exists() else {}), "machine": machine(), "layers": LAYERS,
              "chunk_rows": CHUNK_ROWS}

    def stamp() -> dict:
        return {"command": "bench/reduction_cost.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average": [round(x, 2) for x in os.getloadavg()]}

    try:
        if args.part in ("all", "passes"):
            rows = [measure_pass(spark, dataset_uri, int(p), args.repeats) for p in args.partitions.split(",")]
            result["passes"] = {**stamp(), "rows": rows}
            write(result)
        if args.part in ("all", "training"):
            result["training_512_partitions"] = {**stamp(), **measure_training(spark, dataset_uri)}
            write(result)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
