"""The retraining DAG: integrity, typed params, and one whole run on a small slice with dag.test()."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from admm_jobs.lake import storage
from admm_jobs.registry import model as model_io

DAG_ID = "mnist_admm_retraining"
REVIEW_DAG_ID = "mnist_quarantine_review"
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"
STAGES = ["ingest", "validate", "plan", "train", "evaluate", "publish"]


@pytest.fixture(scope="module")
def dag_bag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="module")
def dag(dag_bag):
    return dag_bag.dags[DAG_ID]


def test_dag_wires_the_stages_in_order(dag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    chain = ["ingest", "validate", "plan", "train", "evaluate", "approval", "publish"]
    assert dag.task_dict.keys() == {*chain, "ingest_route", "ingest_on_spark", "request_review",
                                    "request_review_after_publish"}
    for upstream, downstream in zip(chain, chain[1:]):
        assert dag.get_task(upstream).downstream_task_ids - {"request_review"} == {downstream}
    # every stage does I/O: transient failures are retried
    assert all(dag.get_task(task_id).retries >= 1 for task_id in STAGES)
    assert type(dag.get_task("plan")).__name__ == "ShortCircuitOperator"
    assert dag.timetable.expression == "0 0 * * 0" and dag.catchup is False  # @weekly
    # a person before publish: skipped unless the approval param asks, so publish also runs after a skip
    approval = dag.get_task("approval")
    assert isinstance(approval, ApprovalOperator) and approval.response_timeout.days == 6
    assert approval.defaults == [ApprovalOperator.REJECT]  # no answer in time: nothing is published
    assert dag.get_task("publish").trigger_rule == "none_failed"
    assert dag.params["approval"] == "never"  # the schedule and make run never wait


def test_ingest_on_spark_is_the_same_ingest_submitted_as_a_spark_job_only_when_asked(dag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    from airflow.sdk.exceptions import ParamValidationError

    from admm_jobs.operations import deploy
    from admm_jobs.orchestration import tasks

    route, on_spark, worker = (dag.get_task(task_id) for task_id in ("ingest_route", "ingest_on_spark", "ingest"))
    assert dag.params["ingest_on"] == "worker"  # the weekly increment stays on the worker
    params = copy.deepcopy(dag.params)
    assert params.get_param("ingest_on").resolve("spark") == "spark"
    with pytest.raises(ParamValidationError):
        params.get_param("ingest_on").resolve("cluster")
    assert route.op_args == ["{{ params.ingest_on }}"] and not route.ignore_downstream_trigger_rules
    assert [tasks.ingest_on_spark(value) for value in ("worker", "spark")] == [False, True]
    # a false route skips the Spark job only; ingest runs after it or after its skip, and not after its failure
    assert route.downstream_task_ids == {"ingest_on_spark"} and on_spark.downstream_task_ids == {"ingest"}
    assert worker.upstream_task_ids == {"ingest_on_spark"} and worker.trigger_rule == "none_failed"
    # the local deploy target: spark-submit of admm_jobs/ingest.py with the worker's arguments plus the executor
    assert isinstance(on_spark, SparkSubmitOperator) and on_spark.application == deploy.local_application(
        deploy.INGEST_JOB)
    assert on_spark.application_args == [*worker.op_args[0], "--executor", "spark"]
    assert on_spark.conf == deploy.spark_conf(deploy.DeployConfig()) == dag.get_task("train").conf


def test_a_quarantine_starts_the_review_dag_through_an_asset(dag, dag_bag):
    """Only a successful task's outlet events are recorded, so validate (which fails on a quarantine) cannot emit
    the event: request_review, run once validate ran (passed or failed), does."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    from admm_jobs.orchestration import assets, review

    request = dag.get_task("request_review")
    assert request.upstream_task_ids == {"validate"} and request.downstream_task_ids == set()
    assert request.trigger_rule == "one_done" and request.outlets == [assets.quarantine_asset()]
    # publish's challenger check quarantines the batch a poisoned challenger came from: its own request task
    after_publish = dag.get_task("request_review_after_publish")
    assert after_publish.upstream_task_ids == {"publish"} and after_publish.downstream_task_ids == set()
    assert after_publish.outlets == [assets.quarantine_asset()] and after_publish.op_args[2] == "publish"
    review_dag = dag_bag.dags[REVIEW_DAG_ID]
    assert list(review_dag.timetable.asset_condition.objects) == [assets.quarantine_asset()]
    assert review_dag.catchup is False
    assert review_dag.task_dict.keys() == {review.EVIDENCE_TASK, "review"}
    question = review_dag.get_task("review")
    assert question.upstream_task_ids == {review.EVIDENCE_TASK} and issubclass(question.operator_class, HITLOperator)
    assert question.partial_kwargs["response_timeout"] == review.REVIEW_TIMEOUT
    assert question.operator_class(task_id="probe", subject="s", quarantine={}).defaults == ["Keep quarantined"]


