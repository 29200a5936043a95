"""Deployment targets of the training stage: config validation, requests checked against the real
API schemas (botocore models, Dataproc proto types), the EMR operators run against moto's server,
and the DAG built for every target."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import uuid
from datetime import datetime
from pathlib import Path

import boto3
import botocore.session
import botocore.validate
import pytest

from admm_jobs.cli.config import ConfigError
from admm_jobs.operations import deploy

DAG_FILE = Path(__file__).resolve().parents[1] / "dags" / "mnist_admm_retraining.py"
ROLE = "arn:aws:iam::123456789012:role/admm-mnist-train"
ARGS = ["--dataset-uri", "s3://lake-b/mnist/0123456789abcdef", "--output-uri", "s3://runs-b/20260105T000000",
        "--hidden-layers", "{{ params.hidden_layers | join(',') }}", "--epochs", "{{ params.epochs }}"]
SETTINGS = {
    "local": {},
    "emr-serverless": {"code_uri": "s3://artifacts-b/releases/0.1.0", "venv_uri": "s3://artifacts-b/venv/venv.tar.gz",
                       "emr_application_id": "00fabcdefghij123", "execution_role_arn": ROLE,
                       "log_uri": "s3://artifacts-b/logs/", "region_name": "eu-west-1",
                       "spark_conf": {"spark.executor.memory": "8g", "spark.executor.cores": "4"}},
    "emr": {"code_uri": "s3://artifacts-b/releases/0.1.0", "venv_uri": "s3://artifacts-b/venv/venv.tar.gz",
            "emr_cluster_id": "j-1ABCDEFGHIJKL", "spark_conf": {"spark.executor.instances": "4"}},
    "dataproc": {"code_uri": "gs://artifacts-b/releases/0.1.0", "dataproc_project_id": "admm-mnist",
                 "dataproc_region": "europe-west1",
                 "dataproc_service_account": "admm-train@admm-mnist.iam.gserviceaccount.com",
                 "dataproc_container_image": "europe-docker.pkg.dev/admm-mnist/jobs/train:0.1.0",
                 "spark_conf": {"spark.executor.memory": "8g"}},
}


def config(target: str, **overrides) -> deploy.DeployConfig:
    return deploy.DeployConfig(target=target, **{**SETTINGS[target], **overrides})


def input_shape(service: str, operation: str):
    return botocore.session.get_session().get_service_model(service).operation_model(operation).input_shape


def assert_valid(service: str, operation: str, params: dict) -> None:
    """Validate request parameters the way boto3 does before sending them."""
    botocore.validate.validate_parameters(params, input_shape(service, operation))


# --- The config document. ---


def test_no_variable_means_local_spark_submit():
    for text in (None, "", "  "):
        assert deploy.parse_deploy_config(text) == deploy.DeployConfig(target="local")


def test_every_target_accepts_its_documented_example():
    examples = sorted((Path(__file__).resolve().parents[1] / "infra" / "deploy").glob("*.json"))
    assert {path.stem for path in examples} >= {"local", "emr-serverless", "emr", "dataproc"}
    for path in examples:
        assert deploy.parse_deploy_config(path.read_text(), source=str(path)).target == path.stem


@pytest.mark.parametrize("document, message", [
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"target": "emr", "cluster": "j-1"}', "unknown setting(s) ['cluster']"),
    ('{"target": "kubernetes"}', "admm_deploy.target: 'kubernetes' is not one of"),
    ('{"target": "emr-serverless", "code_uri": "s3://artifacts-b/r"}', "admm_deploy.emr_application_id: required"),
    ('{"target": "emr", "code_uri": "s3://artifacts-b/r"}', "admm_deploy.emr_cluster_id: required for target 'emr'"),
    ('{"target": "emr", "emr_cluster_id": "j-1ABC"}', "admm_deploy.code_uri: required"),
    ('{"target": "emr", "code_uri": "gs://artifacts-b/r", "emr_cluster_id": "j-1ABC"}', "reads its code from s3://"),
    ('{"target": "emr", "code_uri": "/tmp/code", "emr_cluster_id": "j-1ABC"}', "admm_deploy.code_uri: '/tmp/code'"),
    ('{"target": "emr", "code_uri": "s3://artifacts-b/r", "emr_cluster_id": "cluster-1"}',
     "admm_deploy.emr_cluster_id: 'cluster-1' does not match"),
    ('{"execution_role_arn": "admin"}', "admm_deploy.execution_role_arn: 'admin' does not match"),
    ('{"spark_conf": {"spark.executor.cores": 4}}', "admm_deploy.spark_conf['spark.executor.cores']: 4 is not of type"),
    ('{"spark_conf": {"executor.cores": "4"}}', "admm_deploy.spark_conf"),
    ('{"timeout_minutes": 0}', "admm_deploy.timeout_minutes: 0 is less than the minimum"),
    ('{"target": "dataproc", "code_uri": "gs://artifacts-b/r", "dataproc_project_id": "admm-mnist", '
     '"dataproc_region": "europe-west1", "venv_uri": "s3://artifacts-b/venv.tar.gz"}', "dataproc_container_image"),
])
def test_bad_documents_fail_with_a_message_naming_the_setting(document, message):
    with pytest.raises(ConfigError) as error:
        deploy.parse_deploy_config(document)
    assert message in str(error.value)


@pytest.mark.parametrize("key, value", [
    ("spark.hadoop.fs.s3a.secret.key", "x"),
    ("spark.hadoop.fs.s3a.access.key", "x"),
    ("spark.executorEnv.AWS_SESSION_TOKEN", "x"),
    ("spark.executorEnv.DB_PASSWORD", "x"),
    ("spark.executorEnv.SOME_ID", "AKIAABCDEFGHIJKLMNOP"),
])
def test_credentials_are_refused_in_spark_conf(key, value):
    with pytest.raises(ConfigError, match="looks like a credential"):
        config("emr", spark_conf={key: value})


def test_interpreter_settings_come_from_venv_uri_only():
    with pytest.raises(ConfigError, match=r"\['spark.archives'\] are set from venv_uri"):
        config("emr-serverless", spark_conf={"spark.archives": "s3://other-b/env.tar.gz#environment"})


def test_emr_serverless_refuses_whitespace_it_cannot_submit():
    with pytest.raises(ConfigError, match="whitespace"):
        config("emr-serverless", spark_conf={"spark.driver.extraJavaOptions": "-Da=1 -Db=2"})


# --- Requests, checked against the service schemas. ---


def submitted_job_run(submit_config: deploy.DeployConfig, prepare=lambda submit: None) -> dict:
    """Run the EMR Serverless submit task of ``submit_config`` against moto: its own StartJobRun request,
    which boto3 checks against the service schema before sending; the job run moto recorded."""
    client = boto3.client("emr-serverless")
    application = client.create_application(name="admm", releaseLabel="emr-7.5.0", type="SPARK")["applicationId"]
    submit, _ = train_group(dataclasses.replace(submit_config, emr_application_id=application, region_name=None))
    render(submit, params={"hidden_layers": [64, 32], "epochs": 3})
    prepare(submit)
    return client.get_job_run(applicationId=application, jobRunId=submit.execute({}))["jobRun"]


def test_emr_serverless_start_job_run_matches_the_api_schema(aws):
    job = submitted_job_run(config("emr-serverless"))
    submit = job["jobDriver"]["sparkSubmit"]
    assert submit["entryPoint"] == "s3://artifacts-b/releases/0.1.0/train.py"
    parameters = submit["sparkSubmitParameters"].split()
    assert parameters[:2] == ["--py-files", "s3://artifacts-b/releases/0.1.0/admm_jobs.zip"]
    conf = dict(value.split("=", 1) for flag, value in zip(parameters, parameters[1:]) if flag == "--conf")
    assert conf["spark.archives"] == "s3://artifacts-b/venv/venv.tar.gz#environment"
    for key in ("spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON", "spark.emr-serverless.driverEnv.PYSPARK_PYTHON",
                "spark.executorEnv.PYSPARK_PYTHON"):
        assert conf[key] == "./environment/bin/python"
    assert conf["spark.executorEnv.OPENBLAS_NUM_THREADS"] == "1" and conf["spark.executor.memory"] == "8g"
    assert job["configurationOverrides"]["monitoringConfiguration"]["s3MonitoringConfiguration"]["logUri"] \
        == "s3://artifacts-b/logs/"


def test_the_schema_check_catches_a_malformed_request(aws):
    def malform(submit) -> None:
        submit.job_driver["sparkSubmit"]["entryPointArguments"] = "--epochs 3"  # a string, not a list

    with pytest.raises(botocore.exceptions.ParamValidationError):
        submitted_job_run(config("emr-serverless"), malform)


def test_emr_step_matches_the_api_schema():
    step = deploy.emr_step(config("emr"), ARGS)
    assert_valid("emr", "AddJobFlowSteps", {"JobFlowId": "j-1ABCDEFGHIJKL", "Steps": [step], "ExecutionRoleArn": ROLE})
    args = step["HadoopJarStep"]["Args"]
    assert step["HadoopJarStep"]["Jar"] == "command-runner.jar" and step["ActionOnFailure"] == "CONTINUE"
    assert args[:3] == ["spark-submit", "--deploy-mode", "cluster"]
    assert "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python" in args
    assert "spark.executor.instances=4" in args


def test_dataproc_batch_round_trips_through_the_client_types():
    from google.cloud import dataproc_v1

    batch = deploy.dataproc_batch(config("dataproc"), ARGS)
    message = dataproc_v1.Batch(batch)  # unknown or mistyped fields raise here
    assert dataproc_v1.Batch.to_dict(message, always_print_fields_with_no_presence=False) == batch
    assert message.runtime_config.container_image.endswith("/train:0.1.0")
    assert message.environment_config.execution_config.ttl.total_seconds() == 360 * 60
    assert message.runtime_config.properties["spark.executorEnv.OPENBLAS_NUM_THREADS"] == "1"
    request = dataproc_v1.CreateBatchRequest(parent="projects/admm-mnist/locations/europe-west1", batch=batch,
                                             batch_id=f"{deploy.TRAIN_JOB.name}-0123abcd")
    assert request.batch == message
    # Batch ids: 4-63 of [a-z0-9-]; the operator appends "-" and 8 hex characters to the prefix.
    assert re.fullmatch(r"[a-z0-9-]{4,63}", request.batch_id)


def test_every_target_passes_the_application_arguments_unchanged():
    seen = {
        "local": deploy.submission(config("local"), ARGS)["application_args"],
        "emr-serverless": deploy.emr_serverless_job_driver(config("emr-serverless"), ARGS)
        ["sparkSubmit"]["entryPointArguments"],
        "emr": deploy.emr_step(config("emr"), ARGS)["HadoopJarStep"]["Args"][-len(ARGS):],
        "dataproc": deploy.dataproc_batch(config("dataproc"), ARGS)["pyspark_batch"]["args"],
    }
    assert seen == {target: ARGS for target in deploy.TARGETS}
    assert deploy.emr_step(config("emr"), ARGS)["HadoopJarStep"]["Args"][-len(ARGS) - 1] \
        == "s3://artifacts-b/releases/0.1.0/train.py"


def test_the_ingest_job_goes_to_every_target_with_its_own_entry_point_and_name():
    args = ["--source", "s3://landing-b/mnist", "--lake", "s3://lake-b", "--executor", "spark"]
    local = deploy.submission(config("local"), args, deploy.INGEST_JOB)
    assert Path(local["application"]) == Path(deploy.__file__).parents[1] / "ingest.py"
    assert local["conf"] == deploy.submission(config("local"), ARGS)["conf"]  # the training job's settings
    serverless = deploy.submission(config("emr-serverless"), args, deploy.INGEST_JOB)
    assert serverless["name"] == "admm-mnist-ingest"
    assert serverless["jobDriver"]["sparkSubmit"]["entryPoint"] == "s3://artifacts-b/releases/0.1.0/ingest.py"
    assert_valid("emr-serverless", "StartJobRun", {**serverless, "clientToken": "token"})  # the operator adds one
    step = deploy.submission(config("emr"), args, deploy.INGEST_JOB)
    assert_valid("emr", "AddJobFlowSteps", step)
    step_args = step["Steps"][0]["HadoopJarStep"]["Args"]
    assert step["Steps"][0]["Name"] == "admm-mnist-ingest" and step_args[step_args.index("--name") + 1] == step[
        "Steps"][0]["Name"]
    assert step_args[-len(args) - 1:] == ["s3://artifacts-b/releases/0.1.0/ingest.py", *args]
    batch = deploy.dataproc_batch(config("dataproc"), args, deploy.INGEST_JOB)["pyspark_batch"]
    assert batch["main_python_file_uri"].endswith("/ingest.py") and batch["args"] == args


def test_the_cli_prints_the_request_for_a_config_file(tmp_path, capsys):
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"target": "emr", **SETTINGS["emr"]}))
    result = deploy.main([str(path), "--epochs", "3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["request"]["Steps"][0]["HadoopJarStep"]["Args"][-2:] == ["--epochs", "3"]
    assert_valid("emr", "AddJobFlowSteps", result["request"])


# --- The real operators against moto's server (EMR Serverless and EMR). ---

FAKE_SECRET = "fake-secret-do-not-log-5f1c"


@pytest.fixture
def aws(s3_env, monkeypatch):
    """moto as AWS, reached through the Airflow connection aws_default (no credentials in it)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws"}))
    return s3_env


