"""Where the Spark jobs run: local spark-submit, EMR Serverless, EMR on EC2 or Dataproc Serverless.

Two jobs: training (every run) and ingest on Spark (``--executor spark``: an initial load or a backfill of
many batches, when the DAG param ``ingest_on`` asks for it); both go to the same target with the same settings.

One JSON document, the Airflow Variable ``admm_deploy``, selects and configures
the target; without it the job runs with the local ``spark_default`` connection
(development). Airflow also reads Variables from ``AIRFLOW_VAR_ADMM_DEPLOY``, so
the same document can be set in the environment. It is read once, when the DAG
file is parsed, into a :class:`DeployConfig` that is validated on creation: a
bad document is a DAG import error that names the setting.

Targets and what they run:

* ``local``: ``SparkSubmitOperator`` with ``admm_jobs/train.py`` (``ingest.py``) of this checkout.
* ``emr-serverless``: ``EmrServerlessStartJobOperator`` then ``EmrServerlessJobSensor``.
* ``emr``: ``EmrAddStepsOperator`` (a ``spark-submit`` step in YARN cluster mode on a
  running cluster) then ``EmrStepSensor``.
* ``dataproc``: ``DataprocCreateBatchOperator`` (Dataproc Serverless batch, no cluster to
  run) then ``DataprocBatchSensor``.

Remote targets are a task group ``train`` (``submit`` then ``wait``); the sensors
poke in reschedule mode, so a training run of hours holds no worker slot. A
failed job fails ``train.wait``; clearing the group submits a new job. Every
target runs the same entry point (``train.py`` or ``ingest.py`` uploaded by ``infra/build.sh``
with ``admm_jobs.zip`` on the Python path) with the same application arguments.

Credentials never appear here: AWS calls use the ``aws_conn_id`` connection (or
the standard AWS chain when it has none), Google calls ``gcp_conn_id``; the job
itself uses its execution role or service account.

The request builders (:func:`emr_serverless_job_driver`, :func:`emr_step`,
:func:`dataproc_batch`, ...) are plain functions; Airflow is imported only by
:func:`spark_job_task` and :func:`load_deploy_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from admm_jobs.cli.config import ConfigError, require, setting

VARIABLE = "admm_deploy"
TARGETS = ("local", "emr-serverless", "emr", "dataproc")


@dataclasses.dataclass(frozen=True)
class SparkJob:
    """A job every target can submit: its module, the entry point file infra/build.py writes from it, its name."""

    module: str
    entry_point: str
    name: str


TRAIN_JOB = SparkJob("admm_jobs.train", "train.py", "admm-mnist-train")
INGEST_JOB = SparkJob("admm_jobs.ingest", "ingest.py", "admm-mnist-ingest")
JOBS = (TRAIN_JOB, INGEST_JOB)

# What infra/build.py writes and code_uri must hold (besides each job's entry point).
CODE_ARCHIVE = "admm_jobs.zip"
VENV_ARCHIVE = "venv.tar.gz"
# Spark unpacks spark.archives "<uri>#environment" into ./environment of every container.
ARCHIVE_ALIAS = "environment"
ARCHIVE_PYTHON = f"./{ARCHIVE_ALIAS}/bin/python"

# What every training job needs wherever it runs (the DAG's targets, the local standalone cluster, the
# benchmarks): each Python worker runs one task, and BLAS threads beyond one per task oversubscribe the
# cores (the driver's solves limit themselves to one thread, see AdmmTrainer). Each block's ADMM state lives
# in files on the executor that loaded it: its tasks wait for that executor (while it lives) rather than run
# elsewhere and find no state, which costs a reload.
TRAINING_SPARK_CONF = {"spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
                       "spark.locality.wait.process": "600s",
                       # blocks are placed once, when the job starts: wait for every executor so they spread evenly
                       "spark.scheduler.minRegisteredResourcesRatio": "1.0",
                       "spark.scheduler.maxRegisteredResourcesWaitingTime": "300s",
                       # Every pass is one short task per block: over TCP each task's exchange with its Python
                       # worker waited ~40 ms more than over a Unix domain socket (Spark >= 4.1; older Sparks
                       # ignore the key).
                       "spark.python.unix.domain.socket.enabled": "true",
                       # A pass's result per block (the first layer's cross term: 256 x 785 float64, 1.6 MB) is
                       # over the 1 MiB default: it went through the block manager, one more fetch per pass.
                       "spark.task.maxDirectResultSize": "16m"}
BASE_SPARK_CONF = {"spark.driver.memory": "4g", "spark.log.level": "WARN", **TRAINING_SPARK_CONF}

_URI = r"^{schemes}://[a-z0-9][a-z0-9._-]{{1,220}}[a-z0-9](/\S*)?$"
S3_URI = _URI.format(schemes="s3")
CLOUD_URI = _URI.format(schemes="(s3|gs)")
ROLE_ARN = r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$"
# Keys that would carry a secret: credentials come from roles and connections only.
SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access[._-]?key|private[._-]?key", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _optional(**schema: Any) -> dict[str, Any]:
    return {"type": ["string", "null"], **schema}


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """Where and how the training job runs (the Airflow Variable ``admm_deploy``, JSON)."""

    target: str = setting("local", "where the Spark job runs", type="string", enum=list(TARGETS))
    code_uri: str | None = setting(
        None, f"s3:// (EMR) or gs:// (Dataproc) prefix holding {', '.join(job.entry_point for job in JOBS)} and "
              f"{CODE_ARCHIVE} from infra/build.sh",
        **_optional(pattern=CLOUD_URI))
    venv_uri: str | None = setting(
        None, f"s3:// URI of the packed virtualenv ({VENV_ARCHIVE}) the EMR job's Python runs from; "
              "none: the cluster's own Python", **_optional(pattern=S3_URI))
    spark_conf: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "Spark properties (sizing, tuning) over the defaults; no credentials",
        "schema": {"type": "object", "propertyNames": {"pattern": r"^spark\.\S+$"},
                   "additionalProperties": {"type": "string"}}})
    timeout_minutes: int = setting(360, "a Spark job is stopped (and its task fails) after this long",
                                   type="integer", minimum=10, maximum=24 * 60)
    poke_interval_seconds: int = setting(60, "how often the sensors of remote targets check the job",
                                         type="integer", minimum=10, maximum=3600)
    spark_conn_id: str = setting("spark_default", "local: Spark connection of spark-submit", type="string", minLength=1)
    aws_conn_id: str = setting("aws_default", "EMR targets: Airflow AWS connection (none set: the AWS default chain)",
                               type="string", minLength=1)
    region_name: str | None = setting(None, "EMR targets: AWS region (none: the connection's or the chain's)",
                                      **_optional(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$"))
    emr_application_id: str | None = setting(None, "emr-serverless: application id",
                                             **_optional(pattern=r"^[0-9a-z]{1,64}$"))
    execution_role_arn: str | None = setting(
        None, "emr-serverless (required) / emr (runtime role, optional): IAM role the job runs as",
        **_optional(pattern=ROLE_ARN))
    log_uri: str | None = setting(None, "emr-serverless: s3:// prefix for driver and executor logs",
                                  **_optional(pattern=S3_URI))
    emr_cluster_id: str | None = setting(None, "emr: id of the running cluster (j-...)",
                                         **_optional(pattern=r"^j-[0-9A-Z]{1,255}$"))
    gcp_conn_id: str = setting("google_cloud_default", "dataproc: Airflow Google Cloud connection",
                               type="string", minLength=1)
    dataproc_project_id: str | None = setting(None, "dataproc: project id",
                                              **_optional(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"))
    dataproc_region: str | None = setting(None, "dataproc: region, e.g. europe-west1",
                                          **_optional(pattern=r"^[a-z]+-[a-z]+\d+$"))
    dataproc_service_account: str | None = setting(
        None, "dataproc: service account the batch runs as (none: the Compute Engine default)",
        **_optional(pattern=r"^[a-z0-9-]+@[a-z0-9.-]+\.iam\.gserviceaccount\.com$"))
    dataproc_runtime_version: str = setting("2.2", "dataproc: Serverless runtime version",
                                            type="string", pattern=r"^\d+\.\d+$")
    dataproc_container_image: str | None = setting(
        None, "dataproc: custom container image with Python and the job's dependencies (infra/docker)",
        **_optional(minLength=1))
    dataproc_subnetwork_uri: str | None = setting(None, "dataproc: subnetwork the batch runs in",
                                                  **_optional(minLength=1))

    def __post_init__(self):
        object.__setattr__(self, "spark_conf", dict(self.spark_conf))
        _validate_schema(self)
        for key, value in self.spark_conf.items():
            require(not SECRET_KEY.search(key) and not AWS_KEY_ID.search(value),
                    f"{VARIABLE}.spark_conf[{key!r}]: looks like a credential; the job authenticates with its "
                    "execution role or service account, never with keys in Spark conf")
        derived = sorted(set(self.spark_conf) & set(python_conf(self)))
        require(not derived, f"{VARIABLE}.spark_conf: {derived} are set from venv_uri/target; remove them")
        if self.target == "local":
            return
        needed = {"emr-serverless": ("code_uri", "emr_application_id", "execution_role_arn"),
                  "emr": ("code_uri", "emr_cluster_id"),
                  "dataproc": ("code_uri", "dataproc_project_id", "dataproc_region")}[self.target]
        for name in needed:
            require(getattr(self, name) is not None, f"{VARIABLE}.{name}: required for target {self.target!r}")
        scheme = "gs" if self.target == "dataproc" else "s3"
        require(self.code_uri.startswith(f"{scheme}://"),
                f"{VARIABLE}.code_uri: target {self.target!r} reads its code from {scheme}://, got {self.code_uri!r}")
        require(self.target != "dataproc" or self.venv_uri is None,
                f"{VARIABLE}.venv_uri: not used by target 'dataproc'; give the job its Python packages with "
                "dataproc_container_image (see infra/README.md)")
        if self.target == "emr-serverless":
            # EMR Serverless splits sparkSubmitParameters on whitespace.
            for key, value in spark_conf(self).items():
                require(not re.search(r"\s", value), f"{VARIABLE}.spark_conf[{key!r}]: value contains whitespace, "
                                                     "which EMR Serverless submit parameters cannot carry")


def _validate_schema(deploy: DeployConfig) -> None:
    import jsonschema

    for field in dataclasses.fields(deploy):
        try:
            jsonschema.validate(getattr(deploy, field.name), field.metadata["schema"])
        except jsonschema.ValidationError as exc:
            where = "".join(f"[{part!r}]" for part in exc.absolute_path)
            raise ConfigError(f"{VARIABLE}.{field.name}{where}: {exc.message}") from None


def parse_deploy_config(text: str | None, source: str = f"Airflow Variable {VARIABLE!r}") -> DeployConfig:
    """Build the config from the JSON document (``None`` or empty: the local defaults)."""
    if text is None or not text.strip():
        return DeployConfig()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    require(isinstance(document, dict), f"{source}: expected a JSON object, got {type(document).__name__}")
    known = [field.name for field in dataclasses.fields(DeployConfig)]
    unknown = sorted(set(document) - set(known))
    require(not unknown, f"{source}: unknown setting(s) {unknown}; known: {known}")
    return DeployConfig(**document)


def load_deploy_config(variable: str = VARIABLE) -> DeployConfig:
    """The config from the Airflow Variable (or ``AIRFLOW_VAR_<NAME>``); local defaults when it is unset."""
    from airflow.sdk import Variable

    return parse_deploy_config(Variable.get(variable, default=None), source=f"Airflow Variable {variable!r}")


# --- Request builders: plain data, checked by the tests against the real API schemas. ---


def local_application(job: SparkJob = TRAIN_JOB) -> str:
    """This checkout's entry point of ``job``, for spark-submit on the Airflow worker."""
    return importlib.util.find_spec(job.module).origin


