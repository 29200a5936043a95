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

import numpy as np
import pytest
from scipy import special

from admm_jobs import publish
from admm_jobs.lake import storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.scoring import label_checks, metrics

from run_artifacts import make_evaluated_run

REPO_ROOT = Path(__file__).resolve().parents[1]
POINTER_KEYS = {"version", "test_accuracy", "dataset_version", "published_at", "run"}


def entry(registry_uri: str) -> str:
    return storage.join(registry_uri, registry.DEFAULT_MODEL_NAME)


def read_history(registry_uri: str) -> list[dict]:
    return registry.read_history(registry_uri)


def version_names(registry_uri: str) -> set[str]:
    """The version directories that hold a committed manifest."""
    root = entry(registry_uri)
    return {
        uri[len(root) :].strip("/").split("/")[0]
        for uri in storage.list_files(root)
        if uri.endswith("/" + registry.VERSION_MANIFEST_FILE)
    }


def test_first_model_is_published_with_a_complete_version(tmp_path):
    registry_uri = str(tmp_path / "registry")
    run = str(tmp_path / "run-a")
    version = make_evaluated_run(run, seed=1, test_accuracy=0.9)

    result = publish.publish_run(run, registry_uri)

    assert result["published"] and result["decision"] == "accepted"
    assert result["model_version"] == version
    pointer = storage.read_json(registry.pointer_uri(registry_uri))
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
    assert [h["decision"] for h in read_history(registry_uri)] == ["accepted"]


@pytest.mark.parametrize(
    ("accuracy", "outcome"),
    [(0.93, "accepted"), (0.896, "accepted"), (0.895, "accepted"), (0.8949, "rejected"), (0.5, "rejected")],
)
def test_gate_against_the_published_model(tmp_path, accuracy, outcome):
    registry_uri = str(tmp_path / "registry")
    first = make_evaluated_run(str(tmp_path / "run-a"), seed=1, test_accuracy=0.9)
    publish.publish_run(str(tmp_path / "run-a"), registry_uri, min_accuracy=0.85, max_regression=0.005)
    pointer_before = Path(registry.pointer_uri(registry_uri)).read_bytes()

    second = make_evaluated_run(str(tmp_path / "run-b"), seed=2, test_accuracy=accuracy)
    result = publish.publish_run(str(tmp_path / "run-b"), registry_uri, min_accuracy=0.85, max_regression=0.005)

    assert result["decision"] == outcome
    history = read_history(registry_uri)
    assert [h["version"] for h in history] == [first, second]
    assert history[1]["decision"] == outcome and history[1]["previous_version"] == first
    assert history[1]["reasons"] == result["reasons"] and result["reason"] == "; ".join(result["reasons"])
    assert history[1]["champion"] == {"version": first, "test_accuracy": 0.9, "batch_accuracy": None,
                                      "class_recalls": None}
    if outcome == "accepted":
        assert storage.read_json(registry.pointer_uri(registry_uri))["version"] == second
        assert version_names(registry_uri) == {first, second}
    else:
        assert not result["published"] and result["model_uri"] is None
        assert Path(registry.pointer_uri(registry_uri)).read_bytes() == pointer_before
        assert version_names(registry_uri) == {first}
        assert not (tmp_path / "registry" / "mnist-admm" / second).exists()
        expected = (
            "below the minimum 0.8500"
            if accuracy < 0.85
            else f"published version {first} ({accuracy - 0.9:+.4f}; more than the allowed drop of 0.0050)"
        )
        assert expected in result["reasons"][0]


def test_model_below_the_floor_is_rejected_with_an_empty_registry(tmp_path, caplog):
    registry_uri = str(tmp_path / "registry")
    make_evaluated_run(str(tmp_path / "run"), seed=1, test_accuracy=0.8)

    result = publish.publish_run(str(tmp_path / "run"), registry_uri, min_accuracy=0.85)

    assert result == {**result, "published": False, "decision": "rejected", "current": None}
    assert result["reasons"] == ["test accuracy 0.8000 is below the minimum 0.8500", "no published model to compare with"]
    assert not storage.exists(registry.pointer_uri(registry_uri))
    assert version_names(registry_uri) == set()
    assert read_history(registry_uri)[0]["reasons"] == result["reasons"]
    assert any(
        "REJECTED" in record.message and result["reason"] in record.message for record in caplog.records
    )


