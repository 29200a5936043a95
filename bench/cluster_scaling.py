"""Scaling on a real Spark standalone cluster (one-core workers on 127.0.0.1): strong and weak.

Three runs of the default network (784-256-256-10) on MNIST, blocks of the same size in all three:

* 1 worker, N/2 samples;  * 1 worker, N samples;  * 2 workers, N samples.

Strong scaling efficiency = T(1 worker, N) / (2 T(2 workers, N)); weak scaling efficiency =
T(1 worker, N/2) / T(2 workers, N), T being the median seconds per iteration after the first.
Each iteration is split into worker compute, store I/O (per executor: the blocks' sums divided
by the executors), reduction, broadcast, driver solve and scheduling; reduction, broadcast and
scheduling come from jobs run on the same blocks after training (a pass that does nothing; one
that returns statistics as large as the real passes'; one that receives a broadcast as large as
theirs). The driver (this process and its JVM) shares the machine's cores with the workers: its
CPU seconds per iteration are recorded too.

    .venv/bin/python bench/cluster_scaling.py [--samples 55000] [--epochs 4] [--blocks-per-worker 2]

Writes bench/results/cluster_scaling.{json,md}; ``bench/scaling_model.py`` fits the model on it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from admm_jobs.operations.cluster import StandaloneCluster, job_conf
from admm_jobs.trainer import admm
from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, chunked
from admm_jobs.trainer.reduction import Partial
from admm_jobs.trainer.spark_backend import SparkBackend, executor_scratch_directory

from common import RESULTS, WORK, machine, mnist_dataset_uri

REPEATS = 7
PASS_NAMES = ("forward", "pass1", "pass2", "pass3", "pass4")


def noop_pass(block, params):
    return block, Partial()


def stats_pass(block, params):
    """Statistics shaped like one iteration's largest pass (every Gram of the forward pass), per chunk."""
    return block, chunked(block, "train", lambda rows: {key: np.zeros(shape) for key, shape in params["shapes"].items()})