@pytest.mark.parametrize("mode, evaluation, asks", [
    ("never", {"delta_vs_published": -0.01, "batch_delta_vs_published": -0.02}, False),
    ("when-flagged", {"delta_vs_published": 0.003, "batch_delta_vs_published": 0.0}, False),
    ("when-flagged", {"delta_vs_published": None, "batch_delta_vs_published": None}, False),  # first model
    ("when-flagged", {"delta_vs_published": -0.0015, "batch_delta_vs_published": 0.01}, True),
    ("when-flagged", {"delta_vs_published": 0.001, "batch_delta_vs_published": -0.004}, True),
    ("always", {"delta_vs_published": 0.003, "batch_delta_vs_published": 0.0}, True),
])
def test_approval_waits_for_a_person_as_its_param_says(dag, mode, evaluation, asks):
    from admm_jobs.registry import review

    copy.deepcopy(dag.params).get_param("approval").resolve(mode)  # a copy: resolve() sets the value it checks
    flags = review.approval_flags(evaluation)
    assert review.approval_required(mode, flags) is asks
    assert len(flags) == sum(1 for value in evaluation.values() if value is not None and value < 0)


def test_params_are_typed_and_bounded(dag):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag.params)  # resolve() sets the value it checks: the module's DAG must keep its defaults
    assert params["hidden_layers"] == [256, 256] and params["train_limit"] is None
    for name, bad in [("beta", 0), ("beta", -1.0), ("epochs", 0), ("hidden_layers", []),
                      ("hidden_layers", [0]), ("loss", "softmax"), ("partitions", 0),
                      ("min_accuracy", 1.5), ("train_limit", 0), ("init", "pretrained"), ("window", 0),
                      ("validation_fraction", 0.9), ("max_accuracy_drop", -0.1)]:
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(bad)
    assert params.get_param("loss").resolve("hinge") == "hinge"
    for name in ("lake_uri", "registry_uri", "source_uri", "runs_uri"):
        assert params.get_param(name).description


def test_every_gate_setting_is_a_param_that_plan_and_publish_receive(dag):
    """GateSettings alone defines the gate: a new threshold becomes a typed param, part of plan's training key
    and an option of publish with nothing else to wire."""
    import dataclasses

    from admm_jobs.registry.gate import GateSettings

    templates = {task: " ".join(dag.get_task(task).op_args[0]) for task in ("plan", "publish")}
    for field in dataclasses.fields(GateSettings):
        param = dag.params.get_param(field.name)
        assert param.schema["minimum"] == 0 and param.schema["maximum"] == 1
        option = f"--{field.name.replace('_', '-')} {{{{ params.{field.name} }}}}"
        assert option in templates["plan"].split(" -- ")[-1] and option in templates["publish"]
    assert dag.params["max_class_regression"] == GateSettings.max_class_regression


def test_every_validate_check_setting_is_a_param_that_validate_receives(dag):
    """The thresholds, the label checks' margins and the false-alarm budget reach the validate task; its
    chunk_rows is not a param (the param of that name is train's and would shadow it)."""
    from admm_jobs.trainer.config import TrainConfig

    template = " ".join(dag.get_task("validate").op_args[0])
    for name in ("max_accuracy_drop", "max_class_divergence", "min_cell_excess", "min_class_mislabelled_excess",
                 "min_mislabelled_excess", "false_alarm_rate"):
        assert name in dag.params
        assert f"--{name.replace('_', '-')} {{{{ params.{name} }}}}" in template
    assert "--chunk-rows" not in template
    assert dag.params["chunk_rows"] == TrainConfig.chunk_rows  # train's, not validate's (10,000)


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dag_run.get_task_instances()}


def run_week(dag, conf, day: str):
    dag_run = dag.test(logical_date=datetime.fromisoformat(day).replace(tzinfo=timezone.utc), run_conf=conf)
    return str(dag_run.state).rsplit(".", 1)[-1].lower(), task_states(dag_run)