def test_republishing_the_same_run_is_idempotent(tmp_path):
    registry_uri = str(tmp_path / "registry")
    run = str(tmp_path / "run")
    version = make_evaluated_run(run, seed=1, test_accuracy=0.9)
    first = publish.publish_run(run, registry_uri)
    pointer_before = Path(registry.pointer_uri(registry_uri)).read_bytes()
    files_before = storage.list_files(entry(registry_uri))

    again = publish.publish_run(run, registry_uri)

    assert again["published"] and again["decision"] == "unchanged"
    assert again["model_version"] == first["model_version"] == version
    assert Path(registry.pointer_uri(registry_uri)).read_bytes() == pointer_before
    assert storage.list_files(entry(registry_uri)) == files_before  # no second copy, only the history grew
    # Already the published model: accepted again, the pointer left as it was.
    history = read_history(registry_uri)
    assert [(h["decision"], h["pointer_changed"]) for h in history] == [("accepted", True), ("accepted", False)]


def test_an_older_version_can_be_published_again_without_copying_it(tmp_path):
    registry_uri = str(tmp_path / "registry")
    old = make_evaluated_run(str(tmp_path / "old"), seed=1, test_accuracy=0.9)
    new = make_evaluated_run(str(tmp_path / "new"), seed=2, test_accuracy=0.9)
    publish.publish_run(str(tmp_path / "old"), registry_uri)
    manifest = Path(registry_uri, "mnist-admm", old, "manifest.json")
    written = manifest.stat().st_mtime_ns
    publish.publish_run(str(tmp_path / "new"), registry_uri)

    result = publish.publish_run(str(tmp_path / "old"), registry_uri)

    assert result["decision"] == "accepted"
    assert storage.read_json(registry.pointer_uri(registry_uri))["version"] == old
    assert manifest.stat().st_mtime_ns == written
    assert version_names(registry_uri) == {old, new}


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"test_accuracy": "high"}', "no valid 'test_accuracy'")],
)
def test_corrupt_evaluation_is_an_error_naming_the_file(tmp_path, content, message):
    registry_uri = str(tmp_path / "registry")
    run = tmp_path / "run"
    make_evaluated_run(str(run), seed=1, test_accuracy=0.9)
    metrics = run / "evaluation" / "metrics.json"
    metrics.write_text(content)

    with pytest.raises(
        (storage.StorageError, publish.PublishError), match=re.escape(str(metrics)) + ".*" + message
    ):
        publish.publish_run(str(run), registry_uri)
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
    registry_uri = str(tmp_path / "registry")
    run = tmp_path / "run"
    make_evaluated_run(str(run), seed=1, test_accuracy=0.9)
    Path(registry.pointer_uri(registry_uri)).parent.mkdir(parents=True)
    Path(registry.pointer_uri(registry_uri)).write_text("[]")
    with pytest.raises(registry.RegistryError, match=re.escape(registry.pointer_uri(registry_uri))):
        publish.publish_run(str(run), registry_uri)

    (run / "model" / "model.npz").unlink()
    with pytest.raises(model_io.ModelError, match="model.npz"):
        publish.publish_run(str(run), registry_uri)


def assert_serialised(history: list[dict], pointer: dict, accuracies: dict[str, float]) -> None:
    """Every decision saw the pointer left by the decision before it, and accepted ones only ever improved."""
    current = None
    for line in history:
        assert line["previous_version"] == current
        if line["decision"] == "accepted":
            assert current is None or accuracies[line["version"]] >= accuracies[current]
            current = line["version"]
    assert pointer["version"] == current
    assert pointer["test_accuracy"] == accuracies[current]


def test_concurrent_publishes_in_threads_leave_a_consistent_pointer(tmp_path):
    registry_uri = str(tmp_path / "registry")
    accuracies = [0.90 + 0.005 * i for i in range(8)]
    random.Random(0).shuffle(accuracies)
    runs = {}
    for seed, accuracy in enumerate(accuracies):
        runs[make_evaluated_run(str(tmp_path / f"run-{seed}"), seed=seed, test_accuracy=accuracy)] = accuracy
    start = threading.Barrier(len(runs))

    def publish_after_barrier(seed: int) -> dict:
        start.wait()
        return publish.publish_run(str(tmp_path / f"run-{seed}"), registry_uri, max_regression=0.0)

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(publish_after_barrier, range(len(runs))))

    best = max(runs, key=runs.get)
    pointer = storage.read_json(registry.pointer_uri(registry_uri))
    assert pointer["version"] == best  # the best model is never rejected with max_regression=0
    history = read_history(registry_uri)
    assert len(history) == len(runs)
    assert_serialised(history, pointer, runs)
    accepted = {r["model_version"] for r in results if r["decision"] == "accepted"}
    assert version_names(registry_uri) == accepted


