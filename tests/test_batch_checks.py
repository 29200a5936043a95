"""Drift and poison checks of new batches against the published model's data, and their quarantine."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fitted_model import fitted_model
from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored
from test_ingest import WEEKS, batch_files, batched_source

from admm_jobs import ingest, validate
from admm_jobs.lake import batches, dataset, storage
from admm_jobs.registry import review
from admm_jobs.registry import store as registry
from admm_jobs.registry.model import save_model
from admm_jobs.scoring import metrics

ROWS = 400  # images per batch


def publish_reference(registry_uri: str, dataset_uri: str) -> float:
    """Publish a model that recognises digits (random features, about 80 %) as trained on ``dataset_uri``."""
    model = fitted_model()
    pixels, labels = dataset.read_split(dataset_uri, "test")
    test_accuracy = float((model.predict(pixels) == labels).mean())
    model.metadata = {"dataset": {"uri": dataset_uri, "version": dataset.load_manifest(dataset_uri)["version"]}}
    version = "0123456789abcdef"
    save_model(model, storage.join(registry.version_uri(registry_uri, version), registry.MODEL_DIR))
    assert registry.switch_pointer(registry_uri, {"version": version, "test_accuracy": test_accuracy}, None)
    return test_accuracy


def land_and_publish(tmp_path, rows_per_batch: int):
    """Weeks 1-2 landed (``rows_per_batch`` images each) and ingested, a model published on them; returns
    (source, lake, registry)."""
    source, lake, registry_uri = tmp_path / "landing", tmp_path / "lake", str(tmp_path / "registry")
    batched_source(source, WEEKS[:2], rows_per_batch=rows_per_batch)
    reference = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    publish_reference(registry_uri, reference["dataset_uri"])
    return source, lake, registry_uri


@pytest.fixture
def landed(tmp_path):
    return land_and_publish(tmp_path, ROWS)


def week3(images, labels):
    return images[2 * ROWS:3 * ROWS], labels[2 * ROWS:3 * ROWS]


def shuffled_labels(images, labels):
    images, labels = week3(images, labels)
    return images, np.random.default_rng(0).permutation(labels)


def single_class(images, labels):
    return images[labels == 3][:ROWS], labels[labels == 3][:ROWS]


def inverted(images, labels):
    images, labels = week3(images, labels)
    return 255 - images, labels


def copy_of_week1(images, labels):
    return images[:ROWS], labels[:ROWS]


def validate_week3(landed, make_batch):
    source, lake, registry_uri = landed
    batch_files(source, WEEKS[2], *make_batch(read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)))
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    assert result["batches"] == WEEKS[:3]
    return result, validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri,
                                             logical_date="2026-01-18T00:00:00+00:00")


def test_a_clean_batch_passes_against_the_reference(landed):
    _, outcome = validate_week3(landed, week3)
    assert outcome["success"] and outcome["checked_batches"] == [WEEKS[2]]
    assert outcome["refused_batches"] == {} and outcome["reference_dataset"].endswith(
        dataset.load_manifest(outcome["reference_dataset"])["version"])
    # a version published before calibrations were stored: the coarse label sanity check stands in
    assert outcome["label_checks"] == {WEEKS[2]: validate.LABEL_CHECKS_WITHOUT_REFERENCE}
    suites = [validate.BATCH_SUITE, validate.DRIFT_SUITE, validate.LABEL_SANITY_SUITE]
    assert evaluated_expectations(outcome) == expectation_count(suites)


def expectation_count(suites) -> int:
    return sum(len(validate.load_suite(str(suite)).expectations) for suite in suites)


def evaluated_expectations(outcome) -> int:
    return outcome["statistics"]["splits"][f"batch={WEEKS[2]}"]["evaluated_expectations"]


@pytest.mark.parametrize("make_batch, check", [
    (shuffled_labels, "label sanity"),
    (single_class, "class proportions"),
    (inverted, "pixel intensity"),
    (copy_of_week1, "duplicates"),
])
def test_a_poisoned_batch_is_quarantined(landed, make_batch, check):
    source, lake, registry_uri = landed
    before = registry.read_pointer(registry_uri)
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_week3(landed, make_batch)
    record = failure.value.quarantined[WEEKS[2]]
    failed = {entry["check"]: entry for entry in record["failures"]}
    assert check in failed
    # the record names the batch, the check, the observed value and the threshold
    assert f"batch {WEEKS[2]}: {check}: observed" in str(failure.value)
    assert failed[check]["observed"] is not None and failed[check]["threshold"] is not None
    # plain JSON values: the record travels through XCom and an asset event, whose serialiser refuses numpy types
    assert json.loads(json.dumps(record)) == record
    assert all(type(value) in (int, float, str, bool, list, type(None))
               for entry in record["failures"] for value in (entry["observed"], entry["threshold"]))
    stored = storage.read_json(batches.quarantine_uri(str(lake / "mnist"), WEEKS[2]))
    assert stored["batch"] == WEEKS[2] and stored["failures"] == record["failures"]
    assert storage.exists(stored["result_uri"]) and storage.exists(stored["data_docs_uri"])
    history = registry.read_history(registry_uri)
    assert [entry["decision"] for entry in history] == ["quarantined"]
    assert history[0]["batch"] == WEEKS[2] and history[0]["logical_date"] == "2026-01-18T00:00:00+00:00"
    assert registry.read_pointer(registry_uri) == before  # the published model stays
    # later runs leave the quarantined batch out: the registry history says so
    assert ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25,
                                 registry_uri=registry_uri)["batches"] == WEEKS[:2]


def test_inverted_images_are_also_saturated(landed):
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_week3(landed, inverted)
    checks = {entry["check"] for entry in failure.value.quarantined[WEEKS[2]]["failures"]}
    assert {"pixel intensity", "saturated images"} <= checks


def test_thresholds_are_settings(landed):
    """A looser label-sanity threshold lets the shuffled batch through that check (the others still pass)."""
    source, lake, registry_uri = landed
    batch_files(source, WEEKS[2], *shuffled_labels(read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)))
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    outcome = validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, max_accuracy_drop=1.0)
    assert outcome["success"] and outcome["checked_batches"] == [WEEKS[2]]


def test_a_released_batch_is_included_by_the_next_run_and_not_refused_again(landed, tmp_path):
    """A reviewer's release in the registry history, not a deleted file, brings the batch back."""
    source, lake, registry_uri = landed
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_week3(landed, shuffled_labels)
    record = failure.value.quarantined[WEEKS[2]]
    quarantine = {**record, "batch": WEEKS[2], "registry_uri": registry_uri, "run_uri": str(tmp_path / "runs" / "w3"),
                  "dataset_uri": failure.value.result["dataset_uri"]}
    sheet_uri = review.write_contact_sheet(quarantine)
    assert sheet_uri == review.contact_sheet_uri(quarantine["run_uri"], WEEKS[2])
    assert storage.read_bytes(sheet_uri).startswith(b"\x89PNG")

    entry = review.record_review({**quarantine, "contact_sheet_uri": sheet_uri}, review.review_decision(
        [review.RELEASE], timed_out=False), {"id": "ann", "name": "ann"}, "2026-01-19T09:30:00+00:00")
    assert entry["decision"] == "released" and entry["batch"] == WEEKS[2] and entry["reviewer"] == "ann"
    assert entry["responded_at"] == "2026-01-19T09:30:00+00:00" and entry["contact_sheet_uri"] == sheet_uri
    assert storage.exists(batches.quarantine_uri(str(lake / "mnist"), WEEKS[2]))  # the evidence stays

    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25, registry_uri=registry_uri)
    assert result["batches"] == WEEKS[:3] and result["quarantined"] == []
    outcome = validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri)
    assert outcome["success"] and outcome["checked_batches"] == []  # the reviewer overruled its checks
    assert [entry["decision"] for entry in registry.read_history(registry_uri)] == ["quarantined", "released"]


