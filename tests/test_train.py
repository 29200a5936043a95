"""The Spark training job: same result as the single-process reference, artifacts, config refusal."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from admm_jobs import train
from admm_jobs.lake import storage
from admm_jobs.operations.deploy import TRAINING_SPARK_CONF
from admm_jobs.registry import model as model_io
from admm_jobs.trainer.blocks import block_specs, default_partitions, load_block, partition_slices
from admm_jobs.trainer.checkpoint import CheckpointStore
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, BlocksLost, LocalBackend, sum_pass
from admm_jobs.trainer.spark_backend import SparkBackend


def test_default_partitions_bound_the_rows_of_a_block_not_only_the_cores():
    assert default_partitions(55_000, cores=2, block_rows=50_000) == 2  # MNIST: one block per core
    assert default_partitions(100_000, cores=2, block_rows=50_000) == 2
    assert default_partitions(100_001, cores=2, block_rows=50_000) == 3
    assert default_partitions(3_000_000, cores=2, block_rows=50_000) == 60  # 3M images: 50,000 rows a block
    assert default_partitions(3_000_000, cores=512, block_rows=50_000) == 512


def test_partition_slices_cover_every_row_once_in_whole_chunks():
    files = [("a", 10), ("b", 7), ("c", 10)]
    slices = partition_slices(files, None, 4, chunk_rows=4)
    rows = [(uri, i) for part in slices for uri, start, end in part for i in range(start, end)]
    assert rows == [(uri, i) for uri, count in files for i in range(count)]
    sizes = [sum(end - start for _, start, end in part) for part in slices]
    assert sizes == [8, 4, 4, 11]  # six chunks of 4 rows, the last one with the 3 rows left over
    limited = partition_slices(files, 12, 3, chunk_rows=4)
    assert [part for part in limited] == [[("a", 0, 4)], [("a", 4, 8)], [("a", 8, 10), ("b", 0, 2)]]


@pytest.mark.parametrize("argv, message", [
    (["--beta", "-1"], "--beta"),
    (["--gamma", "0"], "--gamma"),
    (["--hidden-layers", ""], "--hidden-layers"),
    (["--hidden-layers", "0,10"], "--hidden-layers"),
    (["--hidden-layers", "100000"], "--hidden-layers"),
    (["--partitions", "0"], "--partitions"),
    (["--loss", "softmax"], "--loss"),
    (["--epochs", "3", "--warmup-epochs", "4"], "--warmup-epochs"),
])
def test_bad_settings_are_refused_before_spark_starts(argv, message, capsys, monkeypatch):
    def no_spark(*args, **kwargs):
        raise AssertionError("Spark must not start for an invalid config")

    monkeypatch.setattr("pyspark.sql.SparkSession.builder.getOrCreate", no_spark, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset-uri", "x", "--output-uri", "y", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_spark_training_equals_the_single_process_reference_bit_for_bit(spark_context, small_dataset, tmp_path):
    """Three Spark partitions give the weights of one block in this process, bit for bit: the sums
    run along the same chunk tree (``trainer.reduction``) wherever the rows are."""
    dataset_uri = small_dataset["dataset_uri"]
    config = TrainConfig(dataset_uri=dataset_uri, output_uri=str(tmp_path / "run"), hidden_layers=(32, 16),
                         epochs=3, warmup_epochs=1, partitions=3, train_limit=600, patience=0, chunk_rows=64)
    result = train.train(config, spark_context)

    [spec] = block_specs(dataset_uri, 1, config.train_limit, config.chunk_rows)
    # single-threaded BLAS, as the Spark workers run it (TRAINING_SPARK_CONF): OpenBLAS's threaded kernels
    # round some products differently
    with threadpool_limits(1):
        reference = AdmmTrainer(config.hyperparameters(784, 10), LocalBackend([load_block(spec)])).fit()
    trained = model_io.load_model(result["model_uri"], expected_layer_sizes=[784, 32, 16, 10])
    for weight, bias, expected in zip(trained.weights, trained.biases, reference.weights):
        np.testing.assert_array_equal(weight, expected[:, :-1])
        np.testing.assert_array_equal(bias, expected[:, -1])

    lines = [json.loads(line) for line in storage.read_bytes(result["metrics_uri"]).decode().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["phase"] for line in lines] == ["warmup", "admm", "admm"]
    for line in lines:
        for split in ("train", "validation", "test"):
            assert 0.0 <= line[f"{split}_accuracy"] <= 1.0 and np.isfinite(line[f"{split}_loss"])
        assert line["seconds"] > 0 and {"solve", "worker", "store", "pass1", "pass2"} <= set(line["timers"])
    metadata = trained.metadata
    assert metadata["dataset"]["version"] == small_dataset["dataset_version"]
    assert metadata["hyperparameters"]["layer_sizes"] == [784, 32, 16, 10]
    best_line = lines[metadata["best_epoch"] - 1]
    assert metadata["final_metrics"] == {key: pytest.approx(best_line[key]) for key in metadata["final_metrics"]}
    assert metadata["final_metrics"]["validation_loss"] == min(line["validation_loss"] for line in lines)


def _die_once_in_partition_one(function, block, params):
    """Kill this Python worker the first time partition 1 runs the pass (Spark must retry the task)."""
    import os

    from pyspark import TaskContext

    context = TaskContext.get()
    if context.partitionId() == 1 and context.attemptNumber() == 0:
        os._exit(1)
    return function(block, params)


class FlakySparkBackend(SparkBackend):
    """Kills a Python worker in the third pass."""

    passes = 0

    def run_pass(self, function, params):
        self.passes += 1
        if self.passes == 3:
            function = functools.partial(_die_once_in_partition_one, function)
        return super().run_pass(function, params)


@pytest.mark.slow
def test_a_killed_python_worker_is_retried_and_training_ends_the_same(spark_context, small_dataset):
    dataset_uri = small_dataset["dataset_uri"]
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", hidden_layers=(24,), epochs=3,
                               partitions=3, train_limit=300, patience=0)
    specs = block_specs(dataset_uri, config.partitions, config.train_limit, chunk_rows=50)
    hp = config.hyperparameters(784, 10)
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    clean = AdmmTrainer(hp, SparkBackend(spark_context, specs, load_block)).fit()
    flaky_backend = FlakySparkBackend(spark_context, specs, load_block)
    faulty = AdmmTrainer(hp, flaky_backend).fit()
    assert flaky_backend.passes > 3
    for expected, actual in zip(clean.weights, faulty.weights):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.slow
def test_spark_caches_only_block_handles_and_a_lost_block_fails_naming_it(spark_context, small_dataset):
    from pyspark import SparkFiles

    dataset_uri = small_dataset["dataset_uri"]
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", hidden_layers=(24,), epochs=2,
                               partitions=2, train_limit=400, patience=0)
    backend = SparkBackend(spark_context, block_specs(dataset_uri, 2, 400, chunk_rows=50), load_block)
    AdmmTrainer(config.hyperparameters(784, 10), backend).fit()

    # the state (here 400 samples x (24 + 24 + 10 + 10 + 24) floats) stays in executor files;
    # the JVM caches a handle of a few bytes per block
    cached = [info for info in spark_context._jsc.sc().getRDDStorageInfo() if info.id() == backend.handles.id()]
    assert len(cached) == 1 and cached[0].numCachedPartitions() == 2
    assert cached[0].memSize() + cached[0].diskSize() < 2_000
    store = Path(SparkFiles.getRootDirectory()) / f"admm-blocks-{backend.token}"
    assert sorted(path.name for path in store.iterdir()) == ["block-00000", "block-00001"]
    assert len(list((store / "block-00001").glob("state-*"))) == 2

    shutil.rmtree(store / "block-00001")  # as if the executor holding block 1 had been lost
    with pytest.raises(BlocksLost, match=r"block 1: .*block-00001/data is not on host"):
        backend.inspect(sum_pass, {})
    backend.close()
    assert list(store.iterdir()) == []


class ExecutorLossSparkBackend(SparkBackend):
    """Deletes block 0's files before one pass, as if the executor holding it had been lost."""

    def __init__(self, spark_context, specs, lose_before_pass):
        super().__init__(spark_context, specs, load_block)
        self.passes, self.lose_before_pass, self.reloads = 0, lose_before_pass, 0

    def run_pass(self, function, params):
        from pyspark import SparkFiles

        self.passes += 1
        if self.passes == self.lose_before_pass:
            shutil.rmtree(Path(SparkFiles.getRootDirectory()) / f"admm-blocks-{self.token}" / "block-00000")
        return super().run_pass(function, params)

    def reload(self):
        self.reloads += 1
        super().reload()


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [2, 0])
def test_a_lost_block_is_reloaded_and_training_ends_the_same(spark_context, small_dataset, tmp_path, checkpoint_every):
    dataset_uri = small_dataset["dataset_uri"]
    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", hidden_layers=(24, 12), epochs=5,
                               partitions=2, train_limit=300, patience=0)
    specs, hp = block_specs(dataset_uri, 2, 300, chunk_rows=50), config.hyperparameters(784, 10)
    clean = AdmmTrainer(hp, SparkBackend(spark_context, specs, load_block)).fit()
    # 1 init + 3 passes per iteration: pass 12 is in iteration 4, after the checkpoint of iteration 2
    backend = ExecutorLossSparkBackend(spark_context, specs, lose_before_pass=12)
    checkpoints = CheckpointStore(str(tmp_path / "checkpoints"), "fingerprint") if checkpoint_every else None
    recovered = AdmmTrainer(hp, backend, checkpoints=checkpoints, checkpoint_every=checkpoint_every).fit()
    assert backend.reloads == 1
    assert recovered.resumed_from == (2 if checkpoint_every else None)  # from the checkpoint, or from scratch
    assert [r.epoch for r in recovered.history] == [1, 2, 3, 4, 5]
    for expected, actual in zip(clean.weights, recovered.weights):
        np.testing.assert_array_equal(actual, expected)


