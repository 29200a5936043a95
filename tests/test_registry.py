"""Tests of the registry module: pointer, published model, decision history (local and S3, concurrent)."""

from __future__ import annotations

import datetime
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from admm_jobs import publish
from admm_jobs.lake import storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry

from run_artifacts import make_evaluated_run


def test_an_empty_registry_has_no_pointer_model_or_history(tmp_path):
    registry_uri = str(tmp_path / "registry")
    assert registry.read_pointer(registry_uri) is None
    assert registry.published_model_uri(registry_uri) is None
    assert registry.read_history(registry_uri) == []
    assert registry.find_decision(registry_uri, "any-key") is None
    assert not (tmp_path / "registry").exists()  # reading creates nothing


def test_published_model_uri_names_a_loadable_model_of_the_current_version(tmp_path):
    registry_uri = str(tmp_path / "registry")
    first = make_evaluated_run(str(tmp_path / "a"), seed=1, test_accuracy=0.9)
    second = make_evaluated_run(str(tmp_path / "b"), seed=2, test_accuracy=0.95)
    publish.publish_run(str(tmp_path / "a"), registry_uri)
    assert registry.read_pointer(registry_uri)["version"] == first
    publish.publish_run(str(tmp_path / "b"), registry_uri)

    uri = registry.published_model_uri(registry_uri)
    assert uri == str(tmp_path / "registry" / "mnist-admm" / second / "model")
    model = model_io.load_model(uri)
    assert registry.model_version(model.metadata["weights_sha256"]) == second


def test_record_decision_fills_the_common_fields_and_keeps_extras(tmp_path):
    registry_uri = str(tmp_path / "registry")
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    stored = registry.record_decision(
        registry_uri,
        {"decision": "quarantined", "batch": "2026-01-12", "check": "blank_share", "observed": 0.31,
         "threshold": 0.05, "reasons": ["31% of the images are blank (at most 5%)"], "batches": ["2026-01-12"]},
    )
    recorded_at = datetime.datetime.fromisoformat(stored["recorded_at"])
    assert recorded_at.tzinfo is not None and recorded_at >= before
    assert stored == {
        **registry.ENTRY_DEFAULTS,
        "decision": "quarantined",
        "batch": "2026-01-12",
        "check": "blank_share",
        "observed": 0.31,
        "threshold": 0.05,
        "reasons": ["31% of the images are blank (at most 5%)"],
        "batches": ["2026-01-12"],
        "recorded_at": stored["recorded_at"],
    }
    assert registry.read_history(registry_uri) == [stored]


@pytest.mark.parametrize("entry, message", [
    ({"decision": "maybe"}, "'decision' must be one of"),
    ({}, "'decision' must be one of"),
    ({"decision": "skipped", "reasons": "nothing new"}, "'reasons' must be a list of strings"),
    ({"decision": "skipped", "batches": [20260105]}, "'batches' must be a list of strings"),
    ({"decision": "rejected", "test_accuracy": 1.5}, "'test_accuracy' must be in"),
])
def test_invalid_entries_are_refused_and_nothing_is_written(tmp_path, entry, message):
    registry_uri = str(tmp_path / "registry")
    with pytest.raises(registry.RegistryError, match=message):
        registry.record_decision(registry_uri, entry)
    assert registry.read_history(registry_uri) == []


def test_find_decision_returns_the_latest_gate_decision_with_that_key(tmp_path):
    registry_uri = str(tmp_path / "registry")
    record = lambda **entry: registry.record_decision(registry_uri, entry)  # noqa: E731
    record(decision="rejected", training_key="k1", version="v1", test_accuracy=0.5)
    accepted = record(decision="accepted", training_key="k1", version="v2", test_accuracy=0.9)
    record(decision="skipped", training_key="k1")
    record(decision="quarantined", batch="2026-01-05")
    other = record(decision="rejected", training_key="k2", version="v3", test_accuracy=0.4)

    assert registry.find_decision(registry_uri, "k1") == accepted
    assert registry.find_decision(registry_uri, "k2") == other
    assert registry.find_decision(registry_uri, "k3") is None
    assert [entry["decision"] for entry in registry.read_history(registry_uri)] == [
        "rejected", "accepted", "skipped", "quarantined", "rejected"]


