"""What each stage costs as the landing grows: seconds, peak memory and bytes read, on synthetic landings.

Landings are weekly batches cut from shifted copies of MNIST's training images (copy k moves every
image by its own (dx, dy) of up to 4 pixels, so no image repeats another), plus MNIST's test files:

* ``sizes``: 150k, 1M and 3M images in weekly batches of 50,000, and one single batch of 1M images;
  each stage (ingest, validate, evaluate's scoring, ...) runs in a child process that reports its
  wall seconds, peak resident memory (``ru_maxrss``) and bytes read (``/proc/self/io`` rchar: every
  read() the process made, module imports included);
* ``increment``: one new batch of 50,000 on top of 1, 20 and 60 weeks of history: ingest plus
  validate, seconds and bytes read;
* ``train``: seconds per training iteration (median of the iterations after the first) on the 1M and
  3M datasets, Spark local[2].

    .venv/bin/python bench/scale.py sizes [--sizes 150000,1000000,3000000] [--work DIR]
    .venv/bin/python bench/scale.py increment [--weeks 1,20,60]
    .venv/bin/python bench/scale.py train [--sizes 1000000,3000000] [--epochs 6]

Writes bench/results/scale_<part>.json and .md. Check ``df -h`` first: the 3M landing and its lake
take about 5 GB, training state at 3M about 20 GB (removed after each run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, WORK, machine
from poisons import shifted

from admm_jobs.lake.idx import fetch_source_file, read_source, write_idx
from admm_jobs.lake.landing import BATCHES_DIR, SOURCE_FILES

MNIST = ROOT / "data" / "mnist"
BATCH_SIZE = 50_000
FIRST_WEEK = datetime.date(2024, 1, 1)
SHIFTS = [(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)]  # 81 copies: 4.86M images at most


def synthetic_images(count: int, images: np.ndarray, labels: np.ndarray):
    """The first ``count`` images of MNIST's shifted copies (copy 0 unshifted), in chunks of one copy."""
    for copy, (dx, dy) in enumerate(SHIFTS):
        start = copy * len(images)
        if start >= count:
            return
        take = min(len(images), count - start)
        yield shifted(images[:take], dx, dy), labels[:take]
    raise ValueError(f"{count} images need more than {len(SHIFTS)} shifted copies")


def land(landing: Path, images_total: int, batch_size: int) -> list[str]:
    """Land ``images_total`` synthetic images as weekly batches of ``batch_size`` (plus MNIST's test files)."""
    images = read_source(str(MNIST), *SOURCE_FILES["train_images"]).array
    labels = read_source(str(MNIST), *SOURCE_FILES["train_labels"]).array
    landing.mkdir(parents=True, exist_ok=True)
    for role in ("test_images", "test_labels"):
        uri, raw = fetch_source_file(str(MNIST), SOURCE_FILES[role][0])
        (landing / os.path.basename(uri)).write_bytes(raw)
    batch_images, batch_labels, dates, week = [], [], [], 0

    def flush() -> None:
        nonlocal batch_images, batch_labels, week
        day = (FIRST_WEEK + datetime.timedelta(weeks=week)).isoformat()
        directory = landing / BATCHES_DIR / day
        write_idx(directory / f"{SOURCE_FILES['train_images'][0]}.gz", np.concatenate(batch_images))
        write_idx(directory / f"{SOURCE_FILES['train_labels'][0]}.gz", np.concatenate(batch_labels))
        dates.append(day)
        batch_images, batch_labels, week = [], [], week + 1

    held = 0
    for chunk_images, chunk_labels in synthetic_images(images_total, images, labels):
        offset = 0
        while offset < len(chunk_images):
            take = min(batch_size - held, len(chunk_images) - offset)
            batch_images.append(chunk_images[offset:offset + take])
            batch_labels.append(chunk_labels[offset:offset + take])
            held, offset = held + take, offset + take
            if held == batch_size:
                flush()
                held = 0
    if held:
        flush()
    return dates


