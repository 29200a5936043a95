"""Seconds per ADMM iteration: the Spark trainer against the same math in one numpy process, same cores.

    .venv/bin/python bench/backend_ratio.py [--epochs 16] [--partitions CORES] [--cores 2]

The two trainers take turns, one iteration each, so that both see the same machine: on a shared VM
the speed drifts by 10-25 % over minutes, and two runs one after the other compared those drifts as
much as the trainers. The turn passes where a checkpoint would be written, after an iteration's
clock has stopped, so no iteration's seconds include the other trainer's.

Writes bench/results/backend_ratio.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading

from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, LocalBackend
from admm_jobs.trainer.spark_backend import SparkBackend

from common import RESULTS, machine, mnist_dataset_uri, spark_session, uptime


class Turns:
    """Whose iteration it is, among trainers that run in their own threads."""

    def __init__(self, names: list[str]):
        self.running, self.turn = list(names), names[0]
        self.changed = threading.Condition()

    def wait_for(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.turn == name)

    def hand_on(self, name: str, finished: bool = False) -> None:
        """Give the turn to the next trainer still running (and, unless ``finished``, wait for it to come back)."""
        with self.changed:
            following = self.running[(self.running.index(name) + 1) % len(self.running)]
            if finished:
                self.running.remove(name)
            self.turn = following
            self.changed.notify_all()
        if not finished:
            self.wait_for(name)


class TakeTurns:
    """A checkpoint store that saves nothing: a trainer's checkpoint after each iteration hands the turn on."""

    def __init__(self, turns: Turns, name: str):
        self.turns, self.name = turns, name

    def restore(self, backend):
        self.turns.wait_for(self.name)
        return None

    def save(self, backend, state) -> None:
        self.turns.hand_on(self.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=None,
                        help="sample blocks (default: one per core, as the trainer's own default)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None)
    args = parser.parse_args()
    args.partitions = args.partitions or args.cores

    dataset_uri = mnist_dataset_uri()
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", epochs=args.epochs,
                               partitions=args.partitions, patience=0, train_limit=args.train_limit)
    hp = config.hyperparameters(784, 10)
    specs = block_specs(dataset_uri, config.partitions, config.train_limit)

    load_before = uptime()
    spark = spark_session(args.cores, "bench-backend-ratio")
    backends = {"numpy": LocalBackend(load_block(spec) for spec in specs),
                "spark": SparkBackend(spark.sparkContext, specs, load_block)}
    turns = Turns(list(backends))
    reports: dict[str, list] = {name: [] for name in backends}
    failures: list[BaseException] = []

    def fit(name: str) -> None:
        try:
            AdmmTrainer(hp, backends[name], reports[name].append, checkpoints=TakeTurns(turns, name),
                        checkpoint_every=1).fit()
        except BaseException as exc:
            failures.append(exc)
        finally:
            turns.hand_on(name, finished=True)

    try:
        threads = [threading.Thread(target=fit, args=(name,)) for name in backends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        backends["spark"].close()
    finally:
        spark.stop()
    if failures:
        raise failures[0]

    # the first iteration carries start-up costs (JIT of the JVM, first touches): compare steady state
    result = {
        "command": "bench/backend_ratio.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine(), "uptime_before": load_before, "uptime_after": uptime(),
        "hyperparameters": {k: v for k, v in vars(config).items() if k not in ("dataset_uri", "output_uri")},
        "turns": "one iteration each, alternating",
    }
    for name, epochs in reports.items():
        records = [{"epoch": r.epoch, "seconds": r.seconds, **r.timers, "test_accuracy": r.metrics["test_accuracy"]}
                   for r in epochs]
        steady = [r["seconds"] for r in records[1:]] or [r["seconds"] for r in records]
        result[name] = {"epochs": records, "median_epoch_seconds": statistics.median(steady),
                        "iteration_seconds": sum(r["seconds"] for r in records)}
    result["ratio_spark_to_numpy"] = result["spark"]["median_epoch_seconds"] / result["numpy"]["median_epoch_seconds"]
    # each iteration against the other trainer's iteration of the same number, run right next to it
    pairs = [s["seconds"] / n["seconds"] for n, s in zip(result["numpy"]["epochs"][1:], result["spark"]["epochs"][1:])]
    result["ratio_of_paired_iterations"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backend_ratio.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| trainer | median s/iteration | iteration s in all |\n| --- | --- | --- |")
    for name in reports:
        print(f"| {name} | {result[name]['median_epoch_seconds']:.2f} | {result[name]['iteration_seconds']:.1f} |")
    print(f"ratio spark/numpy = {result['ratio_spark_to_numpy']:.2f} (paired iterations: median "
          f"{result['ratio_of_paired_iterations']['median']:.2f}, {min(pairs):.2f}-{max(pairs):.2f})")


if __name__ == "__main__":
    main()
