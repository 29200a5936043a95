"""A Spark standalone cluster on this machine: one master and N workers on 127.0.0.1 (``make cluster``).

    python -m admm_jobs.operations.cluster [--workers 2] [--cores 1] [--memory 1g] [--port 7077] [--webui-port 8077]

The daemons are pyspark's own ``bin/spark-class`` master and worker (nothing is downloaded).
Once every worker has registered it prints the master URL; Ctrl-C (or SIGTERM) stops the
master, the workers and their executors. Each worker has its own work directory (executor
logs) and local directory (executor scratch space, deleted by the worker when an
application ends) under ``--directory``; the daemons' logs are there too.

The tests start the same cluster through :class:`StandaloneCluster` (``tests/spark_cluster.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from admm_jobs.cli.config import configure_logging, parse_config, setting, validate_fields
from admm_jobs.operations.deploy import TRAINING_SPARK_CONF
from admm_jobs.operations.ports import free_port

log = logging.getLogger("admm_jobs.cluster")

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def job_conf(executor_memory: str = "1g") -> dict[str, str]:
    """Spark properties for a training job on a standalone cluster (``--conf`` of spark-submit).

    Executors as large as a worker offers; the first job held back until every executor has
    registered (else the first executor loads every block, and the blocks stay where they were
    loaded); each block's tasks kept on the executor holding its files (an executor lost during a
    pass is noticed by the backend, not by this wait); single-threaded BLAS in the Python workers.
    """
    return {"spark.executor.memory": executor_memory, "spark.ui.showConsoleProgress": "false", **TRAINING_SPARK_CONF}


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Start a Spark standalone master and workers on 127.0.0.1 until Ctrl-C."""

    workers: int = setting(2, "number of workers", minimum=1, maximum=64)
    cores: int = setting(1, "cores each worker offers", minimum=1, maximum=256)
    memory: str = setting("1g", "memory each worker offers its executors (cap), e.g. 1g, 512m", pattern=r"^[1-9][0-9]*[mMgG]$")
    port: int = setting(7077, "master RPC port (0: any free port)", minimum=0, maximum=65535)
    webui_port: int = setting(8077, "master web UI port, also its JSON state at /json/ (0: any free port)",
                              minimum=0, maximum=65535)
    directory: str = setting("var/cluster", "work, scratch and log directories of the daemons", minLength=1)
    timeout: float = setting(180.0, "seconds to wait for the master and every worker to come up",
                             exclusiveMinimum=0, maximum=3600)

    def __post_init__(self):
        validate_fields(self)


