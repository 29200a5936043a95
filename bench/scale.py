"""What each stage costs as the landing grows: seconds, peak memory and bytes read, on synthetic landings.

Landings are weekly batches cut from shifted copies of MNIST's training images (copy k moves every
image by its own (dx, dy) of up to 4 pixels, so no image repeats another), raw IDX files (gzip level 1 with
``--gzip``), plus MNIST's test files:

* ``sizes``: 150k, 1M and 3M images in weekly batches of 50,000, and one single batch of 1M images;
  each stage (ingest, validate, evaluate's scoring, ...) runs in a child process that reports its
  wall seconds, peak resident memory (``VmHWM``) and bytes read (``/proc/self/io`` rchar: every
  read() the process made, module imports included);
* ``increment``: one new batch of 50,000 on top of 1, 20 and 60 weeks of history (ingested, a model
  published on it): ingest plus validate, seconds and bytes read;
* ``train``: seconds per training iteration (median of the iterations after the first) on the 1M and
  3M datasets, Spark local[2].

    .venv/bin/python bench/scale.py sizes [--sizes 150000,1000000,3000000] [--single-batch 1000000] [--work DIR]
    .venv/bin/python bench/scale.py increment [--weeks 1,20,60]
    .venv/bin/python bench/scale.py train [--sizes 1000000,3000000] [--epochs 6]
    .venv/bin/python bench/scale.py plot     # bench/results/scale.png from the sizes and increment results

Writes bench/results/scale_<part>.json and .md. Check ``df -h`` first: the 3M landing and its lake
take about 5 GB, training state at 3M about 20 GB (removed after each run).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, WORK, machine
from poisons import shifted

from admm_jobs.lake import dataset, storage
from admm_jobs.lake.idx import fetch_source_file, idx_bytes, read_array
from admm_jobs.lake.landing import BATCHES_DIR, SOURCE_FILES
from admm_jobs.registry import store
from admm_jobs.registry.model import save_model

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


def land(landing: Path, images_total: int, batch_size: int, compress: bool = True) -> list[str]:
    """Land ``images_total`` synthetic images as weekly batches of ``batch_size`` (plus MNIST's test files),
    gzip-compressed at level 1 or raw (gzip at level 9, write_idx's, writes about 2 MB/s: 3M images would
    take an hour)."""
    images = read_array(str(MNIST), *SOURCE_FILES["train_images"])
    labels = read_array(str(MNIST), *SOURCE_FILES["train_labels"])
    landing.mkdir(parents=True, exist_ok=True)
    for role in ("test_images", "test_labels"):
        uri, raw = fetch_source_file(str(MNIST), SOURCE_FILES[role][0])
        (landing / os.path.basename(uri)).write_bytes(raw)
    batch_images, batch_labels, dates, week = [], [], [], 0

    def flush() -> None:
        nonlocal batch_images, batch_labels, week
        day = (FIRST_WEEK + datetime.timedelta(weeks=week)).isoformat()
        directory = landing / BATCHES_DIR / day
        directory.mkdir(parents=True)
        for role, arrays in (("train_images", batch_images), ("train_labels", batch_labels)):
            payload = idx_bytes(np.concatenate(arrays))
            (directory / (SOURCE_FILES[role][0] + (".gz" if compress else ""))).write_bytes(
                gzip.compress(payload, compresslevel=1, mtime=0) if compress else payload)
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
    # Peak RSS is VmHWM, the high-water mark of the child's own memory: ru_maxrss keeps the parent's across
    # fork and exec, so it would report the harness's peak (3 GB after landing one batch of 1M images).
    probe = ("import json, runpy, sys, time; started = time.perf_counter(); "
             f"sys.argv = [{module!r}] + {argv!r}; "
             "exit_code = 0\n"
             f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as exc:\n    exit_code = exc.code or 0\n"
             "io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
             "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
             "print('BENCH ' + json.dumps({'seconds': round(time.perf_counter() - started, 2), "
             "'peak_rss_mib': round(int(status['VmHWM'].split()[0]) / 1024), "
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


def ingested_uri(argv: list[str]) -> str:
    """Where the dataset of ingest ``argv`` went (a no-op re-run when it was ingested already)."""
    return json.loads(subprocess.run([sys.executable, "-m", "admm_jobs.ingest", *argv], capture_output=True,
                                     text=True, cwd=ROOT, check=True).stdout.strip().splitlines()[-1])["dataset_uri"]


def ingest_and_validate(landing: Path, lake: Path, as_of: str | None = None, registry: Path | None = None) -> dict:
    """Ingest, then validate (against the model published in ``registry``, if given), each measured."""
    argv = ["--source", str(landing), "--lake", str(lake)] + (["--as-of", as_of] if as_of else [])
    argv += ["--registry-uri", str(registry)] if registry else []
    ingest = measured("admm_jobs.ingest", argv)
    dataset_uri = ingested_uri(argv)
    # The reference model only knows centred digits, so its accuracy on shifted copies says nothing about
    # their labels: the label sanity check is relaxed (the model still scores every new image).
    validate = measured("admm_jobs.validate", ["--dataset-uri", dataset_uri]
                        + (["--registry-uri", str(registry), "--max-accuracy-drop", "1"] if registry else []))
    return {"ingest": ingest, "validate": validate, "dataset_uri": dataset_uri}


def publish_reference(registry: Path, dataset_uri: str) -> None:
    """Publish, as trained on ``dataset_uri``, the tests' random-features model (about 80 % accurate, fitted in
    a second): the weekly run that follows validates only the batches it was not trained on."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fitted_model import fitted_model

    model = fitted_model()
    pixels, labels = dataset.read_split(dataset_uri, "test")
    version = dataset.load_manifest(dataset_uri)["version"]
    model.metadata = {"dataset": {"uri": dataset_uri, "version": version}}
    save_model(model, storage.join(store.version_uri(str(registry), version), store.MODEL_DIR))
    pointer = {"version": version, "test_accuracy": float((model.predict(pixels) == labels).mean())}
    if not store.switch_pointer(str(registry), pointer, None):
        raise RuntimeError(f"{registry}: a model is published already")


