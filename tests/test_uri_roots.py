"""Storage URIs confined to [admm] allowed_uri_roots: the matching, the configuration, the task callables,
the train submission of every target, and whole DAG runs refused before any I/O."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from admm_jobs.cli.config import ConfigError
from admm_jobs.lake import confinement
from admm_jobs.lake.confinement import UriRefused
from admm_jobs.orchestration import tasks, uri_roots
from admm_jobs.orchestration.failures import fail_fast

from conftest import ALLOWED_URI_ROOTS
from test_deploy import load_dag

REPO_ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = REPO_ROOT / "dags" / "mnist_admm_retraining.py"


def within(uri: str, root: str) -> bool:
    return confinement.normalise(uri).is_within(confinement.normalise(root))


# --- Matching (admm_jobs.lake.confinement) ---


@pytest.mark.parametrize("uri, root, expected", [
    ("/data/lake/x", "/data/lake/", True),
    ("/data/lake", "/data/lake/", True),
    ("/data/lake/", "/data/lake", True),
    ("/data/lake-evil/x", "/data/lake/", False),
    ("/data/lakex", "/data/lake", False),
    ("/data", "/data/lake", False),
    ("/data/lake/../evil", "/data/lake", False),
    ("/data/lake/a/../b", "/data/lake", True),
    ("/data/lake/./x", "/data/lake", True),
    ("file:///data/lake/x", "/data/lake", True),
    ("/data/lake/x", "file:///data/lake/", True),
    ("file:///data/lake/%2e%2e/evil", "/data/lake", False),
    ("s3://bucket/lake/x", "s3://bucket/lake/", True),
    ("s3://bucket/lake", "s3://bucket/lake/", True),
    ("s3://bucket/x", "s3://bucket", True),
    ("s3://bucket2/lake/x", "s3://bucket/lake/", False),
    ("s3://bucket/lake-evil/x", "s3://bucket/lake/", False),
    ("s3://bucket/lake/../evil", "s3://bucket/lake/", False),
    ("s3://bucket/lake/a/../b", "s3://bucket/lake/", True),
    ("gs://bucket/lake/x", "s3://bucket/lake/", False),
    ("/bucket/lake/x", "s3://bucket/lake/", False),
    ("s3://bucket/lake/x", "/", False),
    ("https://host.example/mnist/t10k.gz", "https://host.example/mnist/", True),
    ("https://HOST.example:443/mnist/x", "https://host.example/mnist", True),
    ("https://host.example/mnist-evil/x", "https://host.example/mnist/", False),
    ("https://host.example/other", "https://host.example/mnist/", False),
    ("https://host.example.evil/mnist/x", "https://host.example/mnist/", False),
    ("https://host.example:8443/mnist/x", "https://host.example/mnist/", False),
    ("http://host.example/mnist/x", "https://host.example/mnist/", False),
])
def test_a_uri_is_under_a_root_by_whole_segments_of_normalised_paths(uri, root, expected):
    assert within(uri, root) is expected


@pytest.mark.parametrize("uri", [
    "s3://bucket/lake/x?endpoint_override=evil.example",
    "s3://bucket/lake/x#y",
    "https://host.example/mnist/?u=https://evil.example/",
    "https://host.example@evil.example/mnist/x",
    "https://host.example/mnist\\..\\..\\admin",
    "s3://bucket/lake/%2E%2E/evil",
    "s3://bucket/lak%65/x",
    "https://host.example/mnist%2F..%2F..%2Fadmin",
    "https://host.example/mnist/\n/x",
    "https://host.example:99999/mnist",
    "file:///data/lake/x?y",
    "s3://bucket/../other-bucket/x",
    "s3:///lake",
])
def test_queries_fragments_user_info_and_escapes_in_remote_uris_are_refused(uri):
    with pytest.raises(UriRefused, match=re.escape(uri.splitlines()[0])):
        confinement.normalise(uri)


def test_symlinks_are_resolved_before_matching(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (allowed / "data").mkdir(parents=True)
    (allowed / "escape").symlink_to(outside)
    (allowed / "dangling").symlink_to(outside / "not-yet")
    (allowed / "sub").symlink_to(outside / "deep")
    (outside / "into").symlink_to(allowed / "data")

    assert within(str(allowed / "data" / "new" / "file"), str(allowed))
    assert not within(str(allowed / "escape"), str(allowed))
    assert not within(str(allowed / "escape" / "new" / "file"), str(allowed))  # not there yet: its parent decides
    assert not within(str(allowed / "dangling" / "x"), str(allowed))
    # '..' after a link leaves the link's target, not the link: lexically this would be allowed/x
    assert not within(f"{allowed}/sub/../x", str(allowed))
    assert within(str(outside / "into" / "x"), str(allowed))
    assert not within(str(outside / "into" / "x"), str(outside))
    # a root reached through a link is the same root
    assert within(str(allowed / "data" / "x"), str(outside / "into"))


def test_relative_paths_are_made_absolute_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert within("lake/x", str(tmp_path)) and not within("../lake", str(tmp_path))


def test_refusal_is_one_line_naming_the_param_the_uri_and_the_roots():
    roots = ("/data/mnist", "s3://bucket/lake/")
    confinement.confine("lake_uri", "s3://bucket/lake/x", roots, "[admm] allowed_uri_roots")
    with pytest.raises(UriRefused) as refused:
        confinement.confine("lake_uri", "s3://bucket/lake-evil", roots, "[admm] allowed_uri_roots")
    assert str(refused.value) == ("lake_uri: s3://bucket/lake-evil is outside the allowed roots "
                                  "([admm] allowed_uri_roots): /data/mnist, s3://bucket/lake/")
    with pytest.raises(UriRefused, match=r"^source_uri: s3://b/x\?y=1: query, .*; allowed roots .*: none$"):
        confinement.confine("source_uri", "s3://b/x?y=1", (), "here")
    assert isinstance(refused.value, ValueError)  # fail_fast: deterministic, not retried


def test_roots_are_comma_separated_absolute_and_checkable():
    assert confinement.parse_roots(" /data/mnist/, s3://bucket/lake/ ,,https://host/p/ ", "cfg") == (
        "/data/mnist/", "s3://bucket/lake/", "https://host/p/")
    with pytest.raises(ConfigError, match="^cfg: root 'var/lake' is a relative path"):
        confinement.parse_roots("/data,var/lake", "cfg")
    with pytest.raises(ConfigError, match=r"^cfg: root s3://bucket/\?x=1: query"):
        confinement.parse_roots("s3://bucket/?x=1", "cfg")


# --- Configuration (admm_jobs.orchestration.uri_roots) ---


def test_default_roots_are_the_project_data_and_var_directories(monkeypatch):
    monkeypatch.delenv(ALLOWED_URI_ROOTS)
    assert uri_roots.allowed_uri_roots() == (str(REPO_ROOT / "data"), str(REPO_ROOT / "var"))
    monkeypatch.setenv(ALLOWED_URI_ROOTS, " ")
    assert uri_roots.allowed_uri_roots() == uri_roots.DEFAULT_ROOTS
    uri_roots.confine_uris([("source_uri", str(REPO_ROOT / "data" / "mnist")),
                            ("runs_uri", str(REPO_ROOT / "var" / "runs"))])
    with pytest.raises(UriRefused, match="^registry_uri: /tmp/registry is outside"):
        uri_roots.confine_uris([("registry_uri", "/tmp/registry")])


def test_the_environment_variable_sets_the_roots(monkeypatch, tmp_path):
    monkeypatch.setenv(ALLOWED_URI_ROOTS, f"{tmp_path}/,s3://bucket/lake/,https://host.example/mnist/")
    assert uri_roots.allowed_uri_roots() == (f"{tmp_path}/", "s3://bucket/lake/", "https://host.example/mnist/")
    uri_roots.confine_uris([("lake_uri", "s3://bucket/lake/x"), ("source_uri", "https://host.example/mnist"),
                            ("runs_uri", str(tmp_path / "runs"))])
    for name, uri in [("lake_uri", "s3://bucket/lake-evil"), ("source_uri", "https://evil.example/mnist"),
                      ("runs_uri", str(REPO_ROOT / "var" / "runs"))]:
        with pytest.raises(UriRefused, match=f"^{name}: {re.escape(uri)} is outside the allowed roots "
                                             r"\(\[admm\] allowed_uri_roots\)"):
            uri_roots.confine_uris([(name, uri)])
    monkeypatch.setenv(ALLOWED_URI_ROOTS, "var/")
    with pytest.raises(ConfigError, match=r"^\[admm\] allowed_uri_roots: root 'var/' is a relative path"):
        uri_roots.allowed_uri_roots()


def test_uri_options_of_a_command_line():
    argv = ["--source", "s", "--lake=l", "--as-of", "2026-01-04", "--window", "3", "--checksums", "c",
            "--init-model-uri", "none", "--registry-uri", "none", "--", "--dataset-uri", "d", "--output-uri"]
    assert uri_roots.argv_uris(argv) == [("--source", "s"), ("--lake", "l"), ("--checksums", "c"),
                                         ("--registry-uri", "none"), ("--dataset-uri", "d")]
    assert uri_roots.argv_uris(["--init-model-uri", "s3://b/m"]) == [("--init-model-uri", "s3://b/m")]


# --- The task callables ---


@pytest.fixture
def http_recorder():
    """An HTTP server that answers 404 to everything and records the paths asked for; yields (URL, paths)."""
    paths: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def test_ingest_of_a_source_outside_the_roots_fetches_nothing(http_recorder, tmp_path, monkeypatch):
    url, requested = http_recorder
    monkeypatch.setenv(ALLOWED_URI_ROOTS, str(tmp_path))
    argv = ["--source", f"{url}/mnist", "--lake", str(tmp_path / "lake")]
    with pytest.raises(AirflowFailException) as failure:
        fail_fast(tasks.ingest_task)(argv)
    assert isinstance(failure.value.__cause__, UriRefused)
    assert str(failure.value.__cause__).startswith(f"--source: {url}/mnist is outside the allowed roots")
    assert requested == [] and not (tmp_path / "lake").exists()

    # under a configured http root the same source is fetched (no checksum manifest there: ingest fails)
    monkeypatch.setenv(ALLOWED_URI_ROOTS, f"{tmp_path},{url}/mnist/")
    with pytest.raises(AirflowFailException, match="checksums are mandatory"):
        fail_fast(tasks.ingest_task)(argv)
    assert requested == ["/mnist/checksums.json"] and not (tmp_path / "lake").exists()


def test_every_task_callable_refuses_an_outside_uri_before_any_io(http_recorder, tmp_path, monkeypatch):
    url, requested = http_recorder
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    monkeypatch.setenv(ALLOWED_URI_ROOTS, str(inside))
    dataset, run, registry = str(inside / "lake" / "mnist" / "v1"), str(inside / "runs" / "r"), str(inside / "registry")
    calls = {
        "ingest": (tasks.ingest_task, ["--source", str(inside / "landing"), "--lake", str(outside / "lake")]),
        "validate": (tasks.validate_task, ["--dataset-uri", f"{url}/lake/mnist/v1", "--registry-uri", registry]),
        "plan": (tasks.plan_task, ["--dataset-uri", dataset, "--run-uri", str(outside / "run"),
                                   "--registry-uri", registry, "--", "--epochs", "1"]),
        "evaluate": (tasks.evaluate_task, ["--model-uri", f"{url}/run/model", "--dataset-uri", dataset,
                                           "--metrics-uri", f"{run}/metrics.jsonl",
                                           "--output-uri", f"{run}/evaluation", "--registry-uri", registry]),
        "publish": (tasks.publish_task, ["--run-uri", run, "--registry-uri", str(outside / "registry")]),
    }
    for stage, (task, argv) in calls.items():
        with pytest.raises(AirflowFailException) as failure:
            fail_fast(task)(argv)
        refused = failure.value.__cause__
        assert isinstance(refused, UriRefused), stage
        assert re.match(r"--[a-z-]+: \S+ is outside the allowed roots", str(refused)), stage
    assert requested == [] and not outside.exists() and not inside.exists()


# --- The train submission of every target, in the real DAG ---


class XComStub:
    """What ingest and plan pushed: the same dict answers both pulls."""

    def __init__(self, value):
        self.value = value

    def xcom_pull(self, task_ids=None, key="return_value", **_):
        return self.value


def test_every_task_of_the_dag_confines_its_uris_before_it_executes(monkeypatch):
    dag = load_dag(monkeypatch, None)
    for task in dag.tasks:  # the hook the task runner calls before execute()
        assert task._pre_execute_hook.__wrapped__ is uri_roots.confine_task, task.task_id


@pytest.mark.parametrize("target", ["local", "emr-serverless", "emr", "dataproc"])
def test_the_train_submission_of_every_target_refuses_uris_outside_the_roots(target, tmp_path, monkeypatch):
    document = None if target == "local" else json.loads((REPO_ROOT / "infra" / "deploy" / f"{target}.json").read_text())
    dag = load_dag(monkeypatch, document)
    submit = dag.get_task("train" if target == "local" else "train.submit")
    monkeypatch.setenv(ALLOWED_URI_ROOTS, str(tmp_path))
    params = {**{name: dag.params[name] for name in dag.params},
              "source_uri": str(tmp_path / "landing"), "lake_uri": str(tmp_path / "lake"),
              "runs_uri": str(tmp_path / "runs"), "registry_uri": str(tmp_path / "registry")}

    def pre_execute(dataset_uri: str, init_model_uri: str | None):
        """Render the submission as a run would, then run the task's pre-execute hook on it."""
        task = submit.prepare_for_execution()
        context = {"ti": XComStub({"dataset_uri": dataset_uri, "init_model_uri": init_model_uri}),
                   "params": params, "logical_date": datetime(2026, 1, 4, tzinfo=timezone.utc), "task": task}
        task.render_template_fields(context)
        task._pre_execute_hook(context)

    pre_execute(str(tmp_path / "lake" / "mnist" / "v1"), None)
    pre_execute(str(tmp_path / "lake" / "mnist" / "v1"), str(tmp_path / "registry" / "mnist-admm" / "v0" / "model"))
    for dataset_uri, init_model_uri, option in [("s3://elsewhere/lake/mnist/v1", None, "--dataset-uri"),
                                                (str(tmp_path / "lake"), "/etc/model", "--init-model-uri")]:
        with pytest.raises(AirflowFailException) as failure:
            pre_execute(dataset_uri, init_model_uri)
        assert str(failure.value.__cause__).startswith(f"{option}: "), target


