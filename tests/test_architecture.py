"""The package's layers (pyproject.toml, [tool.importlinter]) hold, and the contracts do catch a break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the ``admm_jobs`` found first on the path from ``root`` (its pyproject.toml's contracts)."""
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def test_the_package_keeps_its_layers():
    completed = lint_imports(REPO)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2 kept, 0 broken" in completed.stdout


def test_a_stage_importing_a_stage_and_airflow_below_the_wings_are_both_caught(tmp_path):
    shutil.copytree(REPO / "admm_jobs", tmp_path / "admm_jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "admm_jobs" / "validate.py", "a") as module:
        module.write("\nfrom admm_jobs import ingest  # noqa\n")
    with open(tmp_path / "admm_jobs" / "lake" / "storage.py", "a") as module:
        module.write("\n\ndef _airflow():\n    import airflow.sdk  # noqa\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode != 0
    assert "0 kept, 2 broken" in completed.stdout, completed.stdout
    assert "admm_jobs.validate is not allowed to import admm_jobs.ingest" in completed.stdout
    assert "admm_jobs.lake.storage -> airflow" in completed.stdout
