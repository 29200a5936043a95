"""Retraining demo: MNIST landed in weekly batches, backfilled through a real Airflow (``make demo-retraining``).

    python -m admm_jobs.operations.demo [--workdir var/demo] [--weeks 6] [--batch-size 10000]
        [--first-week 2026-01-04] [--params JSON] [--port 0] [--timeout 3600]

1. Cuts the vendored MNIST training images into ``weeks`` dated batches of ``batch_size``
   images (consecutive slices of the training file), dated on the DAG's weekly schedule
   (``@weekly``: Sundays 00:00 UTC, which are also the runs' logical dates), into the landing
   directory ``WORKDIR/landing`` with the fixed test set::

       WORKDIR/landing/t10k-{images-idx3,labels-idx1}-ubyte.gz
       WORKDIR/landing/batches/YYYY-MM-DD/train-{images-idx3,labels-idx1}-ubyte.gz

2. Starts Airflow's api-server, scheduler and dag-processor with their own ``AIRFLOW_HOME``
   (``WORKDIR/airflow``, a fresh SQLite DB; the scheduler creates no scheduled runs).
3. Backfills the weeks through ``POST /api/v2/backfills`` (one run at a time, oldest first),
   with the lake, runs and registry under ``WORKDIR``, and waits for every run to end.
4. Prints one row per week (batches, training samples, test accuracy, gate decision, ADMM
   iterations, training seconds, warm or cold start) and writes ``WORKDIR/weeks.{md,json,png}``.
5. Stops every process it started, also on Ctrl-C, SIGTERM or failure.

``WORKDIR`` is emptied first: each demo starts from nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from admm_jobs.cli.config import ConfigError, configure_logging, parse_config, require, setting, validate_fields
from admm_jobs.lake import dataset, storage
from admm_jobs.lake.idx import fetch_source_file, read_array, write_idx
from admm_jobs.operations.ports import free_port
from admm_jobs.operations.run_pipeline import run_key
from admm_jobs.registry import store as registry
from admm_jobs.registry.model import load_model

log = logging.getLogger("admm_jobs.demo")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DAG_ID = "mnist_admm_retraining"
TRAIN_FILES = {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"}
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
USER = "admin"
# Training params of the demo's runs (on top of the DAG's defaults): six trainings of up to 60k
# images must stay affordable on a 2-core machine; with 25 ADMM iterations week 3 (27,513 images) reached 97.2 %.
DEMO_PARAMS: dict[str, Any] = {"epochs": 25}
# Without an explicit connection, Spark runs in the task's process on every core (4 blocks).
SPARK_CONNECTION = '{"conn_type": "spark", "host": "local[*,4]", "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}}'
FINISHED_RUN_STATES = ("success", "failed")
QUIET_TASK_STATES = (None, "scheduled", "queued")  # progress lines start at "running"
TABLE_COLUMNS = ("week", "batches", "training samples", "test accuracy", "decision", "iterations",
                 "train s", "run s", "start")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Cut MNIST into weekly batches, backfill them through Airflow, print and plot the weeks."""

    workdir: str = setting(str(PROJECT_ROOT / "var" / "demo"), "demo directory (emptied first)", minLength=1)
    mnist: str = setting(str(PROJECT_ROOT / "data" / "mnist"), "directory with the four MNIST IDX files", minLength=1)
    weeks: int = setting(6, "number of weekly batches (and runs)", minimum=1, maximum=52)
    batch_size: int = setting(10_000, "training images per batch", minimum=1)
    first_week: str = setting("2026-01-04", "date of the first batch and run: a Sunday (@weekly runs at Sunday 00:00 UTC)")
    params: str = setting("{}", "JSON object of DAG params for every run, over the demo's own (epochs 25)")
    port: int = setting(0, "API server port on 127.0.0.1 (0: any free port)", minimum=0, maximum=65535)
    timeout: int = setting(3600, "seconds to wait for all runs to end", minimum=1)

    def __post_init__(self) -> None:
        validate_fields(self)
        try:
            first = datetime.date.fromisoformat(self.first_week)
        except ValueError:
            raise ConfigError(f"--first-week {self.first_week!r}: not a date (YYYY-MM-DD)") from None
        require(first.weekday() == 6, f"--first-week {self.first_week}: a {first:%A}; @weekly runs on Sundays")
        try:
            params = json.loads(self.params)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params is not valid JSON: {exc}") from None
        require(isinstance(params, dict), "--params must be a JSON object")

    def week_dates(self) -> list[datetime.date]:
        first = datetime.date.fromisoformat(self.first_week)
        return [first + datetime.timedelta(weeks=week) for week in range(self.weeks)]

    def run_conf(self) -> dict[str, Any]:
        """The DAG params of every run: the demo's storage roots, its training params, then --params."""
        root = Path(self.workdir)
        return {"source_uri": str(root / "landing"), "lake_uri": str(root / "lake"),
                "runs_uri": str(root / "runs"), "registry_uri": str(root / "registry"),
                **DEMO_PARAMS, **json.loads(self.params)}


