"""Shared fixtures: a small real-MNIST IDX source, its ingested dataset, and an S3 (moto) server."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from admm_jobs import ingest
from admm_jobs.lake import batches
from admm_jobs.operations.deploy import TRAINING_SPARK_CONF
from admm_jobs.operations.ports import free_port

from idx_files import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_vendored, write_idx

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# py4j logs "closing connection" from finalizers after pytest has closed its streams
logging.getLogger("py4j").setLevel(logging.WARNING)

# Spark's Python workers and spark-submit come from this interpreter's venv, whatever PATH says.
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")
# Airflow reads its configuration at first import: give the test session its own
# AIRFLOW_HOME (SQLite DB created on demand by the airflow_db fixture).
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="airflow-test-")
os.environ.update({
    "AIRFLOW_HOME": _AIRFLOW_HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    # parsing imports Airflow, pandas and matplotlib: allow for a loaded 2-core CI machine
    "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "180",
    "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2,4]", '
                                  '"extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}}',
})

# The DAG's tasks refuse storage URIs outside [admm] allowed_uri_roots (admm_jobs.orchestration.uri_roots).
ALLOWED_URI_ROOTS = "AIRFLOW__ADMM__ALLOWED_URI_ROOTS"


@pytest.fixture(scope="session", autouse=True)
def allowed_uri_roots(tmp_path_factory):
    """The tests' runs keep their data in temporary directories: allow the session's (and its subprocesses')."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ALLOWED_URI_ROOTS, str(tmp_path_factory.getbasetemp()))
        yield


SMALL_TRAIN_ROWS = 1_200
SMALL_TEST_ROWS = 400
SMALL_VALIDATION_FRACTION = 1 / 6  # about 200 of the 1,200 training images, drawn per image from its hash
SMALL_VALIDATION_ROWS = int(batches.validation_mask(
    batches.image_ids(read_vendored(TRAIN_IMAGES)[:SMALL_TRAIN_ROWS].reshape(-1, 784)), SMALL_VALIDATION_FRACTION).sum())


@pytest.fixture(scope="session")
def small_idx_source(tmp_path_factory):
    """A directory with the four MNIST file names (gzip) holding the first 1,200 train / 400 test records."""
    source = tmp_path_factory.mktemp("mnist-small")
    for name, rows in (
        (TRAIN_IMAGES, SMALL_TRAIN_ROWS),
        (TRAIN_LABELS, SMALL_TRAIN_ROWS),
        (TEST_IMAGES, SMALL_TEST_ROWS),
        (TEST_LABELS, SMALL_TEST_ROWS),
    ):
        write_idx(source / f"{name}.gz", read_vendored(name)[:rows])
    return source


@pytest.fixture(scope="session")
def small_dataset(small_idx_source, tmp_path_factory):
    """``small_idx_source`` ingested into a fresh lake (a sixth held out for validation): the ingest result dict."""
    lake = tmp_path_factory.mktemp("lake")
    return ingest.ingest_dataset(str(small_idx_source), str(lake), validation_fraction=SMALL_VALIDATION_FRACTION)


@pytest.fixture(scope="module")
def spark_context():
    """A local Spark with 2 cores and 4 attempts per task, as on a cluster; stopped after the module."""
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2,4]")
             .appName("tests")
             .config("spark.ui.enabled", "false").config("spark.pyspark.python", sys.executable)
             .config(map=TRAINING_SPARK_CONF)
             .getOrCreate())
    yield spark.sparkContext
    spark.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server in a subprocess; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # a loaded machine answers late
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point every S3 client at the moto server (fake credentials) and yield a fresh bucket's name."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield bucket


@pytest.fixture(scope="session")
def airflow_db():
    """An initialised SQLite metadata DB in the session's AIRFLOW_HOME (removed at the end)."""
    subprocess.run([os.path.join(VENV_BIN, "airflow"), "db", "migrate"], check=True,
                   capture_output=True, timeout=300)
    yield _AIRFLOW_HOME
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)