def measured(module: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module argv`` in a child that reports its seconds, peak RSS and bytes read."""
    probe = ("import json, resource, runpy, sys, time; started = time.perf_counter(); "
             f"sys.argv = [{module!r}] + {argv!r}; "
             "exit_code = 0\n"
             f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as exc:\n    exit_code = exc.code or 0\n"
             "io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
             "print('BENCH ' + json.dumps({'seconds': round(time.perf_counter() - started, 2), "
             "'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "
             "'bytes_read': int(io['rchar']), 'exit_code': exit_code}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"{module} {argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1][len("BENCH "):])
    if report["exit_code"]:
        raise RuntimeError(f"{module} {argv} exited {report['exit_code']}:\n{result.stderr[-3000:]}")
    return report


def ingest_and_validate(landing: Path, lake: Path, as_of: str | None = None) -> dict:
    argv = ["--source", str(landing), "--lake", str(lake)] + (["--as-of", as_of] if as_of else [])
    ingest = measured("admm_jobs.ingest", argv)
    dataset_uri = json.loads(subprocess.run(
        [sys.executable, "-m", "admm_jobs.ingest", *argv], capture_output=True, text=True, cwd=ROOT,
        check=True).stdout.strip().splitlines()[-1])["dataset_uri"]  # a no-op re-run: where the dataset went
    validate = measured("admm_jobs.validate", ["--dataset-uri", dataset_uri])
    return {"ingest": ingest, "validate": validate, "dataset_uri": dataset_uri}


def sizes_part(args, work: Path) -> list[dict]:
    rows = []
    for label, total, batch in [*((f"{n:,} weekly", n, BATCH_SIZE) for n in args.sizes),
                                ("1,000,000 single batch", 1_000_000, 1_000_000)]:
        landing, lake = work / "landing", work / "lake"
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        land(landing, total, batch)
        stages = ingest_and_validate(landing, lake)
        rows.append({"landing": label, "images": total, "landing_seconds": round(time.perf_counter() - started, 1),
                     **{stage: stages[stage] for stage in ("ingest", "validate")}})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def increment_part(args, work: Path) -> list[dict]:
    rows = []
    shutil.rmtree(work, ignore_errors=True)
    landing, lake = work / "landing", work / "lake"
    dates = land(landing, (max(args.weeks) + 1) * BATCH_SIZE, BATCH_SIZE)
    for weeks in sorted(args.weeks):
        ingest_and_validate(landing, lake, as_of=dates[weeks - 1])  # the history, as earlier runs left it
        increment = ingest_and_validate(landing, lake, as_of=dates[weeks])
        rows.append({"history_weeks": weeks, "ingest": increment["ingest"], "validate": increment["validate"],
                     "bytes_read": increment["ingest"]["bytes_read"] + increment["validate"]["bytes_read"],
                     "seconds": round(increment["ingest"]["seconds"] + increment["validate"]["seconds"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def train_part(args, work: Path) -> list[dict]:
    rows = []
    for total in args.sizes:
        shutil.rmtree(work, ignore_errors=True)
        land(work / "landing", total, BATCH_SIZE)
        dataset_uri = ingest_and_validate(work / "landing", work / "lake")["dataset_uri"]
        run = work / "run"
        spark_submit = Path(sys.executable).parent / "spark-submit"
        output = subprocess.run(
            [str(spark_submit), "--master", "local[2]", "--driver-memory", "4g", str(ROOT / "admm_jobs" / "train.py"),
             "--dataset-uri", dataset_uri, "--output-uri", str(run), "--epochs", str(args.epochs), "--patience", "0",
             "--init", "random", "--checkpoint-every", "0"],
            capture_output=True, text=True, cwd=ROOT, check=True).stdout
        seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"images": total, "iterations": len(seconds),
                     "median_seconds_per_iteration": round(statistics.median(seconds[1:]), 2),
                     "seconds": seconds, "log_tail": output.splitlines()[-1:]})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def write(part: str, rows: list[dict], command: str) -> None:
    result = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows}
    (RESULTS / f"scale_{part}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{command}` on {result['machine']['cpu']} ({result['machine']['cores']} cores), {result['date']}", ""]
    if part == "train":
        lines += ["| images | iterations | median s / iteration |", "| --- | --- | --- |"]
        lines += [f"| {r['images']:,} | {r['iterations']} | {r['median_seconds_per_iteration']} |" for r in rows]
    else:
        key = "landing" if part == "sizes" else "history_weeks"
        lines += [f"| {key} | stage | seconds | peak RSS MiB | bytes read |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r[key]} | {stage} | {r[stage]['seconds']} | {r[stage]['peak_rss_mib']} | "
                  f"{r[stage]['bytes_read'] / 2**20:,.0f} MiB |" for r in rows for stage in ("ingest", "validate")]
    (RESULTS / f"scale_{part}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("sizes", "increment", "train"))
    parser.add_argument("--sizes", default=None, help="comma-separated image counts")
    parser.add_argument("--weeks", default="1,20,60", help="history lengths of the increment, in weeks")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work", default=str(WORK / "scale"))
    args = parser.parse_args()
    default_sizes = {"sizes": "150000,1000000,3000000", "train": "1000000,3000000", "increment": ""}[args.part]
    args.sizes = [int(n) for n in (args.sizes or default_sizes).split(",") if n]
    args.weeks = [int(n) for n in args.weeks.split(",")]
    part = {"sizes": sizes_part, "increment": increment_part, "train": train_part}[args.part]
    rows = part(args, Path(args.work))
    write(args.part, rows, "bench/scale.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
