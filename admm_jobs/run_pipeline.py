"""Run the whole retraining DAG once, locally, with ``airflow dags test`` (what ``make run`` does).

Prints the evaluation summary and the artifact locations; the last stdout
line is one JSON object: test_accuracy, model_uri, report_uri, published,
dataset_version, ...
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

from admm_jobs import storage

DAG_FILE = Path(__file__).resolve().parents[1] / "dags" / "mnist_admm_retraining.py"


def load_dag():
    spec = importlib.util.spec_from_file_location("mnist_admm_retraining", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def resolved_params(dag, overrides: dict[str, Any]) -> dict[str, Any]:
    """The DAG's param defaults updated with ``overrides``, validated like the UI form does."""
    unknown = sorted(set(overrides) - set(dag.params))
    if unknown:
        raise SystemExit(f"unknown param(s) {unknown}; known: {sorted(dag.params)}")
    params = copy.deepcopy(dag.params)
    params.update(overrides)
    return params.validate()


def run_summary(params: dict[str, Any], run_key: str) -> dict[str, Any]:
    """What the run produced, read back from its artifacts."""
    run_uri = storage.join(params["runs_uri"], run_key)
    evaluation = storage.read_json(storage.join(run_uri, "evaluation", "metrics.json"))
    pointer_uri = storage.join(params["registry_uri"], "mnist-admm", "current.json")
    current = storage.read_json(pointer_uri) if storage.exists(pointer_uri) else None
    published = bool(current) and current.get("run") == run_uri
    return {
        "test_accuracy": evaluation["test_accuracy"],
        "dataset_version": evaluation["dataset"]["version"],
        "run_uri": run_uri,
        "model_uri": storage.join(run_uri, "model"),
        "report_uri": storage.join(run_uri, "evaluation", "report.html"),
        "published": published,
        "published_version": current.get("version") if current else None,
        "published_test_accuracy": current.get("test_accuracy") if current else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="{}", help="JSON object of DAG params to override")
    parser.add_argument("--logical-date", default=None, help="ISO timestamp (default: now, UTC)")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.params or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--params is not valid JSON: {exc}") from exc
    dag = load_dag()
    params = resolved_params(dag, overrides)
    logical_date = (datetime.fromisoformat(args.logical_date) if args.logical_date
                    else datetime.now(timezone.utc).replace(microsecond=0))
    if logical_date.tzinfo is None:
        logical_date = logical_date.replace(tzinfo=timezone.utc)
    command = ["airflow", "dags", "test", dag.dag_id, logical_date.isoformat(), "--conf", json.dumps(overrides)]
    print("$ " + " ".join(command), flush=True)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"the DAG run failed (exit {completed.returncode}); see the task logs above")
    summary = run_summary(params, logical_date.strftime("%Y%m%dT%H%M%S"))
    print(f"test accuracy {summary['test_accuracy']:.4f}; published: {summary['published']}")
    print(f"model:  {summary['model_uri']}\nreport: {summary['report_uri']}")
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