# ---------------------------------------------------------------- the per-class label checks

LABEL_ROWS = 3_000  # images per batch: a few thousand, as the checks' power is sized for
FIT_ROWS = 2_000  # fitted_model() fits the first 2,000 training images: the batches start after them


def label_batch(week: int) -> tuple[np.ndarray, np.ndarray]:
    """Week ``week`` (0-based) of the label-check tests: training images the published model never fitted."""
    rows = slice(FIT_ROWS + week * LABEL_ROWS, FIT_ROWS + (week + 1) * LABEL_ROWS)
    return read_vendored(TRAIN_IMAGES)[rows], read_vendored(TRAIN_LABELS)[rows]


def publish_label_reference(registry_uri: str, dataset_uri: str) -> None:
    """Publish the random-features model with the references publish stores with a version: its confusion and
    calibration on the validation split of ``dataset_uri`` (rows it never fitted)."""
    publish_reference(registry_uri, dataset_uri)
    model, version = fitted_model(), registry.read_pointer(registry_uri)["version"]
    pixels, labels = dataset.read_split(dataset_uri, "validation")
    confusion = metrics.confusion_matrix(labels, model.predict(pixels), 10)
    calibration, joint = metrics.held_out_calibration(model, metrics.validation_set(dataset_uri))
    directory = registry.version_uri(registry_uri, version)
    storage.write_bytes(storage.join(directory, registry.REFERENCE_CONFUSION_PATH),
                        registry.reference_confusion_bytes(confusion.tolist(), "validation", None))
    storage.write_bytes(storage.join(directory, registry.REFERENCE_CALIBRATION_PATH),
                        registry.reference_calibration_bytes(calibration.temperature, calibration.thresholds.tolist(),
                                                             joint.tolist(), "validation", None))


