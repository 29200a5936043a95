"""The DAG on a running Airflow: api-server, scheduler and dag-processor as subprocesses, driven over REST.

A triggered run with non-default params (small slice, tmp lake/runs/registry) whose publish a person
approves over the HITL REST API, and a backfill over two logical dates, as an operator would do them from
the UI or the API: params reaching the training job, one log line per epoch in the train task's log,
the report link, asset events, per-date outputs and the registry pointer. Last, a quarantine that starts
the review DAG through its asset event, and a release answered over the HITL REST API.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from admm_jobs import ingest
from admm_jobs.lake import storage
from admm_jobs.operations import demo, ports
from admm_jobs.registry import review
from admm_jobs.registry import store as registry

pytestmark = pytest.mark.slow

DAG_ID = "mnist_admm_retraining"
REVIEW_DAG_ID = "mnist_quarantine_review"
USER, PASSWORD = demo.USER, "live-test-password"
TRIGGERED_DATE = "2026-03-09T00:00:00Z"  # not test_dag's date: the session shares one DB
TRIGGERED_KEY = "20260309T000000"
BACKFILL_DATES = ("2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z")  # two Sundays: the DAG is @weekly
RUN_TIMEOUT_S = 420
ANSWER_DELAY_S = 15
QUARANTINED_DATE, QUARANTINED_KEY, QUARANTINED_BATCH = "2026-03-16T00:00:00Z", "20260316T000000", "2026-03-15"


class Airflow(demo.AirflowServices):
    """The demo's supervised services (``demo.AirflowServices``: own process groups, a service that exits is
    restarted, a REST client at /api/v2 signed in as admin), with the test's helpers."""

    def __init__(self, env: dict[str, str], logs: Path, port: int):
        super().__init__(env, logs, port, PASSWORD)

    def poll(self, look, what: str, timeout: float = RUN_TIMEOUT_S):
        """``look()`` every 3 s until it returns something true (returned); fail after ``timeout`` naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            self.revive()  # the scheduler can die on a race with the backfill request (demo.AirflowServices.revive)
            if result := look():
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not within {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(3)

    def finished_runs(self, run_ids: list[str], dag_id: str = DAG_ID) -> dict[str, dict]:
        """Poll until every run has finished (success or failed); returns them by run id."""
        def look():
            runs = {run_id: self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}") for run_id in run_ids}
            return runs if all(run["state"] in ("success", "failed") for run in runs.values()) else None
        return self.poll(look, f"runs {run_ids} of {dag_id} finished")

    def wait_for_runs(self, run_ids: list[str]) -> dict[str, dict]:
        """Poll until every run has finished; fail with the failed tasks' logs if one did not succeed."""
        runs = self.finished_runs(run_ids)
        failed = [run_id for run_id, run in runs.items() if run["state"] != "success"]
        assert not failed, "\n".join(self.failed_task_logs(run_id) for run_id in failed)
        return runs

    def failed_task_logs(self, run_id: str) -> str:
        instances = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return "\n".join(f"=== {run_id} {ti['task_id']} ({ti['state']}):\n"
                         f"{self.task_log(run_id, ti['task_id'])[-4000:]}"
                         for ti in instances if ti["state"] not in ("success", None))

    def task_log(self, run_id: str, task_id: str) -> str:
        """The whole log of a task's latest try, one message per line, as the UI shows it."""
        try_number = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}")["try_number"]
        content = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                           params={"full_content": "true"}, headers={"Accept": "application/json"})["content"]
        return "\n".join(entry.get("event", "") if isinstance(entry, dict) else str(entry) for entry in content)

    def answer(self, dag_id: str, run_id: str, task_id: str, map_index: int, option: str) -> tuple[dict, dict]:
        """Wait until a human-in-the-loop task awaits input, then choose ``option`` over the REST API, as the
        Required Actions page does; returns the question (its HITL detail) and the stored answer."""
        task = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        instance = task + (f"/{map_index}" if map_index >= 0 else "")  # a mapped instance exists once expanded
        self.poll(lambda: (response := self.client.get(instance)).status_code == 200
                  and response.json()["state"] == "awaiting_input", f"{instance} awaiting input")
        # As a person would, answer only after the scheduler has seen the parked task's process exit: Airflow
        # 3.3.2 takes that exit for an external kill when the resumed try already runs (state mismatch).
        time.sleep(ANSWER_DELAY_S)
        question = self.api("GET", f"{task}/{map_index}/hitlDetails")
        answer = self.api("PATCH", f"{task}/{map_index}/hitlDetails", json={"chosen_options": [option]})
        return question, answer

    def restart_scheduler(self, **settings: str) -> None:
        """Stop the scheduler and everything it started, and start it again with ``settings`` in its environment."""
        scheduler = psutil.Process(self.processes["scheduler"].pid)
        tree = [scheduler, *scheduler.children(recursive=True)]
        for member in tree:
            member.terminate()
        psutil.wait_procs(tree, timeout=30)
        self.processes["scheduler"].wait()
        self.env.update(settings)
        self._launch("scheduler")

    def asset_events(self, task_id: str, run_ids: list[str]) -> list[dict]:
        """The asset events ``task_id`` emitted in the given runs."""
        events = self.api("GET", "/assets/events", params={"source_dag_id": DAG_ID, "source_task_id": task_id,
                                                           "limit": 100})["asset_events"]
        return [event for event in events if event["source_run_id"] in run_ids]