def artifact_uri(deploy: DeployConfig, name: str) -> str:
    return f"{deploy.code_uri.rstrip('/')}/{name}"


def python_conf(deploy: DeployConfig) -> dict[str, str]:
    """The Spark properties choosing the Python interpreter of driver and executors for the target."""
    if deploy.target == "local":
        return {"spark.pyspark.python": sys.executable}
    if deploy.venv_uri is None:
        return {}
    archive = {"spark.archives": f"{deploy.venv_uri}#{ARCHIVE_ALIAS}", "spark.executorEnv.PYSPARK_PYTHON": ARCHIVE_PYTHON}
    if deploy.target == "emr-serverless":
        return {**archive, "spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON": ARCHIVE_PYTHON,
                "spark.emr-serverless.driverEnv.PYSPARK_PYTHON": ARCHIVE_PYTHON}
    # emr: YARN cluster mode, the driver runs in the application master's container.
    return {**archive, "spark.yarn.appMasterEnv.PYSPARK_PYTHON": ARCHIVE_PYTHON}


def spark_conf(deploy: DeployConfig) -> dict[str, str]:
    """All Spark properties of the job: defaults, then the interpreter settings, then the config's own."""
    return {**BASE_SPARK_CONF, **python_conf(deploy), **deploy.spark_conf}


