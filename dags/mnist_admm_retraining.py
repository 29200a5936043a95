"""Weekly retraining of the MNIST classifier by ADMM on Spark (wiring only; logic lives in admm_jobs)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Param

from admm_jobs import deploy, evaluate, ingest, publish, validate
from admm_jobs.config import airflow_params, templated_argv
from admm_jobs.train import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VAR = PROJECT_ROOT / "var"
# Where the Spark job runs (Airflow Variable admm_deploy; unset: local spark-submit), read once per parse.
DEPLOY = deploy.load_deploy_config()
TRAIN_SETTINGS = [name for name in TrainConfig.__dataclass_fields__ if name not in ("dataset_uri", "output_uri")]

# One directory per logical date (or per run when triggered without one): re-running a
# date replaces its outputs, and backfills of different dates never share a path.
RUN_KEY = "{{ (logical_date or dag_run.run_after) | ts_nodash }}"
RUN_URI = "{{ params.runs_uri }}/" + RUN_KEY
DATASET_URI = "{{ ti.xcom_pull(task_ids='ingest')['dataset_uri'] }}"
IO_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}

with DAG(
    dag_id="mnist_admm_retraining",
    description="Retrain the MNIST classifier without gradients (ADMM on Spark) and publish it if it is good enough",
    doc_md=__doc__,
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    tags=["mnist", "admm", "spark"],
    params={
        "source_uri": Param(str(PROJECT_ROOT / "data" / "mnist"), type="string", minLength=1,
                            description="directory (local, s3:// or https://) holding the four MNIST-format IDX files"),
        "lake_uri": Param(str(VAR / "lake"), type="string", minLength=1, description="data lake root for Parquet datasets"),
        "runs_uri": Param(str(VAR / "runs"), type="string", minLength=1, description="root of per-run artifacts"),
        "registry_uri": Param(str(VAR / "registry"), type="string", minLength=1, description="model registry root"),
        "validation_size": Param(5000, type="integer", minimum=1, description="last N training images held out for validation"),
        **airflow_params(TrainConfig, exclude=("dataset_uri", "output_uri")),
        "min_accuracy": Param(0.85, type="number", minimum=0, maximum=1, description="publish only at or above this test accuracy"),
        "max_regression": Param(0.005, type="number", minimum=0, maximum=1,
                                description="publish only if test accuracy is at most this much below the published model"),
    },
) as dag:
    ingest_task = PythonOperator(
        task_id="ingest",
        python_callable=ingest.main,
        op_args=[["--source", "{{ params.source_uri }}", "--lake", "{{ params.lake_uri }}",
                  "--validation-size", "{{ params.validation_size }}"]],
        **IO_RETRIES,
    )
    validate_task = PythonOperator(
        task_id="validate",
        python_callable=validate.main,
        op_args=[["--dataset-uri", DATASET_URI]],
        retries=0,  # a failed expectation is deterministic: retrying would only repeat it
    )
    train_task = deploy.train_task(
        DEPLOY, ["--dataset-uri", DATASET_URI, "--output-uri", RUN_URI, *templated_argv(TrainConfig, TRAIN_SETTINGS)])
    evaluate_task = PythonOperator(
        task_id="evaluate",
        python_callable=evaluate.main,
        op_args=[["--model-uri", RUN_URI + "/model", "--dataset-uri", DATASET_URI,
                  "--metrics-uri", RUN_URI + "/metrics.jsonl", "--output-uri", RUN_URI + "/evaluation",
                  "--registry-uri", "{{ params.registry_uri }}"]],
        **IO_RETRIES,
    )
    publish_task = PythonOperator(
        task_id="publish",
        python_callable=publish.main,
        op_args=[["--run-uri", RUN_URI, "--registry-uri", "{{ params.registry_uri }}",
                  "--min-accuracy", "{{ params.min_accuracy }}", "--max-regression", "{{ params.max_regression }}"]],
        **IO_RETRIES,
    )

    ingest_task >> validate_task >> train_task >> evaluate_task >> publish_task
