"""Deterministic failures fail the task at once; transient storage errors keep the task's retries.

(On the S3 test server with injected faults: tests/test_transient_failures.py.)
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from airflow.sdk.exceptions import AirflowFailException

from admm_jobs import ingest
from admm_jobs.lake import storage
from admm_jobs.orchestration.failures import fail_fast
from admm_jobs.registry import store as registry
from admm_jobs.validate import ValidationFailed


def raising(error):
    def stage(argv, outlet_events=None):
        raise error

    return stage


@pytest.mark.parametrize("error", [ingest.IngestError("src/t10k-labels-idx1-ubyte[.gz]: missing file"),
                                   ValidationFailed("dataset failed validation", {}),
                                   storage.StorageError("s3://b/k: no such file"),
                                   registry.RegistryError("s3://b/r/current.json: registry pointer lacks a 'version'"),
                                   SystemExit(2)])
def test_deterministic_failures_are_not_retried(error):
    with pytest.raises(AirflowFailException) as failure:
        fail_fast(raising(error))(["--x"])
    assert str(failure.value).splitlines()[0] and failure.value.__cause__ is error


def stage_error_from(cause: Exception) -> ingest.IngestError:
    """A stage's own error as ``raise IngestError(...) from cause`` leaves it (how stages report storage failures)."""
    error = ingest.IngestError(f"cannot ingest: {cause}")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error", [storage.TransientStorageError("s3://b/k: cannot read: connection reset"),
                                   registry.TransientRegistryError("s3://b/r: gave up after 10 concurrent changes"),
                                   stage_error_from(storage.TransientStorageError("s3://b/k: cannot read: 503"))])
def test_transient_errors_keep_their_retries(error):
    with pytest.raises(type(error)) as raised:
        fail_fast(raising(error))([])
    assert raised.value is error


def test_results_pass_through():
    wrapped = fail_fast(lambda argv, outlet_events=None: {"ok": argv})
    assert wrapped(["a"]) == {"ok": ["a"]}
    import inspect
    assert "outlet_events" in inspect.signature(wrapped).parameters  # Airflow still passes the context it asks for


def test_missing_source_fails_the_run_at_once(airflow_db, tmp_path):
    from airflow.dag_processing.dagbag import DagBag
    from test_dag import DAGS_FOLDER, task_states

    dag = DagBag(dag_folder=str(DAGS_FOLDER)).dags["mnist_admm_retraining"]
    conf = {"source_uri": str(tmp_path / "nothing-landed"), "lake_uri": str(tmp_path / "lake"),
            "runs_uri": str(tmp_path / "runs"), "registry_uri": str(tmp_path / "registry")}
    dag_run = dag.test(logical_date=datetime(2026, 5, 3, tzinfo=timezone.utc), run_conf=conf)
    states = task_states(dag_run)
    assert states["ingest"] == "failed" and states["validate"] == "upstream_failed"
    [ingest_ti] = [ti for ti in dag_run.get_task_instances() if ti.task_id == "ingest"]
    assert ingest_ti.try_number == 1  # failed on the first try, though the task has retries for I/O errors