def logged(capsys, caplog) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err + caplog.text


def train_group(config_: deploy.DeployConfig, args=ARGS):
    from airflow.sdk import DAG

    with DAG(f"deploy_{uuid.uuid4().hex[:6]}", start_date=datetime(2026, 1, 1), schedule=None):
        group = deploy.spark_job_task(config_, args)
    return group.children[f"{group.group_id}.submit"], group.children[f"{group.group_id}.wait"]


class StubTaskInstance:
    """Answers ``xcom_pull`` with a fixed value and records pushes (operators push links and ids)."""

    def __init__(self, xcom=None):
        self.xcom, self.pushed = xcom, {}

    def xcom_pull(self, task_ids=None, key="return_value", **_):
        return self.xcom

    def xcom_push(self, key, value, **_):
        self.pushed[key] = value


def render(task, xcom=None, params=None):
    """Render a task's templates as a run would, with a stub task instance answering xcom_pull."""
    context = {"ti": StubTaskInstance(xcom), "params": params or {}}
    task.render_template_fields(context)
    return context


def test_emr_serverless_submit_and_wait_against_moto(aws, capsys, caplog):
    client = boto3.client("emr-serverless")
    application = client.create_application(name="admm", releaseLabel="emr-7.5.0", type="SPARK")["applicationId"]
    submit, wait = train_group(config("emr-serverless", emr_application_id=application, region_name=None))
    context = render(submit, params={"hidden_layers": [64, 32], "epochs": 3})
    job_run_id = submit.execute(context)

    job = client.get_job_run(applicationId=application, jobRunId=job_run_id)["jobRun"]
    sent = job["jobDriver"]["sparkSubmit"]
    assert sent["entryPointArguments"] == [*ARGS[:4], "--hidden-layers", "64,32", "--epochs", "3"]
    assert sent["sparkSubmitParameters"] == submit.job_driver["sparkSubmit"]["sparkSubmitParameters"]
    assert job["executionRole"] == ROLE and job["name"] == deploy.TRAIN_JOB.name

    assert wait.job_run_id.startswith("{{")
    render(wait, xcom=job_run_id)
    assert wait.job_run_id == job_run_id
    assert wait.poke({}) is True  # moto finishes job runs at once
    assert FAKE_SECRET not in logged(capsys, caplog)


