"""Batch profiles: written by ingest, back-filled for older lakes, the same whatever the chunk size; a changed
batch found by its files' signatures; duplicates across batches found through the key filters, confirmed in the
sorted id files."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored, write_idx
from test_batch_checks import ROWS, landed  # noqa: F401  (landed is a fixture)
from test_ingest import WEEKS, batch_files, batched_source, file_state

from admm_jobs import ingest, validate
from admm_jobs.lake import batches, dataset, profiles, storage


def profile_directories(lake):
    return sorted(path.parent.parent for path in (lake / "mnist").rglob(f"{profiles.PROFILE_DIR}/{profiles.PROFILE_RECORD}"))


def stored_profiles(lake):
    """Every profile of the lake: its groups and its id files' keys, by directory (signatures left out)."""
    stored = {}
    for directory in profile_directories(lake):
        record = storage.read_json(str(directory / profiles.PROFILE_DIR / profiles.PROFILE_RECORD))
        ids = {split: pq.read_table(directory / profiles.PROFILE_DIR / entry["ids"]).to_pydict()
               for split, entry in record["splits"].items()}
        stored[directory.relative_to(lake)] = ({key: value for key, value in record.items() if key != "files"}, ids)
    return stored


def test_ingest_profiles_each_batch_and_the_test_set(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    manifest = dataset.load_manifest(result["dataset_uri"])
    directories = profile_directories(lake)
    assert [directory.relative_to(lake / "mnist").parts[0] for directory in directories] == [
        "batches", "batches", "test-sets"]
    week = storage.read_json(str(directories[0] / profiles.PROFILE_DIR / profiles.PROFILE_RECORD))
    pixels, labels = dataset.read_batch(result["dataset_uri"], WEEKS[0])
    train = profiles.groups_frame(week["splits"]["train"]["groups"])
    validation = profiles.groups_frame(week["splits"]["validation"]["groups"])
    assert week["splits"]["train"]["rows"] + week["splits"]["validation"]["rows"] == 300
    # rows per split and class, the statistics of the drift checks, as sums over the batch's images
    assert train["rows"].add(validation["rows"], fill_value=0).tolist() == np.bincount(labels, minlength=10).tolist()
    merged = profiles.merge_groups([train, validation])
    means = pixels.mean(axis=1) / 255
    assert merged["images"].sum() == 300
    assert merged["intensity_sum"].sum() == pytest.approx(means.sum())
    assert merged["intensity_square_sum"].sum() == pytest.approx((means ** 2).sum())
    assert merged["blank"].sum() == 0 and merged["pixel_count_min"].min() == merged["pixel_count_max"].max() == 784
    # the id index: the batch's image ids, sorted, with their labels
    ids = pq.read_table(directories[0] / profiles.PROFILE_DIR / "ids-train.parquet")
    train_ids = [image_id for uri in dataset.batch_file_uris(result["dataset_uri"], WEEKS[0]) if "split=train" in uri
                 for image_id in pq.read_table(uri).column("image_id").to_pylist()]
    assert ids.column("image_key").to_pylist() == sorted(int(image_id, 16) for image_id in train_ids)
    assert manifest["splits"]["test"]["rows"] == storage.read_json(
        str(directories[2] / profiles.PROFILE_DIR / profiles.PROFILE_RECORD))["splits"]["test"]["rows"]


def test_a_lake_without_profiles_gets_them_once(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    ingest.ingest_dataset(str(source), str(lake))
    written = stored_profiles(lake)
    for directory in profile_directories(lake):  # a lake from before profiles existed
        shutil.rmtree(directory / profiles.PROFILE_DIR)

    again = ingest.ingest_dataset(str(source), str(lake))
    assert not again["reused"] and stored_profiles(lake) == written  # back-filled from the part files
    before = file_state(lake)
    assert ingest.ingest_dataset(str(source), str(lake))["reused"]
    assert file_state(lake) == before


def test_a_lake_without_key_filters_gets_them_once(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    ingest.ingest_dataset(str(source), str(lake))
    written = stored_profiles(lake)
    for directory in profile_directories(lake):  # profiles from before key filters existed
        record_path = directory / profiles.PROFILE_DIR / profiles.PROFILE_RECORD
        record = storage.read_json(str(record_path))
        for entry in record["splits"].values():
            (directory / profiles.PROFILE_DIR / entry.pop("filter")["file"]).unlink()
            del entry["id_groups"]
        storage.write_json(str(record_path), record)

    again = ingest.ingest_dataset(str(source), str(lake))
    assert not again["reused"] and stored_profiles(lake) == written  # back-filled from the id files
    assert all((directory / profiles.PROFILE_DIR / profiles.filter_file(split)).is_file()
               for directory in profile_directories(lake) for split in ("train", "validation")
               if "batches" in directory.parts)
    before = file_state(lake)
    assert ingest.ingest_dataset(str(source), str(lake))["reused"]
    assert file_state(lake) == before


def test_key_filter_never_misses_a_key_and_its_false_positive_rate_is_as_designed():
    keys, others = np.random.default_rng(0).integers(0, 2**64, (2, 20_000), dtype=np.uint64)
    for bits_per_key, hashes in ((4, 3), (profiles.FILTER_BITS_PER_KEY, profiles.FILTER_HASHES)):
        key_filter = profiles.KeyFilter.of(keys, bits_per_key, hashes)
        assert key_filter.may_contain(keys).all()
        designed = (1 - np.exp(-hashes / bits_per_key)) ** hashes
        false_positives = key_filter.may_contain(others).sum()
        # within 5 standard deviations of the binomial count (at most 1 for the real filter's 1.5e-6)
        assert abs(false_positives - designed * len(others)) <= 5 * np.sqrt(designed * len(others)) + 1
    assert profiles.KeyFilter.of(keys[:0]).may_contain(keys[:5]).tolist() == [False] * 5
    first_keys = [10, 20, 30]  # row groups [10, 20), [20, 30), [30, ...)
    assert profiles.groups_holding(first_keys, np.array([5, 12, 25, 29, 99], np.uint64)) == [0, 1, 2]
    assert profiles.groups_holding(first_keys, np.array([21], np.uint64)) == [1]


def test_profiles_do_not_depend_on_the_chunk_size(small_dataset):
    uris = dataset.split_file_uris(small_dataset["dataset_uri"], "train")
    whole, chunked = profiles.profile_files(uris, chunk_rows=100_000), profiles.profile_files(uris, chunk_rows=37)
    np.testing.assert_array_equal(whole.keys, chunked.keys)
    np.testing.assert_array_equal(whole.labels, chunked.labels)
    assert whole.groups.drop(columns=["intensity_sum", "intensity_square_sum"]).equals(
        chunked.groups.drop(columns=["intensity_sum", "intensity_square_sum"]))
    np.testing.assert_allclose(whole.groups[["intensity_sum", "intensity_square_sum"]],
                               chunked.groups[["intensity_sum", "intensity_square_sum"]])


def observed_values(result):
    return {name: [outcome["result"].get("observed_value") for outcome in check["results"]]
            for name, check in storage.read_json(result["result_uri"])["results"].items()}


def test_validation_in_small_chunks_gives_the_results_of_one_chunk(landed):  # noqa: F811
    source, lake, registry_uri = landed
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    batch_files(source, WEEKS[2], images[2 * ROWS:3 * ROWS], labels[2 * ROWS:3 * ROWS])
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    one_chunk = validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, chunk_rows=100_000)
    one_chunk_values = observed_values(one_chunk)
    chunked = validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, chunk_rows=64)
    assert chunked["statistics"] == one_chunk["statistics"] and chunked["checked_batches"] == [WEEKS[2]]
    chunked_values = observed_values(chunked)
    assert chunked_values.keys() == one_chunk_values.keys()
    for name, values in chunked_values.items():
        assert values == pytest.approx(one_chunk_values[name]), name


def test_duplicates_of_an_old_batch_are_found_through_its_id_file(landed):  # noqa: F811
    source, lake, registry_uri = landed
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    copied = 7  # images of week 1 (trained on: known by its profile only) landed again in week 3
    batch_files(source, WEEKS[2], np.r_[images[:copied], images[2 * ROWS:3 * ROWS - copied]],
                np.r_[labels[:copied], labels[2 * ROWS:3 * ROWS - copied]])
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    with pytest.raises(validate.ValidationFailed) as failure:
        validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, max_duplicate_share=0.5)
    batch = failure.value.result["statistics"]["splits"][f"batch={WEEKS[2]}"]
    assert batch["unsuccessful_expectations"] == 0 and not failure.value.result["refused_batches"]
    values = observed_values(failure.value.result)
    duplicate_share = values[f"batch={WEEKS[2]}"][2]
    assert duplicate_share == pytest.approx(copied / ROWS)
    # the split suite counts both copies of each image, the old batch's row found by merging its id file
    repeated = sum(values[split][-2] for split in ("train", "validation"))
    assert repeated == 2 * copied
    assert "expect_column_sum_to_be_between(repeated_image_ids) failed" in str(failure.value)