def sizes_part(args, work: Path) -> Iterator[dict]:
    landings = [*((f"{n:,} weekly", n, BATCH_SIZE) for n in args.sizes),
                *([(f"{args.single_batch:,} single batch", args.single_batch, args.single_batch)] if args.single_batch
                  else [])]
    for label, total, batch in sorted(landings, key=lambda landing: landing[1]):  # smallest first
        landing, lake = work / "landing", work / "lake"
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        land(landing, total, batch, args.gzip)
        stages = ingest_and_validate(landing, lake)
        yield {"landing": label, "images": total, "landing_seconds": round(time.perf_counter() - started, 1),
               **{stage: stages[stage] for stage in ("ingest", "validate")}}
    shutil.rmtree(work, ignore_errors=True)


def increment_part(args, work: Path) -> Iterator[dict]:
    shutil.rmtree(work, ignore_errors=True)
    landing, lake = work / "landing", work / "lake"
    dates = land(landing, (max(args.weeks) + 1) * BATCH_SIZE, BATCH_SIZE, args.gzip)
    for weeks in sorted(args.weeks):
        # The history, as earlier runs left it: ingested, and a model published on it.
        registry = work / f"registry-{weeks}"
        publish_reference(registry, ingested_uri(["--source", str(landing), "--lake", str(lake),
                                                  "--as-of", dates[weeks - 1]]))
        increment = ingest_and_validate(landing, lake, as_of=dates[weeks], registry=registry)
        yield {"history_weeks": weeks, "ingest": increment["ingest"], "validate": increment["validate"],
               "bytes_read": increment["ingest"]["bytes_read"] + increment["validate"]["bytes_read"],
               "seconds": round(increment["ingest"]["seconds"] + increment["validate"]["seconds"], 2)}
    shutil.rmtree(work, ignore_errors=True)