def placement_pass(block, params):
    return block, Partial(counts={f"block{block['index']}": str(executor_scratch_directory())})


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def driver_cpu_seconds(spark_context) -> float:
    """CPU seconds of the driver: this Python process and its JVM."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + cpu_seconds(int(spark_context._jvm.java.lang.ProcessHandle.current().pid()))


def timed_job(backend: SparkBackend, function, params) -> float:
    """Median wall seconds of one pass (``inspect``: nothing is written)."""
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        backend.inspect(function, params)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def pass_sizes(layer_sizes: list[int]) -> dict[str, float]:
    """Bytes per iteration: statistics each block returns, and the broadcasts (pickled, as Spark sends them)."""
    widths = layer_sizes
    last = len(widths) - 1
    grams = {f"gram{layer}": (widths[layer - 1] + 1, widths[layer - 1] + 1) for layer in range(2, last + 1)}
    crosses = {f"cross{layer}": (widths[layer], widths[layer - 1] + 1) for layer in range(1, last + 1)}
    weights = [np.zeros((widths[i + 1], widths[i] + 1), np.float32) for i in range(last)]
    operators = [admm.activation_operator(weights[layer], 1.0, 10.0) for layer in range(1, last)]
    statistics_bytes = sum(8 * a * b for a, b in [*grams.values(), *crosses.values()])
    broadcast_bytes = (len(pickle.dumps({"weights": weights, "input_weight": weights[0]}))
                       + sum(len(pickle.dumps({"next_weight": weights[layer], "activation": operators[layer - 1]}))
                             for layer in range(1, last)))
    return {"statistics_bytes_per_block": statistics_bytes, "broadcast_bytes": broadcast_bytes,
            "forward_gram_shapes": {**grams, f"cross{last}": crosses[f"cross{last}"]}}


def measure(dataset_uri: str, workers: int, samples: int, blocks: int, epochs: int, memory: str) -> dict:
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors' Python: this venv's
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cluster-", dir=WORK) as directory, \
            StandaloneCluster(directory, workers=workers, cores=1, memory=memory) as cluster:
        builder = SparkSession.builder.master(cluster.master_url).appName(f"bench-cluster-{workers}w-{samples}")
        for key, value in {**job_conf(memory), "spark.ui.enabled": "false"}.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        sc = spark.sparkContext
        config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=epochs, patience=0,
                                   partitions=blocks, train_limit=samples)
        hp = config.hyperparameters(784, 10)
        backend = SparkBackend(sc, block_specs(dataset_uri, blocks, samples), load_block)
        reports, cpu_marks = [], []

        def on_epoch(report):
            reports.append(report)
            cpu_marks.append(driver_cpu_seconds(sc))

        try:
            started = time.perf_counter()
            AdmmTrainer(hp, backend, on_epoch).fit()
            train_seconds = time.perf_counter() - started
            placement = backend.inspect(placement_pass, {})
            sizes = pass_sizes(list(hp.layer_sizes))
            broadcast_params = {"payload": np.zeros(sizes["broadcast_bytes"] // 4, np.float32)}
            noop = timed_job(backend, noop_pass, {})
            with_statistics = timed_job(backend, stats_pass, {"shapes": sizes["forward_gram_shapes"]})
            with_broadcast = timed_job(backend, noop_pass, broadcast_params)
        finally:
            backend.close()
            spark.stop()
    load_after = os.getloadavg()
    steady = reports[1:] or reports
    median_timer = {key: statistics.median(r.timers.get(key, 0.0) for r in steady) for key in steady[0].timers}
    passes = [name for name in PASS_NAMES if name in median_timer]
    iteration = statistics.median(r.seconds for r in steady)
    forward_bytes = sum(8 * a * b for a, b in sizes["forward_gram_shapes"].values())
    # the reduction job returned the forward pass's statistics; the other passes return crosses only
    reduction = (with_statistics - noop) * sizes["statistics_bytes_per_block"] / forward_bytes
    split = {
        "worker_compute": median_timer["worker"] / workers,
        "store_io": median_timer["store"] / workers,
        "reduction": max(reduction, 0.0),
        "broadcast": max(with_broadcast - noop, 0.0),
        "driver_solve": median_timer["solve"],
        "scheduling": noop * len(passes),
    }
    split["unattributed"] = iteration - sum(split.values())
    cpu_per_iteration = statistics.median(np.diff(cpu_marks)[1:]) if len(cpu_marks) > 2 else float("nan")
    placement = {key: value for key, value in placement.items() if key.startswith("block")}
    executors = sorted(set(placement.values()))
    return {
        "workers": workers, "cores_per_worker": 1, "samples": samples, "blocks": blocks,
        "samples_per_block": samples // blocks, "epochs": epochs, "layer_sizes": list(hp.layer_sizes),
        "seconds_per_iteration": round(iteration, 3),
        "iteration_seconds": [round(r.seconds, 3) for r in reports],
        "split_seconds_per_iteration": {key: round(value, 4) for key, value in split.items()},
        "pass_wall_seconds": {name: round(median_timer[name], 4) for name in passes},
        "worker_cpu_seconds_per_iteration": round(median_timer["worker"], 4),
        "store_seconds_per_iteration_summed": round(median_timer["store"], 4),
        "noop_pass_seconds": round(noop, 4),
        "forward_statistics_pass_seconds": round(with_statistics, 4),
        "broadcast_pass_seconds": round(with_broadcast, 4),
        "statistics_bytes_per_block_per_iteration": sizes["statistics_bytes_per_block"],
        "forward_statistics_bytes_per_block": forward_bytes,
        "broadcast_bytes_per_iteration": sizes["broadcast_bytes"],
        "driver_cpu_seconds_per_iteration": round(float(cpu_per_iteration), 3),
        "blocks_per_executor": [sum(1 for d in placement.values() if d == e) for e in executors],
        "train_seconds_including_start": round(train_seconds, 2),
        "final_test_accuracy": round(reports[-1].metrics.get("test_accuracy", float("nan")), 4),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
    }


def markdown(result: dict) -> str:
    rows = result["runs"]
    keys = list(rows[0]["split_seconds_per_iteration"])
    lines = [f"Command: `{result['command']}` on {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"{result['machine']['memory_gib']} GiB; {result['date']}. Load average (1 min) during the runs: "
             f"{', '.join(str(r['load_average_before'][0]) for r in rows)}.\n",
             f"**Strong scaling efficiency {result['strong_scaling_efficiency']:.2f}** (1 worker vs 2, "
             f"{rows[1]['samples']} samples); **weak scaling efficiency {result['weak_scaling_efficiency']:.2f}** "
             f"(1 worker with {rows[0]['samples']} samples vs 2 workers with {rows[2]['samples']}).\n",
             "| workers | samples | blocks | s/iteration | " + " | ".join(k.replace("_", " ") for k in keys)
             + " | driver CPU s/iteration | blocks per executor |",
             "| --- " * (6 + len(keys)) + "|"]
    for r in rows:
        split = r["split_seconds_per_iteration"]
        lines.append(f"| {r['workers']} | {r['samples']} | {r['blocks']} | {r['seconds_per_iteration']:.2f} | "
                     + " | ".join(f"{split[k]:.3f}" for k in keys)
                     + f" | {r['driver_cpu_seconds_per_iteration']} | {r['blocks_per_executor']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=55_000, help="N: the data of the strong-scaling runs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--blocks-per-worker", type=int, default=2)
    parser.add_argument("--memory", default="2g", help="memory each worker offers (and each executor takes)")
    args = parser.parse_args()

    dataset_uri = mnist_dataset_uri()
    per_worker = args.blocks_per_worker
    runs = []
    for workers, samples, blocks in ((1, args.samples // 2, per_worker), (1, args.samples, 2 * per_worker),
                                     (2, args.samples, 2 * per_worker)):
        runs.append(measure(dataset_uri, workers, samples, blocks, args.epochs, args.memory))
        print(json.dumps(runs[-1]), flush=True)
    half, one, two = (run["seconds_per_iteration"] for run in runs)
    result = {
        "command": f"bench/cluster_scaling.py --samples {args.samples} --epochs {args.epochs} "
                   f"--blocks-per-worker {args.blocks_per_worker} --memory {args.memory}",
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "strong_scaling_efficiency": round(one / (2 * two), 3),
        "weak_scaling_efficiency": round(half / two, 3),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cluster_scaling.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
