"""The pixel drift check: a stamped trigger pattern relabelled to one class is found, naming the class and the
pixels; clean slices, shifts of 1-2 pixels and rescaled grey levels are not flagged."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_ingest import WEEKS, batch_files

from admm_jobs import ingest, validate
from admm_jobs.lake import dataset, profiles, storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import review
from admm_jobs.registry import store as registry
from admm_jobs.scoring import pixel_checks

from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored
from image_drift import CROSS, SQUARE_3X3, rescaled, shifted, stamped

SHAPE = (28, 28)
LEVEL = validate.ValidateConfig.false_alarm_rate / 2 / pixel_checks.pixel_tests(10, 784)
MARGIN = validate.ValidateConfig.pixel_drift_margin
SQUARE_AT_BOTTOM_RIGHT = [[24 + row, 24 + column] for row, column in SQUARE_3X3]
CROSS_AT_TOP_RIGHT = [[1 + row, 24 + column] for row, column in CROSS]


def class_ink(images: np.ndarray, labels: np.ndarray) -> profiles.ClassInk:
    groups = pd.DataFrame({"images": np.bincount(labels, minlength=10)})
    return profiles.class_ink(groups, profiles.ink_by_label(images.reshape(len(images), -1), labels), 10)


@pytest.fixture(scope="module")
def mnist():
    """A reference of 6,000 MNIST training images and a disjoint batch of 2,000."""
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    return class_ink(images[:6000], labels[:6000]), images[6000:8000], labels[6000:8000]


def drifted(mnist, images, labels):
    return pixel_checks.drifted_classes(class_ink(images, labels), mnist[0], SHAPE, LEVEL, MARGIN)


def test_dilation_spreads_each_value_over_the_square_around_it():
    counts = np.zeros((2, 28 * 28), dtype=np.int64)
    counts[0, 0] = 5  # a corner: its square is cut by the border
    counts[1, 14 * 28 + 14] = 3
    grown = pixel_checks.dilated(counts, SHAPE, 2).reshape(2, 28, 28)
    assert (grown[0, :3, :3] == 5).all() and grown[0].sum() == 5 * 9
    assert (grown[1, 12:17, 12:17] == 3).all() and grown[1].sum() == 3 * 25


@pytest.mark.parametrize("drift", [
    lambda images: images,
    lambda images: shifted(images, 0, 1),
    lambda images: shifted(images, -1, 0),
    lambda images: shifted(images, 1, 1),
    lambda images: shifted(images, 0, -2),
    lambda images: shifted(images, 2, 2),
    lambda images: rescaled(images, 0.9),
    lambda images: rescaled(images, 1.1),
], ids=["clean", "down 1", "left 1", "diagonal 1", "up 2", "diagonal 2", "grey x0.9", "grey x1.1"])
def test_natural_drift_is_not_flagged(mnist, drift):
    _, images, labels = mnist
    assert drifted(mnist, drift(images), labels) == []


def test_a_shift_beyond_the_tolerance_is_flagged(mnist):
    """The check does look: the same batch moved 5 pixels puts ink where the reference has none."""
    _, images, labels = mnist
    assert drifted(mnist, shifted(images, 5, 5), labels)


@pytest.mark.parametrize("pattern, corner, target, share, expected", [
    (SQUARE_3X3, (24, 24), 7, 0.03, SQUARE_AT_BOTTOM_RIGHT),
    (CROSS, (1, 24), 3, 0.05, CROSS_AT_TOP_RIGHT),
])
def test_a_stamped_trigger_names_its_target_class_and_pixels(mnist, pattern, corner, target, share, expected):
    _, images, labels = mnist
    found = drifted(mnist, *stamped(images, labels, share, pattern, corner, target))
    assert [entry.given for entry in found] == [target]
    assert sorted(map(list, found[0].pixels)) == sorted(expected) and found[0].drifted == len(expected)
    # every image stamped and relabelled carries ink there: the share is theirs among the class's images
    stamped_images = round(share * len(labels))
    share_of_class = stamped_images / (np.sum(labels == target) + stamped_images)
    assert min(found[0].observed) >= share_of_class * 0.9
    assert all(observed > bound >= expected_share for observed, bound, expected_share
               in zip(found[0].observed, found[0].bound, found[0].expected))


@pytest.mark.parametrize("margin, decides", [(0.01, "sampling"), (0.2, "margin")])
def test_the_bound_is_the_largest_count_that_passes(margin, decides):
    images, reference_count, reference_images = 200, 3, 1000
    bound = pixel_checks.largest_passing_count(images, reference_count, reference_images, LEVEL, margin)
    reference = profiles.ClassInk(np.array([reference_images]), np.full((1, 784), reference_count))

    def fails(count: int) -> bool:
        batch = profiles.ClassInk(np.array([images]), np.full((1, 784), count))
        return bool(pixel_checks.drifted_classes(batch, reference, SHAPE, LEVEL, margin))

    assert not fails(bound) and fails(bound + 1)
    above_margin = bound / images > reference_count / reference_images + margin
    assert above_margin == (decides == "sampling")


def test_the_contact_sheet_outlines_the_drifted_pixels_on_images_carrying_them(mnist):
    _, images, labels = mnist
    images, labels = stamped(images, labels, 0.03, SQUARE_3X3, (24, 24), 7)
    failures = [{"check": "pixel drift", "given": 7, "pixels": SQUARE_AT_BOTTOM_RIGHT}]
    marks = review.marked_pixels(failures)
    assert marks == {7: [tuple(pixel) for pixel in SQUARE_AT_BOTTOM_RIGHT]}
    pixels = images.reshape(len(images), -1)
    carrying = review.carrying_marks(pixels, labels, marks, 28)
    assert carrying.sum() == round(0.03 * len(labels)) and (labels[carrying] == 7).all()
    assert review.outline([(0, 0), (0, 1)]) == sorted([(0, 0, 1, 0), (1, 0, 2, 0), (0, 1, 1, 1), (1, 1, 2, 1),
                                                       (0, 0, 0, 1), (2, 0, 2, 1)])  # a 1x2 bar: six sides
    chosen = np.flatnonzero(carrying)[:3]
    sheet = Image.open(io.BytesIO(review.contact_sheet_png(pixels[chosen], labels[chosen], SHAPE, "t", marks)))
    red = np.all(np.asarray(sheet.convert("RGB")) == review.MARK_COLOUR, axis=2)
    rows, columns = np.nonzero(red)
    scale, top = review.TILE_SCALE, review.TITLE_HEIGHT + review.CAPTION_HEIGHT
    # the square's outline on the first tile: 3 pixels wide, from row/column 24 to 27 (in tile pixels x scale)
    first = columns < 28 * scale + 2
    assert (rows[first].min(), rows[first].max()) == (top + 24 * scale, top + 27 * scale)
    assert (columns[first].min(), columns[first].max()) == (1 + 24 * scale, 1 + 27 * scale)
    assert len(np.unique(columns // (28 * scale + 2))) == 3  # on every tile


# ---------------------------------------------------------------- through ingest and validate


ROWS = 1000  # images per weekly batch: 30 stamped images at 3 %


@pytest.fixture
def weeks(tmp_path):
    """Weeks 1-2 landed and ingested, a model published on them; returns (source, lake, registry)."""
    from test_batch_checks import land_and_publish

    return land_and_publish(tmp_path, ROWS)


def validate_week3(weeks, make_batch, **settings):
    source, lake, registry_uri = weeks
    images, labels = read_vendored(TRAIN_IMAGES)[2 * ROWS:3 * ROWS], read_vendored(TRAIN_LABELS)[2 * ROWS:3 * ROWS]
    batch_files(source, WEEKS[2], *make_batch(images, labels))
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    return validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, **settings)


@pytest.mark.parametrize("make_batch", [lambda images, labels: (shifted(images, -1, 2), labels),
                                        lambda images, labels: (rescaled(images, 0.9), labels)],
                         ids=["shifted 2 down 1 left", "grey x0.9"])
def test_a_drifted_batch_passes(weeks, make_batch):
    # The test's model (random features) is not shift-invariant: its accuracy on the shifted batch falls far, so
    # the label sanity check is switched off here; the pixel drift check and the other checks pass.
    outcome = validate_week3(weeks, make_batch, max_accuracy_drop=1.0)
    assert outcome["success"] and outcome["checked_batches"] == [WEEKS[2]] and outcome["refused_batches"] == {}


@pytest.mark.parametrize("pattern, corner, target, expected", [
    (SQUARE_3X3, (24, 24), 7, SQUARE_AT_BOTTOM_RIGHT),
    (CROSS, (1, 24), 3, CROSS_AT_TOP_RIGHT),
])
def test_a_stamped_batch_is_quarantined_naming_class_and_pixels(weeks, tmp_path, pattern, corner, target, expected):
    with pytest.raises(validate.BatchQuarantined) as failure:
        validate_week3(weeks, lambda images, labels: stamped(images, labels, 0.03, pattern, corner, target))
    record = failure.value.quarantined[WEEKS[2]]
    [drift] = [entry for entry in record["failures"] if entry["check"] == "pixel drift"]
    assert drift["given"] == target and sorted(drift["pixels"]) == sorted(expected)
    assert len(drift["observed"]) == len(drift["expected"]) == len(drift["threshold"]) == len(expected)
    assert json.loads(json.dumps(record)) == record  # plain JSON: it travels through XCom and the history
    assert f"batch {WEEKS[2]}: pixel drift: observed" in str(failure.value)
    # the reviewer's contact sheet shows the stamped images of the target class
    quarantine = {**record, "run_uri": str(tmp_path / "run"), "dataset_uri": failure.value.result["dataset_uri"]}
    sheet = Image.open(io.BytesIO(storage.read_bytes(review.write_contact_sheet(quarantine))))
    assert (np.asarray(sheet.convert("RGB")) == review.MARK_COLOUR).all(axis=2).any()


def test_validate_compares_with_the_published_versions_stored_reference(weeks):
    """The reference is the version's reference/pixels.json when it has one: here one in which every 7 carried the
    square, so a batch stamped with it is nothing new."""
    _, _, registry_uri = weeks
    version = registry.read_pointer(registry_uri)["version"]
    reference_uri = model_io.load_model(registry.published_model_uri(registry_uri)).metadata["dataset"]["uri"]
    ink = profiles.dataset_class_ink(reference_uri, 10)
    ink.ink[7, [row * 28 + column for row, column in SQUARE_AT_BOTTOM_RIGHT]] = ink.images[7]
    storage.write_bytes(storage.join(registry.version_uri(registry_uri, version), registry.REFERENCE_PIXELS_PATH),
                        registry.reference_pixels_bytes(ink, None))
    outcome = validate_week3(weeks, lambda images, labels: stamped(images, labels, 0.03, SQUARE_3X3, (24, 24), 7))
    assert outcome["success"] and outcome["checked_batches"] == [WEEKS[2]]


def test_old_profiles_get_ink_counts_once(weeks):
    """A lake profiled before ink counts (format /1, no ``ink``) is profiled again on the next ingest."""
    source, lake, _ = weeks
    records = sorted((lake / "mnist").rglob(f"{profiles.PROFILE_DIR}/{profiles.PROFILE_RECORD}"))
    for path in records:
        record = json.loads(path.read_text())
        for split in record["splits"].values():
            del split["ink"]
        path.write_text(json.dumps({**record, "format": "idx-profile/1"}))

    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    assert all(json.loads(path.read_text())["format"] == profiles.PROFILE_FORMAT for path in records)
    ink = profiles.dataset_class_ink(result["dataset_uri"], 10)
    images, labels = dataset.read_files([uri for split in ("train", "validation")
                                         for uri in dataset.split_file_uris(result["dataset_uri"], split)])
    expected = class_ink(images, labels)
    np.testing.assert_array_equal(ink.images, expected.images)
    np.testing.assert_array_equal(ink.ink, expected.ink)
    assert ink.images.sum() == 2 * ROWS