def spark_submit_options(deploy: DeployConfig) -> list[str]:
    """spark-submit options shared by the EMR targets: the code archive and every Spark property."""
    options = ["--py-files", artifact_uri(deploy, CODE_ARCHIVE)]
    for key, value in spark_conf(deploy).items():
        options += ["--conf", f"{key}={value}"]
    return options


def emr_serverless_job_driver(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob = TRAIN_JOB
                              ) -> dict[str, Any]:
    """``jobDriver`` of EMR Serverless ``StartJobRun``."""
    return {"sparkSubmit": {"entryPoint": artifact_uri(deploy, job.entry_point),
                            "entryPointArguments": list(application_args),
                            "sparkSubmitParameters": " ".join(spark_submit_options(deploy))}}


def emr_serverless_configuration_overrides(deploy: DeployConfig) -> dict[str, Any] | None:
    """``configurationOverrides`` of ``StartJobRun``: where logs go (none: EMR-managed storage only)."""
    if deploy.log_uri is None:
        return None
    return {"monitoringConfiguration": {"s3MonitoringConfiguration": {"logUri": deploy.log_uri}}}


def emr_serverless_start_job_run_extras(deploy: DeployConfig) -> dict[str, Any]:
    """Further ``StartJobRun`` fields (the operator's ``config``): the job's time limit."""
    return {"executionTimeoutMinutes": deploy.timeout_minutes}