@pytest.fixture(scope="module")
def label_landing(tmp_path_factory):
    """Weeks 1-2 landed and ingested (a quarter of each held out: 1,500 reference images), the model published
    with its label reference; returns (source, lake, registry) to copy (each test lands its own week 3)."""
    root = tmp_path_factory.mktemp("labels")
    source, lake, registry_uri = root / "landing", root / "lake", str(root / "registry")
    batched_source(source, [], test_rows=400)
    for week in range(2):
        batch_files(source, WEEKS[week], *label_batch(week))
    reference = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    publish_label_reference(registry_uri, reference["dataset_uri"])
    return root


@pytest.fixture
def label_landed(label_landing, tmp_path):
    copy = tmp_path / "labels"
    shutil.copytree(label_landing, copy)
    return copy / "landing", copy / "lake", str(copy / "registry")


def half_flip(images, labels):
    """Half of the 3s relabelled as 8s."""
    labels = labels.copy()
    threes = np.flatnonzero(labels == 3)
    labels[threes[::2]] = 8
    return images, labels


def uniform_noise(images, labels):
    """5 % of the labels replaced by another class, at random."""
    labels = labels.copy()
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(labels), len(labels) // 20, replace=False)
    labels[chosen] = (labels[chosen] + rng.integers(1, 10, len(chosen))) % 10
    return images, labels


def validate_label_week(landed, images, labels):
    source, lake, registry_uri = landed
    batch_files(source, WEEKS[2], images, labels)
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    return validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri,
                                     logical_date="2026-01-18T00:00:00+00:00")


def test_a_clean_batch_passes_the_label_checks(label_landed):
    outcome = validate_label_week(label_landed, *label_batch(2))
    assert outcome["success"] and outcome["refused_batches"] == {}
    assert outcome["label_checks"][WEEKS[2]].startswith("ran: 101 tests")
    # the label checks stand in for the coarse label sanity check, which a 2-pixel shift of clean data trips
    assert evaluated_expectations(outcome) == expectation_count([validate.BATCH_SUITE, validate.DRIFT_SUITE])