# --- Whole runs (dag.test) ---


def run_states(dag_run) -> dict[str, tuple[str, int]]:
    return {ti.task_id: (str(ti.state).rsplit(".", 1)[-1].lower(), ti.try_number) for ti in dag_run.get_task_instances()}


def test_the_dag_refuses_a_run_outside_the_roots_before_ingest_does_anything(airflow_db, http_recorder, tmp_path,
                                                                               monkeypatch, capfd):
    from airflow.dag_processing.dagbag import DagBag

    url, requested = http_recorder
    monkeypatch.setenv(ALLOWED_URI_ROOTS, str(tmp_path / "allowed"))
    dag = DagBag(dag_folder=str(DAG_FILE.parent)).dags["mnist_admm_retraining"]
    conf = {"source_uri": f"{url}/mnist", "lake_uri": str(tmp_path / "elsewhere" / "lake"),
            "runs_uri": str(tmp_path / "allowed" / "runs"), "registry_uri": str(tmp_path / "allowed" / "registry")}
    dag_run = dag.test(logical_date=datetime(2026, 5, 10, tzinfo=timezone.utc), run_conf=conf)
    states = run_states(dag_run)
    # the run's first task (the route to a Spark ingest) is refused; not retried, whatever its retries
    assert states["ingest_route"] == ("failed", 1)
    assert states.pop("request_review") == ("skipped", 0)  # validate never ran: no quarantine to review
    assert {state for task, (state, _) in states.items() if task != "ingest_route"} == {"upstream_failed"}
    assert requested == [] and not (tmp_path / "elsewhere").exists() and not (tmp_path / "allowed").exists()
    # refused by the pre-execute hook, on the run's params, before ingest saw its --source
    assert f"source_uri: {url}/mnist is outside the allowed roots ([admm] allowed_uri_roots)" in capfd.readouterr().out


