"""Fixtures: a real Spark standalone cluster (a master and 2 one-core workers on 127.0.0.1) and jobs on it.

Used through ``pytest_plugins = ["spark_cluster"]``. The daemons are started by
:class:`admm_jobs.operations.cluster.StandaloneCluster` (the code behind ``make cluster``), each worker with
its own work and local directories under the test's tmp directory, and every process group
is killed at the end, also when a test fails.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from admm_jobs import train
from admm_jobs.operations.cluster import Daemon, StandaloneCluster, job_conf
from admm_jobs.trainer.spark_backend import STORE_PREFIX

WORKER_MEMORY = "1g"
CLUSTER_CONF = {**job_conf(WORKER_MEMORY), "spark.ui.enabled": "false"}


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A running master with 2 workers (1 core, 1g each); yields the :class:`StandaloneCluster`."""
    cluster = StandaloneCluster(tmp_path_factory.mktemp("spark-cluster"), workers=2, cores=1, memory=WORKER_MEMORY,
                                timeout=300)
    with cluster:
        yield cluster


def wait_for_idle(cluster: StandaloneCluster, workers: int = 2) -> None:
    """Wait until no application holds the cluster and ``workers`` workers are alive (the next job gets every core)."""
    cluster.wait_until(lambda state: not state["activeapps"] and len(cluster.alive_workers(state)) >= workers,
                       "the cluster to be idle", timeout=300)


def directories(root: Path, pattern: str) -> list[Path]:
    """Directories below ``root`` named like ``pattern``; Spark creates and deletes some meanwhile (os.walk skips them)."""
    return [Path(parent) / name for parent, names, _ in os.walk(root) for name in names if fnmatch.fnmatch(name, pattern)]


def block_directories(cluster: StandaloneCluster, pattern: str = f"{STORE_PREFIX}*", worker: Daemon | None = None
                      ) -> list[Path]:
    """Block-store directories under the local and work directories of the live workers (or of ``worker``).

    A worker lost for good is left out: its machine, disk included, is gone for good too.
    """
    workers = [worker] if worker else [w for w in cluster.workers if w.process.poll() is None]
    return [path for w in workers for root in (w.local_dir, w.work_dir) for path in directories(root, pattern)]


def wait_for_no_block_files(cluster: StandaloneCluster, timeout: float = 120) -> None:
    """The workers delete an application's local directories asynchronously once it has ended."""
    deadline = time.monotonic() + timeout
    while block_directories(cluster):
        if time.monotonic() > deadline:
            raise AssertionError(f"block files left on the workers: {block_directories(cluster)}")
        time.sleep(0.5)


def submit_training(master: str, dataset_uri: str, output_uri: str, *, epochs: int = 6, partitions: int = 2,
                    train_limit: int = 400, conf: dict[str, str] | None = None) -> subprocess.Popen:
    """``spark-submit admm_jobs/train.py`` in its own process group (output: one text stream)."""
    options = [item for key, value in {**CLUSTER_CONF, **(conf or {})}.items() for item in ("--conf", f"{key}={value}")]
    command = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", master, *options,
               train.__file__, "--dataset-uri", dataset_uri, "--output-uri", output_uri, "--hidden-layers", "24,12",
               "--epochs", str(epochs), "--partitions", str(partitions), "--train-limit", str(train_limit),
               "--checkpoint-every", "2", "--patience", "0"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a submitted job; its whole output. A job that hangs is killed with its process group."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def read_until(process: subprocess.Popen, marker: str) -> str:
    """The job's output up to and including the first line containing ``marker``."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the job ended before printing {marker!r}:\n" + "".join(seen))