def test_shuffled_labels_are_quarantined_by_the_label_checks_not_the_coarse_check(label_landed):
    images, labels = label_batch(2)
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_label_week(label_landed, images, np.random.default_rng(0).permutation(labels))
    checks = {entry["check"] for entry in failure.value.quarantined[WEEKS[2]]["failures"]}
    assert validate.MISLABELLED_CHECK in checks and "label sanity" not in checks


def test_half_of_a_class_relabelled_as_another_is_quarantined_naming_the_pair(label_landed):
    images, labels = half_flip(*label_batch(2))
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_label_week(label_landed, images, labels)
    record = failure.value.quarantined[WEEKS[2]]
    cells = [entry for entry in record["failures"] if entry["check"] == validate.LABEL_CELL_CHECK]
    # the 3s labelled 8 are still called 3 by the model: the cell (given 8, predicted 3) rose
    [cell] = [entry for entry in cells if (entry["given"], entry["predicted"]) == (8, 3)]
    assert cell["expected"] + validate.ValidateConfig.min_cell_excess <= cell["threshold"] < cell["observed"]
    assert cell["observed"] > 0.2 and cell["expected"] < 0.1 and cell["p_value"] <= cell["test_level"]
    assert record["label_checks"].startswith("ran: ")
    assert json.loads(json.dumps(record)) == record  # plain JSON
    assert {3, 8} <= set(review.flagged_classes(record["failures"]))  # the contact sheet shows those images
    assert f"batch {WEEKS[2]}: confusion cell: observed {cell['observed']:.4g}, at most" in str(failure.value)
    assert registry.read_history(label_landed[2])[0]["decision"] == "quarantined"


def test_uniform_label_noise_of_five_percent_is_quarantined(label_landed):
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_label_week(label_landed, *uniform_noise(*label_batch(2)))
    failures = failure.value.quarantined[WEEKS[2]]["failures"]
    assert validate.LABEL_CELL_CHECK not in {entry["check"] for entry in failures}  # spread thin over the cells
    [overall] = [entry for entry in failures if entry["check"] == validate.MISLABELLED_CHECK and entry["given"] is None]
    assert overall["observed"] - overall["expected"] > 0.02 and overall["threshold"] < overall["observed"]


def test_without_a_published_model_the_label_checks_say_they_did_not_run(tmp_path):
    source, lake, registry_uri = tmp_path / "landing", tmp_path / "lake", str(tmp_path / "registry")
    batched_source(source, [], test_rows=400)
    images, labels = label_batch(0)
    batch_files(source, WEEKS[0], np.concatenate([images[:500]] * 2), np.concatenate([labels[:500]] * 2))
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    with pytest.raises(validate.BatchQuarantined) as failure:  # every image twice: duplicates
        validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri)
    assert failure.value.result["label_checks"] == {WEEKS[0]: validate.LABEL_CHECKS_WITHOUT_MODEL}
    assert failure.value.quarantined[WEEKS[0]]["label_checks"] == validate.LABEL_CHECKS_WITHOUT_MODEL


def test_the_label_checks_count_the_same_in_any_chunk_size(label_landed):
    """Only counts are kept chunk by chunk: a chunk of 257 rows finds what one chunk of the whole batch finds."""
    source, lake, registry_uri = label_landed
    batch_files(source, WEEKS[2], *half_flip(*label_batch(2)))
    dataset_uri = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)["dataset_uri"]
    failures = []
    for chunk_rows in (257, 100_000):
        with pytest.raises(validate.BatchQuarantined) as failure:
            validate.validate_dataset(dataset_uri, chunk_rows=chunk_rows, registry_uri=registry_uri)
        failures.append(failure.value.quarantined[WEEKS[2]]["failures"])
    assert failures[0] == failures[1] and any(entry["check"] == validate.LABEL_CELL_CHECK for entry in failures[0])