# ---------------------------------------------------------------- landing the batches


def cut_batches(mnist_dir: str, landing_dir: str, dates: list[datetime.date], batch_size: int) -> list[dict[str, Any]]:
    """Land consecutive ``batch_size``-image slices of the MNIST training file as one batch per date.

    Batch k (k = 0, 1, ...) holds training records ``k * batch_size`` to ``(k + 1) * batch_size``;
    the test files are copied unchanged. Returns ``[{"id", "date", "records", "first_record"}]``.
    """
    images = read_array(mnist_dir, TRAIN_FILES["images"], 3)
    labels = read_array(mnist_dir, TRAIN_FILES["labels"], 1)
    if len(dates) * batch_size > images.shape[0]:
        raise ConfigError(f"{len(dates)} batches of {batch_size} images need {len(dates) * batch_size} "
                          f"training images; {mnist_dir} has {images.shape[0]}")
    landing = Path(landing_dir)
    landing.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        uri, raw = fetch_source_file(mnist_dir, name)
        (landing / posixpath.basename(uri)).write_bytes(raw)  # as stored: the same test set every week
    batches = []
    for index, day in enumerate(dates):
        start, stop = index * batch_size, (index + 1) * batch_size
        batch_dir = landing / "batches" / day.isoformat()
        write_idx(batch_dir / f"{TRAIN_FILES['images']}.gz", images[start:stop])
        write_idx(batch_dir / f"{TRAIN_FILES['labels']}.gz", labels[start:stop])
        batches.append({"id": day.isoformat(), "date": day.isoformat(), "records": stop - start, "first_record": start})
    return batches


# ---------------------------------------------------------------- Airflow


