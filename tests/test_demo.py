"""The retraining demo: cutting MNIST into dated batches, the week table from real artifacts, a tiny real demo."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

from admm_jobs import ingest
from admm_jobs.cli.config import ConfigError
from admm_jobs.lake import idx, storage
from admm_jobs.operations import demo
from admm_jobs.registry import store as registry
from admm_jobs.registry.model import save_model

from idx_files import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, VENDORED_MNIST, read_vendored
from run_artifacts import random_model

SUNDAYS = [datetime.date(2026, 1, 4), datetime.date(2026, 1, 11), datetime.date(2026, 1, 18)]


@pytest.fixture(scope="module")
def landing(tmp_path_factory):
    """Three batches of 300 real MNIST training images, dated on three Sundays, plus the test set."""
    root = tmp_path_factory.mktemp("landing")
    batches = demo.cut_batches(str(VENDORED_MNIST), str(root), SUNDAYS, 300)
    return root, batches


def test_cut_batches_lands_consecutive_slices_as_dated_idx_batches(landing):
    root, batches = landing
    assert [batch["id"] for batch in batches] == ["2026-01-04", "2026-01-11", "2026-01-18"]
    assert [batch["first_record"] for batch in batches] == [0, 300, 600]
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    for index, day in enumerate(SUNDAYS):
        batch_dir = str(root / "batches" / day.isoformat())
        landed_images = idx.open_source(batch_dir, TRAIN_IMAGES, 3)
        assert landed_images.uri.endswith(".gz")
        np.testing.assert_array_equal(idx.whole_array(landed_images), images[index * 300:(index + 1) * 300])
        np.testing.assert_array_equal(idx.read_array(batch_dir, TRAIN_LABELS, 1), labels[index * 300:(index + 1) * 300])
    for name in (TEST_IMAGES, TEST_LABELS):  # the fixed test set, byte for byte
        assert (root / f"{name}.gz").read_bytes() == (VENDORED_MNIST / f"{name}.gz").read_bytes()
    assert sorted(path.name for path in (root / "batches").iterdir()) == [day.isoformat() for day in SUNDAYS]


def test_landed_batches_ingest_up_to_each_logical_date(landing, tmp_path):
    root, _ = landing
    second = ingest.ingest_dataset(str(root), str(tmp_path / "lake"), as_of="2026-01-11")
    assert second["batches"] == ["2026-01-04", "2026-01-11"]
    assert second["rows"]["train"] + second["rows"]["validation"] == 600 and second["rows"]["test"] == 10_000
    third = ingest.ingest_dataset(str(root), str(tmp_path / "lake"), as_of="2026-01-18")
    assert third["batches"] == ["2026-01-04", "2026-01-11", "2026-01-18"]
    assert third["dataset_version"] != second["dataset_version"]


def test_cut_batches_refuses_more_images_than_mnist_has(tmp_path):
    with pytest.raises(ConfigError, match="7 batches of 10000 images need 70000"):
        demo.cut_batches(str(VENDORED_MNIST), str(tmp_path), [SUNDAYS[0] + datetime.timedelta(weeks=k) for k in range(7)],
                         10_000)
    assert not (tmp_path / "batches").exists()


def test_demo_config_weeks_are_sundays_and_runs_get_the_demo_roots(tmp_path):
    config = demo.DemoConfig(workdir=str(tmp_path), weeks=3, params='{"epochs": 3, "hidden_layers": [16]}')
    assert config.week_dates() == SUNDAYS
    conf = config.run_conf()
    assert conf["source_uri"] == str(tmp_path / "landing") and conf["registry_uri"] == str(tmp_path / "registry")
    assert conf["epochs"] == 3 and conf["hidden_layers"] == [16]
    assert demo.DemoConfig().run_conf()["epochs"] == demo.DEMO_PARAMS["epochs"]
    with pytest.raises(ConfigError, match="2026-01-05: a Monday; @weekly runs on Sundays"):
        demo.DemoConfig(first_week="2026-01-05")
    with pytest.raises(ConfigError, match="--params"):
        demo.DemoConfig(params="[1]")
    with pytest.raises(ConfigError, match="--weeks"):
        demo.DemoConfig(weeks=0)


def test_the_demo_airflow_allows_the_storage_of_its_run_conf_only(tmp_path, monkeypatch):
    from admm_jobs.orchestration import uri_roots

    conf = demo.DemoConfig(workdir=str(tmp_path / "demo"),
                           params=json.dumps({"lake_uri": str(tmp_path / "lake")})).run_conf()
    env = demo.airflow_environment(tmp_path / "airflow", 8080, tmp_path / "passwords.json", conf)
    monkeypatch.setenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS", env["AIRFLOW__ADMM__ALLOWED_URI_ROOTS"])
    uri_roots.confine_uris((name, conf[name]) for name in ("source_uri", "lake_uri", "runs_uri", "registry_uri"))
    with pytest.raises(ValueError, match="^lake_uri: .* is outside the allowed roots"):
        uri_roots.confine_uris([("lake_uri", str(tmp_path / "demo" / "lake"))])  # --params moved the lake


def _trained_run(run_uri: str, dataset: dict, *, init: str, epochs_run: int, seconds: float, accuracy: float) -> None:
    """RUN/plan.json, RUN/model and RUN/evaluation/metrics.json as a retraining run leaves them."""
    storage.write_json(storage.join(run_uri, "plan.json"), {
        "retrain": True, "reason": None, "batches": dataset["batches"], "dataset_version": dataset["dataset_version"],
        "dataset_uri": dataset["dataset_uri"], "training_key": "k" + dataset["dataset_version"], "init": init,
        "init_model_uri": None})
    model = random_model(seed=epochs_run)
    model.metadata.update(epochs_run=epochs_run, best_epoch=epochs_run, train_seconds=seconds,
                          init={"kind": init, "model_uri": None})
    save_model(model, storage.join(run_uri, "model"))
    storage.write_json(storage.join(run_uri, "evaluation", "metrics.json"), {"test_accuracy": accuracy})


def test_week_table_from_real_run_artifacts(landing, tmp_path):
    root, _ = landing
    conf = demo.DemoConfig(workdir=str(tmp_path)).run_conf()
    lake = conf["lake_uri"]
    first = ingest.ingest_dataset(str(root), lake, as_of="2026-01-04")
    second = ingest.ingest_dataset(str(root), lake, as_of="2026-01-11")
    runs = {week: storage.join(conf["runs_uri"], week.replace("-", "") + "T000000")
            for week in ("2026-01-04", "2026-01-11", "2026-01-18", "2026-01-25")}
    _trained_run(runs["2026-01-04"], first, init="random", epochs_run=12, seconds=30.4, accuracy=0.9012)
    registry.record_decision(conf["registry_uri"], {"decision": "accepted", "run_uri": runs["2026-01-04"],
                                                    "test_accuracy": 0.9012})
    _trained_run(runs["2026-01-11"], second, init="published", epochs_run=5, seconds=11.6, accuracy=0.8874)
    registry.record_decision(conf["registry_uri"], {"decision": "rejected", "run_uri": runs["2026-01-11"],
                                                    "test_accuracy": 0.8874})
    # Week 3: nothing new, the plan skipped training.
    storage.write_json(storage.join(runs["2026-01-18"], "plan.json"), {
        "retrain": False, "reason": "model already judged", "batches": second["batches"],
        "dataset_version": second["dataset_version"], "dataset_uri": second["dataset_uri"],
        "training_key": "k", "init": "published", "init_model_uri": None})
    # Week 4: failed before planning (no artifacts at all).
    dag_runs = {"2026-01-04": {"state": "success", "start_date": "2026-12-01T03:00:00Z",
                               "end_date": "2026-12-01T03:01:40.500000Z"},
                "2026-01-25": {"state": "failed", "start_date": None, "end_date": None, "failed_tasks": ["ingest"]}}
    records = [demo.week_record(conf, week, dag_runs.get(week)) for week in runs]

    assert [record["batches"] for record in records[:3]] == [["2026-01-04"], ["2026-01-04", "2026-01-11"],
                                                             ["2026-01-04", "2026-01-11"]]
    assert records[0]["training_samples"] == first["rows"]["train"]
    assert records[1]["training_samples"] == second["rows"]["train"] > first["rows"]["train"]
    assert [record["decision"] for record in records] == ["accepted", "rejected", "skipped", None]
    assert [record["start"] for record in records] == ["cold", "warm", None, None]
    assert records[0]["run_seconds"] == 100.5 and records[1]["run_seconds"] is None

    rows = demo.table_rows(records)
    assert rows[0] == ["2026-01-04", "1", f"{first['rows']['train']:,}", "0.9012", "accepted", "12", "30", "100",
                       "cold"]
    assert rows[1][3:7] == ["0.8874", "rejected", "5", "12"] and rows[1][8] == "warm"
    assert rows[2][1] == "2" and rows[2][3:5] == ["–", "skipped"]
    assert rows[3] == ["2026-01-25", "–", "–", "–", "run failed (ingest)", "–", "–", "–", "–"]

    table = demo.write_results(records, tmp_path)
    assert table.splitlines()[0].startswith("| week | batches | training samples | test accuracy | decision")
    assert len(table.splitlines()) == 2 + len(runs)
    assert (tmp_path / "weeks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [entry["week"] for entry in json.loads((tmp_path / "weeks.json").read_text())] == list(runs)


@pytest.mark.slow
def test_tiny_demo_backfills_three_weeks_through_airflow(tmp_path):
    """The whole demo on 3 batches of 1,000 images: real api-server, scheduler, dag-processor and backfill API."""
    # 30 % validation: the dataset suite's class-balance check needs a few hundred validation rows.
    config = demo.DemoConfig(
        workdir=str(tmp_path / "demo"), weeks=3, batch_size=1000, timeout=900,
        params=json.dumps({"hidden_layers": [16], "epochs": 2, "partitions": 2, "min_accuracy": 0.0,
                           "validation_fraction": 0.3}))
    records = demo.run_demo(config)

    assert [record["week"] for record in records] == [day.isoformat() for day in SUNDAYS]
    assert [record["state"] for record in records] == ["success"] * 3
    assert [len(record["batches"]) for record in records] == [1, 2, 3]
    samples = [record["training_samples"] for record in records]
    assert samples[0] < samples[1] < samples[2] < 3000
    assert all(record["decision"] in ("accepted", "rejected") for record in records)
    assert all(0 < record["test_accuracy"] <= 1 and record["iterations"] == 2 for record in records)
    assert records[0]["start"] == "cold"
    assert (tmp_path / "demo" / "weeks.png").stat().st_size > 0
    table = (tmp_path / "demo" / "weeks.md").read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("| 2026-01-04 | 1 |")
    # every process the demo started (they all run with its AIRFLOW_HOME) is gone
    import psutil

    airflow_home = str((tmp_path / "demo" / "airflow").resolve())
    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("AIRFLOW_HOME") == airflow_home:
                leftovers.append(process.info)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    assert leftovers == []


def test_a_service_that_exits_is_restarted_a_bounded_number_of_times(tmp_path, monkeypatch):
    """The scheduler can die on a race with the backfill API; the demo restarts it, but not forever."""
    import subprocess
    import sys

    services = demo.AirflowServices(env={}, logs=tmp_path, port=0, password="")
    (tmp_path / "scheduler.log").write_text("sqlalchemy.orm.exc.ObjectDeletedError\n")
    launched = []

    def launch(name):  # a service that exits at once, as the crashed scheduler did
        launched.append(name)
        services.processes[name] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        services.processes[name].wait()

    monkeypatch.setattr(services, "_launch", launch)
    launch("scheduler")
    services.processes["api-server"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(demo.MAX_RESTARTS):
            services.revive()
        assert launched == ["scheduler"] * (demo.MAX_RESTARTS + 1)  # the running api-server is left alone
        with pytest.raises(RuntimeError, match=r"(?s)scheduler exited 4 times.*ObjectDeletedError"):
            services.revive()
    finally:
        services.processes["api-server"].kill()
        services.processes["api-server"].wait()