def test_the_latest_decision_about_a_batch_says_whether_it_is_held_out(tmp_path):
    registry_uri = str(tmp_path / "registry")
    record = lambda **entry: registry.record_decision(registry_uri, entry)  # noqa: E731
    for batch in ("2026-01-04", "2026-01-11", "2026-01-18", "2026-01-25"):
        record(decision="quarantined", batch=batch)
    record(decision="released", batch="2026-01-04", reviewer="ann")
    record(decision="confirmed", batch="2026-01-11", reviewer="bob")
    record(decision="timed_out", batch="2026-01-18", reviewer=None)
    record(decision="accepted", training_key="k", version="v", test_accuracy=0.9, batch="2026-01-25")  # not a batch's
    record(decision="quarantined", batch="2026-02-01")
    record(decision="released", batch="2026-02-01", reviewer="ann")
    record(decision="quarantined", batch="2026-02-01")  # refused again after its release: out again

    assert registry.quarantined_batches(registry_uri) == {"2026-01-11", "2026-01-18", "2026-01-25", "2026-02-01"}
    assert registry.released_batches(registry_uri) == {"2026-01-04"}
    assert registry.quarantined_batches(str(tmp_path / "empty")) == set()


def test_history_lines_written_before_the_decision_kinds_are_read_in_the_current_form(tmp_path):
    registry_uri = str(tmp_path / "registry")
    old = {"at": "2026-01-01T00:00:00+00:00", "reason": "test accuracy 0.9000 >= minimum 0.8500",
           "model_version": "abcd", "test_accuracy": 0.9, "dataset_version": "d1", "run": "/runs/1",
           "previous_version": None, "min_accuracy": 0.85, "max_regression": 0.005}
    lines = [{**old, "decision": "accepted"}, {**old, "decision": "unchanged"}, {**old, "decision": "rejected"}]
    path = Path(registry.history_uri(registry_uri))
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    new = registry.record_decision(registry_uri, {"decision": "skipped", "training_key": "k"})

    history = registry.read_history(registry_uri)
    assert [(h["decision"], h.get("pointer_changed")) for h in history] == [
        ("accepted", None), ("accepted", False), ("rejected", None), ("skipped", None)]
    assert history[0] == {**registry.ENTRY_DEFAULTS, "decision": "accepted", "recorded_at": old["at"],
                          "reasons": [old["reason"]], "version": "abcd", "test_accuracy": 0.9,
                          "dataset_version": "d1", "run_uri": "/runs/1", "previous_version": None,
                          "min_accuracy": 0.85, "max_regression": 0.005}
    assert history[-1] == new
    assert registry.find_decision(registry_uri, "k") is None  # a skip is not a gate decision


def test_a_corrupt_history_line_is_an_error_naming_the_file_and_line(tmp_path):
    registry_uri = str(tmp_path / "registry")
    registry.record_decision(registry_uri, {"decision": "skipped"})
    path = Path(registry.history_uri(registry_uri))
    path.write_text(path.read_text() + "{truncated\n")
    with pytest.raises(registry.RegistryError, match=f"{path}: line 2 is not valid JSON"):
        registry.read_history(registry_uri)


def test_record_decision_inside_a_held_lock_does_not_deadlock(tmp_path):
    registry_uri = str(tmp_path / "registry")
    done = threading.Event()

    def record_while_locked():
        with registry.locked(registry_uri):
            registry.record_decision(registry_uri, {"decision": "skipped"})
        done.set()

    worker = threading.Thread(target=record_while_locked, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "record_decision blocked on the lock its own thread holds"
    assert len(registry.read_history(registry_uri)) == 1


def concurrent_records(registry_uri: str, writers: int) -> list[dict]:
    start = threading.Barrier(writers)

    def record(number: int) -> dict:
        start.wait()
        return registry.record_decision(registry_uri, {"decision": "skipped", "training_key": f"k{number}"})

    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(record, range(writers)))


def test_concurrent_records_on_local_disk_lose_no_line(tmp_path):
    registry_uri = str(tmp_path / "registry")
    stored = concurrent_records(registry_uri, 8)
    history = registry.read_history(registry_uri)
    assert sorted(h["training_key"] for h in history) == sorted(s["training_key"] for s in stored)


def test_concurrent_records_on_s3_lose_no_line(s3_env):
    registry_uri = f"s3://{s3_env}/registry"
    stored = concurrent_records(registry_uri, 6)
    history = registry.read_history(registry_uri)
    assert sorted(h["training_key"] for h in history) == sorted(s["training_key"] for s in stored)
    assert storage.exists(registry.history_uri(registry_uri))


def test_switch_pointer_refuses_a_stale_token_on_s3(s3_env):
    registry_uri = f"s3://{s3_env}/registry"
    pointer, token = registry.read_pointer_versioned(registry_uri)
    assert (pointer, token) == (None, None)
    first = {"version": "v1", "test_accuracy": 0.9}
    assert registry.switch_pointer(registry_uri, first, token)
    assert not registry.switch_pointer(registry_uri, {"version": "v2", "test_accuracy": 0.95}, token)
    current, token = registry.read_pointer_versioned(registry_uri)
    assert current == first
    assert registry.switch_pointer(registry_uri, {"version": "v3", "test_accuracy": 0.95}, token)
    assert registry.read_pointer(registry_uri)["version"] == "v3"
