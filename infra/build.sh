#!/usr/bin/env bash
# Package the Spark jobs for a cluster: dist/{train.py, ingest.py, admm_jobs.zip, venv.tar.gz, build-info.json}.
# Options: see `infra/build.sh --help` (infra/build.py). Runs with the project virtualenv's Python
# unless PYTHON is set; venv-pack must be importable by it (pip install venv-pack==0.2.0).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-$repo/.venv/bin/python}" "$repo/infra/build.py" "$@"
