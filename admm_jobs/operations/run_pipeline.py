"""Run the whole retraining DAG once, locally, with ``airflow dags test`` (what ``make run`` does).

    python -m admm_jobs.operations.run_pipeline [--params JSON] [--logical-date YYYY-MM-DD|ISO-TIMESTAMP]

Prints the evaluation summary and the artifact locations; the last stdout line
is one JSON object:

* ``run_uri``, ``dataset_version``: this run's directory and the dataset it planned on;
* ``retrained``: false when the ``plan`` task skipped train/evaluate/publish because
  nothing changed; ``reason`` then says why (null when retrained); ``batches``: the
  ids of the landed batches the dataset holds;
* ``test_accuracy``, ``model_uri``, ``report_uri``: this run's new model, null when
  it was not retrained (no new model, no new evaluation);
* ``published``: whether this run's model is now the registry's current one (false
  when not retrained); ``published_version``, ``published_test_accuracy``: the
  registry's current model after the run, whichever run trained it.

An invalid param, a malformed date or a failed run ends with one line on stderr
saying what (the param and its bound; the task that failed) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from admm_jobs.lake import storage

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "mnist_admm_retraining.py"
PLAN_FILE = "plan.json"
# Task states that mean the task itself went wrong (not merely skipped or blocked upstream).
FAILED_STATES = ("failed", "up_for_retry")


def load_dag():
    spec = importlib.util.spec_from_file_location("mnist_admm_retraining", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def resolved_params(dag, overrides: dict[str, Any]) -> dict[str, Any]:
    """The DAG's param defaults updated with ``overrides``, validated like the UI form does.

    A bad value ends the program with Airflow's one-line reason, e.g.
    ``invalid param epochs: 0 is less than the minimum of 1``.
    """
    from airflow.sdk.exceptions import ParamValidationError

    unknown = sorted(set(overrides) - set(dag.params))
    if unknown:
        raise SystemExit(f"unknown param(s) {unknown}; known: {sorted(dag.params)}")
    params = copy.deepcopy(dag.params)
    try:
        params.update(overrides)
        return params.validate()
    except ParamValidationError as exc:
        # Airflow's message: "Invalid input for param NAME: REASON" and then the whole JSON schema.
        first_line = str(exc).splitlines()[0]
        raise SystemExit(first_line.replace("Invalid input for param ", "invalid param ", 1)) from None


def refuse_waiting_for_a_person(params: dict[str, Any]) -> None:
    """``airflow dags test`` runs without an API server, so nobody could answer a publish approval: refuse an
    ``approval`` other than ``never`` before running anything (approve in the UI of a running Airflow instead)."""
    if params.get("approval", "never") != "never":  # a DAG without the param has nobody to wait for
        raise SystemExit(f"invalid param approval: {params['approval']!r} waits for a person, who cannot answer "
                         "a local run; trigger the DAG in the Airflow UI or REST API to approve its publish")


def parse_logical_date(text: str | None) -> datetime:
    """``YYYY-MM-DD`` (00:00 UTC that day) or an ISO 8601 timestamp (UTC if it has no offset), in UTC; None: now."""
    if not text:
        return datetime.now(timezone.utc).replace(microsecond=0)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(
            f"logical date {text!r}: not a date; use YYYY-MM-DD (e.g. DATE=2026-01-04) or an ISO timestamp"
        ) from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def run_key(logical_date: datetime) -> str:
    """The run directory name the DAG uses: the logical date in UTC as YYYYmmddTHHMMSS."""
    return logical_date.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S")


def _read_json_if_exists(uri: str) -> Any:
    return storage.read_json(uri) if storage.exists(uri) else None


def run_summary(params: dict[str, Any], run_key: str) -> dict[str, Any]:
    """What the run produced, read back from its artifacts (see the module docstring for the fields).

    Without ``RUN/plan.json`` (a DAG without the plan task) the run counts as retrained.
    """
    run_uri = storage.join(params["runs_uri"], run_key)
    plan = _read_json_if_exists(storage.join(run_uri, PLAN_FILE)) or {}
    retrained = bool(plan.get("retrain", True))
    pointer_uri = storage.join(params["registry_uri"], "mnist-admm", "current.json")
    current = _read_json_if_exists(pointer_uri)
    summary = {
        "run_uri": run_uri,
        "retrained": retrained,
        "reason": None if retrained else plan.get("reason"),
        "batches": list(plan.get("batches") or []),
        "dataset_version": plan.get("dataset_version"),
        "test_accuracy": None,
        "model_uri": None,
        "report_uri": None,
        "published": False,
        "published_version": current.get("version") if current else None,
        "published_test_accuracy": current.get("test_accuracy") if current else None,
    }
    if retrained:
        evaluation = storage.read_json(storage.join(run_uri, "evaluation", "metrics.json"))
        summary.update(
            test_accuracy=evaluation["test_accuracy"],
            dataset_version=evaluation["dataset"]["version"],
            model_uri=storage.join(run_uri, "model"),
            report_uri=storage.join(run_uri, "evaluation", "report.html"),
            published=bool(current) and current.get("run") == run_uri,
        )
    return summary


def task_states(dag_id: str, logical_date: datetime) -> dict[str, str] | None:
    """Task id -> state of the latest run of ``dag_id`` at ``logical_date`` in Airflow's DB; None if no run."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalars(
            select(DagRun).where(DagRun.dag_id == dag_id, DagRun.logical_date == logical_date)
            .order_by(DagRun.id.desc()).limit(1)
        ).first()
        if run is None:
            return None
        instances = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
        ).all()
        return {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state) for ti in instances}


def failure_line(exit_code: int, states: dict[str, str] | None) -> str:
    """One line saying which task(s) made the run fail, from their states in the DB."""
    failed = [task for task, state in states.items() if state in FAILED_STATES] if states else []
    if failed:
        return f"the DAG run failed at task {', '.join(sorted(failed))} (exit {exit_code}); its log is above"
    return f"airflow dags test failed (exit {exit_code}) before any task failed; see the output above"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="{}", help="JSON object of DAG params to override")
    parser.add_argument("--logical-date", default=None,
                        help="YYYY-MM-DD (00:00 UTC) or ISO timestamp (default: now, UTC)")
    args = parser.parse_args(argv)
    logical_date = parse_logical_date(args.logical_date)
    try:
        overrides = json.loads(args.params or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--params is not valid JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise SystemExit(f"--params must be a JSON object, got {type(overrides).__name__}")
    dag = load_dag()
    params = resolved_params(dag, overrides)
    refuse_waiting_for_a_person(params)
    command = ["airflow", "dags", "test", dag.dag_id, logical_date.isoformat(), "--conf", json.dumps(overrides)]
    print("$ " + " ".join(command), flush=True)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        try:
            states = task_states(dag.dag_id, logical_date)
        except Exception:  # the DB is only read to name the task; the exit code already says it failed
            states = None
        raise SystemExit(failure_line(completed.returncode, states))
    summary = run_summary(params, run_key(logical_date))
    if summary["retrained"]:
        print(f"test accuracy {summary['test_accuracy']:.4f}; published: {summary['published']}")
        print(f"model:  {summary['model_uri']}\nreport: {summary['report_uri']}")
    else:
        print(f"not retrained: {summary['reason']}; current model {summary['published_version']} "
              f"(test accuracy {summary['published_test_accuracy']})")
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