def history(registry_root) -> list[dict]:
    lines = (registry_root / "mnist-admm" / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_weekly_retraining_point_in_time_warm_start_skip_and_quarantine(dag, airflow_db, tmp_path):
    """Three weeks landed, then a poisoned fourth: each run trains on what existed at its date."""
    from test_ingest import WEEKS, batch_files, batched_source

    from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored

    source = batched_source(tmp_path / "landing", WEEKS[:3], rows_per_batch=400)
    conf = {"source_uri": str(source), "lake_uri": str(tmp_path / "lake"), "runs_uri": str(tmp_path / "runs"),
            "registry_uri": str(tmp_path / "registry"), "validation_fraction": 0.25, "hidden_layers": [32],
            "epochs": 3, "partitions": 2, "min_accuracy": 0.0}

    # week 2, backfilled after week 3 landed, its initial load ingested by a Spark job: trains on weeks 1-2 only,
    # from random weights
    assert run_week(dag, {**conf, "ingest_on": "spark"}, WEEKS[1]) == ("success", {
                                                         **dict.fromkeys(dag.task_dict, "success"),
                                                         "approval": "skipped", "request_review": "skipped",
                                                         "request_review_after_publish": "skipped"})
    week2 = tmp_path / "runs" / "20260111T000000"
    plan = json.loads((week2 / "plan.json").read_text())
    assert plan["batches"] == WEEKS[:2] and plan["retrain"] is True and plan["init_model_uri"] is None
    first = model_io.load_model(str(week2 / "model"))
    assert first.metadata["init"]["kind"] == "random"
    assert storage.read_json(str(tmp_path / "registry" / "mnist-admm" / "current.json"))["run"] == str(week2)

    # week 3: weeks 1-3, warm start from the week-2 model that is now published; ingest on the worker again (named:
    # dag.test shares the DAG's Param objects, so a run's conf stays for the next run in this process)
    conf["ingest_on"] = "worker"
    state, states = run_week(dag, conf, WEEKS[2])
    assert states["ingest_route"] == "success" and states["ingest_on_spark"] == "skipped"
    week3 = tmp_path / "runs" / "20260118T000000"
    assert state == "success" and json.loads((week3 / "plan.json").read_text())["batches"] == WEEKS[:3]
    warm = model_io.load_model(str(week3 / "model"))
    assert warm.metadata["init"] == {"kind": "published", "weights_sha256": first.metadata["weights_sha256"],
                                     "model_uri": plan_model_uri(week3)}
    evaluation = json.loads((week3 / "evaluation" / "metrics.json").read_text())
    assert evaluation["dataset"]["batches"] == WEEKS[:3]

    # week 3 again: nothing new, so train/evaluate/publish are skipped, not failed
    state, states = run_week(dag, conf, WEEKS[2])
    assert state == "success"
    assert states == {"ingest_route": "success", "ingest_on_spark": "skipped", "ingest": "success", "validate": "success", "plan": "success", "request_review": "skipped",
                      "train": "skipped", "evaluate": "skipped", "approval": "skipped", "publish": "skipped",
                      "request_review_after_publish": "skipped"}
    skipped = json.loads((week3 / "plan.json").read_text())
    assert skipped["retrain"] is False and "already" in skipped["reason"]

    # week 4 lands with shuffled labels: quarantined, the run fails before training, the model stays
    pointer = (tmp_path / "registry" / "mnist-admm" / "current.json").read_text()
    images, labels = read_vendored(TRAIN_IMAGES)[1200:1600], read_vendored(TRAIN_LABELS)[1200:1600]
    batch_files(source, WEEKS[3], images, np.random.default_rng(0).permutation(labels))
    state, states = run_week(dag, conf, WEEKS[3])
    assert state == "failed" and states["validate"] == "failed" and states["request_review"] == "success"
    assert {states[task] for task in ("plan", "train", "evaluate", "approval", "publish")} == {"upstream_failed"}
    assert (tmp_path / "registry" / "mnist-admm" / "current.json").read_text() == pointer
    decisions = [(entry["decision"], entry.get("batch")) for entry in history(tmp_path / "registry")]
    assert decisions[-2:] == [("skipped", None), ("quarantined", WEEKS[3])]
    assert {decision for decision, _ in decisions[:-2]} <= {"accepted", "rejected"} and len(decisions) == 4


def plan_model_uri(run_uri) -> str:
    return json.loads((run_uri / "plan.json").read_text())["init_model_uri"]


def _s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.mark.slow
def test_whole_dag_on_s3_reruns_idempotently_and_leaks_no_secret(dag, airflow_db, s3_env, tmp_path,
                                                                    monkeypatch, capfd):
    """Landing directory, lake, runs and registry on the S3 server; two dated batches, the later one after
    the logical date (left out)."""
    import boto3
    from test_ingest import batched_source

    secret = "sentinel-secret-7f3a9c1e"  # moto accepts any key pair; it must never surface anywhere
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    bucket = s3_env
    client = boto3.client("s3")
    landing = batched_source(tmp_path / "landing", ["2026-03-29", "2026-04-05", "2026-04-12"], rows_per_batch=400)
    for path in landing.rglob("*.gz"):
        client.upload_file(str(path), bucket, f"source/{path.relative_to(landing)}")
    root = f"s3://{bucket}"
    monkeypatch.setenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS", root)
    conf = {"source_uri": f"{root}/source", "lake_uri": f"{root}/lake", "runs_uri": f"{root}/runs",
            "registry_uri": f"{root}/registry", "validation_fraction": 1 / 6, "hidden_layers": [32], "epochs": 2,
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
    # the rerun found a gate decision for the same data, code and settings: it trained nothing
    assert [json.loads(line)["decision"] for line in history] == ["accepted", "skipped"]
    trained = model_io.load_model(f"{root}/runs/20260406T000000/model")
    assert trained.metadata["hyperparameters"]["layer_sizes"] == [784, 32, 10]
    plan = storage.read_json(f"{root}/runs/20260406T000000/plan.json")
    assert plan["batches"] == ["2026-03-29", "2026-04-05"] and plan["retrain"] is False  # the rerun's plan
    assert {key.split("/")[3] for key in keys if key.startswith("lake/mnist/batches/")} == {"2026-03-29", "2026-04-05"}

    # no credential in task output, spark-submit output, params, or any stored artifact
    output = capfd.readouterr()
    assert secret not in output.out and secret not in output.err
    assert secret not in json.dumps(dag.params.dump(), default=str)
    for key in keys:
        assert secret.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key


# validate's statistical checks off (their levels and margins out of reach), so only the challenger check can find it
VALIDATE_STATISTICS_OFF = {"false_alarm_rate": 1e-12, "pixel_drift_margin": 1.0, "min_cell_excess": 1.0,
                           "min_class_mislabelled_excess": 1.0, "min_mislabelled_excess": 1.0}


@pytest.mark.slow
def test_a_poison_found_only_by_the_challenger_check_quarantines_its_batch(dag, airflow_db, tmp_path):
    """A trigger on 5 % of the second week's images, relabelled to one class, passes validate (its statistical
    label and pixel checks are turned off here, so that only the challenger check can find it): the challenger memorises it,
    publish rejects it and quarantines the batch, request_review_after_publish starts the review, and the week's
    re-run leaves the batch out."""
    from test_challenger_check import HISTORY, HISTORY_ROWS, NEW, TARGET, land, new_batch

    source = land(tmp_path / "landing", new_batch(HISTORY_ROWS, poisoned=True))
    conf = {"source_uri": str(source), "lake_uri": str(tmp_path / "lake"), "runs_uri": str(tmp_path / "runs"),
            "registry_uri": str(tmp_path / "registry"), "hidden_layers": [128], "epochs": 10, "patience": 0,
            "min_accuracy": 0.5, **VALIDATE_STATISTICS_OFF}
    state, states = run_week(dag, conf, HISTORY)
    assert state == "success" and states["publish"] == "success"
    pointer = (tmp_path / "registry" / "mnist-admm" / "current.json").read_text()

    state, states = run_week(dag, conf, NEW)
    assert state == "success" and states["validate"] == "success" and states["request_review"] == "skipped"
    assert states["publish"] == "success" and states["request_review_after_publish"] == "success"
    assert (tmp_path / "registry" / "mnist-admm" / "current.json").read_text() == pointer  # the champion stays
    rejected, quarantined = history(tmp_path / "registry")[-2:]
    assert rejected["decision"] == "rejected" and any(
        reason.startswith(f"the challenger adopted the label {TARGET} ") for reason in rejected["reasons"])
    assert (quarantined["decision"], quarantined["batch"], quarantined["given"]) == ("quarantined", NEW, TARGET)

    # the week again: ingest leaves the batch out, so the dataset is the champion's and nothing is retrained
    state, states = run_week(dag, conf, NEW)
    plan = json.loads((tmp_path / "runs" / "20260111T000000" / "plan.json").read_text())
    assert state == "success" and plan["batches"] == [HISTORY] and states["train"] == "skipped"