def emr_step(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob = TRAIN_JOB) -> dict[str, Any]:
    """One step of EMR ``AddJobFlowSteps``: spark-submit in YARN cluster mode through command-runner."""
    return {
        "Name": job.name,
        # The cluster outlives a failed training run (it may serve other jobs).
        "ActionOnFailure": "CONTINUE",
        "HadoopJarStep": {
            "Jar": "command-runner.jar",
            "Args": ["spark-submit", "--deploy-mode", "cluster", "--name", job.name, *spark_submit_options(deploy),
                     artifact_uri(deploy, job.entry_point), *application_args],
        },
    }


def dataproc_batch(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob = TRAIN_JOB
                   ) -> dict[str, Any]:
    """The Dataproc Serverless ``Batch`` (as the dict form of ``google.cloud.dataproc_v1.Batch``)."""
    runtime: dict[str, Any] = {"version": deploy.dataproc_runtime_version, "properties": spark_conf(deploy)}
    if deploy.dataproc_container_image:
        runtime["container_image"] = deploy.dataproc_container_image
    execution: dict[str, Any] = {"ttl": f"{deploy.timeout_minutes * 60}s"}
    if deploy.dataproc_service_account:
        execution["service_account"] = deploy.dataproc_service_account
    if deploy.dataproc_subnetwork_uri:
        execution["subnetwork_uri"] = deploy.dataproc_subnetwork_uri
    return {
        "pyspark_batch": {"main_python_file_uri": artifact_uri(deploy, job.entry_point),
                          "args": list(application_args),
                          "python_file_uris": [artifact_uri(deploy, CODE_ARCHIVE)]},
        "runtime_config": runtime,
        "environment_config": {"execution_config": execution},
    }


# --- Airflow operators. ---


def _sensor_kwargs(deploy: DeployConfig) -> dict[str, Any]:
    # Reschedule mode frees the worker slot between pokes; retries cover API hiccups.
    return {"mode": "reschedule", "poke_interval": deploy.poke_interval_seconds,
            "timeout": deploy.timeout_minutes * 60, "retries": 2, "retry_delay": timedelta(minutes=1)}


SUBMIT_KWARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
                 "execution_timeout": timedelta(minutes=30)}


def _emr_serverless_tasks(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob):
    from airflow.providers.amazon.aws.operators.emr import EmrServerlessStartJobOperator
    from airflow.providers.amazon.aws.sensors.emr import EmrServerlessJobSensor

    aws = {"aws_conn_id": deploy.aws_conn_id, "region_name": deploy.region_name}
    submit = EmrServerlessStartJobOperator(
        task_id="submit", application_id=deploy.emr_application_id, execution_role_arn=deploy.execution_role_arn,
        job_driver=emr_serverless_job_driver(deploy, application_args, job),
        configuration_overrides=emr_serverless_configuration_overrides(deploy),
        config=emr_serverless_start_job_run_extras(deploy), name=job.name,
        wait_for_completion=False, **aws, **SUBMIT_KWARGS)
    wait = EmrServerlessJobSensor(
        task_id="wait", application_id=deploy.emr_application_id,
        job_run_id=f"{{{{ ti.xcom_pull(task_ids='{submit.task_id}') }}}}", **aws, **_sensor_kwargs(deploy))
    return submit, wait