SUBMISSION_PROBE = '''
from datetime import datetime

from airflow.sdk import DAG

from admm_jobs.operations import deploy
from admm_jobs.orchestration import uri_roots
from admm_jobs.orchestration.failures import fail_fast

with DAG(dag_id="train_submission_probe", schedule=None, start_date=datetime(2026, 1, 1),
         default_args={"pre_execute": fail_fast(uri_roots.confine_task)}) as dag:
    for name in ("inside", "outside"):
        deploy.spark_job_task(deploy.DeployConfig(), ["--dataset-uri", "%(lake)s/mnist/v1", "--output-uri", f"%(root)s/{name}/run"],
                          task_id=name)
'''

FAKE_SPARK_SUBMIT = '''#!/bin/sh
echo "$@" >> "%s"
'''


def test_spark_submit_is_not_started_for_a_uri_outside_the_roots(airflow_db, tmp_path, monkeypatch):
    """``airflow dags test`` of two local train tasks with the DAG's hook (a fresh parse, as a worker does), one
    writing inside the roots and one outside, with a spark-submit that records its calls."""
    from admm_jobs.operations.run_pipeline import task_states

    submitted, bin_dir, dags = tmp_path / "submitted.txt", tmp_path / "bin", tmp_path / "dags"
    bin_dir.mkdir()
    dags.mkdir()
    (bin_dir / "spark-submit").write_text(FAKE_SPARK_SUBMIT % submitted)
    (bin_dir / "spark-submit").chmod(0o755)
    (dags / "probe.py").write_text(SUBMISSION_PROBE % {"lake": tmp_path / "lake", "root": tmp_path})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(dags))
    monkeypatch.setenv(ALLOWED_URI_ROOTS, f"{tmp_path / 'lake'},{tmp_path / 'inside'}")

    logical_date = datetime(2026, 5, 17, tzinfo=timezone.utc)
    completed = subprocess.run(["airflow", "dags", "test", "train_submission_probe", logical_date.isoformat()],
                               capture_output=True, text=True, timeout=300, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output  # the run failed: one task did
    assert task_states("train_submission_probe", logical_date) == {"inside": "success", "outside": "failed"}, output
    assert submitted.read_text().count("--output-uri") == 1 and f"{tmp_path / 'inside'}/run" in submitted.read_text()
    assert f"--output-uri: {tmp_path / 'outside'}/run is outside the allowed roots" in output
