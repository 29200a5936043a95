"""make run's driver: the logical date, one-line errors, the summary line (retrained or skipped), failed tasks."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone

import pytest

from admm_jobs.lake import storage
from admm_jobs.operations import run_pipeline


@pytest.fixture(scope="module")
def dag():
    return run_pipeline.load_dag()


@pytest.mark.parametrize("text, expected", [
    ("2026-01-04", datetime(2026, 1, 4, tzinfo=timezone.utc)),
    ("2026-01-04T06:30:00", datetime(2026, 1, 4, 6, 30, tzinfo=timezone.utc)),
    ("2026-01-04T06:30:00+02:00", datetime(2026, 1, 4, 4, 30, tzinfo=timezone.utc)),
])
def test_logical_date_is_a_day_or_timestamp_in_utc(text, expected):
    parsed = run_pipeline.parse_logical_date(text)
    assert parsed == expected and parsed.utcoffset().total_seconds() == 0
    assert run_pipeline.run_key(parsed) == expected.strftime("%Y%m%dT%H%M%S")


def test_no_logical_date_means_now():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert before <= run_pipeline.parse_logical_date(None) <= datetime.now(timezone.utc)


@pytest.mark.parametrize("text", ["2026-13-01", "04/01/2026", "yesterday"])
def test_malformed_logical_date_is_one_line(text):
    with pytest.raises(SystemExit) as raised:
        run_pipeline.parse_logical_date(text)
    assert str(raised.value) == (f"logical date {text!r}: not a date; use YYYY-MM-DD (e.g. DATE=2026-01-04) "
                                 "or an ISO timestamp")


@pytest.mark.parametrize("overrides, line", [
    ({"epochs": 0}, "invalid param epochs: 0 is less than the minimum of 1"),
    ({"min_accuracy": 1.5}, "invalid param min_accuracy: 1.5 is greater than the maximum of 1"),
    ({"hidden_layers": []}, "invalid param hidden_layers: [] should be non-empty"),
    ({"beta": "x"}, "invalid param beta: 'x' is not of type 'number'"),
])
def test_invalid_param_is_one_line_naming_param_and_bound(dag, overrides, line):
    with pytest.raises(SystemExit) as raised:
        run_pipeline.resolved_params(dag, overrides)
    assert str(raised.value) == line


def test_unknown_param_and_valid_overrides(dag):
    with pytest.raises(SystemExit, match=r"unknown param\(s\) \['epoch'\]"):
        run_pipeline.resolved_params(dag, {"epoch": 3})
    params = run_pipeline.resolved_params(dag, {"epochs": 3, "hidden_layers": [16]})
    assert params["epochs"] == 3 and params["hidden_layers"] == [16] and params["beta"] == dag.params["beta"]


def test_main_rejects_bad_date_and_params_before_running_anything(capsys):
    for argv, message in ([["--logical-date", "2026-02-30"], "logical date '2026-02-30': not a date"],
                          [["--params", "{\"epochs\": 0}"], "invalid param epochs: 0 is less than the minimum of 1"],
                          [["--params", "[1]"], "--params must be a JSON object, got list"],
                          [["--params", "{\"approval\": \"always\"}"], "invalid param approval: 'always' waits"]):
        with pytest.raises(SystemExit) as raised:
            run_pipeline.main(argv)
        assert str(raised.value).startswith(message)
    assert "airflow dags test" not in capsys.readouterr().out


def _roots(tmp_path) -> dict[str, str]:
    return {"runs_uri": str(tmp_path / "runs"), "registry_uri": str(tmp_path / "registry")}


def _plan(run_uri: str, retrain: bool, reason: str | None = None) -> None:
    storage.write_json(storage.join(run_uri, "plan.json"), {
        "retrain": retrain, "reason": reason, "batches": ["2026-01-04", "2026-01-11"], "dataset_version": "v2",
        "dataset_uri": "lake/mnist/v2", "training_key": "k", "init": "published", "init_model_uri": None})


def test_summary_of_a_retrained_and_published_run(tmp_path):
    roots = _roots(tmp_path)
    run_uri = storage.join(roots["runs_uri"], "20260111T000000")
    _plan(run_uri, retrain=True)
    storage.write_json(storage.join(run_uri, "evaluation", "metrics.json"),
                       {"test_accuracy": 0.9712, "dataset": {"uri": "lake/mnist/v2", "version": "v2"}})
    storage.write_json(storage.join(roots["registry_uri"], "mnist-admm", "current.json"),
                       {"version": "abc", "test_accuracy": 0.9712, "run": run_uri})
    summary = run_pipeline.run_summary(roots, "20260111T000000")
    assert summary == {
        "run_uri": run_uri, "retrained": True, "reason": None, "batches": ["2026-01-04", "2026-01-11"],
        "dataset_version": "v2", "test_accuracy": 0.9712, "model_uri": storage.join(run_uri, "model"),
        "report_uri": storage.join(run_uri, "evaluation", "report.html"), "published": True,
        "published_version": "abc", "published_test_accuracy": 0.9712}


def test_summary_of_a_skipped_run_reports_no_new_model_and_the_published_one(tmp_path):
    roots = _roots(tmp_path)
    storage.write_json(storage.join(roots["registry_uri"], "mnist-admm", "current.json"),
                       {"version": "abc", "test_accuracy": 0.9712, "run": "elsewhere"})
    run_uri = storage.join(roots["runs_uri"], "20260118T000000")
    _plan(run_uri, retrain=False, reason="nothing new: dataset v2 already judged (accepted)")
    summary = run_pipeline.run_summary(roots, "20260118T000000")
    assert summary["retrained"] is False and summary["reason"] == "nothing new: dataset v2 already judged (accepted)"
    assert summary["batches"] == ["2026-01-04", "2026-01-11"] and summary["dataset_version"] == "v2"
    assert summary["test_accuracy"] is None and summary["model_uri"] is None and summary["report_uri"] is None
    assert summary["published"] is False
    assert (summary["published_version"], summary["published_test_accuracy"]) == ("abc", 0.9712)


def test_summary_without_a_plan_counts_the_run_as_retrained(tmp_path):
    roots = _roots(tmp_path)
    run_uri = storage.join(roots["runs_uri"], "20260104T000000")
    storage.write_json(storage.join(run_uri, "evaluation", "metrics.json"),
                       {"test_accuracy": 0.95, "dataset": {"uri": "lake/mnist/v1", "version": "v1"}})
    summary = run_pipeline.run_summary(roots, "20260104T000000")
    assert summary["retrained"] is True and summary["batches"] == [] and summary["dataset_version"] == "v1"
    assert summary["published"] is False and summary["published_version"] is None


def test_failure_line_names_the_failed_tasks():
    states = {"ingest": "success", "validate": "failed", "train": "upstream_failed", "publish": None}
    assert run_pipeline.failure_line(1, states) == "the DAG run failed at task validate (exit 1); its log is above"
    assert run_pipeline.failure_line(1, None).startswith("airflow dags test failed (exit 1) before any task failed")
    assert run_pipeline.failure_line(2, {"ingest": "success"}).startswith("airflow dags test failed (exit 2)")


FAILING_DAG = '''
from datetime import datetime
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Param


def fail():
    raise ValueError("deterministic failure")


with DAG(dag_id="run_pipeline_failure_probe", schedule=None, start_date=datetime(2026, 1, 1),
         params={"runs_uri": Param("unused", type="string"), "registry_uri": Param("unused", type="string")}) as dag:
    first = PythonOperator(task_id="first", python_callable=lambda: None)
    breaks = PythonOperator(task_id="breaks", python_callable=fail, retries=0)
    after = PythonOperator(task_id="after", python_callable=lambda: None)
    first >> breaks >> after
'''


@pytest.mark.slow
def test_failed_run_exits_with_one_line_naming_the_failed_task(airflow_db, tmp_path, monkeypatch, capsys):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(textwrap.dedent(FAILING_DAG))
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(dags))
    monkeypatch.setattr(run_pipeline, "DAG_FILE", dags / "probe.py")
    with pytest.raises(SystemExit) as raised:
        run_pipeline.main(["--logical-date", "2026-05-03"])
    assert str(raised.value) == "the DAG run failed at task breaks (exit 1); its log is above"
    states = run_pipeline.task_states("run_pipeline_failure_probe", datetime(2026, 5, 3, tzinfo=timezone.utc))
    assert states == {"first": "success", "breaks": "failed", "after": "upstream_failed"}
