"""Cost of one ADMM epoch as the data grows: MNIST replicated 1x, 2x, 4x, 8x.

Each replica of a training image is perturbed (every pixel moved by up to +-8 grey
levels, seeded per replica), and the replicas are built on the executors when the
blocks load, so the driver never sees the data. Partitions grow with the factor, so
a block always holds about 13,750 samples. Reports seconds per epoch (median of the
epochs after the first), the peak resident memory of the Python workers, and the
ADMM state per sample a block holds between iterations (z_1 and the multipliers) and the
bytes per sample of the executors' block files at the end (data plus the two newest state
generations).

    .venv/bin/python bench/scaling.py [--factors 1,2,4,8] [--epochs 3] [--cores 2]

Writes bench/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from pathlib import Path

import numpy as np
from pyspark import SparkFiles

from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.checkpoint import DATA_KEYS
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, make_block
from admm_jobs.trainer.reduction import Partial
from admm_jobs.trainer.spark_backend import SparkBackend

from common import RESULTS, machine, mnist_dataset_uri, spark_session

BASE_PARTITIONS = 4


def replicated_block(spec: dict) -> dict:
    """The partition's MNIST rows, perturbed into ``spec['replica']``-th copies."""
    block = load_block(spec)
    rng = np.random.default_rng(1000 * spec["replica"] + spec["index"])
    noise = rng.integers(-8, 9, size=block["pixels"].shape)
    pixels = np.clip(block["pixels"].astype(np.int16) + noise * (spec["replica"] > 0), 0, 255).astype(np.uint8)
    return make_block(spec["index"], pixels, block["labels"], block["evaluation"] if spec["replica"] == 0 else {},
                      spec["rows"], spec["chunk_rows"])


def memory_pass(block: dict, params: dict):
    """Peak RSS of this Python worker and the bytes of ADMM state this block holds between iterations."""
    state = sum(array.nbytes for key, arrays in block.items() if key not in DATA_KEYS for array in arrays)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return block, Partial(counts={f"peak_rss_mib_{block['index']}": peak_mib, "state_bytes": state,
                                  "samples": len(block["labels"])})


def measure(spark, dataset_uri: str, factor: int, epochs: int) -> dict:
    base = block_specs(dataset_uri, BASE_PARTITIONS, None)
    train_rows = base[0]["rows"]["train"][1]
    # replica r's rows come after those of replicas 0..r-1 in the sums' chunk order
    specs = [dict(spec, index=replica * BASE_PARTITIONS + spec["index"], replica=replica,
                  rows={**spec["rows"], "train": (replica * train_rows + spec["rows"]["train"][0], factor * train_rows)})
             for replica in range(factor) for spec in base]
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=epochs, patience=0,
                               partitions=len(specs))
    backend = SparkBackend(spark.sparkContext, specs, replicated_block)
    reports = []
    try:
        AdmmTrainer(config.hyperparameters(784, 10), backend, reports.append).fit()
        memory = backend.inspect(memory_pass, {})
        # local mode: the executor's scratch directory is this process's; data plus two state generations
        store = Path(SparkFiles.getRootDirectory()) / f"admm-blocks-{backend.token}"
        store_bytes = sum(path.stat().st_size for path in store.rglob("*.npy"))
    finally:
        backend.close()
    peaks = [value for key, value in memory.items() if key.startswith("peak_rss_mib_")]
    return {
        "factor": factor, "samples": int(memory["samples"]), "partitions": len(specs),
        "epoch_seconds": [round(r.seconds, 3) for r in reports],
        "median_epoch_seconds": statistics.median(r.seconds for r in reports[1:] or reports),
        "peak_python_worker_rss_mib": round(max(peaks), 1),
        "state_bytes_per_sample": memory["state_bytes"] / memory["samples"],
        "executor_store_bytes_per_sample": store_bytes / memory["samples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--factors", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--driver-memory", default="4g",
                        help="local mode: the driver JVM is the executor (the ADMM state is in files, not the JVM)")
    args = parser.parse_args()

    dataset_uri = mnist_dataset_uri()
    spark = spark_session(args.cores, "bench-scaling", args.driver_memory)
    try:
        rows = []
        for factor in (int(f) for f in args.factors.split(",")):
            rows.append(measure(spark, dataset_uri, factor, args.epochs))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        spark.stop()
    base = rows[0]
    for row in rows:
        row["seconds_per_epoch_relative_to_1x"] = round(row["median_epoch_seconds"] / base["median_epoch_seconds"], 2)
    result = {"command": f"bench/scaling.py --factors {args.factors} --epochs {args.epochs} --cores {args.cores} "
                         f"--driver-memory {args.driver_memory}",
              "machine": machine(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [f"Command: `{result['command']}` on {result['machine']['cpu']}, {result['machine']['cores']} cores.\n",
             "| factor | samples | partitions | s/epoch | relative | peak Python worker RSS (MiB) | state bytes/sample "
             "| executor store bytes/sample |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['factor']}x | {r['samples']} | {r['partitions']} | {r['median_epoch_seconds']:.1f} | "
              f"{r['seconds_per_epoch_relative_to_1x']} | {r['peak_python_worker_rss_mib']} | {r['state_bytes_per_sample']:.0f} "
              f"| {r['executor_store_bytes_per_sample']:.0f} |" for r in rows]
    (RESULTS / "scaling.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