def train_part(args, work: Path) -> Iterator[dict]:
    for total in args.sizes:
        shutil.rmtree(work, ignore_errors=True)
        land(work / "landing", total, BATCH_SIZE, args.gzip)
        dataset_uri = ingest_and_validate(work / "landing", work / "lake")["dataset_uri"]
        run = work / "run"
        spark_submit = Path(sys.executable).parent / "spark-submit"
        output = subprocess.run(
            [str(spark_submit), "--master", "local[2]", "--driver-memory", "4g", str(ROOT / "admm_jobs" / "train.py"),
             "--dataset-uri", dataset_uri, "--output-uri", str(run), "--epochs", str(args.epochs), "--patience", "0",
             "--init", "random", "--checkpoint-every", "0"],
            capture_output=True, text=True, cwd=ROOT, check=True).stdout
        seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        yield {"images": total, "iterations": len(seconds),
               "median_seconds_per_iteration": round(statistics.median(seconds[1:]), 2),
               "seconds": seconds, "log_tail": output.splitlines()[-1:]}
    shutil.rmtree(work, ignore_errors=True)


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


def plot_part() -> None:
    """bench/results/scale.png from the sizes and increment results: each stage's peak RSS and bytes read
    against the images of the dataset, and the weekly increment's bytes read against the weeks of history."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    sizes = json.loads((RESULTS / "scale_sizes.json").read_text())["rows"]
    increment = json.loads((RESULTS / "scale_increment.json").read_text())["rows"]
    figure = Figure(figsize=(13, 4.2))
    memory, read, weekly = figure.subplots(1, 3)
    for stage, marker, color in (("ingest", "o", "tab:blue"), ("validate", "s", "tab:green")):
        weekly_rows = [row for row in sizes if "weekly" in row["landing"]]
        single = [row for row in sizes if "single" in row["landing"]]
        for axes, key, scale in ((memory, "peak_rss_mib", 1), (read, "bytes_read", 2**-20)):
            axes.plot([row["images"] / 1e6 for row in weekly_rows], [row[stage][key] * scale for row in weekly_rows],
                      f"{marker}-", color=color, label=f"{stage}, weekly batches of 50,000")
            axes.plot([row["images"] / 1e6 for row in single], [row[stage][key] * scale for row in single], marker,
                      color=color, mfc="none", ms=12, label=f"{stage}, one batch")
        weekly.plot([row["history_weeks"] for row in increment], [row[stage]["bytes_read"] / 2**20 for row in increment],
                    f"{marker}-", color=color, label=stage)
    weekly.plot([row["history_weeks"] for row in increment], [row["bytes_read"] / 2**20 for row in increment], "k^-",
                label="ingest + validate")
    memory.axhline(1536, color="grey", ls=":", lw=0.8, label="goal: 1.5 GB")
    for axes, title, ylabel in ((memory, "peak resident memory (VmHWM)", "MiB"), (read, "bytes read (rchar)", "MiB")):
        axes.set(title=title, ylabel=ylabel, xlabel="millions of images in the dataset")
    weekly.set(title="a new batch of 50,000 on top of the history", xlabel="weeks of history", ylabel="MiB read")
    for axes in (memory, read, weekly):
        axes.set_ylim(bottom=0)
    for axes in (memory, read, weekly):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "scale.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("sizes", "increment", "train", "plot"))
    parser.add_argument("--sizes", default=None, help="comma-separated image counts")
    parser.add_argument("--single-batch", type=int, default=1_000_000, help="sizes: images of the one-batch landing "
                        "(0: none)")
    parser.add_argument("--weeks", default="1,20,60", help="history lengths of the increment, in weeks")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work", default=str(WORK / "scale"))
    parser.add_argument("--gzip", action="store_true", help="land IDX files gzip-compressed at level 1 (default raw: faster)")
    args = parser.parse_args()
    default_sizes = {"sizes": "150000,1000000,3000000", "train": "1000000,3000000"}.get(args.part, "")
    args.sizes = [int(n) for n in (args.sizes or default_sizes).split(",") if n]
    args.weeks = [int(n) for n in args.weeks.split(",")]
    if args.part == "plot":
        plot_part()
        return
    part = {"sizes": sizes_part, "increment": increment_part, "train": train_part}[args.part]
    rows = []
    for row in part(args, Path(args.work)):  # the results so far are written after each row
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.part, rows, "bench/scale.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
