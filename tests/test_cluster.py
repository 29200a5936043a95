"""Training on a real Spark standalone cluster: a master and 2 one-core workers on 127.0.0.1.

Local mode has one JVM, one scratch directory and one host; here each block's files live in
the local directory of the worker whose executor loaded it, executors and workers can die,
and the driver is a separate process. Every run is the real CLI (``spark-submit
admm_jobs/train.py``) except the one that injects a driver-side failure.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

from admm_jobs import train
from admm_jobs.registry import model as model_io
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, NumericalFailure

from spark_cluster import (
    CLUSTER_CONF,
    block_directories,
    finish,
    read_until,
    submit_training,
    wait_for_idle,
    wait_for_no_block_files,
)

pytest_plugins = ["spark_cluster"]

pytestmark = pytest.mark.slow

EPOCHS = 6
RELOADED = "reloading the blocks and resuming from the latest checkpoint"


def assert_same_model(run_uri: str, reference_uri: str) -> None:
    actual, expected = model_io.load_model(run_uri + "/model"), model_io.load_model(reference_uri + "/model")
    for got, want in zip(actual.weights + actual.biases, expected.weights + expected.biases):
        np.testing.assert_array_equal(got, want)  # bit-identical


@pytest.fixture(scope="module")
def cluster_reference(spark_cluster, small_dataset, tmp_path_factory):
    """An undisturbed training run on the cluster: its run URI (the model every disturbed run must equal)."""
    wait_for_idle(spark_cluster)
    run_uri = str(tmp_path_factory.mktemp("cluster-reference") / "run")
    process = submit_training(spark_cluster.master_url, small_dataset["dataset_uri"], run_uri, epochs=EPOCHS)
    output = finish(process)
    assert process.returncode == 0, output
    assert RELOADED not in output
    wait_for_no_block_files(spark_cluster)  # on success: closed by the job, then the app's directories go
    return run_uri


def test_cluster_training_is_bit_identical_to_local_mode(cluster_reference, small_dataset, tmp_path):
    """Same partitions on 2 executors in 2 JVMs as in ``local[2]``: the same weights, bit for bit.

    Why the reduction order allows it: one partition is one block, so each task returns one
    statistics dict computed from that block alone (single-threaded BLAS in every Python
    worker, same binaries, same machine), and ``aggregate`` collects the partition results and
    merges them on the driver in partition order, whichever executor ran which partition and
    whenever it finished. The driver's solves see the same sums, so the same weights.
    """
    local_uri = str(tmp_path / "local")
    process = submit_training("local[2]", small_dataset["dataset_uri"], local_uri, epochs=EPOCHS)
    output = finish(process)
    assert process.returncode == 0, output
    assert_same_model(cluster_reference, local_uri)
    local_metrics = (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()
    assert len(local_metrics) == EPOCHS


def test_an_executor_killed_mid_run_is_survived_with_identical_weights(spark_cluster, cluster_reference,
                                                                         small_dataset, tmp_path):
    wait_for_idle(spark_cluster)
    run_uri = str(tmp_path / "run")
    process = submit_training(spark_cluster.master_url, small_dataset["dataset_uri"], run_uri, epochs=EPOCHS)
    output = read_until(process, f"epoch 2/{EPOCHS}")  # iteration 3 runs; the checkpoint of iteration 2 exists
    worker = spark_cluster.workers[0]
    assert block_directories(spark_cluster, "block-*", worker), "the executor of worker 0 holds no block"
    [executor] = worker.executor_pids()
    os.kill(executor, signal.SIGKILL)
    output += finish(process)
    assert process.returncode == 0, output
    assert "Lost executor" in output, output
    # Either the lost blocks' tasks ran on the other executor, found no state there and the
    # job reloaded every block and resumed from the checkpoint, or they ran on the executor the
    # worker started in place of the killed one, which shares the worker's (the application's)
    # local directory and so found the blocks' files intact. Both give the same weights.
    print("executor killed; recovery:", "blocks reloaded, resumed from checkpoint" if RELOADED in output
          else "the replacement executor found the files on its worker")
    assert_same_model(run_uri, cluster_reference)
    wait_for_no_block_files(spark_cluster)


def test_a_worker_lost_for_good_is_survived_on_the_remaining_worker(spark_cluster, cluster_reference,
                                                                    small_dataset, tmp_path):
    wait_for_idle(spark_cluster)
    run_uri = str(tmp_path / "run")
    process = submit_training(spark_cluster.master_url, small_dataset["dataset_uri"], run_uri, epochs=EPOCHS)
    try:
        output = read_until(process, f"epoch 2/{EPOCHS}")
        lost = spark_cluster.workers[0]
        assert block_directories(spark_cluster, "block-*", lost), "worker 0 holds no block"
        lost.kill()  # its process group: the worker, its executor and that executor's Python workers
        output += finish(process)
        assert process.returncode == 0, output
        # its blocks' state is gone with it: they are reloaded on the remaining worker
        assert RELOADED in output, output
        metadata = model_io.load_model(run_uri + "/model").metadata
        assert metadata["resumed_from_epoch"] == 2
        assert_same_model(run_uri, cluster_reference)
        state = spark_cluster.wait_until(lambda s: len(spark_cluster.alive_workers(s)) == 1, "worker 0 to be dead")
        assert [w["state"] for w in state["workers"]].count("DEAD") == 1
        wait_for_no_block_files(spark_cluster)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        spark_cluster.add_worker()  # the other tests get their 2 workers back


def test_a_killed_driver_leaves_no_block_files_and_the_retry_resumes_from_its_checkpoint(
        spark_cluster, cluster_reference, small_dataset, tmp_path):
    wait_for_idle(spark_cluster)
    run_uri = str(tmp_path / "run")
    process = submit_training(spark_cluster.master_url, small_dataset["dataset_uri"], run_uri, epochs=EPOCHS)
    output = read_until(process, f"epoch 4/{EPOCHS}")
    assert block_directories(spark_cluster, "block-*")
    os.killpg(process.pid, signal.SIGKILL)  # spark-submit, the driver JVM and the driver's Python
    process.wait(timeout=60)
    assert process.returncode != 0, output
    assert not (tmp_path / "run" / "model").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    # the master notices the driver is gone and the workers delete the application's directories
    wait_for_idle(spark_cluster)
    wait_for_no_block_files(spark_cluster)

    retry = submit_training(spark_cluster.master_url, small_dataset["dataset_uri"], run_uri, epochs=EPOCHS)
    retry_output = finish(retry)
    assert retry.returncode == 0, retry_output
    assert "resuming from checkpoint" in retry_output
    assert model_io.load_model(run_uri + "/model").metadata["resumed_from_epoch"] == 4
    assert_same_model(run_uri, cluster_reference)
    wait_for_no_block_files(spark_cluster)


def test_a_failed_training_removes_the_block_files_from_the_executors(spark_cluster, small_dataset, tmp_path,
                                                                      monkeypatch):
    from pyspark.sql import SparkSession

    wait_for_idle(spark_cluster)
    builder = SparkSession.builder.master(spark_cluster.master_url).appName("test-cluster-failure")
    for key, value in {**CLUSTER_CONF, "spark.pyspark.python": sys.executable}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    held = []
    solve = AdmmTrainer._solve

    def fail_in_iteration_three(self, cross, gram, samples, layer, epoch):
        if epoch == 3:
            held.extend(block_directories(spark_cluster, "block-*"))
            raise NumericalFailure("injected: the solve of iteration 3 fails")
        return solve(self, cross, gram, samples, layer, epoch)

    monkeypatch.setattr(AdmmTrainer, "_solve", fail_in_iteration_three)
    config = TrainConfig(dataset_uri=small_dataset["dataset_uri"], output_uri=str(tmp_path / "run"),
                               hidden_layers=(24, 12), epochs=EPOCHS, partitions=2, train_limit=400, patience=0)
    try:
        with pytest.raises(NumericalFailure, match="injected"):
            train.train(config, spark.sparkContext)
        assert len(held) == 2  # both blocks were on the workers' disks when it failed
        assert block_directories(spark_cluster, "block-*") == []  # removed by the job itself
        assert not (tmp_path / "run" / "model").exists()
    finally:
        spark.stop()
    wait_for_idle(spark_cluster)
    wait_for_no_block_files(spark_cluster)
