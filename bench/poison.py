"""Issue 24's poison and clean batteries, one weekly batch at a time, through the real weekly DAG.

Each dataset (MNIST; transposed MNIST, the second MNIST-format dataset of the clean battery) gets a *base*:
its test files and ``--history`` weekly batches of ``--weekly`` training images (the first ones of its training
file) landed in IDX format, and one run of the weekly DAG (``airflow dags test`` through
``admm_jobs.operations.run_pipeline``, what ``make run`` calls) on the last history week, which publishes the
champion. Every attack or clean batch then starts from a copy of that base, always restored at the same path so
the registry's and the lake's absolute URIs stay valid (attacks are independent), lands one more weekly batch
(the next ``--weekly`` training images, poisoned by ``bench/poisons.py``) and runs the DAG for that week.

Recorded per batch: whether validate quarantined it (and the checks the quarantine names), every registry
decision the run added (a challenger check or the gate rejecting the model shows there), whether the run
published a new model, and the harm on the fixed test set for the model published after the run and for the
champion before it: test accuracy, the attacked class's recall (flips, swaps) and the trigger's success rate
(the share of test images not of the target class that the model classifies as the target once stamped).
Batches quarantined at validate never train, so they are cheap. ``--stages`` runs only ingest and validate
(in this process, the same stage functions the DAG's tasks call) for detection-only sweeps.

    .venv/bin/python bench/poison.py attacks --half held_out [--limit 2|trigger=3,flip=2] [--kinds trigger,flip] [--stages]
    .venv/bin/python bench/poison.py attacks --half held_out --names trigger-...,flip-...   # only those attacks
    .venv/bin/python bench/poison.py clean [--limit 10]          # always --stages: false alarms at validate
    .venv/bin/python bench/poison.py table --half held_out       # the markdown table for bench/README.md

Writes bench/results/poison_<half>.{json,md} (attacks; poison_<half>_stages with --stages) and
bench/results/poison_clean.{json,md}, with the
machine, the command, the date, ``uptime`` before and after, the battery's split and the DAG params.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import poisons
from common import RESULTS, ROOT, WORK, machine, uptime

from admm_jobs.cli.command import FailedWithResult
from admm_jobs.lake.idx import fetch_source_file, read_array, write_idx
from admm_jobs.lake.landing import BATCHES_DIR, SOURCE_FILES
from admm_jobs.operations.run_pipeline import parse_logical_date, run_key
from admm_jobs.registry import store as registry
from admm_jobs.serving.predict import load_image_model

MNIST = ROOT / "data" / "mnist"
POISON_WORK = WORK / "poison"
LIVE = POISON_WORK / "live"  # every batch runs here, on a fresh copy of its base
FIRST_WEEK = "2026-01-04"  # a Sunday: the weekly DAG's logical dates
SOURCES = ("mnist", "mnist-transposed")
VENV_BIN = Path(sys.executable).parent


def week(index: int) -> str:
    return str(np.datetime64(FIRST_WEEK) + np.timedelta64(7 * index, "D"))


def source_arrays(source: str) -> dict[str, np.ndarray]:
    """Training and test images and labels of a battery source: MNIST, or MNIST with every image transposed (a
    different distribution of the same format and classes, which gets its own base history and model)."""
    arrays = {role: read_array(str(MNIST), *SOURCE_FILES[role]) for role in SOURCE_FILES}
    if source == "mnist-transposed":
        arrays["train_images"] = arrays["train_images"].transpose(0, 2, 1).copy()
        arrays["test_images"] = arrays["test_images"].transpose(0, 2, 1).copy()
    return arrays


def land_batch(landing: Path, day: str, images: np.ndarray, labels: np.ndarray) -> None:
    directory = landing / BATCHES_DIR / day
    write_idx(directory / f"{SOURCE_FILES['train_images'][0]}.gz", images)
    write_idx(directory / f"{SOURCE_FILES['train_labels'][0]}.gz", labels)


def land_test_set(landing: Path, source: str, arrays: dict[str, np.ndarray]) -> None:
    """The fixed test set: MNIST's files as stored, or the transposed images written anew."""
    landing.mkdir(parents=True, exist_ok=True)
    for role in ("test_images", "test_labels"):
        name = SOURCE_FILES[role][0]
        if source == "mnist":
            uri, raw = fetch_source_file(str(MNIST), name)
            (landing / os.path.basename(uri)).write_bytes(raw)
        else:
            write_idx(landing / f"{name}.gz", arrays[role])


