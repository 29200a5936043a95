"""Package the Spark jobs (training, ingest) for a cluster, and optionally upload them.

    python infra/build.py [--out dist] [--no-venv] [--python /usr/bin/python3.11]
                          [--upload s3://bucket/releases/<version>]

Writes into ``--out`` (names from :mod:`admm_jobs.operations.deploy`):

* ``train.py``, ``ingest.py``: the entry points (``admm_jobs/train.py`` and ``admm_jobs/ingest.py`` themselves, as the
  local target runs them);
* ``admm_jobs.zip``: the package, for ``--py-files`` / ``python_file_uris``. It carries an
  ``admm_mnist-<version>.dist-info`` so ``importlib.metadata`` (the model's ``code_version``)
  reports the version and commit on the cluster, where there is no git checkout;
* ``venv.tar.gz``: a virtualenv with the job's runtime dependencies, pinned by
  ``requirements.lock``, packed by venv-pack for ``spark.archives``. A virtualenv links to
  its base interpreter by absolute path: the cluster must have the same Python at the same
  path as ``--python`` (infra/docker/venv-builder.Dockerfile builds against /usr/bin/python3.11
  on Amazon Linux 2023; venv-pack's own ``--python-prefix`` rewrite is not used, it breaks
  the ``python3.X`` link of Python 3 venvs);
* ``build-info.json``: version, release (the version as a path segment), interpreter and
  sha256 of every file, written last.

``--upload`` copies the files to an s3:// or gs:// prefix through :mod:`admm_jobs.lake.storage`
(credentials from the standard chains), ``build-info.json`` last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: admm_jobs comes from this checkout

from admm_jobs.operations.deploy import CODE_ARCHIVE, JOBS, VENV_ARCHIVE  # noqa: E402

PACKAGE = "admm_jobs"
DISTRIBUTION = "admm_mnist"
BUILD_INFO = "build-info.json"
LOCK_FILE = REPO / "requirements.lock"
RUNTIME_REQUIREMENTS = REPO / "infra" / "requirements-runtime.txt"
# Zip entries get a fixed timestamp so the same sources give the same archive bytes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class BuildError(RuntimeError):
    """A packaging step failed; the message says which and why."""


def code_version(repo: Path = REPO) -> str:
    """The project version with the git commit as PEP 440 local label (``0.1.0+g1a2b3c4[.dirty]``)."""
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", PACKAGE], cwd=repo, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def _zip_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def build_code_archive(out: Path, version: str, repo: Path = REPO) -> Path:
    """Zip the package sources (no bytecode) plus minimal distribution metadata."""
    target = out / CODE_ARCHIVE
    sources = sorted(path for path in (repo / PACKAGE).rglob("*.py") if "__pycache__" not in path.parts)
    if not sources:
        raise BuildError(f"{repo / PACKAGE}: no Python sources to package")
    dist_info = f"{DISTRIBUTION}-{version}.dist-info"
    with zipfile.ZipFile(target, "w") as archive:
        for path in sources:
            _zip_entry(archive, path.relative_to(repo).as_posix(), path.read_bytes())
        metadata = f"Metadata-Version: 2.1\nName: {DISTRIBUTION.replace('_', '-')}\nVersion: {version}\n"
        _zip_entry(archive, f"{dist_info}/METADATA", metadata.encode())
        _zip_entry(archive, f"{dist_info}/top_level.txt", f"{PACKAGE}\n".encode())
    return target


def build_entry_points(out: Path, repo: Path = REPO) -> list[Path]:
    """Each Spark job's entry point: its module's file itself (the rest comes from the code archive)."""
    targets = [out / job.entry_point for job in JOBS]
    for job, target in zip(JOBS, targets):
        target.write_bytes((repo / Path(*job.module.split("."))).with_suffix(".py").read_bytes())
    return targets


def _run(command: list[str], step: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise BuildError(f"{step} failed (exit {completed.returncode}): {' '.join(command)}\n"
                         f"{completed.stderr.strip()[-2000:]}")


def runtime_packages(requirements: Path = RUNTIME_REQUIREMENTS) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line]


def build_venv_archive(out: Path, python: str, packages: list[str]) -> Path:
    """Create a fresh virtualenv with ``packages`` (pinned by the lock file) and pack it with venv-pack."""
    try:
        import venv_pack
    except ImportError:
        raise BuildError("venv-pack is not installed: pip install venv-pack==0.2.0 (or build with --no-venv)") from None
    target = out / VENV_ARCHIVE
    with tempfile.TemporaryDirectory(prefix="admm-venv-") as workdir:
        env = Path(workdir) / "env"
        _run([python, "-m", "venv", str(env)], "creating the virtualenv")
        if packages:
            _run([str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  "--only-binary=:all:", "--constraint", str(LOCK_FILE), *packages],
                 "installing the runtime packages")
        target.unlink(missing_ok=True)
        venv_pack.pack(prefix=str(env), output=str(target), compress_level=6)
    target.chmod(0o644)  # venv-pack writes 0600; the archive is read by the cluster
    return target


def _interpreter_version(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload(out: Path, files: list[Path], destination: str) -> list[str]:
    """Copy the built files under ``destination`` (s3:// or gs://), the build info last."""
    from admm_jobs.lake import storage  # pyarrow: needed for uploads only, not to build

    if storage.is_local(destination):
        raise BuildError(f"{destination}: --upload needs an s3:// or gs:// prefix")
    uploaded = []
    for path in [*files, out / BUILD_INFO]:
        uri = storage.join(destination, path.name)
        storage.write_bytes(uri, path.read_bytes())
        uploaded.append(uri)
    return uploaded


def build(out: Path, *, venv: bool = True, python: str = sys.executable, packages: list[str] | None = None,
          upload_to: str | None = None) -> dict[str, Any]:
    """Build the artifacts into ``out`` (replacing earlier ones) and return the build info."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*(job.entry_point for job in JOBS), CODE_ARCHIVE, VENV_ARCHIVE, BUILD_INFO):
        (out / name).unlink(missing_ok=True)
    version = code_version()
    files = [*build_entry_points(out), build_code_archive(out, version)]
    # Object keys and Spark paths are safer without "+": the release directory name uses "-".
    info: dict[str, Any] = {"version": version, "release": version.replace("+", "-")}
    if venv:
        packages = runtime_packages() if packages is None else packages
        files.append(build_venv_archive(out, python, packages))
        info["venv"] = {"python": _interpreter_version(python), "interpreter": python, "packages": packages}
    info["files"] = {path.name: {"sha256": sha256(path), "bytes": path.stat().st_size} for path in files}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if upload_to:
        info["uploaded"] = upload(out, files, upload_to)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory (default: dist/)")
    parser.add_argument("--no-venv", dest="venv", action="store_false", help="skip the virtualenv archive")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the virtualenv is made from; the cluster needs it at the same path")
    parser.add_argument("--packages", default=None,
                        help="comma-separated runtime packages (default: infra/requirements-runtime.txt; '': none)")
    parser.add_argument("--upload", default=None, help="s3:// or gs:// prefix to copy the artifacts to")
    args = parser.parse_args(argv)
    packages = None if args.packages is None else [name for name in args.packages.split(",") if name.strip()]
    try:
        info = build(args.out.resolve(), venv=args.venv, python=args.python, packages=packages,
                     upload_to=args.upload)
    except BuildError as exc:
        parser.exit(1, f"build failed: {exc}\n")
    info["out"] = str(args.out.resolve())
    print(json.dumps(info, sort_keys=True))
    return info


if __name__ == "__main__":
    main()
