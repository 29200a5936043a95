"""Tests of the publish stage: quality gate, registry layout, idempotence, concurrency, S3."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from admm_jobs import model as model_io
from admm_jobs import publish, storage
from run_artifacts import make_evaluated_run

REPO_ROOT = Path(__file__).resolve().parents[1]
POINTER_KEYS = {"version", "test_accuracy", "dataset_version", "published_at", "run"}


def entry(registry: str) -> str:
    return storage.join(registry, publish.DEFAULT_MODEL_NAME)


def read_history(registry: str) -> list[dict]:
    uri = storage.join(entry(registry), publish.HISTORY_FILE)
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]


def version_names(registry: str) -> set[str]:
    """The version directories that hold a committed manifest."""
    root = entry(registry)
    return {
        uri[len(root) :].strip("/").split("/")[0]
        for uri in storage.list_files(root)
        if uri.endswith("/" + publish.VERSION_MANIFEST_FILE)
    }


def test_first_model_is_published_with_a_complete_version(tmp_path):
    registry = str(tmp_path / "registry")
    run = str(tmp_path / "run-a")
    version = make_evaluated_run(run, seed=1, test_accuracy=0.9)

    result = publish.publish_run(run, registry)

    assert result["published"] and result["decision"] == "accepted"
    assert result["model_version"] == version
    pointer = storage.read_json(publish.pointer_uri(registry))
    assert set(pointer) == POINTER_KEYS
    assert pointer["version"] == version and pointer["test_accuracy"] == 0.9 and pointer["run"] == run
    assert result["current"] == pointer

    version_dir = tmp_path / "registry" / "mnist-admm" / version
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == [
        "evaluation/metrics.json",
        "evaluation/report.html",
        "metrics.jsonl",
        "model/model.json",
        "model/model.npz",
        "model/model.onnx",
    ]
    for file in manifest["files"]:
        assert hashlib.sha256((version_dir / file["path"]).read_bytes()).hexdigest() == file["sha256"]
    assert model_io.load_model(result["model_uri"]).metadata["weights_sha256"].startswith(version)
    assert [h["decision"] for h in read_history(registry)] == ["accepted"]


@pytest.mark.parametrize(
    ("accuracy", "outcome"),
    [(0.93, "accepted"), (0.896, "accepted"), (0.895, "accepted"), (0.8949, "rejected"), (0.5, "rejected")],
)
def test_gate_against_the_published_model(tmp_path, accuracy, outcome):
    registry = str(tmp_path / "registry")
    first = make_evaluated_run(str(tmp_path / "run-a"), seed=1, test_accuracy=0.9)
    publish.publish_run(str(tmp_path / "run-a"), registry, min_accuracy=0.85, max_regression=0.005)
    pointer_before = Path(publish.pointer_uri(registry)).read_bytes()

    second = make_evaluated_run(str(tmp_path / "run-b"), seed=2, test_accuracy=accuracy)
    result = publish.publish_run(str(tmp_path / "run-b"), registry, min_accuracy=0.85, max_regression=0.005)

    assert result["decision"] == outcome
    history = read_history(registry)
    assert [h["model_version"] for h in history] == [first, second]
    assert history[1]["decision"] == outcome and history[1]["previous_version"] == first
    assert history[1]["reason"] == result["reason"]
    if outcome == "accepted":
        assert storage.read_json(publish.pointer_uri(registry))["version"] == second
        assert version_names(registry) == {first, second}
    else:
        assert not result["published"] and result["model_uri"] is None
        assert Path(publish.pointer_uri(registry)).read_bytes() == pointer_before
        assert version_names(registry) == {first}
        assert not (tmp_path / "registry" / "mnist-admm" / second).exists()
        expected = "below the minimum 0.8500" if accuracy < 0.85 else f"below the published version {first}"
        assert expected in result["reason"]


def test_model_below_the_floor_is_rejected_with_an_empty_registry(tmp_path, caplog):
    registry = str(tmp_path / "registry")
    make_evaluated_run(str(tmp_path / "run"), seed=1, test_accuracy=0.8)

    result = publish.publish_run(str(tmp_path / "run"), registry, min_accuracy=0.85)

    assert result == {**result, "published": False, "decision": "rejected", "current": None}
    assert "test accuracy 0.8000 is below the minimum 0.8500" == result["reason"]
    assert not storage.exists(publish.pointer_uri(registry))
    assert version_names(registry) == set()
    assert read_history(registry)[0]["reason"] == result["reason"]
    assert any(
        "REJECTED" in record.message and result["reason"] in record.message for record in caplog.records
    )


def test_republishing_the_same_run_is_idempotent(tmp_path):
    registry = str(tmp_path / "registry")
    run = str(tmp_path / "run")
    version = make_evaluated_run(run, seed=1, test_accuracy=0.9)
    first = publish.publish_run(run, registry)
    pointer_before = Path(publish.pointer_uri(registry)).read_bytes()
    files_before = storage.list_files(entry(registry))

    again = publish.publish_run(run, registry)

    assert again["published"] and again["decision"] == "unchanged"
    assert again["model_version"] == first["model_version"] == version
    assert Path(publish.pointer_uri(registry)).read_bytes() == pointer_before
    assert storage.list_files(entry(registry)) == files_before  # no second copy, only the history grew
    assert [h["decision"] for h in read_history(registry)] == ["accepted", "unchanged"]


def test_an_older_version_can_be_published_again_without_copying_it(tmp_path):
    registry = str(tmp_path / "registry")
    old = make_evaluated_run(str(tmp_path / "old"), seed=1, test_accuracy=0.9)
    new = make_evaluated_run(str(tmp_path / "new"), seed=2, test_accuracy=0.9)
    publish.publish_run(str(tmp_path / "old"), registry)
    manifest = Path(registry, "mnist-admm", old, "manifest.json")
    written = manifest.stat().st_mtime_ns
    publish.publish_run(str(tmp_path / "new"), registry)

    result = publish.publish_run(str(tmp_path / "old"), registry)

    assert result["decision"] == "accepted"
    assert storage.read_json(publish.pointer_uri(registry))["version"] == old
    assert manifest.stat().st_mtime_ns == written
    assert version_names(registry) == {old, new}


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"test_accuracy": "high"}', "no valid 'test_accuracy'")],
)
def test_corrupt_evaluation_is_an_error_naming_the_file(tmp_path, content, message):
    registry = str(tmp_path / "registry")
    run = tmp_path / "run"
    make_evaluated_run(str(run), seed=1, test_accuracy=0.9)
    metrics = run / "evaluation" / "metrics.json"
    metrics.write_text(content)

    with pytest.raises(
        (storage.StorageError, publish.PublishError), match=re.escape(str(metrics)) + ".*" + message
    ):
        publish.publish_run(str(run), registry)
    assert not (tmp_path / "registry").exists()


def test_evaluation_of_another_model_is_an_error(tmp_path):
    run = tmp_path / "run"
    make_evaluated_run(str(run), seed=1, test_accuracy=0.9)
    make_evaluated_run(str(tmp_path / "other"), seed=2, test_accuracy=0.9)
    (run / "evaluation" / "metrics.json").write_bytes(
        (tmp_path / "other" / "evaluation" / "metrics.json").read_bytes()
    )
    with pytest.raises(publish.PublishError, match="evaluates model weights"):
        publish.publish_run(str(run), str(tmp_path / "registry"))


def test_missing_model_and_corrupt_pointer_are_errors(tmp_path):
    registry = str(tmp_path / "registry")
    run = tmp_path / "run"
    make_evaluated_run(str(run), seed=1, test_accuracy=0.9)
    Path(publish.pointer_uri(registry)).parent.mkdir(parents=True)
    Path(publish.pointer_uri(registry)).write_text("[]")
    with pytest.raises(publish.PublishError, match=re.escape(publish.pointer_uri(registry))):
        publish.publish_run(str(run), registry)

    (run / "model" / "model.npz").unlink()
    with pytest.raises(model_io.ModelError, match="model.npz"):
        publish.publish_run(str(run), registry)


def assert_serialised(history: list[dict], pointer: dict, accuracies: dict[str, float]) -> None:
    """Every decision saw the pointer left by the decision before it, and accepted ones only ever improved."""
    current = None
    for line in history:
        assert line["previous_version"] == current
        if line["decision"] == "accepted":
            assert current is None or accuracies[line["model_version"]] >= accuracies[current]
            current = line["model_version"]
    assert pointer["version"] == current
    assert pointer["test_accuracy"] == accuracies[current]


def test_concurrent_publishes_in_threads_leave_a_consistent_pointer(tmp_path):
    registry = str(tmp_path / "registry")
    accuracies = [0.90 + 0.005 * i for i in range(8)]
    random.Random(0).shuffle(accuracies)
    runs = {}
    for seed, accuracy in enumerate(accuracies):
        runs[make_evaluated_run(str(tmp_path / f"run-{seed}"), seed=seed, test_accuracy=accuracy)] = accuracy
    start = threading.Barrier(len(runs))

    def publish_after_barrier(seed: int) -> dict:
        start.wait()
        return publish.publish_run(str(tmp_path / f"run-{seed}"), registry, max_regression=0.0)

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(publish_after_barrier, range(len(runs))))

    best = max(runs, key=runs.get)
    pointer = storage.read_json(publish.pointer_uri(registry))
    assert pointer["version"] == best  # the best model is never rejected with max_regression=0
    history = read_history(registry)
    assert len(history) == len(runs)
    assert_serialised(history, pointer, runs)
    accepted = {r["model_version"] for r in results if r["decision"] == "accepted"}
    assert version_names(registry) == accepted


def test_concurrent_publish_processes(tmp_path):
    registry = str(tmp_path / "registry")
    accuracies = {}
    for seed, accuracy in enumerate([0.91, 0.95, 0.80, 0.93]):
        accuracies[make_evaluated_run(str(tmp_path / f"run-{seed}"), seed=seed, test_accuracy=accuracy)] = (
            accuracy
        )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "admm_jobs.publish",
                "--run-uri",
                str(tmp_path / f"run-{seed}"),
                "--registry-uri",
                registry,
                "--min-accuracy",
                "0.85",
                "--max-regression",
                "0",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(len(accuracies))
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0] * len(processes)  # rejections exit 0 too
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert {"published", "reason", "model_version", "model_uri", "current"} <= set(results[0])
    assert results[2]["published"] is False and "below the minimum" in results[2]["reason"]
    assert "REJECTED" in outputs[2][1]
    pointer = storage.read_json(publish.pointer_uri(registry))
    assert accuracies[pointer["version"]] == 0.95
    assert_serialised(read_history(registry), pointer, accuracies)


def test_publish_to_s3(s3_env, tmp_path):
    registry = f"s3://{s3_env}/registry"
    good = make_evaluated_run(str(tmp_path / "good"), seed=1, test_accuracy=0.9)
    worse = make_evaluated_run(str(tmp_path / "worse"), seed=2, test_accuracy=0.88)

    accepted = publish.publish_run(str(tmp_path / "good"), registry)
    rejected = publish.publish_run(str(tmp_path / "worse"), registry)
    again = publish.publish_run(str(tmp_path / "good"), registry)

    assert [accepted["decision"], rejected["decision"], again["decision"]] == [
        "accepted",
        "rejected",
        "unchanged",
    ]
    pointer = storage.read_json(publish.pointer_uri(registry))
    assert pointer["version"] == good and set(pointer) == POINTER_KEYS
    assert version_names(registry) == {good}
    assert worse not in "".join(storage.list_files(entry(registry)))
    assert model_io.load_model(accepted["model_uri"]).metadata["weights_sha256"].startswith(good)
    assert [h["decision"] for h in read_history(registry)] == ["accepted", "rejected", "unchanged"]


def test_s3_conditional_write_refuses_stale_tokens(s3_env):
    uri = f"s3://{s3_env}/registry/object.json"
    assert publish.read_versioned(uri) == (None, None)
    assert publish.write_if_unchanged(uri, b"one", None)
    assert not publish.write_if_unchanged(uri, b"two", None)  # it exists now
    content, token = publish.read_versioned(uri)
    assert content == b"one"
    assert publish.write_if_unchanged(uri, b"three", token)
    assert not publish.write_if_unchanged(uri, b"four", token)  # token is stale
    assert storage.read_bytes(uri) == b"three"


def test_s3_pointer_race_reruns_the_gate(s3_env, tmp_path, monkeypatch):
    registry = f"s3://{s3_env}/registry"
    slow = make_evaluated_run(str(tmp_path / "slow"), seed=1, test_accuracy=0.90)
    fast = make_evaluated_run(str(tmp_path / "fast"), seed=2, test_accuracy=0.95)
    real_gate = publish.quality_gate
    seen = []

    def gate_while_another_publisher_wins(candidate, current, *args):
        seen.append((candidate.version, current and current["version"]))
        if len(seen) == 1:  # another publisher switches the pointer after this one read it
            publish.publish_run(str(tmp_path / "fast"), registry)
        return real_gate(candidate, current, *args)

    monkeypatch.setattr(publish, "quality_gate", gate_while_another_publisher_wins)
    result = publish.publish_run(str(tmp_path / "slow"), registry)

    assert seen == [(slow, None), (fast, None), (slow, fast)]
    assert result["decision"] == "rejected" and f"published version {fast}" in result["reason"]
    assert storage.read_json(publish.pointer_uri(registry))["version"] == fast
    assert [(h["model_version"], h["decision"]) for h in read_history(registry)] == [
        (fast, "accepted"),
        (slow, "rejected"),
    ]
    assert version_names(registry) == {fast}
    assert slow not in "".join(
        storage.list_files(entry(registry))
    )  # the copy made before losing the race is gone