# ---------------------------------------------------------------- Airflow and the DAG


def airflow_environment(airflow_home: Path) -> dict[str, str]:
    """What ``make run`` exports, with the bench's own AIRFLOW_HOME and the bench directory as the only allowed
    storage root."""
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # the DAG's tasks run this checkout's admm_jobs, whatever the venv installed
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__ADMM__ALLOWED_URI_ROOTS": str(POISON_WORK),
        "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2,4]", '
                                      '"extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}}',
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
    }


def prepare_airflow() -> None:
    """The bench's Airflow environment in this process (its children inherit it), its DB migrated once."""
    home = POISON_WORK / "airflow"
    os.environ.update(airflow_environment(home))
    if not (home / "airflow.db").exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], check=True, capture_output=True)


def roots(directory: Path) -> dict[str, str]:
    return {"source_uri": str(directory / "landing"), "lake_uri": str(directory / "lake"),
            "runs_uri": str(directory / "runs"), "registry_uri": str(directory / "registry")}


def run_dag(day: str, params: dict[str, Any], log: Path) -> dict[str, Any]:
    """One weekly DAG run for ``day`` as ``make run`` does it; its output goes to ``log``. Returns the run's
    summary (run_pipeline's last line) or ``{"failed": its one-line reason}``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as output:
        completed = subprocess.run(
            [sys.executable, "-m", "admm_jobs.operations.run_pipeline", "--params", json.dumps(params),
             "--logical-date", day], cwd=ROOT, stdout=output, stderr=subprocess.PIPE, check=False)
    if completed.returncode:
        return {"failed": completed.stderr.decode(errors="replace").strip().splitlines()[-1:]}
    return json.loads(log.read_text().strip().splitlines()[-1])


def restore(base: Path) -> None:
    """A fresh copy of ``base`` at :data:`LIVE`."""
    shutil.rmtree(LIVE, ignore_errors=True)
    shutil.copytree(base, LIVE)


def build_base(source: str, args: argparse.Namespace, arrays: dict[str, np.ndarray]) -> Path:
    """The source's base (history landed, champion published), built once and reused while its settings match."""
    base = POISON_WORK / "bases" / source
    settings = {"history": args.history, "weekly": args.weekly, "params": args.base_params}
    done = base / "base.json"
    if done.exists() and json.loads(done.read_text())["settings"] == settings:
        return base
    shutil.rmtree(LIVE, ignore_errors=True)
    land_test_set(LIVE / "landing", source, arrays)
    for index in range(args.history):
        window = slice(index * args.weekly, (index + 1) * args.weekly)
        land_batch(LIVE / "landing", week(index), arrays["train_images"][window], arrays["train_labels"][window])
    print(f"base {source}: {args.history} weeks of {args.weekly} images, DAG run on {week(args.history - 1)}",
          flush=True)
    summary = run_dag(week(args.history - 1), {**roots(LIVE), **args.base_params}, POISON_WORK / "logs" /
                      f"base-{source}.log")
    if not summary.get("published"):
        raise RuntimeError(f"the base run of {source} published no champion: {summary}")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(LIVE, base)
    done.write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    return base


# ---------------------------------------------------------------- the stages alone


def run_stages(day: str) -> dict[str, Any]:
    """Ingest and validate of ``day`` on :data:`LIVE`, with the DAG's arguments; ``{"failed": reason}`` when a
    stage refuses the data (validate's quarantine records its decision in the registry either way)."""
    from admm_jobs import ingest, validate

    where = roots(LIVE)
    try:
        dataset = ingest.ingest_dataset(where["source_uri"], where["lake_uri"], as_of=day,
                                        registry_uri=where["registry_uri"])
        result = validate.validate_dataset(dataset["dataset_uri"], registry_uri=where["registry_uri"],
                                           logical_date=day)
    except FailedWithResult as exc:  # validation failed or quarantined: its result says what it checked
        return {"failed": [str(exc).splitlines()[0]], "checked_batches": exc.result["checked_batches"]}
    except ValueError as exc:  # ingest's deterministic refusals (IngestError, ConfigError, ...)
        return {"failed": [f"{type(exc).__name__}: {str(exc).splitlines()[0]}"]}
    return {"checked_batches": result["checked_batches"]}