def _spark_submit(dataset_uri: str, output_uri: str, epochs: int, *extra: str, spark_conf: tuple[str, ...] = ()):
    command = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
               "--conf", "spark.ui.enabled=false", *spark_conf, train.__file__, "--dataset-uri", dataset_uri,
               "--output-uri", output_uri, "--hidden-layers", "32,16", "--epochs", str(epochs), "--partitions", "2",
               "--train-limit", "500", "--checkpoint-every", "2", "--patience", "0", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_many_partitions_send_the_driver_a_bounded_result_and_train_the_same_weights(small_dataset, tmp_path):
    """64 partitions under a 16 MiB ``spark.driver.maxResultSize``: the 15 that hold rows (chunks of 64)
    make 5 MiB of statistics each (the input Gram), so collecting them (RDD.aggregate) would need 75 MiB;
    the executors sum them along the chunk tree and the driver receives one partial per split. The
    weights equal those of one block in this process bit for bit."""
    dataset_uri = small_dataset["dataset_uri"]
    # the job's own settings (single-threaded BLAS on the workers: threaded OpenBLAS rounds by block size)
    conf = [item for key, value in {**TRAINING_SPARK_CONF, "spark.driver.maxResultSize": "16m"}.items()
            for item in ("--conf", f"{key}={value}")]
    job = _spark_submit(dataset_uri, str(tmp_path / "run"), 2, "--partitions", "64", "--chunk-rows", "64",
                        "--train-limit", "1000", "--init", "random", spark_conf=tuple(conf))
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output
    trained = model_io.load_model(str(tmp_path / "run" / "model"))
    assert trained.metadata["hyperparameters"]["partitions"] == 64

    config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", hidden_layers=(32, 16), epochs=2, patience=0,
                         train_limit=1000, chunk_rows=64, init="random")
    [spec] = block_specs(dataset_uri, 1, config.train_limit, config.chunk_rows)
    with threadpool_limits(1):
        reference = AdmmTrainer(config.hyperparameters(784, 10), LocalBackend([load_block(spec)])).fit()
    for weight, bias, expected in zip(trained.weights, trained.biases, reference.weights):
        np.testing.assert_array_equal(weight, expected[:, :-1])
        np.testing.assert_array_equal(bias, expected[:, -1])


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_checkpoint_with_identical_weights(small_dataset, tmp_path):
    """A warm start (the resume path of a cold one is the same; the block-loss tests above resume cold runs)."""
    dataset_uri = small_dataset["dataset_uri"]
    # every run below starts from the model of a short earlier run
    earlier = _spark_submit(dataset_uri, str(tmp_path / "earlier"), 2, "--init", "random")
    assert earlier.wait(timeout=600) == 0, earlier.stdout.read()
    extra = ["--init-model-uri", str(tmp_path / "earlier" / "model")]
    reference = _spark_submit(dataset_uri, str(tmp_path / "reference"), 7, *extra)
    reference_output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, reference_output

    interrupted = _spark_submit(dataset_uri, str(tmp_path / "run"), 7, *extra)
    seen = []
    for line in interrupted.stdout:  # kill the whole job (driver, JVM, workers) during epoch 6
        seen.append(line)
        if "epoch 5/7" in line:
            os.killpg(interrupted.pid, signal.SIGKILL)
            break
    interrupted.wait(timeout=60)
    assert interrupted.returncode != 0, "".join(seen)
    assert not (tmp_path / "run" / "model").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest.json").exists()

    retry = _spark_submit(dataset_uri, str(tmp_path / "run"), 7, *extra)
    retry_output = retry.communicate(timeout=600)[0]
    assert retry.returncode == 0, retry_output
    assert "resuming from checkpoint" in retry_output
    assert not (tmp_path / "run" / "checkpoints").exists()  # cleared once the model is committed

    resumed = model_io.load_model(str(tmp_path / "run" / "model"))
    uninterrupted = model_io.load_model(str(tmp_path / "reference" / "model"))
    assert resumed.metadata["resumed_from_epoch"] == 4
    assert resumed.metadata["init"]["kind"] == "published"
    for actual, expected in zip(resumed.weights + resumed.biases, uninterrupted.weights + uninterrupted.biases):
        np.testing.assert_array_equal(actual, expected)  # bit-identical
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 8))