def test_emr_add_step_and_wait_against_moto(aws, capsys, caplog):
    client = boto3.client("emr")
    cluster = client.run_job_flow(
        Name="admm", ReleaseLabel="emr-7.5.0", JobFlowRole="EMR_EC2_DefaultRole", ServiceRole="EMR_DefaultRole",
        Instances={"MasterInstanceType": "m5.xlarge", "InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True},
    )["JobFlowId"]
    submit, wait = train_group(config("emr", emr_cluster_id=cluster))
    context = render(submit, params={"hidden_layers": [64, 32], "epochs": 3})
    step_ids = submit.execute(context)

    step = client.describe_step(ClusterId=cluster, StepId=step_ids[0])["Step"]
    assert step["Config"]["Args"] == submit.steps[0]["HadoopJarStep"]["Args"]
    assert step["Config"]["Args"][-4:] == ["--hidden-layers", "64,32", "--epochs", "3"]

    render(wait, xcom=step_ids)
    assert wait.step_id == step_ids[0]
    # moto runs the first step of a cluster at once and never finishes it: the sensor must keep waiting
    assert client.describe_step(ClusterId=cluster, StepId=step_ids[0])["Step"]["Status"]["State"] == "RUNNING"
    assert wait.poke({}) is False
    assert FAKE_SECRET not in logged(capsys, caplog)


def test_dataproc_wait_reads_the_batch_id_from_the_submitted_batch():
    submit, wait = train_group(config("dataproc"))
    assert submit.batch_id_prefix == deploy.TRAIN_JOB.name and submit.asynchronous
    render(wait, xcom={"name": "projects/admm-mnist/locations/europe-west1/batches/admm-mnist-train-0123abcd"})
    assert wait.batch_id == "admm-mnist-train-0123abcd"


# --- The DAG for every target. ---


def load_dag(monkeypatch, document: dict | None):
    if document is None:
        monkeypatch.delenv("AIRFLOW_VAR_ADMM_DEPLOY", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW_VAR_ADMM_DEPLOY", json.dumps(document))
    spec = importlib.util.spec_from_file_location(f"dag_{uuid.uuid4().hex[:8]}", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


EXPECTED_TASKS = {
    "emr-serverless": ("EmrServerlessStartJobOperator", "EmrServerlessJobSensor"),
    "emr": ("EmrAddStepsOperator", "EmrStepSensor"),
    "dataproc": ("DataprocCreateBatchOperator", "DataprocBatchSensor"),
}


def submitted_args(task, count: int) -> list[str]:
    """The application arguments inside a submit task's request (the last ``count`` of an EMR step)."""
    kind = type(task).__name__
    if kind == "EmrServerlessStartJobOperator":
        return task.job_driver["sparkSubmit"]["entryPointArguments"]
    if kind == "EmrAddStepsOperator":
        return task.steps[0]["HadoopJarStep"]["Args"][-count:]
    return task.batch["pyspark_batch"]["args"]


def test_dag_builds_the_operators_of_every_target(monkeypatch):
    local = load_dag(monkeypatch, None)
    train = local.get_task("train")
    assert type(train).__name__ == "SparkSubmitOperator"
    assert train.upstream_task_ids == {"plan"} and train.downstream_task_ids == {"evaluate"}
    local_args = train.application_args
    assert "--dataset-uri" in local_args and "{{ params.epochs }}" in local_args

    for target, (submit_type, wait_type) in EXPECTED_TASKS.items():
        dag = load_dag(monkeypatch, {"target": target, **SETTINGS[target]})
        submit, wait = dag.get_task("train.submit"), dag.get_task("train.wait")
        assert (type(submit).__name__, type(wait).__name__) == (submit_type, wait_type), target
        assert "train" not in dag.task_dict
        assert submit.upstream_task_ids == {"plan"} and submit.downstream_task_ids == {"train.wait"}
        assert wait.downstream_task_ids == {"evaluate"} and dag.get_task("evaluate").upstream_task_ids == {"train.wait"}
        assert wait.mode == "reschedule" and wait.timeout == 360 * 60
        assert submitted_args(submit, len(local_args)) == local_args, target


def test_dag_import_fails_on_an_invalid_variable(monkeypatch):
    with pytest.raises(ConfigError, match="admm_deploy.emr_cluster_id: required for target 'emr'"):
        load_dag(monkeypatch, {"target": "emr", "code_uri": "s3://artifacts-b/r"})