def spark_class() -> str:
    """pyspark's ``bin/spark-class`` (the launcher of Spark's JVM daemons)."""
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def child_pids(parent: int, marker: str) -> list[int]:
    """Processes whose parent is ``parent`` and whose command line contains ``marker`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may contain spaces
        if ppid == parent and marker in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


@dataclasses.dataclass
class Daemon:
    """One master or worker JVM, the leader of its own process group (its executors and Python workers join it)."""

    name: str
    process: subprocess.Popen
    log_path: Path
    local_dir: Path | None = None
    work_dir: Path | None = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def executor_pids(self) -> list[int]:
        return child_pids(self.process.pid, EXECUTOR_CLASS)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class StandaloneCluster:
    """A master and workers on 127.0.0.1 started with ``spark-class``; use as a context manager.

    Registration is awaited on the master's JSON endpoint (``http://127.0.0.1:<webui>/json/``),
    never by sleeping. :meth:`stop` kills every process group it started, executors included.
    """

    def __init__(self, directory: str | os.PathLike, workers: int = 2, cores: int = 1, memory: str = "1g",
                 port: int = 0, webui_port: int = 0, timeout: float = 180.0, worker_conf: dict[str, str] | None = None):
        self.directory = Path(directory).resolve()
        self.initial_workers, self.cores, self.memory, self.timeout = workers, cores, memory, timeout
        self.port, self.webui_port = port or free_port(), webui_port or free_port()
        self.worker_conf = worker_conf or {}
        self.master: Daemon | None = None
        self.workers: list[Daemon] = []

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    @property
    def webui_url(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    def _environment(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "256m",
                "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable), **extra}

    def _launch(self, name: str, arguments: list[str], environment: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.directory / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as output:
            process = subprocess.Popen([spark_class(), *arguments], stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
        return process, log_path

    def state(self) -> dict[str, Any]:
        """The master's JSON state: workers (with state ALIVE/DEAD), active and completed applications."""
        with urllib.request.urlopen(self.webui_url + "/json/", timeout=10) as response:
            return json.load(response)

    def wait_until(self, condition, what: str, timeout: float | None = None) -> dict[str, Any]:
        """Poll the master's state until ``condition(state)`` holds; the error names what and shows the logs."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                state = self.state()
                if condition(state):
                    return state
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline or (self.master and self.master.process.poll() is not None):
                exited = [d for d in self.workers if d.process.poll() is not None]
                logs = "\n".join(f"--- {d.name} ({d.log_path}):\n{d.log_tail()}" for d in [self.master, *exited] if d)
                raise RuntimeError(f"Spark standalone cluster: timed out waiting for {what}\n{logs}")
            time.sleep(0.5)

    def alive_workers(self, state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [w for w in (state or self.state())["workers"] if w["state"] == "ALIVE"]

    def start(self) -> "StandaloneCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        process, log_path = self._launch("master", [MASTER_CLASS, "--host", "127.0.0.1", "--port", str(self.port),
                                                    "--webui-port", str(self.webui_port)],
                                         self._environment(SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false"))
        self.master = Daemon("master", process, log_path)
        try:
            self.wait_until(lambda state: state.get("status") == "ALIVE", "the master")
            for _ in range(self.initial_workers):
                self.add_worker(wait=False)
            self.wait_until(lambda state: len(self.alive_workers(state)) >= self.initial_workers,
                            f"{self.initial_workers} workers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, wait: bool = True) -> Daemon:
        """Start one more worker (own work and local directories); wait for it to register."""
        index = len(self.workers)
        home = self.directory / f"worker-{index}"
        work_dir, local_dir = home / "work", home / "local"
        work_dir.mkdir(parents=True, exist_ok=True)
        local_dir.mkdir(parents=True, exist_ok=True)
        options = " ".join(f"-D{key}={value}" for key, value in self.worker_conf.items())
        environment = self._environment(SPARK_WORKER_DIR=str(work_dir), SPARK_LOCAL_DIRS=str(local_dir),
                                        SPARK_WORKER_OPTS=options)
        alive_before = len(self.alive_workers()) if wait else 0
        process, log_path = self._launch(
            f"worker-{index}", [WORKER_CLASS, self.master_url, "--host", "127.0.0.1", "--cores", str(self.cores),
                                "--memory", self.memory, "--work-dir", str(work_dir), "--webui-port", "0"], environment)
        worker = Daemon(f"worker-{index}", process, log_path, local_dir=local_dir, work_dir=work_dir)
        self.workers.append(worker)
        if wait:
            self.wait_until(lambda state: len(self.alive_workers(state)) > alive_before, f"{worker.name} to register")
        return worker

    def stop(self) -> None:
        """Kill every daemon's process group (workers first, so no executor outlives its worker), then reap them."""
        daemons = [*self.workers, *([self.master] if self.master else [])]
        for daemon in daemons:
            daemon.kill(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for daemon in daemons:
            try:
                daemon.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            daemon.kill(signal.SIGKILL)  # the group: executors and Python workers that ignored SIGTERM
            try:
                daemon.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit after SIGKILL", daemon.name, daemon.process.pid)

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    configure_logging(sys.stdout)
    config = parse_config(ClusterConfig, argv)
    cluster = StandaloneCluster(config.directory, config.workers, config.cores, config.memory, config.port,
                                config.webui_port, config.timeout)
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, also while the daemons start (and if inherited ignored)
        signal.signal(signum, _interrupt)
    try:
        with cluster:
            print(f"Spark master: {cluster.master_url}  (web UI {cluster.webui_url}, {config.workers} workers x "
                  f"{config.cores} core(s), {config.memory}; logs in {cluster.directory / 'logs'})", flush=True)
            print(f"Train on it:  make run SPARK_MASTER={cluster.master_url}   (Ctrl-C stops the cluster)", flush=True)
            print("Other jobs:   spark-submit --master " + cluster.master_url + " "
                  + " ".join(f"--conf {key}={value}" for key, value in job_conf(config.memory).items()), flush=True)
            while cluster.master.process.poll() is None:
                time.sleep(0.5)
            raise SystemExit(f"the master exited; see {cluster.master.log_path}")
    except KeyboardInterrupt:
        print("cluster stopped", flush=True)


if __name__ == "__main__":
    main()