def test_concurrent_publish_processes(tmp_path):
    registry_uri = str(tmp_path / "registry")
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
                registry_uri,
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
    pointer = storage.read_json(registry.pointer_uri(registry_uri))
    assert accuracies[pointer["version"]] == 0.95
    assert_serialised(read_history(registry_uri), pointer, accuracies)


def test_publish_to_s3(s3_env, tmp_path):
    registry_uri = f"s3://{s3_env}/registry"
    good = make_evaluated_run(str(tmp_path / "good"), seed=1, test_accuracy=0.9)
    worse = make_evaluated_run(str(tmp_path / "worse"), seed=2, test_accuracy=0.88)

    accepted = publish.publish_run(str(tmp_path / "good"), registry_uri)
    rejected = publish.publish_run(str(tmp_path / "worse"), registry_uri)
    again = publish.publish_run(str(tmp_path / "good"), registry_uri)

    assert [accepted["decision"], rejected["decision"], again["decision"]] == [
        "accepted",
        "rejected",
        "unchanged",
    ]
    pointer = storage.read_json(registry.pointer_uri(registry_uri))
    assert pointer["version"] == good and set(pointer) == POINTER_KEYS
    assert version_names(registry_uri) == {good}
    assert worse not in "".join(storage.list_files(entry(registry_uri)))
    assert model_io.load_model(accepted["model_uri"]).metadata["weights_sha256"].startswith(good)
    assert [(h["decision"], h["pointer_changed"]) for h in read_history(registry_uri)] == [
        ("accepted", True),
        ("rejected", False),
        ("accepted", False),
    ]


def test_s3_conditional_write_refuses_stale_tokens(s3_env):
    uri = f"s3://{s3_env}/registry/object.json"
    assert registry.read_versioned(uri) == (None, None)
    assert registry.write_if_unchanged(uri, b"one", None)
    assert not registry.write_if_unchanged(uri, b"two", None)  # it exists now
    content, token = registry.read_versioned(uri)
    assert content == b"one"
    assert registry.write_if_unchanged(uri, b"three", token)
    assert not registry.write_if_unchanged(uri, b"four", token)  # token is stale
    assert storage.read_bytes(uri) == b"three"


def test_s3_pointer_race_reruns_the_gate(s3_env, tmp_path, monkeypatch):
    registry_uri = f"s3://{s3_env}/registry"
    slow = make_evaluated_run(str(tmp_path / "slow"), seed=1, test_accuracy=0.90)
    fast = make_evaluated_run(str(tmp_path / "fast"), seed=2, test_accuracy=0.95)
    real_gate = publish.quality_gate
    seen = []

    def gate_while_another_publisher_wins(candidate, current, *args):
        seen.append((candidate.version, current and current["version"]))
        if len(seen) == 1:  # another publisher switches the pointer after this one read it
            publish.publish_run(str(tmp_path / "fast"), registry_uri)
        return real_gate(candidate, current, *args)

    monkeypatch.setattr(publish, "quality_gate", gate_while_another_publisher_wins)
    result = publish.publish_run(str(tmp_path / "slow"), registry_uri)

    assert seen == [(slow, None), (fast, None), (slow, fast)]
    assert result["decision"] == "rejected" and f"published version {fast}" in result["reasons"][0]
    assert storage.read_json(registry.pointer_uri(registry_uri))["version"] == fast
    assert [(h["version"], h["decision"]) for h in read_history(registry_uri)] == [
        (fast, "accepted"),
        (slow, "rejected"),
    ]
    assert version_names(registry_uri) == {fast}
    assert slow not in "".join(
        storage.list_files(entry(registry_uri))
    )  # the copy made before losing the race is gone


