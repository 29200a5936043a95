"""The Spark training job: same result as the single-process reference, artifacts, config refusal."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from admm_jobs import model as model_io
from admm_jobs import storage, train
from admm_jobs.trainer import AdmmTrainer, LocalBackend


@pytest.fixture(scope="module")
def spark_context():
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("test-train")
             .config("spark.ui.enabled", "false").config("spark.pyspark.python", sys.executable).config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
             .getOrCreate())
    yield spark.sparkContext
    spark.stop()


def test_partition_slices_cover_every_row_once():
    files = [("a", 10), ("b", 7), ("c", 10)]
    slices = train.partition_slices(files, None, 4)
    rows = [(uri, i) for part in slices for uri, start, end in part for i in range(start, end)]
    assert rows == [(uri, i) for uri, count in files for i in range(count)]
    sizes = [sum(end - start for _, start, end in part) for part in slices]
    assert sum(sizes) == 27 and max(sizes) - min(sizes) <= 1
    limited = train.partition_slices(files, 12, 3)
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
def test_spark_training_matches_the_single_process_reference(spark_context, small_dataset, tmp_path):
    dataset_uri = small_dataset["dataset_uri"]
    config = train.TrainConfig(dataset_uri=dataset_uri, output_uri=str(tmp_path / "run"), hidden_layers=(32, 16),
                               epochs=3, warmup_epochs=1, partitions=3, train_limit=600, patience=0)
    result = train.train(config, spark_context)

    specs = train.block_specs(dataset_uri, config.partitions, config.train_limit)
    reference = AdmmTrainer(config.hyperparameters(784, 10), LocalBackend(train.load_block(s) for s in specs)).fit()
    trained = model_io.load_model(result["model_uri"], expected_layer_sizes=[784, 32, 16, 10])
    # Equal up to float32 rounding: Spark's workers run single-threaded BLAS, this process
    # multi-threaded, and the weight solves amplify the rounding by their conditioning.
    for weight, bias, expected in zip(trained.weights, trained.biases, reference.weights):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(weight, expected[:, :-1], rtol=0, atol=1e-3 * scale)
        np.testing.assert_allclose(bias, expected[:, -1], rtol=0, atol=1e-3 * scale)

    lines = [json.loads(line) for line in storage.read_bytes(result["metrics_uri"]).decode().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["phase"] for line in lines] == ["warmup", "admm", "admm"]
    for line in lines:
        for split in ("train", "validation", "test"):
            assert 0.0 <= line[f"{split}_accuracy"] <= 1.0 and np.isfinite(line[f"{split}_loss"])
        assert line["seconds"] > 0 and {"solve", "worker", "pass_output"} <= set(line["timers"])
    metadata = trained.metadata
    assert metadata["dataset"]["version"] == small_dataset["dataset_version"]
    assert metadata["hyperparameters"]["layer_sizes"] == [784, 32, 16, 10]
    best_line = lines[metadata["best_epoch"] - 1]
    assert metadata["final_metrics"] == {key: pytest.approx(best_line[key]) for key in metadata["final_metrics"]}
    assert metadata["final_metrics"]["validation_loss"] == min(line["validation_loss"] for line in lines)