def airflow_environment(airflow_home: Path, port: int, passwords_file: Path, roots: dict[str, str]) -> dict[str, str]:
    """Environment of the demo's Airflow services: own home and DB, this project's DAGs, no scheduled runs."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        # Unpausing the @weekly DAG would also start last week's run with default params: backfill runs only.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__ADMM_REPORTS__ROOTS": f"runs@{DAG_ID}={roots['runs_uri']},registry@{DAG_ID}={roots['registry_uri']}",
        # The runs may use the storage of the demo's run conf and nothing else (the workdir unless --params moves it).
        "AIRFLOW__ADMM__ALLOWED_URI_ROOTS": ",".join(uri for name, uri in roots.items() if name.endswith("_uri")),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
    }
    env.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", SPARK_CONNECTION)
    return env


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


MAX_RESTARTS = 3  # per service, while the backfill runs


class AirflowServices:
    """api-server, scheduler and dag-processor as subprocesses (each its own process group), and a REST client."""

    SERVICES = ("api-server", "scheduler", "dag-processor")

    def __init__(self, env: dict[str, str], logs: Path, port: int, password: str):
        self.env, self.logs, self.port, self.password = env, logs, port, password
        self.url = f"http://127.0.0.1:{port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.client = None

    def migrate_db(self) -> None:
        log_file = self.logs / "db-migrate.log"
        with open(log_file, "wb") as output:
            completed = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=self.env,
                                       stdout=output, stderr=subprocess.STDOUT, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed (exit {completed.returncode}):\n{_tail(log_file)}")

    def start(self) -> None:
        for name in self.SERVICES:
            self._launch(name)

    def _launch(self, name: str) -> None:
        arguments = {"api-server": ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]}
        with open(self.logs / f"{name}.log", "ab") as output:  # a restart appends to the same log
            self.processes[name] = subprocess.Popen(
                [str(VENV_BIN / "airflow"), name, *arguments.get(name, [])], env=self.env,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def revive(self) -> None:
        """Restart a service that exited, as a process supervisor would (up to ``MAX_RESTARTS`` times each).

        Airflow's scheduler can die on a race with the backfill API (SQLAlchemy ObjectDeletedError on a
        DagRun the backfill request replaced while the scheduling loop held it, seen once in CI); its
        state is in the metadata DB, so a new scheduler takes the backfill's runs up again.
        """
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                continue
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if self.restarts[name] > MAX_RESTARTS:
                raise RuntimeError(f"{name} exited {self.restarts[name]} times\n{self.diagnostics()}")
            log.warning("%s exited with %s; restarting it (%d of %d):\n%s", name, process.returncode,
                        self.restarts[name], MAX_RESTARTS, _tail(self.logs / f"{name}.log", 5))
            self._launch(name)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name} (exit {process.poll()}), {self.logs / (name + '.log')}:\n"
                         f"{_tail(self.logs / f'{name}.log')}" for name, process in self.processes.items())

    def wait_until_ready(self, timeout: float = 300) -> None:
        """Until the scheduler and dag-processor report healthy and the DAG is parsed; signs in on the way."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client is None:
                    token = httpx.post(f"{self.url}/auth/token", json={"username": USER, "password": self.password},
                                       timeout=10).raise_for_status().json()["access_token"]
                    self.client = httpx.Client(base_url=f"{self.url}/api/v2",
                                               headers={"Authorization": f"Bearer {token}"}, timeout=30)
                health = self.client.get("/monitor/health").json()
                healthy = all(health.get(part, {}).get("status") == "healthy" for part in ("scheduler", "dag_processor"))
                if healthy and self.client.get(f"/dags/{DAG_ID}").status_code == 200:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            exited = [name for name, process in self.processes.items() if process.poll() is not None]
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"Airflow did not come up (exited: {exited or 'none'})\n{self.diagnostics()}")
            time.sleep(2)

    def api(self, method: str, path: str, attempts: int = 10, **kwargs) -> Any:
        """One REST call; sent again while SQLite answers 503 (database locked by the scheduler's writes)."""
        for attempt in range(attempts):
            response = self.client.request(method, path, **kwargs)
            if response.status_code != 503 or attempt == attempts - 1:
                break
            time.sleep(1)
        if not response.is_success:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:500]}")
        return response.json()

    def stop(self) -> None:
        """SIGTERM every service and everything it started (task runners, spark-submit), then SIGKILL stragglers."""
        import psutil

        if self.client is not None:
            self.client.close()
        tree = []
        for process in self.processes.values():
            try:
                tree += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for member in tree:
            try:
                member.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=30)
        for member in alive:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        for process in self.processes.values():
            process.wait()


def backfill_and_wait(services: AirflowServices, dates: list[datetime.date], conf: dict[str, Any],
                      timeout: float, finished: dict[str, dict[str, Any]]) -> None:
    """Backfill ``dates`` (one run at a time, oldest first) and wait until every run has ended.

    ``finished`` collects week -> DAG run as each run ends (what is known if the wait is cut short).
    """
    first, last = dates[0].isoformat(), dates[-1].isoformat()
    services.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    backfill = services.api("POST", "/backfills", json={
        "dag_id": DAG_ID, "from_date": f"{first}T00:00:00Z", "to_date": f"{last}T00:00:00Z",
        "run_backwards": False, "max_active_runs": 1, "reprocess_behavior": "completed", "dag_run_conf": conf})
    log.info("backfill %s: %d weekly runs from %s to %s", backfill["id"], len(dates), first, last)
    wanted = {day.isoformat() for day in dates}
    deadline, task_states = time.monotonic() + timeout, {}
    while True:
        services.revive()
        weeks = poll_runs(services, wanted, finished, task_states)
        if finished.keys() == wanted:
            return
        if time.monotonic() > deadline:
            states = {week: run["state"] for week, run in sorted(weeks.items())}
            raise RuntimeError(f"runs did not end within {timeout:.0f} s: {states}\n{services.diagnostics()}")
        time.sleep(5)