def gate(candidate_scores: publish.Scores, champion: publish.Scores | None, **settings) -> publish.Decision:
    candidate = publish.Candidate(
        run_uri="run", version="new", scores=candidate_scores, dataset_uri=None, dataset_version=None,
        batches=["2026-01-05"], newest_batch="2026-01-05", evaluation={},
    )
    current = None if champion is None else {"version": "old", "test_accuracy": champion.test_accuracy}
    return publish.quality_gate(candidate, current, champion, publish.GateSettings(**settings))


def test_gate_decides_on_the_test_set_and_the_newest_batch():
    champion = publish.Scores(test_accuracy=0.94, batch_accuracy=0.85)
    worse_on_batch = gate(publish.Scores(0.95, 0.80), champion)
    assert worse_on_batch.outcome == "rejected"
    assert worse_on_batch.reasons[0] == (
        "accuracy on the newest batch 2026-01-05 0.8000 vs 0.8500 for the published version old "
        "(-0.0500; more than the allowed drop of 0.0000)"
    )
    assert gate(publish.Scores(0.95, 0.80), champion, max_batch_regression=0.05).outcome == "accepted"
    assert gate(publish.Scores(0.9375, 0.90), champion, max_regression=0.002).outcome == "rejected"
    assert gate(publish.Scores(0.9380, 0.90), champion, max_regression=0.002).outcome == "accepted"
    # No champion: the floor alone decides; no batch scored: only the test-set checks apply.
    assert gate(publish.Scores(0.86, 0.10), None, min_accuracy=0.85).outcome == "accepted"
    assert gate(publish.Scores(0.84, 0.99), None, min_accuracy=0.85).outcome == "rejected"
    no_batch = gate(publish.Scores(0.95), champion)
    assert no_batch.outcome == "accepted" and "the batch check does not apply" in no_batch.reasons[2]
    assert "the per-class check does not apply" in no_batch.reasons[3]


def test_gate_rejects_a_class_whose_test_recall_falls_beyond_the_limit_and_names_it():
    allowed = publish.GateSettings.max_class_regression
    recalls = [0.99, 0.98, 0.97, 0.96, 0.95, 0.96, 0.97, 0.98, 0.99, 0.97]
    champion = publish.Scores(0.97, None, recalls)
    within = [recall - allowed if k == 4 else recall for k, recall in enumerate(recalls)]  # exactly the limit
    passed = gate(publish.Scores(0.97, None, within), champion)
    assert passed.outcome == "accepted" and passed.failed_classes == []
    assert (f"no class's test recall is more than {allowed:.4f} below the published version "
            f"old's (largest change: class 4, {-allowed:+.4f})") in passed.reasons

    # Overall accuracy unchanged: class 4 loses 0.0001 more than allowed while class 7 gains.
    beyond = [recall - allowed - 1e-4 if k == 4 else recall + 0.01 if k == 7 else recall
              for k, recall in enumerate(recalls)]
    rejected = gate(publish.Scores(0.97, None, beyond), champion)
    assert rejected.outcome == "rejected"
    assert rejected.reasons[0] == (
        f"recall of class 4 on the test set {beyond[4]:.4f} vs 0.9500 for the published version old "
        f"({-allowed - 1e-4:+.4f}; more than the allowed drop of {allowed:.4f})"
    )
    assert rejected.failed_classes == [{"class": 4, "recall": beyond[4], "champion_recall": 0.95, "allowed": allowed}]
    assert gate(publish.Scores(0.97, None, beyond), champion, max_class_regression=allowed + 2e-4).outcome == (
        "accepted")


def evaluated_constant_run(run: Path, dataset_uri: str, predicted_class: int, seed: int, registry_uri=None) -> dict:
    from admm_jobs import evaluate

    from run_artifacts import make_trained_run

    make_trained_run(str(run), seed=seed, constant_class=predicted_class)
    return evaluate.evaluate_run(str(run / "model"), dataset_uri, str(run / "metrics.jsonl"),
                                 str(run / "evaluation"), registry_uri=registry_uri)