def _emr_tasks(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob):
    from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator
    from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor

    aws = {"aws_conn_id": deploy.aws_conn_id, "region_name": deploy.region_name}
    submit = EmrAddStepsOperator(
        task_id="submit", job_flow_id=deploy.emr_cluster_id, steps=[emr_step(deploy, application_args, job)],
        execution_role_arn=deploy.execution_role_arn, wait_for_completion=False, **aws, **SUBMIT_KWARGS)
    wait = EmrStepSensor(
        task_id="wait", job_flow_id=deploy.emr_cluster_id,
        step_id=f"{{{{ ti.xcom_pull(task_ids='{submit.task_id}')[0] }}}}", **aws, **_sensor_kwargs(deploy))
    return submit, wait


def _dataproc_tasks(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob):
    from airflow.providers.google.cloud.operators.dataproc import DataprocCreateBatchOperator
    from airflow.providers.google.cloud.sensors.dataproc import DataprocBatchSensor

    gcp = {"project_id": deploy.dataproc_project_id, "region": deploy.dataproc_region,
           "gcp_conn_id": deploy.gcp_conn_id}
    submit = DataprocCreateBatchOperator(
        task_id="submit", batch=dataproc_batch(deploy, application_args, job),
        # A fresh batch id per attempt, so a retried submission never collides with the failed one.
        batch_id_prefix=job.name, asynchronous=True, **gcp, **SUBMIT_KWARGS)
    wait = DataprocBatchSensor(
        task_id="wait", batch_id=f"{{{{ ti.xcom_pull(task_ids='{submit.task_id}')['name'].split('/')[-1] }}}}",
        **gcp, **_sensor_kwargs(deploy))
    return submit, wait


REMOTE_TASKS = {"emr-serverless": _emr_serverless_tasks, "emr": _emr_tasks, "dataproc": _dataproc_tasks}


def spark_job_task(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob = TRAIN_JOB,
                   task_id: str = "train"):
    """The step running ``job`` on the target: one task ``task_id`` (local) or a task group ``task_id``
    (submit >> wait).

    ``application_args`` are the job's command-line arguments (Airflow templates
    allowed); every target passes them unchanged to the entry point.
    """
    if deploy.target == "local":
        from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

        return SparkSubmitOperator(
            task_id=task_id, application=local_application(job), conn_id=deploy.spark_conn_id, name=job.name,
            application_args=list(application_args), conf=spark_conf(deploy),
            retries=1, execution_timeout=timedelta(minutes=deploy.timeout_minutes))
    from airflow.sdk import TaskGroup

    with TaskGroup(group_id=task_id, tooltip=f"{job.name} job on {deploy.target}") as group:
        submit, wait = REMOTE_TASKS[deploy.target](deploy, application_args, job)
        submit >> wait
    return group


def submission(deploy: DeployConfig, application_args: Sequence[str], job: SparkJob = TRAIN_JOB) -> dict[str, Any]:
    """What the target submits, for inspection before deploying (``python -m admm_jobs.operations.deploy``)."""
    if deploy.target == "local":
        return {"application": local_application(job), "application_args": list(application_args),
                "conf": spark_conf(deploy)}
    if deploy.target == "emr-serverless":
        request = {"applicationId": deploy.emr_application_id, "executionRoleArn": deploy.execution_role_arn,
                   "name": job.name, "jobDriver": emr_serverless_job_driver(deploy, application_args, job),
                   **emr_serverless_start_job_run_extras(deploy)}
        overrides = emr_serverless_configuration_overrides(deploy)
        return request if overrides is None else {**request, "configurationOverrides": overrides}
    if deploy.target == "emr":
        return {"JobFlowId": deploy.emr_cluster_id, "Steps": [emr_step(deploy, application_args, job)],
                **({"ExecutionRoleArn": deploy.execution_role_arn} if deploy.execution_role_arn else {})}
    return {"parent": f"projects/{deploy.dataproc_project_id}/locations/{deploy.dataproc_region}",
            "batch": dataproc_batch(deploy, application_args, job)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Validate a deployment config and print what it would submit.")
    parser.add_argument("config", help="JSON file with the admm_deploy document ('-': standard input)")
    parser.add_argument("--job", choices=[job.module for job in JOBS], default=TRAIN_JOB.module,
                        help="the job to show (default: training)")
    parser.add_argument("application_args", nargs=argparse.REMAINDER,
                        help="job arguments to show in the request (default: --dataset-uri DATASET --output-uri RUN)")
    args = parser.parse_args(argv)
    application_args = args.application_args or ["--dataset-uri", "DATASET", "--output-uri", "RUN"]
    text = sys.stdin.read() if args.config == "-" else Path(args.config).read_text(encoding="utf-8")
    deploy = parse_deploy_config(text, source=args.config)
    job = next(job for job in JOBS if job.module == args.job)
    result = {"target": deploy.target, "request": submission(deploy, application_args, job)}
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
