"""The retraining DAG: integrity, typed params, and one whole run on a small slice with dag.test()."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from admm_jobs import model as model_io
from admm_jobs import storage

DAG_ID = "mnist_admm_retraining"
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def test_dag_wires_the_five_stages_in_order(dag):
    assert dag.task_dict.keys() >= {"ingest", "validate", "train", "evaluate", "publish"}
    chain = ["ingest", "validate", "train", "evaluate", "publish"]
    for upstream, downstream in zip(chain, chain[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.get_task("ingest").retries >= 1  # I/O stages retry
    assert dag.timetable.expression == "0 0 * * 0" and dag.catchup is False  # @weekly


def test_params_are_typed_and_bounded(dag):
    from airflow.sdk.exceptions import ParamValidationError

    params = dag.params
    assert params["hidden_layers"] == [256, 256] and params["train_limit"] is None
    for name, bad in [("beta", 0), ("beta", -1.0), ("epochs", 0), ("hidden_layers", []),
                      ("hidden_layers", [0]), ("loss", "softmax"), ("partitions", 0),
                      ("min_accuracy", 1.5), ("train_limit", 0)]:
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)
    assert params.get_param("loss").resolve("hinge") == "hinge"
    for name in ("lake_uri", "registry_uri", "source_uri", "runs_uri"):
        assert params.get_param(name).description


@pytest.mark.slow
def test_whole_dag_run_on_a_small_slice(dag, airflow_db, small_idx_source, tmp_path):
    conf = {
        "source_uri": str(small_idx_source),
        "lake_uri": str(tmp_path / "lake"),
        "runs_uri": str(tmp_path / "runs"),
        "registry_uri": str(tmp_path / "registry"),
        "validation_size": 200,
        "hidden_layers": [64, 32],
        "epochs": 2,
        "warmup_epochs": 1,
        "partitions": 2,
        "min_accuracy": 0.0,
    }
    logical_date = datetime(2026, 3, 2, tzinfo=timezone.utc)
    dag_run = dag.test(logical_date=logical_date, run_conf=conf)
    assert str(dag_run.state) in ("success", "DagRunState.SUCCESS")

    run_uri = tmp_path / "runs" / "20260302T000000"
    datasets = list((tmp_path / "lake" / "mnist").iterdir())
    assert len(datasets) == 1
    manifest = json.loads((datasets[0] / "manifest.json").read_text())
    assert {s: manifest["splits"][s]["rows"] for s in manifest["splits"]} == {"train": 1000, "validation": 200, "test": 400}
    assert json.loads((datasets[0] / "validation" / "result.json").read_text())["success"] is True

    trained = model_io.load_model(str(run_uri / "model"), expected_layer_sizes=[784, 64, 32, 10])
    assert trained.metadata["dataset"]["version"] == manifest["version"]
    assert trained.metadata["hyperparameters"]["epochs"] == 2
    epochs = [json.loads(line) for line in (run_uri / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]

    evaluation = json.loads((run_uri / "evaluation" / "metrics.json").read_text())
    assert sum(map(sum, evaluation["confusion_matrix"])) == 400
    for name in ("accuracy.png", "loss.png", "confusion_matrix.png"):
        assert (run_uri / "evaluation" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<img" in (run_uri / "evaluation" / "report.html").read_text()

    pointer = storage.read_json(str(tmp_path / "registry" / "mnist-admm" / "current.json"))
    assert pointer["run"] == str(run_uri) and pointer["test_accuracy"] == evaluation["test_accuracy"]
    published = model_io.load_model(str(tmp_path / "registry" / "mnist-admm" / pointer["version"] / "model"))
    assert published.metadata["weights_sha256"] == trained.metadata["weights_sha256"]


def _s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.mark.slow
def test_whole_dag_on_s3_reruns_idempotently_and_leaks_no_secret(dag, airflow_db, small_idx_source, s3_env,
                                                                    monkeypatch, capfd):
    import boto3

    secret = "sentinel-secret-7f3a9c1e"  # moto accepts any key pair; it must never surface anywhere
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    bucket = s3_env
    client = boto3.client("s3")
    for path in small_idx_source.iterdir():
        client.upload_file(str(path), bucket, f"source/{path.name}")
    root = f"s3://{bucket}"
    conf = {"source_uri": f"{root}/source", "lake_uri": f"{root}/lake", "runs_uri": f"{root}/runs",
            "registry_uri": f"{root}/registry", "validation_size": 200, "hidden_layers": [32], "epochs": 2,
            "partitions": 2, "min_accuracy": 0.0, "checkpoint_every": 1}
    logical_date = datetime(2026, 4, 6, tzinfo=timezone.utc)

    for attempt in range(2):  # the second run of the same logical date must change nothing visible
        dag_run = dag.test(logical_date=logical_date, run_conf=conf)
        assert str(dag_run.state) in ("success", "DagRunState.SUCCESS"), f"attempt {attempt}"

    keys = _s3_keys(client, bucket)
    run_keys = {key.split("/")[1] for key in keys if key.startswith("runs/")}
    assert run_keys == {"20260406T000000"}
    assert "runs/20260406T000000/model/model.json" in keys
    assert "runs/20260406T000000/evaluation/report.html" in keys
    versions = {key.split("/")[2] for key in keys
                if key.startswith("registry/mnist-admm/") and key.count("/") >= 3}
    assert len(versions) == 1
    pointer = storage.read_json(f"{root}/registry/mnist-admm/current.json")
    assert pointer["version"] in versions and pointer["run"] == f"{root}/runs/20260406T000000"
    history = storage.read_bytes(f"{root}/registry/mnist-admm/history.jsonl").decode().splitlines()
    assert [json.loads(line)["decision"] for line in history] == ["accepted", "unchanged"]
    trained = model_io.load_model(f"{root}/runs/20260406T000000/model")
    assert trained.metadata["hyperparameters"]["layer_sizes"] == [784, 32, 10]

    # no credential in task output, spark-submit output, params, or any stored artifact
    output = capfd.readouterr()
    assert secret not in output.out and secret not in output.err
    assert secret not in json.dumps(dag.params.dump(), default=str)
    for key in keys:
        assert secret.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key