def test_decision_records_champion_scores_dataset_batches_and_training_key(small_dataset, tmp_path):
    from admm_jobs.lake import dataset

    dataset_uri, registry_uri = small_dataset["dataset_uri"], str(tmp_path / "registry")
    evaluated_constant_run(tmp_path / "a", dataset_uri, predicted_class=7, seed=1)
    first = publish.main(["--run-uri", str(tmp_path / "a"), "--registry-uri", registry_uri, "--min-accuracy", "0",
                          "--training-key", "key-a", "--logical-date", "2026-01-05"])
    evaluation = evaluated_constant_run(tmp_path / "b", dataset_uri, predicted_class=1, seed=2,
                                        registry_uri=registry_uri)
    assert evaluation["champion"]["version"] == first["model_version"]

    result = publish.publish_run(str(tmp_path / "b"), registry_uri, min_accuracy=0.0, max_regression=1.0,
                                 max_batch_regression=1.0, max_class_regression=1.0, training_key="key-b",
                                 logical_date="2026-01-12")

    entry = registry.find_decision(registry_uri, "key-b")
    assert entry == result["history_entry"] == registry.read_history(registry_uri)[-1]
    manifest = dataset.load_manifest(dataset_uri)
    assert entry["decision"] == "accepted" and entry["logical_date"] == "2026-01-12"
    assert entry["batches"] == [batch["id"] for batch in manifest["batches"]]
    assert entry["dataset_version"] == manifest["version"] and entry["newest_batch"] == manifest["batches"][-1]["id"]
    assert entry["test_accuracy"] == evaluation["test_accuracy"]
    assert entry["batch_accuracy"] == evaluation["newest_batch"]["accuracy"]
    assert entry["champion"] == {
        "version": first["model_version"],
        "test_accuracy": evaluation["champion"]["test"]["accuracy"],
        "batch_accuracy": evaluation["champion"]["newest_batch"]["accuracy"],
        "class_recalls": [7 == k for k in range(10)],  # the champion always says 7
    }
    assert entry["failed_classes"] == []
    assert entry["report_uri"] == registry.version_report_uri(registry_uri, result["model_version"])
    assert entry["gate"] == {"min_accuracy": 0.0, "max_regression": 1.0, "max_batch_regression": 1.0,
                             "max_class_regression": 1.0,
                             "challenger_false_alarm_rate": publish.GateSettings.challenger_false_alarm_rate}
    assert registry.find_decision(registry_uri, "key-a")["version"] == first["model_version"]


def test_a_champion_published_after_the_evaluation_is_scored_by_publish(small_dataset, tmp_path):

    dataset_uri, registry_uri = small_dataset["dataset_uri"], str(tmp_path / "registry")
    evaluated_constant_run(tmp_path / "a", dataset_uri, predicted_class=7, seed=1)
    publish.publish_run(str(tmp_path / "a"), registry_uri, min_accuracy=0.0)
    evaluation = evaluated_constant_run(tmp_path / "b", dataset_uri, predicted_class=1, seed=2,
                                        registry_uri=registry_uri)
    # Another model is published between b's evaluation and b's publish.
    evaluated_constant_run(tmp_path / "c", dataset_uri, predicted_class=3, seed=3)
    newer = publish.publish_run(str(tmp_path / "c"), registry_uri, min_accuracy=0.0, max_regression=1.0,
                                max_batch_regression=1.0, max_class_regression=1.0)
    assert newer["decision"] == "accepted" and evaluation["champion"]["version"] != newer["model_version"]

    result = publish.publish_run(str(tmp_path / "b"), registry_uri, min_accuracy=0.0, max_regression=1.0,
                                 max_batch_regression=1.0, max_class_regression=1.0)

    rescored = metrics.score_champion(newer["model_uri"], dataset_uri, str(tmp_path / "b" / "model"))
    # and the challenger check against c: b (always 1) adopts every class-1 label of the batch, c never says 1
    check = rescored["challenger_check"]
    assert [entry["adopted"] for entry in check] == [entry["batch_images"] * (k == 1) for k, entry in enumerate(check)]
    assert check[1]["adopted"] > 0 and check[1]["p_value"] == 1.0  # c errs on every test 1 as well: no evidence
    assert result["history_entry"]["champion"] == {
        "version": newer["model_version"],
        "test_accuracy": rescored["test"]["accuracy"],
        "batch_accuracy": rescored["newest_batch"]["accuracy"],
        "class_recalls": [3 == k for k in range(10)],  # c always says 3
    }
    assert rescored["test"]["accuracy"] != evaluation["champion"]["test"]["accuracy"]  # c is not a


