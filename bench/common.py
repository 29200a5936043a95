"""Shared set-up of the benchmarks: the vendored MNIST ingested once into bench/.work/lake, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from admm_jobs import ingest
from admm_jobs.operations.deploy import TRAINING_SPARK_CONF

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
RESULTS = ROOT / "bench" / "results"


def mnist_dataset_uri() -> str:
    """Ingest the vendored MNIST (a no-op when already there) and return its dataset URI."""
    result = ingest.main(["--source", str(ROOT / "data" / "mnist"), "--lake", str(WORK / "lake")])
    return result["dataset_uri"]


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[:1]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "python": sys.version.split()[0],
            "platform": platform.platform(), "java": java[0] if java else "unknown"}


def uptime() -> str:
    """``uptime``'s line: the load average says whether other work shared the machine during a benchmark."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def spark_session(cores: int, app: str, driver_memory: str = "8g"):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (SparkSession.builder.master(f"local[{cores}]").appName(app).config(map=TRAINING_SPARK_CONF)
            .config("spark.driver.memory", driver_memory).config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false").getOrCreate())