# ---------------------------------------------------------------- outcomes and harm


def outcome(history_before: int, batch: str, run: dict[str, Any], champion_version: str) -> dict[str, Any]:
    """What the run did with the batch, read from the registry history it appended to and its pointer."""
    added = registry.read_history(roots(LIVE)["registry_uri"])[history_before:]
    quarantines = [entry for entry in added if entry["decision"] == registry.QUARANTINED and entry["batch"] == batch]
    pointer = registry.read_pointer(roots(LIVE)["registry_uri"])
    return {
        "quarantined": bool(quarantines),
        "checks": sorted({reason.split(": ")[1] for entry in quarantines for reason in entry["reasons"]
                          if reason.count(": ") >= 2}),
        "decisions": [{"decision": entry["decision"], "reasons": entry["reasons"]} for entry in added],
        "published": pointer["version"] != champion_version,
        "run_failed": run.get("failed"),
        **({"checked_batches": run["checked_batches"]} if "checked_batches" in run else {}),  # --stages only
    }


def trigger_success(model, attack: poisons.Attack, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of the test images not of the trigger's target that ``model`` classifies as the target once
    stamped with the trigger."""
    options = attack.options
    others = images[labels != options["target"]]
    stamped = poisons.stamp(others, options["shape"], options["size"], options["position"])
    return float(np.mean(model.predict(stamped.reshape(len(stamped), -1)) == options["target"]))


def harm(model, attack: poisons.Attack | None, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Test accuracy, per-class recall and, for the attacks that have one, the attacked class's recall or the
    trigger's success rate of ``model`` on the fixed test set."""
    predicted = model.predict(images.reshape(len(images), -1))
    recall = [round(float(np.mean(predicted[labels == digit] == digit)), 4) for digit in range(poisons.CLASSES)]
    measured = {"test_accuracy": round(float(np.mean(predicted == labels)), 4), "class_recall": recall}
    if attack is not None and attack.attacked_class() is not None:
        measured["attacked_class_recall"] = recall[attack.attacked_class()]
    if attack is not None and attack.kind == "trigger":
        measured["trigger_success"] = round(trigger_success(model, attack, images, labels), 4)
    return measured


def run_batch(base: Path, day: str, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace,
              name: str) -> dict[str, Any]:
    """Land one batch on a fresh copy of ``base`` and run the DAG (or the stages) for ``day``."""
    restore(base)
    land_batch(LIVE / "landing", day, images, labels)
    registry_uri = roots(LIVE)["registry_uri"]
    history_before = len(registry.read_history(registry_uri))
    champion_version = registry.read_pointer(registry_uri)["version"]
    started = time.perf_counter()
    run = (run_stages(day) if args.stages else
           run_dag(day, {**roots(LIVE), **args.dag_params}, POISON_WORK / "logs" / f"{name}.log"))
    return {**outcome(history_before, day, run, champion_version), "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the batteries


def attacks_part(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    arrays = source_arrays("mnist")
    base = build_base("mnist", args, arrays)
    champion, _ = load_image_model(roots(base)["registry_uri"])
    test = (arrays["test_images"], arrays["test_labels"])
    fresh = slice(args.history * args.weekly, (args.history + 1) * args.weekly)
    clean = (arrays["train_images"][fresh], arrays["train_labels"][fresh])
    earlier = (arrays["train_images"][:args.weekly], arrays["train_labels"][:args.weekly])  # history week 1
    for kind, attacks in poisons.battery(args.half).items():
        for attack in attacks[:limit_of(args.limit, kind)] if kind in args.kinds else []:
            if args.names and attack.name not in args.names:
                continue
            images, labels = attack.apply(*clean, earlier=earlier)
            row = {"attack": attack.name, "kind": attack.kind, "share": attack.share, "settings": attack.options,
                   **run_batch(base, week(args.history), images, labels, args, attack.name),
                   "champion": harm(champion, attack, *test)}
            if row["published"]:
                row["published_model"] = harm(load_image_model(roots(LIVE)["registry_uri"])[0], attack, *test)
            run = LIVE / "runs" / run_key(parse_logical_date(week(args.history)))
            if (run / "model").exists():  # trained, whether the gate published it or not: did it learn the poison?
                row["challenger"] = harm(load_image_model(str(run / "model"))[0], attack, *test)
                row["challenger_check"] = most_adopted_class(run / "evaluation" / "metrics.json")
            record(row)
            print(json.dumps({key: row[key] for key in ("attack", "quarantined", "checks", "published", "seconds")}),
                  flush=True)


def most_adopted_class(evaluation: Path) -> dict[str, Any] | None:
    """The challenger check's statistics (evaluate's) of the class whose adopted share most exceeds the
    champion's test error rate: how near the check came to failing, whatever the gate decided."""
    check = json.loads(evaluation.read_text()).get("challenger_check") if evaluation.exists() else None
    if not check:
        return None
    return max(check["classes"], key=lambda entry: entry["adopted_share"] - entry["champion_error_rate"])


def limit_of(text: str | None, kind: str) -> int | None:
    """The ``--limit`` of ``kind``: ``N`` for every kind, or ``kind=N,...`` (kinds not named: no limit)."""
    if not text or "=" not in text:
        return int(text) if text else None
    limits = dict(item.split("=") for item in text.split(","))
    return int(limits[kind]) if kind in limits else None


def clean_part(args: argparse.Namespace, record: Callable[[dict[str, Any]], None]) -> None:
    sources = {source: source_arrays(source) for source in SOURCES}
    bases = {source: build_base(source, args, arrays) for source, arrays in sources.items()}
    history_images = args.history * args.weekly
    for batch in poisons.clean_battery(history_images, len(sources["mnist"]["train_images"]), args.other_weekly)[
            :limit_of(args.limit, "clean")]:
        arrays = sources[batch.source]
        images, labels = batch.apply(arrays["train_images"], arrays["train_labels"])
        row = {"batch": batch.name, "source": batch.source, "images": batch.count, "shift": batch.shift,
               "grey": batch.grey, **run_batch(bases[batch.source], week(args.history), images, labels, args, batch.name)}
        record(row)
        print(json.dumps({key: row[key] for key in ("batch", "quarantined", "checks", "seconds")}), flush=True)


# ---------------------------------------------------------------- results


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def harm_cell(row: dict[str, Any], key: str) -> str:
    """``champion -> published model`` of one harm measure (the champion's alone when nothing was published), and
    the challenger's in brackets when the run trained one that was not published."""
    before = row["champion"].get(key)
    if before is None:
        return ""
    after = row.get("published_model", {}).get(key)
    challenger = None if after is not None else row.get("challenger", {}).get(key)
    return ((percent(before) if after is None else f"{percent(before)} → {percent(after)}")
            + ("" if challenger is None else f" (challenger {percent(challenger)})"))


def attack_table(result: dict[str, Any]) -> list[str]:
    lines = ["| attack | share | quarantined (checks) | published | test accuracy % | attacked class recall % | "
             + "trigger success % |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        caught = f"yes ({', '.join(row['checks'])})" if row["quarantined"] else "no"
        published = "n/a (--stages)" if result["stages"] else ("yes" if row["published"] else "no")
        lines.append(f"| {row['attack']} | {row['share']:.0%} | {caught} | {published} | "
                     f"{harm_cell(row, 'test_accuracy')} | {harm_cell(row, 'attacked_class_recall')} | "
                     f"{harm_cell(row, 'trigger_success')} |")
    return lines


def clean_table(result: dict[str, Any]) -> list[str]:
    false_alarms = [row for row in result["rows"] if row["quarantined"]]
    lines = [f"{len(false_alarms)} of {len(result['rows'])} clean batches quarantined.", "",
             "| batch | images | quarantined (checks) |", "| --- | --- | --- |"]
    lines += [f"| {row['batch']} | {row['images']:,} | "
              f"{'yes (' + ', '.join(row['checks']) + ')' if row['quarantined'] else 'no'} |" for row in result["rows"]]
    return lines


def markdown(result: dict[str, Any]) -> str:
    head = [f"# Poison battery: {result['part']}" + (f", half {result['half']}" if result.get("half") else ""), "",
            f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
            f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores  ",
            f"Load before: `{result['uptime_before']}`  ", f"Load after: `{result['uptime_after']}`  ",
            *([] if result.get("finished", True) else ["**Unfinished (still running or interrupted): the rows below are the batches measured so far.**  "]),
            (f"Base: {result['history']} weekly batches of {result['weekly']} images, champion published by the "
             f"DAG with params {json.dumps(result['base_params'])}; each batch's run: params "
             f"{json.dumps(result['dag_params'])}; mode: "
             f"{'ingest + validate only (--stages)' if result['stages'] else 'the whole weekly DAG'}"), ""]
    if result["part"] == "attacks":
        head += [f"Split (seed {poisons.SPLIT_SEED}): {json.dumps(result['split'])}", ""]
    table = attack_table(result) if result["part"] == "attacks" else clean_table(result)
    return "\n".join(head + table) + "\n"


def result_name(part: str, half: str | None, stages: bool = False, tag: str = "") -> str:
    """poison_<half> (the whole DAG), poison_<half>_stages (ingest and validate only) or poison_clean, then
    ``_<tag>`` if given (a partial run that must not replace the full one's results)."""
    name = (f"poison_{half}" + ("_stages" if stages else "")) if part == "attacks" else "poison_clean"
    return f"{name}_{tag}" if tag else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("attacks", "clean", "table"))
    parser.add_argument("--half", choices=poisons.HALVES, default="held_out")
    parser.add_argument("--limit", default=None,
                        help="at most N batches (attacks: of each kind), or per kind: trigger=3,flip=2,...")
    parser.add_argument("--kinds", default=",".join(poisons.KINDS), help="attack kinds to run, comma-separated")
    parser.add_argument("--names", default="", help="only these attacks, comma-separated names (e.g. the ones a "
                        "--stages sweep let through validate)")
    parser.add_argument("--stages", action="store_true", help="only ingest and validate (detection-only)")
    parser.add_argument("--tag", default="", help="suffix of the results' file name (poison_<half>_<tag>.json)")
    parser.add_argument("--history", type=int, default=3, help="clean weekly batches before the attacked week")
    parser.add_argument("--weekly", type=int, default=5_000, help="images per weekly batch")
    parser.add_argument("--other-weekly", type=int, default=3_000,
                        help="images per weekly batch of the transposed-MNIST source in the clean battery")
    parser.add_argument("--base-epochs", type=int, default=10,
                        help="DAG param epochs of the base run (the champion, from random weights)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="DAG param epochs of each attacked week's run (warm start from the champion)")
    args = parser.parse_args()
    args.kinds, args.names = args.kinds.split(","), set(filter(None, args.names.split(",")))
    args.base_params, args.dag_params = {"epochs": args.base_epochs}, {"epochs": args.epochs}
    if args.part == "table":
        for name in (result_name("attacks", args.half), result_name("attacks", args.half, stages=True),
                     result_name("clean", None)):
            if (RESULTS / f"{name}.json").exists():
                print(markdown(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    if args.part == "clean":
        args.stages = True  # false alarms are decided at validate; a clean batch that passes trains like any other
    prepare_airflow()
    before = uptime()
    rows: list[dict[str, Any]] = []

    def write(finished: bool) -> str:
        """The results so far (rewritten after every batch, so an interrupted run keeps what it measured)."""
        result = {"part": args.part, "half": args.half if args.part == "attacks" else None,
                  "command": "bench/poison.py " + " ".join(sys.argv[1:]), "machine": machine(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uptime_before": before,
                  "uptime_after": uptime(), "finished": finished, "stages": args.stages, "history": args.history,
                  "weekly": args.weekly, "base_params": args.base_params, "dag_params": args.dag_params,
                  "split": poisons.battery_split(), "rows": rows}
        name = result_name(args.part, args.half, args.stages, args.tag)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(result))
        return markdown(result)

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        write(finished=False)

    (attacks_part if args.part == "attacks" else clean_part)(args, record)
    print(write(finished=True))


if __name__ == "__main__":
    main()