def evaluated_run_of(model: model_io.Model, run: Path, dataset_uri: str, registry_uri: str) -> dict:
    from admm_jobs import evaluate

    from run_artifacts import write_epoch_metrics

    model_io.save_model(model, str(run / "model"))
    write_epoch_metrics(str(run / "metrics.jsonl"))
    return evaluate.evaluate_run(str(run / "model"), dataset_uri, str(run / "metrics.jsonl"),
                                 str(run / "evaluation"), registry_uri=registry_uri)


def test_default_gate_takes_a_model_fitted_on_more_data_and_stops_a_degraded_one(small_dataset, tmp_path):
    """Real digit classifiers (random features + ridge read-out, about 80 %) through evaluate and publish
    with the default regression limits (the floor is lowered to suit these small models)."""
    from fitted_model import fitted_model

    dataset_uri, registry_uri = small_dataset["dataset_uri"], str(tmp_path / "registry")
    small, large = fitted_model(rows=300), fitted_model(rows=2000)
    evaluated_run_of(small, tmp_path / "small", dataset_uri, registry_uri)
    assert publish.publish_run(str(tmp_path / "small"), registry_uri, min_accuracy=0.5)["decision"] == "accepted"

    better = evaluated_run_of(large, tmp_path / "large", dataset_uri, registry_uri)
    assert better["comparison"]["test"]["accuracy"] > 0 and better["comparison"]["newest_batch"]["accuracy"] > 0
    assert publish.publish_run(str(tmp_path / "large"), registry_uri, min_accuracy=0.5)["decision"] == "accepted"

    # The same network that has forgotten one digit: its read-out never picks class 3.
    forgetful = model_io.Model([w.copy() for w in large.weights], [b.copy() for b in large.biases])
    forgetful.biases[-1][3] = -1e4
    worse = evaluated_run_of(forgetful, tmp_path / "forgetful", dataset_uri, registry_uri)
    assert worse["champion"]["version"] == registry.read_pointer(registry_uri)["version"]
    per_class = {entry["class"]: entry for entry in worse["comparison"]["test"]["per_class"]}
    assert per_class[3]["recall"] < 0 and worse["comparison"]["test"]["accuracy"] < -publish.GateSettings.max_regression
    result = publish.publish_run(str(tmp_path / "forgetful"), registry_uri, min_accuracy=0.5)
    assert result["decision"] == "rejected"
    assert "more than the allowed drop of 0.0020" in result["reasons"][0]
    assert "newest batch" in result["reasons"][1] and "more than the allowed drop of 0.0000" in result["reasons"][1]
    champion_recall = better["per_class"][3]["recall"]
    assert result["reasons"][2] == (
        f"recall of class 3 on the test set 0.0000 vs {champion_recall:.4f} for the published version "
        f"{worse['champion']['version']} ({-champion_recall:+.4f}; more than the allowed drop of "
        f"{publish.GateSettings.max_class_regression:.4f})"
    )
    assert result["failed_classes"] == result["history_entry"]["failed_classes"] == [
        {"class": 3, "recall": 0.0, "champion_recall": champion_recall,
         "allowed": publish.GateSettings.max_class_regression}]
    # The run's report, which the history links, now shows the decision and the class that failed.
    page = Path(result["report_uri"]).read_text()
    assert "<h2>Quality gate</h2>" in page and '<strong class="bad">rejected</strong>' in page
    assert (f'<tr><td class="key">3</td><td>0.0000</td><td>{champion_recall:.4f}</td>'
            f'<td>{-champion_recall:+.4f}</td>') in page
    accepted_page = Path(registry.version_report_uri(registry_uri, registry.read_pointer(registry_uri)["version"]))
    assert '<strong class="good">accepted</strong>' in accepted_page.read_text()
    assert registry.read_pointer(registry_uri)["version"] == registry.model_version(
        model_io.load_model(str(tmp_path / "large" / "model")).metadata["weights_sha256"])