def test_false_candidates_of_the_key_filters_are_confirmed_away(landed):  # noqa: F811
    """Old batches whose filters say yes to every key (all bits set) give the results of their true filters:
    the candidates are confirmed in the id files; and the 7 true duplicates are found either way."""
    source, lake, registry_uri = landed
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    copied = 7
    batch_files(source, WEEKS[2], np.r_[images[:copied], images[2 * ROWS:3 * ROWS - copied]],
                np.r_[labels[:copied], labels[2 * ROWS:3 * ROWS - copied]])
    result = ingest.ingest_dataset(str(source), str(lake), validation_fraction=0.25)
    outcomes = []
    for saturate in (False, True):
        if saturate:
            for path in (lake / "mnist" / "batches").glob(f"{WEEKS[0]}/*/{profiles.PROFILE_DIR}/*.filter"):
                path.write_bytes(b"\xff" * path.stat().st_size)
        with pytest.raises(validate.ValidationFailed) as failure:
            validate.validate_dataset(result["dataset_uri"], registry_uri=registry_uri, max_duplicate_share=0.5)
        outcomes.append(observed_values(failure.value.result))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][f"batch={WEEKS[2]}"][2] == pytest.approx(copied / ROWS)
    assert sum(outcomes[1][split][-2] for split in ("train", "validation")) == 2 * copied