def test_initial_network_starts_from_a_matching_model_only(tmp_path):
    config = TrainConfig(dataset_uri="d", output_uri="o", hidden_layers=(32,))
    hp = config.hyperparameters(784, 10)
    rng = np.random.default_rng(0)
    model = model_io.Model(weights=[rng.normal(size=(32, 784)).astype(np.float32),
                                    rng.normal(size=(10, 32)).astype(np.float32)],
                           biases=[rng.normal(size=32).astype(np.float32), rng.normal(size=10).astype(np.float32)])
    model_io.save_model(model, str(tmp_path / "model"))
    warm = TrainConfig(dataset_uri="d", output_uri="o", hidden_layers=(32,), init_model_uri=str(tmp_path / "model"))
    weights, init = train.initial_network(warm, hp)
    assert init["kind"] == "published" and init["model_uri"] == str(tmp_path / "model")
    for stacked, weight, bias in zip(weights, model.weights, model.biases):
        np.testing.assert_array_equal(stacked, np.hstack([weight, bias[:, None]]))
    assert train.initial_network(config, hp) == (None, {"kind": "random", "reason": "no published model"})
    random_init = TrainConfig(dataset_uri="d", output_uri="o", hidden_layers=(32,), init="random",
                                    init_model_uri=str(tmp_path / "model"))
    assert train.initial_network(random_init, hp) == (None, {"kind": "random", "reason": "--init random"})
    wider = TrainConfig(dataset_uri="d", output_uri="o", hidden_layers=(64,), init_model_uri=str(tmp_path / "model"))
    weights, init = train.initial_network(wider, wider.hyperparameters(784, 10))
    assert weights is None and init["kind"] == "random" and "has layers [784, 32, 10]" in init["reason"]
