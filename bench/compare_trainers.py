"""Side by side, one run: our ADMM trainer, Spark MLlib's MultilayerPerceptronClassifier (L-BFGS)
and gradient training with Adam (scikit-learn's MLPClassifier).

Same data (the ingested full MNIST: 55k train, 10k test), same layers 784-256-256-10, same
cores. ADMM's curve is its per-iteration test accuracy against cumulative wall time (Spark
``local[cores]``, block loading and the per-iteration scoring included; the clock starts after an
empty warm-up job, so that neither Spark trainer's time includes the session's start-up); MLlib exposes no
per-iteration hook, so its curve is one independent fit per ``--mllib-iterations`` value (fit
time only, scoring excluded); Adam's is one ``partial_fit`` epoch at a time (minibatches of 128,
scikit-learn's defaults otherwise, one process whose BLAS is limited to ``--cores`` threads),
timed without the scoring between epochs.

    .venv/bin/python bench/compare_trainers.py [--cores 2] [--admm-epochs 50]
        [--mllib-iterations 10,25,50,75,100,150 (empty: skip MLlib)] [--adam-epochs 20]

Writes bench/results/trainer_comparison.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from admm_jobs.lake import dataset, storage
from admm_jobs.trainer.blocks import block_specs, load_block, read_slices
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer
from admm_jobs.trainer.spark_backend import SparkBackend

from common import RESULTS, machine, mnist_dataset_uri, spark_session, uptime

LAYERS = [784, 256, 256, 10]
TARGETS = (0.95, 0.96, 0.97, 0.98)


def warm_up(spark, cores: int) -> float:
    """Seconds of one empty Python job on every core: the session's first job starts the JVM's task machinery
    and the Python workers (about 2 s), which would otherwise count as the first trainer's time only."""
    started = time.perf_counter()
    spark.sparkContext.parallelize(range(cores), cores).count()  # a Python job: PySpark counts in the workers
    return time.perf_counter() - started


def admm_curve(spark, dataset_uri: str, epochs: int, partitions: int) -> list[dict]:
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=epochs,
                               partitions=partitions, patience=0)
    curve = []
    started = time.perf_counter()

    def record(report):
        curve.append({"epoch": report.epoch, "seconds": time.perf_counter() - started,
                      "test_accuracy": report.metrics["test_accuracy"], "train_accuracy": report.metrics["train_accuracy"]})
        print(f"admm epoch {report.epoch}: {curve[-1]['seconds']:.1f}s test {report.metrics['test_accuracy']:.4f}", flush=True)

    backend = SparkBackend(spark.sparkContext, block_specs(dataset_uri, partitions, None), load_block)
    try:
        AdmmTrainer(config.hyperparameters(784, 10), backend, record).fit()
    finally:
        backend.close()
    return curve, {k: v for k, v in vars(config).items() if k not in ("dataset_uri", "output_uri")}


def mllib_frame(spark, dataset_uri: str, split: str, partitions: int):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    files = dataset.load_manifest(dataset_uri)["splits"][split]["files"]
    frame = spark.read.parquet(*(storage.filesystem(storage.join(dataset_uri, entry["path"]))[1] for entry in files))
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


def adam_curve(dataset_uri: str, epochs: int, cores: int) -> list[dict]:
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    (spec,) = block_specs(dataset_uri, 1, None)
    x_train, y_train = read_slices(spec["train"])
    x_test, y_test = read_slices(spec["test"])
    x_train, x_test = x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
    classes = np.arange(LAYERS[-1])
    model = MLPClassifier(hidden_layer_sizes=tuple(LAYERS[1:-1]), solver="adam", batch_size=128, random_state=0)
    curve, seconds = [], 0.0
    with threadpool_limits(limits=cores):
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            model.partial_fit(x_train, y_train, classes=classes)
            seconds += time.perf_counter() - started
            accuracy = float((model.predict(x_test) == y_test).mean())
            curve.append({"epoch": epoch, "seconds": seconds, "test_accuracy": accuracy,
                          "train_accuracy": float((model.predict(x_train) == y_train).mean())})
            print(f"adam epoch {epoch}: {seconds:.1f}s test {accuracy:.4f}", flush=True)
    return curve


def time_to(curve: list[dict], target: float) -> float | None:
    return next((point["seconds"] for point in curve if point["test_accuracy"] >= target), None)


def step_to(curve: list[dict], target: float, key: str) -> int | None:
    """The first iteration/epoch/maxIter whose model reaches ``target``."""
    return next((point[key] for point in curve if point["test_accuracy"] >= target), None)


