"""infra/build.sh: the job's code archive imports on its own, the packed virtualenv runs from
wherever it is unpacked, and --upload puts the artifacts on S3 (moto).

The virtualenv here holds only pip (no network in tests); the full runtime set
(numpy, scipy, threadpoolctl, pyarrow, jsonschema: ~130 MB) is built the same way by the default command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import boto3
import pytest

from admm_jobs import plan
from admm_jobs.operations import deploy

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "infra" / "build.sh"


def run_build(*args: str, env: dict[str, str] | None = None) -> dict:
    completed = subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def code_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return out, run_build("--out", str(out), "--no-venv")


def test_build_writes_the_entry_point_and_the_code_archive(code_build):
    out, info = code_build
    assert sorted(path.name for path in out.iterdir()) == ["admm_jobs.zip", "build-info.json", "ingest.py",
                                                           "train.py"]
    assert json.loads((out / "build-info.json").read_text()) == {key: info[key] for key in ("files", "release", "version")}
    assert "+" not in info["release"] and info["release"].startswith(info["version"].split("+")[0])
    assert (out / deploy.TRAIN_JOB.entry_point).read_bytes() == (REPO / "admm_jobs" / "train.py").read_bytes()
    assert (out / deploy.INGEST_JOB.entry_point).read_bytes() == (REPO / "admm_jobs" / "ingest.py").read_bytes()
    names = zipfile.ZipFile(out / deploy.CODE_ARCHIVE).namelist()
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "admm_jobs").rglob("*.py")
               if "__pycache__" not in path.parts}
    assert "admm_jobs/trainer/loop.py" in sources and "admm_jobs/lake/storage.py" in sources
    assert sources <= set(names) and not any("__pycache__" in name or name.endswith(".pyc") for name in names)


def test_code_archive_alone_provides_the_job(code_build, tmp_path):
    """With only the zip on the path (as --py-files gives it), admm_jobs.train imports from the zip and
    knows its version; run from an empty directory so this checkout is not importable by accident."""
    out, info = code_build
    archive = str(out / deploy.CODE_ARCHIVE)
    probe = ("import json, admm_jobs.train as t, admm_jobs.plan as p; "
             "print(json.dumps({'file': t.__file__, 'version': t.code_version(), 'code': p.training_code_version()}))")
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": archive})
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(archive + os.sep)
    assert found["version"] == info["version"]
    assert found["code"] == plan.training_code_version()  # the zip's training key is the checkout's
    usage = subprocess.run([sys.executable, "-m", "admm_jobs.train", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONPATH": archive})
    assert usage.returncode == 0 and "--dataset-uri" in usage.stdout


def test_code_archive_is_reproducible(code_build, tmp_path):
    out, info = code_build
    again = run_build("--out", str(tmp_path), "--no-venv")
    assert again["files"] == info["files"]


def test_packed_virtualenv_runs_from_where_it_is_unpacked(tmp_path):
    pytest.importorskip("venv_pack", reason="venv-pack is a build dependency (pip install venv-pack==0.2.0)")
    out = tmp_path / "dist"
    info = run_build("--out", str(out), "--packages", "")
    archive = out / deploy.VENV_ARCHIVE
    assert info["files"][deploy.VENV_ARCHIVE]["bytes"] == archive.stat().st_size
    assert info["venv"]["python"] == ".".join(map(str, sys.version_info[:3]))
    # Spark unpacks spark.archives "<uri>#environment" into ./environment of each container.
    container = tmp_path / "container"
    with tarfile.open(archive) as packed:
        packed.extractall(container / deploy.ARCHIVE_ALIAS, filter="fully_trusted")
    python = container / deploy.ARCHIVE_PYTHON
    probe = "import sys, pip; print(sys.prefix); print(pip.__file__)"
    completed = subprocess.run([str(python), "-c", probe], cwd=container, capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    prefix, pip_file = completed.stdout.split()
    unpacked = (container / deploy.ARCHIVE_ALIAS).resolve()
    assert Path(prefix).resolve() == unpacked and Path(pip_file).resolve().is_relative_to(unpacked)


def test_upload_puts_the_artifacts_under_the_prefix(s3_env, tmp_path):
    destination = f"s3://{s3_env}/releases/test"
    info = run_build("--out", str(tmp_path), "--no-venv", "--upload", destination)
    assert info["uploaded"][-1] == f"{destination}/build-info.json"  # the marker goes last
    client = boto3.client("s3")
    keys = {item["Key"]: item["Size"] for item in client.list_objects_v2(Bucket=s3_env)["Contents"]}
    assert keys == {f"releases/test/{name}": (tmp_path / name).stat().st_size
                    for name in ("train.py", "ingest.py", "admm_jobs.zip", "build-info.json")}


def test_upload_refuses_a_local_destination(tmp_path):
    completed = subprocess.run(["bash", str(BUILD), "--out", str(tmp_path), "--no-venv", "--upload", str(tmp_path)],
                               capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert completed.returncode == 1 and "needs an s3:// or gs:// prefix" in completed.stderr