def test_a_published_version_keeps_its_validation_confusion_as_the_reference(small_dataset, tmp_path):
    from admm_jobs import evaluate
    from admm_jobs.lake import dataset

    from run_artifacts import make_trained_run

    dataset_uri, registry_uri, run = small_dataset["dataset_uri"], str(tmp_path / "registry"), tmp_path / "run"
    model = make_trained_run(str(run), seed=3)
    evaluate.evaluate_run(str(run / "model"), dataset_uri, str(run / "metrics.jsonl"), str(run / "evaluation"),
                          batch_size=50)
    version = publish.publish_run(str(run), registry_uri, min_accuracy=0.0)["model_version"]

    reference = registry.reference_confusion(registry_uri, version)
    pixels, labels = dataset.read_split(dataset_uri, "validation")
    expected = metrics.confusion_matrix(labels, model.predict(pixels), 10)
    np.testing.assert_array_equal(reference["confusion_matrix"], expected)
    assert reference["confusion_matrix"].dtype == np.int64
    assert (reference["examples"], reference["split"], reference["dataset_version"]) == (
        len(labels), "validation", small_dataset["dataset_version"])
    manifest = storage.read_json(storage.join(registry.version_uri(registry_uri, version), "manifest.json"))
    assert {registry.REFERENCE_CONFUSION_PATH, registry.REFERENCE_CALIBRATION_PATH} <= {
        file["path"] for file in manifest["files"]}
    # and its calibration on the same rows: the temperature of least negative log-likelihood, per class the mean
    # calibrated probability of the given label, and the confident joint counted with those
    stored = registry.reference_calibration(registry_uri, version)
    scores = model.logits(pixels)
    temperatures = label_checks.TEMPERATURES
    losses = [np.sum(special.logsumexp(scores / t, axis=1) - scores[np.arange(len(labels)), labels] / t)
              for t in temperatures]
    assert stored["temperature"] == pytest.approx(temperatures[int(np.argmin(losses))])
    probabilities = label_checks.calibrated_probabilities(scores, stored["temperature"])
    present = np.unique(labels)
    np.testing.assert_allclose(stored["thresholds"][present],
                               [probabilities[labels == k, k].mean() for k in present], rtol=1e-6)
    calibration = label_checks.Calibration(stored["temperature"], stored["thresholds"])
    np.testing.assert_array_equal(stored["confident_joint"], label_checks.confident_joint(scores, labels, calibration))
    assert (stored["split"], stored["dataset_version"]) == ("validation", small_dataset["dataset_version"])

    # A version stored without one (its evaluation scored no held-out rows): None, so the batch checks can say so.
    older = make_evaluated_run(str(tmp_path / "older"), seed=4, test_accuracy=0.99)
    assert publish.publish_run(str(tmp_path / "older"), registry_uri)["published"]
    assert registry.reference_confusion(registry_uri, older) is None
    assert registry.reference_calibration(registry_uri, older) is None
    calibration_path = Path(registry.version_uri(registry_uri, version)) / registry.REFERENCE_CALIBRATION_PATH
    calibration_path.write_text(json.dumps({**json.loads(calibration_path.read_text()), "temperature": -1}))
    with pytest.raises(registry.RegistryError, match="not an admm-reference-calibration/1 reference"):
        registry.reference_calibration(registry_uri, version)
    # A damaged one is an error, not a silent pass.
    path = Path(registry.version_uri(registry_uri, version)) / registry.REFERENCE_CONFUSION_PATH
    path.write_text(json.dumps({**json.loads(path.read_text()), "examples": 1}))
    with pytest.raises(registry.RegistryError, match="not an admm-reference-confusion/1 reference"):
        registry.reference_confusion(registry_uri, version)


@pytest.mark.parametrize("argv, message", [
    (["--logical-date", "last tuesday"], "--logical-date must be an ISO date or timestamp, got 'last tuesday'"),
    (["--max-batch-regression", "-0.1"], "--max-batch-regression: -0.1 is less than the minimum of 0"),
    (["--model-name", "a/b"], "--model-name must be a plain directory name"),
])
def test_bad_options_are_one_line_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        publish.main(["--run-uri", "run", "--registry-uri", "registry", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_logical_date_and_training_key_reach_the_history_from_the_command_line(tmp_path):
    registry_uri = str(tmp_path / "registry")
    make_evaluated_run(str(tmp_path / "run"), seed=1, test_accuracy=0.9, batches=["2026-01-05", "2026-01-12"])
    publish.main(["--run-uri", str(tmp_path / "run"), "--registry-uri", registry_uri,
                  "--logical-date", "2026-01-12T00:00:00+00:00", "--training-key", "none"])
    entry = registry.read_history(registry_uri)[-1]
    assert entry["logical_date"] == "2026-01-12T00:00:00+00:00" and entry["training_key"] is None
    assert entry["batches"] == ["2026-01-05", "2026-01-12"] and entry["dataset_version"] == "d" * 16