@pytest.fixture(scope="module")
def storage_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("live")
    return {name: str(base / name) for name in ("lake", "runs", "registry")}


@pytest.fixture(scope="module")
def airflow(airflow_db, storage_roots, tmp_path_factory):
    logs = tmp_path_factory.mktemp("airflow-services")
    passwords = logs / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))
    port = ports.free_port()
    env = {
        **os.environ,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        # Unpausing a @weekly DAG would also start last week's run with the default
        # (full-size, project-directory) params: only triggered and backfill runs here.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__ADMM_REPORTS__ROOTS": f"runs@{DAG_ID}={storage_roots['runs']},"
                                        f"registry@{DAG_ID}={storage_roots['registry']}",
    }
    services = Airflow(env, logs, port)
    try:
        services.start()
        services.wait_until_ready()
        services.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
        # Unpaused before any quarantine: Airflow queues an asset event only for consumers that are not paused.
        services.poll(lambda: services.client.get(f"/dags/{REVIEW_DAG_ID}").status_code == 200, "review DAG parsed")
        services.api("PATCH", f"/dags/{REVIEW_DAG_ID}", json={"is_paused": False})
        yield services
    finally:
        services.stop()


def small_conf(source: Path, roots: dict[str, str], **overrides) -> dict:
    return {"source_uri": str(source), "lake_uri": roots["lake"], "runs_uri": roots["runs"],
            "registry_uri": roots["registry"], "validation_fraction": 1 / 6, "hidden_layers": [32], "epochs": 2,
            "warmup_epochs": 1, "partitions": 2, "min_accuracy": 0.0, **overrides}


@pytest.fixture(scope="module")
def triggered_run(airflow, small_idx_source, storage_roots):
    """A run that waits for a person before publish (``approval`` always); the admin approves over REST."""
    conf = small_conf(small_idx_source, storage_roots, approval="always")
    run = airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": TRIGGERED_DATE, "conf": conf})
    question, answer = airflow.answer(DAG_ID, run["dag_run_id"], "approval", -1, "Approve")
    assert question["options"] == ["Approve", "Reject"] and "approval is `always`" in question["body"]
    assert answer["responded_by"]["name"] == USER
    airflow.wait_for_runs([run["dag_run_id"]])
    return run["dag_run_id"]


def test_triggered_run_trains_with_the_given_params_and_logs_each_epoch(airflow, triggered_run, storage_roots):
    run_uri = storage.join(storage_roots["runs"], TRIGGERED_KEY)
    model = storage.read_json(storage.join(run_uri, "model", "model.json"))
    assert model["hyperparameters"]["layer_sizes"] == [784, 32, 10]
    assert model["hyperparameters"]["epochs"] == 2 and model["hyperparameters"]["partitions"] == 2

    log = airflow.task_log(triggered_run, "train")
    epoch_lines = re.findall(r"epoch (\d+)/2 \[(warmup|admm)\]", log)
    assert epoch_lines == [("1", "warmup"), ("2", "admm")], log[-3000:]

    pointer = storage.read_json(storage.join(storage_roots["registry"], "mnist-admm", "current.json"))
    assert pointer["run"] == run_uri
    decisions = [entry for entry in registry.read_history(storage_roots["registry"]) if entry["run_uri"] == run_uri]
    assert [entry["decision"] for entry in decisions] == ["approved", "accepted"]  # a person, then the gate
    assert decisions[0]["reviewer"] == USER and decisions[0]["responded_at"] and decisions[0]["training_key"]
    (model_event,) = airflow.asset_events("publish", [triggered_run])
    assert model_event["name"] == "mnist-admm-published-model" and model_event["extra"]["version"] == pointer["version"]
    (dataset_event,) = airflow.asset_events("validate", [triggered_run])
    assert dataset_event["uri"] == "x-admm://lake/mnist"
    assert dataset_event["extra"]["dataset_uri"] == model["dataset"]["uri"]