# ---------------------------------------------------------------- a changed batch under the same date


def rewrite_keeping(path, payload, keep_size=False, keep_mtime=False):
    """Write ``payload`` over ``path``; with ``keep_mtime`` the old modification time is put back."""
    stat = path.stat()
    assert not keep_size or len(payload) == stat.st_size
    path.write_bytes(payload)
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def raw_landing(tmp_path):
    """Weeks 1-2 landed as raw (uncompressed) IDX and ingested: a flipped pixel keeps a file's size."""
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    for path in (source / "batches").rglob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    ingest.ingest_dataset(str(source), str(lake))
    return source, lake, source / "batches" / WEEKS[1] / TRAIN_IMAGES


def flipped_pixel(path):
    payload = bytearray(path.read_bytes())
    payload[-100] ^= 0xFF
    return bytes(payload)


def test_changed_content_with_the_same_size_and_a_new_mtime_is_refused(raw_landing):
    source, lake, images = raw_landing
    rewrite_keeping(images, flipped_pixel(images), keep_size=True)
    with pytest.raises(ingest.IngestError, match=f"batch {WEEKS[1]} changed after it was ingested") as info:
        ingest.ingest_dataset(str(source), str(lake))
    assert str(images) in str(info.value) and "land corrected data under a new date" in str(info.value)


def test_changed_content_with_another_size_and_the_same_mtime_is_refused(raw_landing):
    source, lake, _ = raw_landing
    labels = source / "batches" / WEEKS[1] / TRAIN_LABELS
    write_idx(labels.with_name("new"), read_vendored(TRAIN_LABELS)[300:601], compress=False)
    rewrite_keeping(labels, labels.with_name("new").read_bytes(), keep_mtime=True)
    labels.with_name("new").unlink()
    with pytest.raises(ingest.IngestError, match=f"batch {WEEKS[1]} changed after it was ingested") as info:
        ingest.ingest_dataset(str(source), str(lake))
    assert str(labels) in str(info.value)


def test_only_files_with_new_signatures_are_read_again(raw_landing):
    source, lake, images = raw_landing
    pinned = batches.pinned_batch(str(lake / "mnist"), WEEKS[1])
    # touched, same content: hashed again, found unchanged, its new signature recorded
    rewrite_keeping(images, images.read_bytes())
    assert ingest.ingest_dataset(str(source), str(lake))["batches"] == WEEKS[:2]
    touched = batches.pinned_batch(str(lake / "mnist"), WEEKS[1])
    assert touched["sources"]["train_images"]["signature"] != pinned["sources"]["train_images"]["signature"]
    assert touched["sources"]["train_images"]["sha256"] == pinned["sources"]["train_images"]["sha256"]
    # the guarantee's limit: a rewrite that keeps both size and modification time is not read, so not seen
    rewrite_keeping(images, flipped_pixel(images), keep_size=True, keep_mtime=True)
    assert ingest.ingest_dataset(str(source), str(lake))["reused"]