def poll_runs(services: AirflowServices, wanted: set[str], finished: dict[str, dict[str, Any]],
              task_states: dict[tuple[str, str], str]) -> dict[str, dict[str, Any]]:
    """One look at the backfill runs of the ``wanted`` weeks; returns them by week.

    Logs each task's state as it changes (from "running" on; ``task_states`` remembers what was
    logged) and moves every run that ended into ``finished``, with its ``failed_tasks``.
    """
    runs = services.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill", "limit": 100})["dag_runs"]
    weeks = {run["logical_date"][:10]: run for run in runs if (run.get("logical_date") or "")[:10] in wanted}
    for week, run in sorted(weeks.items()):
        if week in finished or run["state"] not in (*FINISHED_RUN_STATES, "running"):
            continue
        instances = services.api("GET", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]
        for ti in instances:
            if ti["state"] not in QUIET_TASK_STATES and task_states.get((week, ti["task_id"])) != ti["state"]:
                task_states[week, ti["task_id"]] = ti["state"]
                log.info("week %s: %s %s", week, ti["task_id"], ti["state"])
        if run["state"] in FINISHED_RUN_STATES:
            run["failed_tasks"] = [ti["task_id"] for ti in instances if ti["state"] == "failed"]
            finished[week] = run
            log.info("week %s: run %s%s (%d of %d done)", week, run["state"],
                     f" at {', '.join(run['failed_tasks'])}" if run["failed_tasks"] else "", len(finished), len(wanted))
    return weeks