def write_plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    admm = result["admm"]["curve"]
    mllib = result["mllib"]["curve"]
    adam = result["adam"]["curve"]
    axes.plot([p["seconds"] for p in admm], [p["test_accuracy"] for p in admm], "o-", ms=3, label="ADMM (ours, Spark)")
    if mllib:
        axes.plot([p["seconds"] for p in mllib], [p["test_accuracy"] for p in mllib], "s--", label="MLlib MLP (L-BFGS)")
    axes.plot([p["seconds"] for p in adam], [p["test_accuracy"] for p in adam], "^-.", ms=4,
              label="Adam (scikit-learn MLPClassifier)")
    for target in TARGETS:
        axes.axhline(target, color="grey", lw=0.8, ls=":")
    axes.set_xlabel("wall seconds")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.85, 1.0)
    axes.set_title(f"MNIST 784-256-256-10, {result['cores']} cores")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def summary(curve: list[dict], key: str) -> dict:
    return {"final_test_accuracy": curve[-1]["test_accuracy"], "best_test_accuracy": max(p["test_accuracy"] for p in curve),
            **{f"seconds_to_{round(t * 100)}": time_to(curve, t) for t in TARGETS},
            **{f"{key}_to_{round(t * 100)}": step_to(curve, t, key) for t in TARGETS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=None,
                        help="sample blocks (default: one per core, as the trainer's own default)")
    parser.add_argument("--admm-epochs", type=int, default=50)
    parser.add_argument("--mllib-iterations", default="10,25,50,75,100,150")
    parser.add_argument("--adam-epochs", type=int, default=20)
    args = parser.parse_args()
    args.partitions = args.partitions or args.cores

    dataset_uri = mnist_dataset_uri()
    load_before = uptime()
    spark = spark_session(args.cores, "bench-compare-trainers")
    try:
        warm_up_seconds = warm_up(spark, args.cores)
        admm, admm_settings = admm_curve(spark, dataset_uri, args.admm_epochs, args.partitions)
        iterations = [int(i) for i in args.mllib_iterations.split(",") if i.strip()]  # "": skip MLlib
        mllib = mllib_curve(spark, dataset_uri, iterations, args.partitions) if iterations else []
    finally:
        spark.stop()
    adam = adam_curve(dataset_uri, args.adam_epochs, args.cores)

    result = {
        "command": f"bench/compare_trainers.py --cores {args.cores} --partitions {args.partitions} "
                   f"--admm-epochs {args.admm_epochs} --mllib-iterations {args.mllib_iterations} "
                   f"--adam-epochs {args.adam_epochs}",
        "machine": machine(), "uptime_before": load_before,
        "uptime_after": uptime(),
        "cores": args.cores, "layers": LAYERS, "spark_warm_up_seconds": warm_up_seconds,
        "admm": {"settings": admm_settings, "curve": admm, **summary(admm, "epoch")},
        "mllib": {"curve": mllib, **(summary(mllib, "max_iter") if mllib else {})},
        "adam": {"settings": {"solver": "adam", "batch_size": 128, "learning_rate_init": 1e-3, "alpha": 1e-4,
                              "random_state": 0}, "curve": adam, **summary(adam, "epoch")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, RESULTS / "trainer_comparison.png")

    def reached(name: str, key: str, unit: str, target: float) -> str:
        seconds, step = result[name][f"seconds_to_{round(target * 100)}"], result[name][f"{key}_to_{round(target * 100)}"]
        return "not reached" if seconds is None else f"{seconds:.0f} s ({unit} {step})"

    rows = [("admm", "epoch", "iteration", f"ADMM (ours, Spark local[{args.cores}], {args.admm_epochs} iterations)"),
            ("mllib", "max_iter", "maxIter", f"MLlib MLP, L-BFGS (Spark local[{args.cores}])"),
            ("adam", "epoch", "epoch", f"Adam, scikit-learn MLPClassifier, batch 128 ({args.cores} BLAS threads)")]
    table = [
        f"Command: `{result['command']}` on {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']} GiB. `uptime` before: {load_before}; after: {result['uptime_after']}. "
        f"Spark warm-up before the clocks start (an empty job on every core): {warm_up_seconds:.1f} s.\n",
        "| trainer | " + " | ".join(f"{round(t * 100)} %" for t in TARGETS) + " | best test | final test | total s |",
        "| --- | " + " | ".join("---" for _ in TARGETS) + " | --- | --- | --- |",
    ]
    for name, key, unit, title in rows:
        if not result[name]["curve"]:
            continue
        table.append(f"| {title} | " + " | ".join(reached(name, key, unit, t) for t in TARGETS)
                     + f" | {result[name]['best_test_accuracy']:.4f} | {result[name]['final_test_accuracy']:.4f} | "
                     f"{result[name]['curve'][-1]['seconds']:.0f} |")
    (RESULTS / "trainer_comparison.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
