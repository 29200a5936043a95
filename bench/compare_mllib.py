"""Side by side, one run: our ADMM trainer vs Spark MLlib's MultilayerPerceptronClassifier.

Same data (the ingested full MNIST: 55k train, 10k test), same layers, same Spark master
and cores. ADMM's curve is its per-epoch test accuracy against cumulative wall time
(data loading included); MLlib exposes no per-iteration hook, so its curve is one
independent fit per ``--mllib-iterations`` value (fit time only, scoring excluded).

    .venv/bin/python bench/compare_mllib.py [--cores 2] [--admm-epochs 50] [--mllib-iterations 10,25,50,75,100,150]

Writes bench/results/mllib_comparison.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time

from admm_jobs import storage, train
from admm_jobs.spark_backend import SparkBackend
from admm_jobs.trainer import AdmmTrainer
from common import RESULTS, machine, mnist_dataset_uri, spark_session

LAYERS = [784, 256, 256, 10]
TARGETS = (0.95, 0.96, 0.97)


def admm_curve(spark, dataset_uri: str, epochs: int, partitions: int) -> list[dict]:
    config = train.TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=epochs,
                               partitions=partitions, patience=0)
    curve = []
    started = time.perf_counter()

    def record(report):
        curve.append({"epoch": report.epoch, "seconds": time.perf_counter() - started,
                      "test_accuracy": report.metrics["test_accuracy"], "train_accuracy": report.metrics["train_accuracy"]})
        print(f"admm epoch {report.epoch}: {curve[-1]['seconds']:.1f}s test {report.metrics['test_accuracy']:.4f}", flush=True)

    backend = SparkBackend(spark.sparkContext, train.block_specs(dataset_uri, partitions, None), train.load_block)
    try:
        AdmmTrainer(config.hyperparameters(784, 10), backend, record).fit()
    finally:
        backend.close()
    return curve, {k: v for k, v in vars(config).items() if k not in ("dataset_uri", "output_uri")}


def mllib_frame(spark, dataset_uri: str, split: str, partitions: int):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    _, path = storage.filesystem(storage.join(dataset_uri, f"split={split}"))
    frame = spark.read.parquet(path)
    features = F.transform("pixels", lambda p: p.cast("double") / 255.0)
    return (frame.select(array_to_vector(features).alias("features"), F.col("label").cast("double").alias("label"))
            .repartition(partitions).cache())


def mllib_curve(spark, dataset_uri: str, iterations: list[int], partitions: int) -> list[dict]:
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator

    train_frame = mllib_frame(spark, dataset_uri, "train", partitions)
    test_frame = mllib_frame(spark, dataset_uri, "test", partitions)
    train_frame.count(), test_frame.count()  # materialise the caches before timing
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    curve = []
    for max_iter in iterations:
        started = time.perf_counter()
        model = MultilayerPerceptronClassifier(layers=LAYERS, maxIter=max_iter, seed=0, blockSize=128).fit(train_frame)
        seconds = time.perf_counter() - started
        accuracy = evaluator.evaluate(model.transform(test_frame))
        curve.append({"max_iter": max_iter, "seconds": seconds, "test_accuracy": accuracy})
        print(f"mllib maxIter {max_iter}: {seconds:.1f}s test {accuracy:.4f}", flush=True)
    return curve


def time_to(curve: list[dict], target: float) -> float | None:
    return next((point["seconds"] for point in curve if point["test_accuracy"] >= target), None)


def write_plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    admm = result["admm"]["curve"]
    mllib = result["mllib"]["curve"]
    axes.plot([p["seconds"] for p in admm], [p["test_accuracy"] for p in admm], "o-", ms=3, label="ADMM (ours, Spark)")
    axes.plot([p["seconds"] for p in mllib], [p["test_accuracy"] for p in mllib], "s--", label="MLlib MLP (L-BFGS)")
    for target in TARGETS:
        axes.axhline(target, color="grey", lw=0.8, ls=":")
    axes.set_xlabel("wall seconds")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.85, 1.0)
    axes.set_title(f"MNIST 784-256-256-10, Spark local[{result['cores']}]")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--admm-epochs", type=int, default=50)
    parser.add_argument("--mllib-iterations", default="10,25,50,75,100,150")
    args = parser.parse_args()

    dataset_uri = mnist_dataset_uri()
    spark = spark_session(args.cores, "bench-compare-mllib")
    try:
        admm, admm_settings = admm_curve(spark, dataset_uri, args.admm_epochs, args.partitions)
        mllib = mllib_curve(spark, dataset_uri, [int(i) for i in args.mllib_iterations.split(",")], args.partitions)
    finally:
        spark.stop()

    result = {
        "command": f"bench/compare_mllib.py --cores {args.cores} --partitions {args.partitions} "
                   f"--admm-epochs {args.admm_epochs} --mllib-iterations {args.mllib_iterations}",
        "machine": machine(), "cores": args.cores, "layers": LAYERS,
        "admm": {"settings": admm_settings, "curve": admm, "final_test_accuracy": admm[-1]["test_accuracy"],
                 "best_test_accuracy": max(p["test_accuracy"] for p in admm),
                 **{f"seconds_to_{round(t * 100)}": time_to(admm, t) for t in TARGETS}},
        "mllib": {"curve": mllib, "final_test_accuracy": mllib[-1]["test_accuracy"],
                  **{f"seconds_to_{round(t * 100)}": time_to(mllib, t) for t in TARGETS}},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mllib_comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, RESULTS / "mllib_comparison.png")
    fmt = lambda v: "not reached" if v is None else f"{v:.0f} s"
    table = [
        f"Command: `{result['command']}` on {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']} GiB.\n",
        "| trainer | final test accuracy | best test accuracy | time to 95 % | time to 96 % | time to 97 % | total s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| ADMM ({args.admm_epochs} epochs) | {result['admm']['final_test_accuracy']:.4f} | "
        f"{result['admm']['best_test_accuracy']:.4f} | "
        + " | ".join(fmt(result["admm"][f"seconds_to_{round(t * 100)}"]) for t in TARGETS) + f" | {admm[-1]['seconds']:.0f} |",
        f"| MLlib MLP (maxIter {mllib[-1]['max_iter']}) | {result['mllib']['final_test_accuracy']:.4f} | "
        f"{max(p['test_accuracy'] for p in mllib):.4f} | "
        + " | ".join(fmt(result["mllib"][f"seconds_to_{round(t * 100)}"]) for t in TARGETS) + f" | {mllib[-1]['seconds']:.0f} |",
    ]
    (RESULTS / "mllib_comparison.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
