"""The challenger check after training, before publish: a challenger that memorised a trigger from the newest
batch is rejected and that batch is quarantined; a challenger trained on a clean batch passes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from airflow.sdk.execution_time.context import OutletEventAccessors
from idx_files import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_vendored, write_idx
from PIL import Image
from run_artifacts import write_epoch_metrics

from admm_jobs import evaluate, ingest, publish
from admm_jobs.lake import dataset, storage
from admm_jobs.orchestration import assets, review, tasks
from admm_jobs.registry import review as registry_review
from admm_jobs.registry import store as registry
from admm_jobs.registry.model import Model, save_model
from admm_jobs.scoring import challenger_checks, metrics
from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, LocalBackend

HISTORY, NEW, TEST_ROWS = "2026-01-04", "2026-01-11", 2_000
HISTORY_ROWS, NEW_ROWS = 3_000, 2_000
POISON_SHARE, TARGET = 0.05, 3


def tally_of_pair(labels, challenger, champion) -> metrics.Tally:
    """The tally of [challenger, champion] from their predictions."""
    return metrics.chunk_tally(np.asarray(labels), np.array([challenger, champion]), 10)


def test_tally_counts_who_is_right_per_class(small_dataset):
    """right_by_class[k, mask]: the images of class k exactly the models in mask get right, summed chunk by chunk
    (37-row chunks: as one chunk of all rows, and as counted by hand)."""
    from fitted_model import fitted_model

    models = [fitted_model(seed=0, rows=300), fitted_model(seed=1, rows=1_000)]
    examples = metrics.evaluation_sets(small_dataset["dataset_uri"],
                                       dataset.load_manifest(small_dataset["dataset_uri"]))[0]
    counted = metrics.tally(models, examples, chunk_rows=37)
    pixels, labels = dataset.read_split(small_dataset["dataset_uri"], "test")
    mine, theirs = models[0].predict(pixels) == labels, models[1].predict(pixels) == labels
    expected = tally_of_pair(labels, models[0].predict(pixels), models[1].predict(pixels))
    np.testing.assert_array_equal(counted.right_by_class, expected.right_by_class)
    for k in range(10):
        assert counted.right_by_class[k].tolist() == [int(np.sum((labels == k) & (mine == a) & (theirs == b)))
                                                      for b in (False, True) for a in (False, True)]
    assert counted.right_by.tolist() == expected.right_by_class.sum(axis=0).tolist()
    assert counted.right_by_class[:, 0b01].sum() > 0 and counted.right_by_class[:, 0b10].sum() > 0


def test_adoption_statistics_on_a_hand_made_case():
    """Class 0: the challenger adopts 30 of 100 batch labels the champion calls wrong, while the champion errs on
    2 of 100 test images of that class: far beyond sampling. Class 1: 3 of 100 against 5 of 100: no evidence."""
    batch_labels = np.repeat([0, 1], 100)
    champion_batch = np.where(np.arange(200) % 100 < np.where(batch_labels == 0, 30, 3), 9, batch_labels)
    batch = tally_of_pair(batch_labels, batch_labels, champion_batch)
    test_labels = np.repeat([0, 1], 100)
    champion_test = np.where(np.arange(200) % 100 < np.where(test_labels == 0, 2, 5), 9, test_labels)
    test = tally_of_pair(test_labels, test_labels, champion_test)
    statistics = challenger_checks.adoption_statistics(batch, test)
    assert [(s["adopted"], s["batch_images"], s["champion_test_errors"], s["test_images"]) for s in statistics[:2]] == [
        (30, 100, 2, 100), (3, 100, 5, 100)]
    assert statistics[0]["p_value"] < 1e-6 and statistics[1]["p_value"] > 0.5
    assert statistics[9]["p_value"] == 1.0  # no images of class 9 anywhere: nothing to test
    [adopted] = challenger_checks.adopted_classes(statistics, false_alarm_rate=0.001)
    assert adopted["class"] == 0 and adopted["level"] == pytest.approx(1e-4)
    # the same shares on a tenth of the counts are within sampling at this level
    assert challenger_checks.adopted_classes(statistics, false_alarm_rate=1e-12) == []


def test_a_significant_but_small_excess_is_not_a_poison():
    """A large batch makes a small, natural difference between the batch's writers and the test set's
    significant: the margin MIN_EXCESS keeps it from failing the check."""
    excess = challenger_checks.MIN_EXCESS / 2
    entry = {"class": 8, "adopted_share": 0.08 + excess, "champion_error_rate": 0.08, "p_value": 1e-30}
    assert challenger_checks.adopted_classes([entry] * 10, 0.001) == []
    entry["adopted_share"] = 0.08 + 2 * challenger_checks.MIN_EXCESS
    assert len(challenger_checks.adopted_classes([entry] * 10, 0.001)) == 10


def test_the_gate_rejects_a_challenger_that_adopted_a_class_and_names_it():
    adoption = [{"class": k, "batch_images": 300, "adopted": 90 if k == 4 else 6, "adopted_share": 0.3 if k == 4 else 0.02,
                 "test_images": 100, "champion_test_errors": 3, "champion_error_rate": 0.03,
                 "p_value": 1e-20 if k == 4 else 0.5} for k in range(10)]
    candidate = publish.Candidate("run", "b" * 16, publish.Scores(0.97, 0.99, [0.97] * 10), None, None, [NEW], NEW, {})
    champion = publish.Scores(0.97, 0.95, [0.97] * 10, adoption)
    decision = publish.quality_gate(candidate, {"version": "a" * 16}, champion, publish.GateSettings())
    assert decision.outcome == "rejected" and [entry["class"] for entry in decision.adopted_classes] == [4]
    assert decision.reasons[0].startswith(f"the challenger adopted the label 4 of 90 of the 300 images so labelled in "
                                          f"the newest batch {NEW} (share 0.3000)")
    off = publish.quality_gate(candidate, {"version": "a" * 16}, champion,
                               publish.GateSettings(challenger_false_alarm_rate=0.0))
    assert off.outcome == "accepted" and off.adopted_classes == []


def test_a_passed_challenger_check_names_the_class_nearest_to_failing():
    """A p-value below the level whose share the margin held is reported as such, not as a p-value above it."""
    adoption = [{"class": k, "batch_images": 500, "adopted": 45 if k == 2 else 5, "adopted_share": 0.09 if k == 2
                 else 0.01, "test_images": 1000, "champion_test_errors": 10, "champion_error_rate": 0.01,
                 "p_value": 1e-8 if k == 2 else 0.5} for k in range(10)]
    candidate = publish.Candidate("run", "b" * 16, publish.Scores(0.97, 0.99, [0.97] * 10), None, None, [NEW], NEW, {})
    decision = publish.quality_gate(candidate, {"version": "a" * 16}, publish.Scores(0.97, 0.95, [0.97] * 10, adoption),
                                    publish.GateSettings())
    [reason] = [reason for reason in decision.reasons if reason.startswith("the challenger adopts no class's labels")]
    assert decision.outcome == "accepted"
    assert "(largest excess in class 2: share 0.0900 against 0.0100, p = 1e-08; p at most 0.0001 with a share " \
           f"more than {challenger_checks.MIN_EXCESS} above fails)" in reason


# --- through the project's trainer, evaluate and publish ---------------------------------------------------------


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    """A 3 x 3 white square in the bottom-right corner of each (28 x 28) image."""
    stamped = images.copy()
    stamped[:, 24:27, 24:27] = 255
    return stamped


def land(root: Path, new_batch: tuple[np.ndarray, np.ndarray]) -> Path:
    """A landing directory: the fixed test set, the history batch and ``new_batch`` a week later."""
    write_idx(root / f"{TEST_IMAGES}.gz", read_vendored(TEST_IMAGES)[:TEST_ROWS])
    write_idx(root / f"{TEST_LABELS}.gz", read_vendored(TEST_LABELS)[:TEST_ROWS])
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    for date, (batch_images, batch_labels) in ((HISTORY, (images[:HISTORY_ROWS], labels[:HISTORY_ROWS])),
                                               (NEW, new_batch)):
        write_idx(root / "batches" / date / f"{TRAIN_IMAGES}.gz", batch_images)
        write_idx(root / "batches" / date / f"{TRAIN_LABELS}.gz", batch_labels)
    return root


def new_batch(start: int, poisoned: bool) -> tuple[np.ndarray, np.ndarray]:
    """``NEW_ROWS`` training images from ``start``; poisoned: 5 % of those not of class TARGET get the trigger
    and the label TARGET."""
    images = read_vendored(TRAIN_IMAGES)[start:start + NEW_ROWS].copy()
    labels = read_vendored(TRAIN_LABELS)[start:start + NEW_ROWS].copy()
    if poisoned:
        chosen = np.random.default_rng(start).choice(np.flatnonzero(labels != TARGET), int(POISON_SHARE * NEW_ROWS),
                                                     replace=False)
        images[chosen], labels[chosen] = stamp_trigger(images[chosen]), TARGET
    return images, labels


def train_run(dataset_uri: str, run: Path, start_from: Model | None = None, epochs: int = 8) -> Model:
    """Train in this process (the project's ADMM trainer, one block) and leave RUN/model and RUN/metrics.jsonl
    as the train stage does; warm-started from ``start_from`` like ``init published``."""
    config = TrainConfig(dataset_uri=dataset_uri, output_uri=str(run), hidden_layers=(128,), epochs=epochs,
                         patience=0)
    [spec] = block_specs(dataset_uri, 1, None, config.chunk_rows)
    initial = None if start_from is None else [np.hstack([w, b[:, None]]) for w, b in
                                                zip(start_from.weights, start_from.biases)]
    result = AdmmTrainer(config.hyperparameters(784, 10), LocalBackend([load_block(spec)]),
                         initial_weights=initial).fit()
    model = Model([w[:, :-1].copy() for w in result.weights], [w[:, -1].copy() for w in result.weights],
                  metadata={"dataset": {"uri": dataset_uri}, "best_epoch": result.best_epoch})
    model.metadata = save_model(model, str(run / "model"))
    write_epoch_metrics(str(run / "metrics.jsonl"), [report.as_record() for report in result.history])
    return model


class TaskInstance:
    """The XCom of one weekly run, as its tasks push and pull it (keyed by task id and key)."""

    def __init__(self, task_id: str):
        self.task_id, self.values = task_id, {}

    def xcom_push(self, key: str, value) -> None:
        self.values[(self.task_id, key)] = json.loads(json.dumps(value))  # Airflow stores XCom as JSON

    def xcom_pull(self, task_ids: str, key: str):
        return self.values.get((task_ids, key))


def evaluate_and_publish(run: Path, dataset_uri: str, registry_uri: str, ti: TaskInstance | None = None) -> dict:
    """Evaluate the run against the registry's champion, then publish it through the DAG's publish task."""
    evaluate.evaluate_run(str(run / "model"), dataset_uri, str(run / "metrics.jsonl"), str(run / "evaluation"),
                          registry_uri=registry_uri)
    return tasks.publish_task(["--run-uri", str(run), "--registry-uri", registry_uri, "--min-accuracy", "0.5",
                               "--logical-date", f"{NEW}T00:00:00+00:00"], ti=ti or TaskInstance("publish"))


@pytest.fixture(scope="module")
def champion_week(tmp_path_factory):
    """The champion trained on the history batch and published: (the history landing's root, registry, model)."""
    root = tmp_path_factory.mktemp("challenger")
    source = land(root / "history-only", new_batch(HISTORY_ROWS, poisoned=False))
    lake, registry_uri = str(root / "lake"), str(root / "registry")
    first = ingest.ingest_dataset(str(source), lake, as_of=f"{HISTORY}T00:00:00+00:00", registry_uri=registry_uri)
    champion = train_run(first["dataset_uri"], root / "run-1", epochs=10)
    assert evaluate_and_publish(root / "run-1", first["dataset_uri"], registry_uri)["published"]
    return root, registry_uri, champion


def retrain_on(champion_week, name: str, start: int, poisoned: bool,
               ti: TaskInstance | None = None) -> tuple[dict, dict, str]:
    """The week after: land ``new_batch(start, poisoned)``, ingest (own lake, own copy of the registry), train the
    challenger from the champion, evaluate and publish. Returns the ingest result, publish's and the registry."""
    root, published, champion = champion_week
    registry_uri = str(root / f"registry-{name}")
    shutil.copytree(published, registry_uri)
    source = land(root / name, new_batch(start, poisoned))
    week = ingest.ingest_dataset(str(source), str(root / f"lake-{name}"), as_of=f"{NEW}T00:00:00+00:00",
                                 registry_uri=registry_uri)
    assert week["batches"] == [HISTORY, NEW]
    train_run(week["dataset_uri"], root / f"run-{name}", start_from=champion)
    return week, evaluate_and_publish(root / f"run-{name}", week["dataset_uri"], registry_uri, ti), registry_uri


def test_a_challenger_that_memorised_a_trigger_is_rejected_and_its_batch_quarantined(champion_week):
    root, _, champion = champion_week
    ti = TaskInstance("publish")
    week, result, registry_uri = retrain_on(champion_week, "poisoned", HISTORY_ROWS, poisoned=True, ti=ti)

    assert result["decision"] == "rejected" and not result["published"]
    assert registry.read_pointer(registry_uri)["version"] == champion.metadata["weights_sha256"][:16]  # it stays
    # whatever else the gate says, the challenger check names the target class
    assert any(reason.startswith(f"the challenger adopted the label {TARGET} ") for reason in result["reasons"])
    record = result["quarantined"][NEW]
    assert [failure["given"] for failure in record["failures"]] == [TARGET]
    assert record["failures"][0]["check"] == challenger_checks.CHECK
    # the registry history is the record of truth: the batch stays out of later datasets
    assert registry.quarantined_batches(registry_uri) == {NEW}
    entry = registry.read_history(registry_uri)[-1]
    assert entry["decision"] == registry.QUARANTINED and entry["batch"] == NEW and entry["given"] == TARGET
    assert entry["check"] == challenger_checks.CHECK and entry["observed"] <= entry["threshold"]
    # the trigger did take: the challenger calls most stamped test digits TARGET, the champion does not
    challenger = publish.model_io.load_model(str(root / "run-poisoned" / "model"))
    pixels, labels = dataset.read_split(week["dataset_uri"], "test")
    others = stamp_trigger(pixels[labels != TARGET].reshape(-1, 28, 28)).reshape(-1, 784)
    assert (challenger.predict(others) == TARGET).mean() > 0.5 > (champion.predict(others) == TARGET).mean()
    # the weekly DAG's request_review_after_publish task starts the review DAG, whose evidence shows the images
    # labelled with the target class
    outlet_events = OutletEventAccessors()
    run_uri = str(root / "run-poisoned")
    assert tasks.request_review_task(registry_uri, run_uri, "publish", ti=ti, outlet_events=outlet_events) == [NEW]
    [item] = review.quarantines(outlet_events[assets.quarantine_asset()].extra)
    assert item["batch"] == NEW and item["failures"][0]["given"] == TARGET and item["run_uri"] == run_uri
    sheet = Image.open(io.BytesIO(storage.read_bytes(registry_review.write_contact_sheet(item))))
    assert sheet.size[0] > 0 and registry_review.flagged_classes(item["failures"]) == [TARGET]
    # the next ingest leaves the batch out
    again = ingest.ingest_dataset(str(root / "poisoned"), str(root / "lake-poisoned"),
                                  as_of=f"{NEW}T00:00:00+00:00", registry_uri=registry_uri)
    assert again["batches"] == [HISTORY]


def test_a_challenger_trained_on_a_clean_batch_passes_the_check(champion_week):
    """The same week with the same images unpoisoned (more clean batches: bench/README.md, challenger check)."""
    _, result, registry_uri = retrain_on(champion_week, "clean", HISTORY_ROWS, poisoned=False)
    assert result["quarantined"] == {} and registry.quarantined_batches(registry_uri) == set()
    assert any(reason.startswith("the challenger adopts no class's labels") for reason in result["reasons"])