def test_report_link_opens_the_evaluation_report(airflow, triggered_run):
    links = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{triggered_run}/taskInstances/evaluate/links")
    link = links["extra_links"]["Evaluation report"]
    assert link == f"admm-reports/files/runs/{TRIGGERED_KEY}/evaluation/report.html"
    report = airflow.client.get(f"{airflow.url}/{link}")
    assert report.status_code == 200 and "<img" in report.text
    assert httpx.get(f"{airflow.url}/{link}").status_code == 401  # not signed in
    published = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{triggered_run}/taskInstances/publish/links")
    assert published["extra_links"]["Evaluation report"].startswith("admm-reports/files/registry/mnist-admm/")
    run_tab = airflow.client.get(f"{airflow.url}/admm-reports/runs/{DAG_ID}/{triggered_run}", follow_redirects=True)
    assert run_tab.status_code == 200 and run_tab.url.path == "/" + link


def test_backfill_runs_each_date_into_its_own_directory(airflow, triggered_run, small_idx_source, storage_roots):
    """Both dates see the same (undated) batch: the first trains a model the gate rejects, the second
    finds that decision for the same data, code and settings and skips training."""
    pointer_uri = storage.join(storage_roots["registry"], "mnist-admm", "current.json")
    published = storage.read_json(pointer_uri)
    # A different model that the gate must reject: no pointer change, no model asset event.
    conf = small_conf(small_idx_source, storage_roots, hidden_layers=[16], min_accuracy=1.0)
    # One run at a time: two runs validating the same dataset at once race on its validation/ directory.
    backfill = airflow.api("POST", "/backfills", json={  # sent again while SQLite answers 503
        "dag_id": DAG_ID, "from_date": BACKFILL_DATES[0], "to_date": BACKFILL_DATES[1],
        "dag_run_conf": conf, "max_active_runs": 1})
    runs = [run for run in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 10})["dag_runs"]
            if run["run_type"] == "backfill"]
    assert backfill["dag_id"] == DAG_ID
    assert sorted(run["logical_date"][:10] for run in runs) == ["2026-01-04", "2026-01-11"]
    run_ids = [run["dag_run_id"] for run in runs]
    airflow.wait_for_runs(run_ids)

    first, second = (storage.join(storage_roots["runs"], key) for key in ("20260104T000000", "20260111T000000"))
    model = storage.read_json(storage.join(first, "model", "model.json"))
    assert model["hyperparameters"]["layer_sizes"] == [784, 16, 10]
    assert model["init"]["kind"] == "random"  # the published model has other layers
    assert storage.exists(storage.join(first, "evaluation", "report.html"))
    assert storage.read_json(storage.join(second, "plan.json"))["retrain"] is False
    assert not storage.exists(storage.join(second, "model", "model.json"))
    (second_run,) = [run["dag_run_id"] for run in runs if run["logical_date"].startswith("2026-01-11")]
    states = {task["task_id"]: task["state"]
              for task in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{second_run}/taskInstances")["task_instances"]}
    assert states["train"] == states["evaluate"] == states["publish"] == "skipped" and states["plan"] == "success"
    assert storage.read_json(pointer_uri) == published
    version_uri = storage.join(storage_roots["registry"], "mnist-admm", published["version"])
    assert storage.exists(storage.join(version_uri, "manifest.json"))
    history = [json.loads(line) for line in
               storage.read_bytes(storage.join(storage_roots["registry"], "mnist-admm", "history.jsonl")).splitlines()]
    decisions = {entry["run_uri"]: entry["decision"] for entry in history if entry.get("run_uri") in (first, second)}
    assert decisions == {first: "rejected", second: "skipped"}
    assert airflow.asset_events("publish", run_ids) == []  # the rejected models emitted nothing
    assert len(airflow.asset_events("validate", run_ids)) == 2


def test_a_quarantine_starts_the_review_whose_release_over_rest_brings_the_batch_back(airflow, storage_roots,
                                                                                       tmp_path_factory):
    """A batch with 10 % blank images fails the weekly run at validate; request_review's asset event starts the
    review DAG, whose question shows the failed check and the contact sheet; released over the HITL REST API,
    the registry history says so (who, when) and the next ingest includes the batch.

    Last in this module: the review run is created by the scheduler from the asset event, which it does only
    with ``[scheduler] use_job_schedule`` on; the scheduler is restarted so, with the weekly DAG paused (it would
    otherwise start last week's scheduled run with the default params)."""
    from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored
    from test_ingest import batch_files, batched_source

    base = tmp_path_factory.mktemp("review")
    landing = batched_source(base / "landing", [])
    images, labels = read_vendored(TRAIN_IMAGES)[:400].reshape(-1, 784).copy(), read_vendored(TRAIN_LABELS)[:400]
    images[::10] = 0
    images[np.arange(0, 400, 10), np.arange(40)] = 5  # blank (no grey level above 10), yet each one distinct
    batch_files(landing, QUARANTINED_BATCH, images.reshape(-1, 28, 28), labels)
    conf = small_conf(landing, {**storage_roots, "lake": str(base / "lake"), "registry": str(base / "registry")})
    run = airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": QUARANTINED_DATE, "conf": conf})
    assert airflow.finished_runs([run["dag_run_id"]])[run["dag_run_id"]]["state"] == "failed"
    states = {task["task_id"]: task["state"] for task in airflow.api(
        "GET", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]}
    assert states["validate"] == "failed" and states["request_review"] == "success"
    assert {states[task] for task in ("plan", "train", "evaluate", "approval", "publish")} == {"upstream_failed"}
    (event,) = airflow.asset_events("request_review", [run["dag_run_id"]])
    assert event["uri"] == "x-admm://lake/mnist/quarantine" and list(event["extra"]["quarantined"]) == [
        QUARANTINED_BATCH]

    airflow.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": True})
    airflow.restart_scheduler(AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="True")
    (review_run,) = airflow.poll(lambda: airflow.api("GET", f"/dags/{REVIEW_DAG_ID}/dagRuns")["dag_runs"],
                                 "the review run started by the quarantine event")
    assert review_run["run_type"] == "asset_triggered"
    question, answer = airflow.answer(REVIEW_DAG_ID, review_run["dag_run_id"], "review", 0, review.RELEASE)
    assert question["options"] == [review.KEEP, review.RELEASE] and question["defaults"] == [review.KEEP]
    assert QUARANTINED_BATCH in question["subject"] and "| blank images | 0.1 | at most 0.02 |" in question["body"]
    (link,) = set(re.findall(r"\]\((admm-reports/quarantine/[^)]+)\)", question["body"]))
    sheet = airflow.client.get(f"{airflow.url}/{link}", follow_redirects=True)
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
    assert sheet.url.path == f"/admm-reports/files/runs/{QUARANTINED_KEY}/quarantine/{QUARANTINED_BATCH}/contact-sheet.png"
    assert httpx.get(f"{airflow.url}/{link}").status_code == 401  # not signed in
    assert airflow.finished_runs([review_run["dag_run_id"]], REVIEW_DAG_ID)[review_run["dag_run_id"]]["state"] == \
        "success"

    history = registry.read_history(conf["registry_uri"])
    assert [(entry["decision"], entry["batch"]) for entry in history] == [
        ("quarantined", QUARANTINED_BATCH), ("released", QUARANTINED_BATCH)]
    assert history[1]["reviewer"] == USER and answer["responded_by"]["name"] == USER
    assert datetime.fromisoformat(history[1]["responded_at"]) == datetime.fromisoformat(answer["responded_at"])
    assert ingest.ingest_dataset(str(landing), conf["lake_uri"], registry_uri=conf["registry_uri"],
                                 validation_fraction=conf["validation_fraction"])["batches"] == [QUARANTINED_BATCH]
