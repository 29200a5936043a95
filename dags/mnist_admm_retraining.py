"""Weekly retraining of the MNIST classifier by ADMM on Spark (wiring only; logic lives in admm_jobs).

ingest -> validate -> plan -> train -> evaluate -> approval -> publish. ``ingest_on`` = ``spark`` (an initial load
or a backfill of many batches) first runs ingest as a Spark job, one task per batch, on the deploy target of
``train`` (``ingest_on_spark``); the worker's ``ingest`` then finds the batches written and only checks their
signatures. The default, ``worker``, skips that job. The run for logical date D uses the
batches landed under ``source_uri/batches/`` dated on or before D (the newest ``window`` of them
if set; a plain four-file source is one batch). ``validate`` also checks every batch the published
model has not seen against that model's data and quarantines a failing batch (the run fails,
nothing downstream runs; ``request_review``, run once validate ran, whether it passed or failed, starts the review DAG
``mnist_quarantine_review`` through the asset ``mnist-quarantine``; the registry history says which
batches stay out). ``publish``'s challenger check rejects a challenger that memorised a poison from the newest
batch and quarantines that batch; ``request_review_after_publish`` then starts its review the same way. ``plan`` skips train/evaluate/publish when a model of exactly this
dataset, code and training settings already went through the gate, and otherwise hands train the
published model to start from (``init``). ``approval`` (human in the loop) waits for a person before
publish when the ``approval`` param asks for one (``never``, the default, skips it; ``when-flagged``
asks when the challenger scores below the published model on the test set or the newest batch;
``always``); a rejection skips publish. Every task first refuses a run whose storage URIs (params,
and the command line it was given) lie outside ``[admm] allowed_uri_roots``
(``admm_jobs.orchestration.uri_roots``). Deterministic failures (bad input or documents, a missing
model version, a checksum mismatch, failed expectations, quarantine, invalid settings, a URI outside
the allowed roots) are not retried; transient ones (throttling, 5xx answers, timeouts, lost
connections, registry writers racing) are.

Lineage (Airflow Assets; logical URIs, since the lake and the registry are run parameters):

* `mnist-validated-dataset` (`x-admm://lake/mnist`): updated by `validate` when a dataset passes
  its expectations; the event's extra has `dataset_uri`, `dataset_version`, `result_uri`.
* `mnist-quarantine` (`x-admm://lake/mnist/quarantine`): updated by `request_review` when `validate`
  quarantined batches, and by `request_review_after_publish` when `publish`'s challenger check did; the event's extra has `registry_uri`, `run_uri`, `dataset_uri` and `quarantined`
  (batch id -> quarantine record). It schedules `mnist_quarantine_review`.
* `mnist-admm-published-model` (`x-admm://registry/mnist-admm`): updated through the alias
  `mnist-admm-publications` by `publish`, only when the quality gate accepts a new version
  (a rejected model, or a re-run of the published one, emits nothing); the event's extra is the
  registry pointer plus `model_uri`. Schedule a consumer with `schedule=[published_model_asset()]`
  (`admm_jobs.orchestration.assets`).

The `evaluate` and `publish` tasks link their evaluation report ("Evaluation report", from the
`admm_reports` plugin in `plugins/`).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
from airflow.sdk import DAG, Param

from admm_jobs import ingest, publish, validate
from admm_jobs.operations import deploy
from admm_jobs.orchestration import tasks, uri_roots
from admm_jobs.orchestration.assets import publications_alias, quarantine_asset, validated_dataset_asset
from admm_jobs.orchestration.failures import fail_fast
from admm_jobs.orchestration.params import airflow_params, templated_argv
from admm_jobs.orchestration.review import APPROVAL_TIMEOUT, PublishApproval
from admm_jobs.registry.gate import GateSettings
from admm_jobs.registry.review import APPROVAL_MODES
from admm_jobs.trainer.config import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VAR = PROJECT_ROOT / "var"
# Where the Spark job runs (Airflow Variable admm_deploy; unset: local spark-submit), read once per parse.
DEPLOY = deploy.load_deploy_config()
TRAIN_SETTINGS = [name for name in TrainConfig.__dataclass_fields__
                  if name not in ("dataset_uri", "output_uri", "init_model_uri")]
# Validate's settings that are DAG params (thresholds, margins, the false-alarm budget); the others the DAG sets
# itself, and its chunk_rows stays its default (the param of that name is train's).
VALIDATE_FIXED = ("dataset_uri", "suite", "batch_suite", "drift_suite", "label_sanity_suite", "registry_uri",
                  "logical_date", "chunk_rows")
VALIDATE_SETTINGS = [name for name in validate.ValidateConfig.__dataclass_fields__ if name not in VALIDATE_FIXED]
PUBLISH_SETTINGS = [field.name for field in dataclasses.fields(GateSettings)]

# One directory per logical date (or per run when triggered without one): re-running a
# date replaces its outputs, and backfills of different dates never share a path.
LOGICAL_DATE = "{{ (logical_date or dag_run.run_after).isoformat() }}"
RUN_KEY = "{{ (logical_date or dag_run.run_after) | ts_nodash }}"
RUN_URI = "{{ params.runs_uri }}/" + RUN_KEY
DATASET_URI = "{{ ti.xcom_pull(task_ids='ingest')['dataset_uri'] }}"
PLAN = "ti.xcom_pull(task_ids='plan', key='plan')"
INGEST_ARGV = ["--source", "{{ params.source_uri }}", "--lake", "{{ params.lake_uri }}", "--as-of", LOGICAL_DATE,
               "--registry-uri", "{{ params.registry_uri }}",
               *templated_argv(ingest.IngestConfig, ["window", "validation_fraction"])]
IO_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}

with DAG(
    dag_id="mnist_admm_retraining",
    description="Retrain the MNIST classifier without gradients (ADMM on Spark) on the batches landed so far, "
                "and publish it if it beats the published one",
    doc_md=__doc__,
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # runs of later dates start from what earlier ones published
    tags=["mnist", "admm", "spark"],
    # Before any task (the train submission included) does I/O: its URIs within the allowed roots, else no retry.
    default_args={"pre_execute": fail_fast(uri_roots.confine_task)},
    params={
        "source_uri": Param(str(PROJECT_ROOT / "data" / "mnist"), type="string", minLength=1,
                            description="landing directory (local, s3://; https:// for four files): the test files "
                                        "plus batches/YYYY-MM-DD/ with one labelled batch each, or four IDX files"),
        "lake_uri": Param(str(VAR / "lake"), type="string", minLength=1, description="data lake root for Parquet datasets"),
        "runs_uri": Param(str(VAR / "runs"), type="string", minLength=1, description="root of per-run artifacts"),
        "registry_uri": Param(str(VAR / "registry"), type="string", minLength=1, description="model registry root"),
        "approval": Param("never", type="string", enum=list(APPROVAL_MODES),
                          description="wait for a person before publish: never, when-flagged (the challenger scores "
                                      "below the published model on the test set or the newest batch), always"),
        "ingest_on": Param("worker", type="string", enum=list(ingest.EXECUTORS),
                           description="where ingest reads and writes new batches: worker (the weekly increment) "
                                       "or spark (an initial load or a backfill of many batches: one Spark task per "
                                       "batch, on the deploy target of train)"),
        **airflow_params(ingest.IngestConfig, exclude=("source", "lake", "dataset", "checksums", "as_of",
                                                       "registry_uri", "chunk_rows", "executor")),
        **airflow_params(validate.ValidateConfig, exclude=VALIDATE_FIXED),
        **airflow_params(TrainConfig, exclude=("dataset_uri", "output_uri", "init_model_uri")),
        **airflow_params(publish.PublishConfig, defaults={"min_accuracy": 0.9},
                         exclude=("run_uri", "registry_uri", "model_name", "training_key", "logical_date")),
    },
) as dag:
    ingest_route_task = ShortCircuitOperator(
        task_id="ingest_route",
        python_callable=tasks.ingest_on_spark,
        op_args=["{{ params.ingest_on }}"],
        ignore_downstream_trigger_rules=False,  # skips ingest_on_spark only: ingest itself runs either way
    )
    ingest_on_spark_task = deploy.spark_job_task(DEPLOY, [*INGEST_ARGV, "--executor", "spark"], deploy.INGEST_JOB,
                                                 task_id="ingest_on_spark")
    ingest_task = PythonOperator(
        task_id="ingest",
        trigger_rule="none_failed",  # after the Spark job, or when it was skipped
        python_callable=fail_fast(tasks.ingest_task),
        op_args=[INGEST_ARGV],
        **IO_RETRIES,
    )
    validate_task = PythonOperator(
        task_id="validate",
        python_callable=fail_fast(tasks.validate_task),
        op_args=[["--dataset-uri", DATASET_URI, "--registry-uri", "{{ params.registry_uri }}",
                  "--logical-date", LOGICAL_DATE, *templated_argv(validate.ValidateConfig, VALIDATE_SETTINGS)]],
        outlets=[validated_dataset_asset()],
        **IO_RETRIES,
    )
    # A failed task emits no asset event: this one, run once validate ran (passed or failed; not when it never
    # ran), emits the quarantine's, and skips itself when validate quarantined nothing.
    request_review_task = PythonOperator(
        task_id="request_review",
        python_callable=fail_fast(tasks.request_review_task),
        op_args=["{{ params.registry_uri }}", RUN_URI],
        outlets=[quarantine_asset()],
        trigger_rule="one_done",
    )
    plan_task = ShortCircuitOperator(
        task_id="plan",
        python_callable=fail_fast(tasks.plan_task),
        op_args=[["--dataset-uri", DATASET_URI, "--run-uri", RUN_URI, "--registry-uri", "{{ params.registry_uri }}",
                  "--logical-date", LOGICAL_DATE, "--", *templated_argv(TrainConfig, TRAIN_SETTINGS),
                  "--", *templated_argv(GateSettings)]],
        **IO_RETRIES,
    )
    train_task = deploy.spark_job_task(
        DEPLOY, ["--dataset-uri", DATASET_URI, "--output-uri", RUN_URI, *templated_argv(TrainConfig, TRAIN_SETTINGS),
                 "--init-model-uri", "{{ " + PLAN + "['init_model_uri'] or 'none' }}"])
    evaluate_task = PythonOperator(
        task_id="evaluate",
        python_callable=fail_fast(tasks.evaluate_task),
        op_args=[["--model-uri", RUN_URI + "/model", "--dataset-uri", DATASET_URI,
                  "--metrics-uri", RUN_URI + "/metrics.jsonl", "--output-uri", RUN_URI + "/evaluation",
                  "--registry-uri", "{{ params.registry_uri }}"]],
        **IO_RETRIES,
    )
    approval_task = PublishApproval(
        task_id="approval", mode="{{ params.approval }}", registry_uri="{{ params.registry_uri }}", run_uri=RUN_URI,
        logical_date=LOGICAL_DATE, response_timeout=APPROVAL_TIMEOUT,
    )
    publish_task = PythonOperator(
        task_id="publish",
        trigger_rule="none_failed",  # runs when approval was not required (skipped); a rejection skips it
        python_callable=fail_fast(tasks.publish_task),
        outlets=[publications_alias()],
        op_args=[["--run-uri", RUN_URI, "--registry-uri", "{{ params.registry_uri }}",
                  "--training-key", "{{ " + PLAN + "['training_key'] }}", "--logical-date", LOGICAL_DATE,
                  *templated_argv(publish.PublishConfig, PUBLISH_SETTINGS)]],
        **IO_RETRIES,
    )

    # publish's challenger check quarantines the batch a poisoned challenger came from (publish succeeds: the
    # rejection is a normal outcome); this task emits that quarantine's event, and skips itself otherwise.
    request_review_after_publish_task = PythonOperator(
        task_id="request_review_after_publish",
        python_callable=fail_fast(tasks.request_review_task),
        op_args=["{{ params.registry_uri }}", RUN_URI, "publish"],
        outlets=[quarantine_asset()],
    )

    ingest_route_task >> ingest_on_spark_task >> ingest_task
    ingest_task >> validate_task >> plan_task >> train_task >> evaluate_task >> approval_task >> publish_task
    validate_task >> request_review_task
    publish_task >> request_review_after_publish_task