# ---------------------------------------------------------------- the table


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def week_record(conf: dict[str, Any], week: str, dag_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the run of ``week`` (YYYY-MM-DD) did, read back from its artifacts and the registry history.

    Fields are None where the run did not get that far (no plan, not retrained, no model).
    """
    run_uri = storage.join(conf["runs_uri"], run_key(datetime.datetime.fromisoformat(week).replace(tzinfo=datetime.timezone.utc)))
    plan_uri = storage.join(run_uri, "plan.json")
    plan = storage.read_json(plan_uri) if storage.exists(plan_uri) else {}
    record: dict[str, Any] = {
        "week": week, "run_uri": run_uri, "state": dag_run["state"] if dag_run else None,
        "failed_tasks": dag_run.get("failed_tasks", []) if dag_run else [],
        "run_seconds": _seconds_between(dag_run.get("start_date"), dag_run.get("end_date")) if dag_run else None,
        "retrained": plan.get("retrain"), "reason": plan.get("reason"), "batches": plan.get("batches") or [],
        "training_samples": None, "test_accuracy": None, "decision": None,
        "iterations": None, "train_seconds": None, "start": None,
    }
    if plan.get("dataset_uri"):
        record["training_samples"] = dataset.load_manifest(plan["dataset_uri"])["splits"]["train"]["rows"]
    metrics_uri = storage.join(run_uri, "evaluation", "metrics.json")
    if storage.exists(metrics_uri):
        record["test_accuracy"] = storage.read_json(metrics_uri)["test_accuracy"]
    if storage.exists(storage.join(run_uri, "model", "model.json")):
        metadata = load_model(storage.join(run_uri, "model")).metadata
        init = metadata.get("init") or {"kind": plan.get("init", "random")}
        record.update(iterations=metadata.get("epochs_run"), train_seconds=metadata.get("train_seconds"),
                      start="warm" if init.get("kind") == "published" else "cold")
    decisions = [entry for entry in registry.read_history(conf["registry_uri"]) if entry["run_uri"] == run_uri]
    if decisions:
        record["decision"] = decisions[-1]["decision"]
    elif plan and not plan.get("retrain", True):
        record["decision"] = "skipped"
    return record


def _cell(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def _run_outcome(record: dict[str, Any]) -> str:
    """What the table shows without a gate decision: the run's state and the tasks that failed."""
    if not record["state"]:
        return "–"
    return f"run {record['state']}" + (f" ({', '.join(record['failed_tasks'])})" if record["failed_tasks"] else "")


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row of :data:`TABLE_COLUMNS` per week."""
    return [[
        record["week"],
        _cell(len(record["batches"]) if record["batches"] else None),
        _cell(record["training_samples"], "{:,}"),
        _cell(record["test_accuracy"], "{:.4f}"),
        record["decision"] or _run_outcome(record),
        _cell(record["iterations"]),
        _cell(record["train_seconds"], "{:.0f}"),
        _cell(record["run_seconds"], "{:.0f}"),
        record["start"] or "–",
    ] for record in records]


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


def plot_weeks(records: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy (line) and training seconds (bars: warm or cold start) per week, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weeks = np.arange(len(records))
    figure, (accuracy_axis, seconds_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    accuracy = [record["test_accuracy"] if record["test_accuracy"] is not None else np.nan for record in records]
    accuracy_axis.plot(weeks, accuracy, marker="o")
    for week, value, record in zip(weeks, accuracy, records):
        if record["decision"]:
            accuracy_axis.annotate(record["decision"], (week, value), textcoords="offset points", xytext=(0, 6),
                                   ha="center", fontsize=8)
    accuracy_axis.set_ylabel("test accuracy")
    accuracy_axis.set_title("Weekly retraining: one new batch of MNIST per week")
    colours = {"warm": "tab:orange", "cold": "tab:blue"}
    seconds = [record["train_seconds"] or 0 for record in records]
    seconds_axis.bar(weeks, seconds, color=[colours.get(record["start"], "tab:gray") for record in records])
    seconds_axis.set_ylabel("training seconds")
    seconds_axis.legend(handles=[matplotlib.patches.Patch(color=colour, label=f"{kind} start")
                                 for kind, colour in colours.items()], loc="upper left")
    seconds_axis.set_xticks(weeks, [record["week"] for record in records])
    seconds_axis.set_xlabel("week (logical date)")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_results(records: list[dict[str, Any]], workdir: Path) -> str:
    """WORKDIR/weeks.{json,md,png}; returns the markdown table."""
    table = markdown_table(records)
    (workdir / "weeks.json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    (workdir / "weeks.md").write_text(table + "\n")
    plot_weeks(records, workdir / "weeks.png")
    return table


# ---------------------------------------------------------------- the whole demo


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    workdir = Path(config.workdir).resolve()
    config = dataclasses.replace(config, workdir=str(workdir))
    if workdir.exists():
        shutil.rmtree(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    dates = config.week_dates()
    batches = cut_batches(config.mnist, str(workdir / "landing"), dates, config.batch_size)
    log.info("landed %d batches of %d images in %s", len(batches), config.batch_size, workdir / "landing")
    conf = config.run_conf()
    port = config.port or free_port()
    password = os.urandom(12).hex()
    passwords_file = workdir / "airflow" / "passwords.json"
    passwords_file.parent.mkdir(parents=True)
    passwords_file.write_text(json.dumps({USER: password}))
    passwords_file.chmod(0o600)
    services = AirflowServices(airflow_environment(workdir / "airflow", port, passwords_file, conf), logs, port, password)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started, finished, records = time.monotonic(), {}, []
    try:
        services.migrate_db()
        services.start()
        services.wait_until_ready()
        log.info("Airflow is up: %s (user %s, password in %s); logs in %s", services.url, USER, passwords_file, logs)
        backfill_and_wait(services, dates, conf, config.timeout, finished)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            services.stop()
            if finished:  # also when interrupted or timed out: the weeks that ended so far
                records = [week_record(conf, day.isoformat(), finished.get(day.isoformat())) for day in dates]
                print(write_results(records, workdir))
                print(f"{len(finished)} of {len(dates)} weekly runs ended in {time.monotonic() - started:.0f} s "
                      f"with params {json.dumps({k: v for k, v in conf.items() if not k.endswith('_uri')}, sort_keys=True)}"
                      f"; table and plot: {workdir / 'weeks.md'}, {workdir / 'weeks.png'}")
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            signal.signal(signal.SIGTERM, previous_sigterm)
    return records


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    config = parse_config(DemoConfig, argv)
    try:
        records = run_demo(config)
    except KeyboardInterrupt:
        raise SystemExit("demo interrupted; every process it started has been stopped")
    failed = [record["week"] for record in records if record["state"] != "success"]
    if failed:
        raise SystemExit(f"runs of week(s) {', '.join(failed)} did not succeed; task logs: the Airflow UI "
                         f"or {Path(config.workdir).resolve() / 'airflow' / 'logs'}")
    return records


if __name__ == "__main__":
    main()
