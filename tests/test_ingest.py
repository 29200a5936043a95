"""Ingest stage: IDX -> versioned Parquet dataset, on real MNIST data and on broken inputs."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from admm_jobs import ingest
from admm_jobs.cli.config import ConfigError
from admm_jobs.lake import batches, dataset, idx, landing, profiles, storage
from admm_jobs.registry import store as registry

from idx_files import (
    IDX_NAMES,
    REPO_ROOT,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    VENDORED_MNIST,
    idx_bytes,
    read_vendored,
    write_idx,
)

README_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
README_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def lake_files(lake):
    return sorted(p.relative_to(lake) for p in lake.rglob("*") if p.is_file())


def file_state(directory):
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def small_arrays():
    """The arrays held by the ``small_idx_source`` fixture."""
    return {
        TRAIN_IMAGES: read_vendored(TRAIN_IMAGES)[:1200],
        TRAIN_LABELS: read_vendored(TRAIN_LABELS)[:1200],
        TEST_IMAGES: read_vendored(TEST_IMAGES)[:400],
        TEST_LABELS: read_vendored(TEST_LABELS)[:400],
    }


def checksum_manifest(arrays):
    files = {
        name: {"sha256": hashlib.sha256(idx_bytes(array)).hexdigest(), "records": int(array.shape[0])}
        for name, array in arrays.items()
    }
    return {"format": landing.CHECKSUMS_FORMAT, "files": files}


def batch_files(root, date, images, labels):
    """Land one dated batch under ``root/batches/<date>/`` (gzip IDX)."""
    write_idx(root / "batches" / date / f"{TRAIN_IMAGES}.gz", images)
    write_idx(root / "batches" / date / f"{TRAIN_LABELS}.gz", labels)


def batched_source(root, dates, rows_per_batch=300, test_rows=400):
    """A landing directory in the batched layout: the fixed test set plus one batch per date (disjoint MNIST slices)."""
    write_idx(root / f"{TEST_IMAGES}.gz", read_vendored(TEST_IMAGES)[:test_rows])
    write_idx(root / f"{TEST_LABELS}.gz", read_vendored(TEST_LABELS)[:test_rows])
    images, labels = read_vendored(TRAIN_IMAGES), read_vendored(TRAIN_LABELS)
    for index, date in enumerate(dates):
        rows = slice(index * rows_per_batch, (index + 1) * rows_per_batch)
        batch_files(root, date, images[rows], labels[rows])
    return root


WEEKS = ["2026-01-04", "2026-01-11", "2026-01-18", "2026-01-25", "2026-02-01", "2026-02-08"]


# ---------------------------------------------------------------- round trip


def test_small_round_trip_matches_the_idx_content(small_dataset, small_idx_source):
    root = storage.local_path(small_dataset["dataset_uri"])
    manifest = json.loads((root / dataset.MANIFEST_FILE).read_text())
    arrays = small_arrays()
    rows = small_dataset["rows"]
    assert rows["train"] + rows["validation"] == 1200 and rows["test"] == 400
    assert 100 <= rows["validation"] <= 300  # a sixth held out, drawn per image
    assert manifest["version"] == small_dataset["dataset_version"] == root.name
    assert manifest["format"] == "idx-parquet/2" and manifest["image_shape"] == [28, 28]
    [batch] = manifest["batches"]
    assert batch["id"].startswith("undated-") and batch["date"] is None and small_dataset["batches"] == [batch["id"]]
    assert batch["rows"] == {"train": rows["train"], "validation": rows["validation"]}
    for role in ("test_images", "test_labels"):
        source = manifest["test_set"]["sources"][role]
        name = landing.SOURCE_FILES[role][0]
        assert source["uri"] == str(small_idx_source / f"{name}.gz")
        assert source["sha256"] == hashlib.sha256(idx_bytes(arrays[name])).hexdigest()

    ids = {}
    for split in dataset.SPLITS:
        pixels, labels = dataset.read_split(small_dataset["dataset_uri"], split)
        entry = manifest["splits"][split]
        assert entry["rows"] == len(labels) == sum(file["rows"] for file in entry["files"])
        assert entry["class_counts"] == np.bincount(labels, minlength=10).tolist()
        tables = [pq.read_table(uri) for uri in dataset.split_file_uris(small_dataset["dataset_uri"], split)]
        for file, uri in zip(entry["files"], dataset.split_file_uris(small_dataset["dataset_uri"], split)):
            assert hashlib.sha256(storage.read_bytes(uri)).hexdigest() == file["sha256"]
        assert all(table.schema.equals(dataset.PARQUET_SCHEMA) for table in tables)
        source_index = np.concatenate([table.column("source_index").to_numpy() for table in tables])
        images_name, labels_name = (TEST_IMAGES, TEST_LABELS) if split == "test" else (TRAIN_IMAGES, TRAIN_LABELS)
        np.testing.assert_array_equal(pixels, arrays[images_name][source_index].reshape(-1, 784))
        np.testing.assert_array_equal(labels, arrays[labels_name][source_index])
        ids[split] = [i for table in tables for i in table.column("image_id").to_pylist()]
        assert ids[split][0] == hashlib.sha256(pixels[0].tobytes()).hexdigest()[:16]
        held_out = batches.validation_mask(ids[split], 1 / 6)
        assert held_out.all() if split == "validation" else split == "test" or not held_out.any()
    assert sorted(np.concatenate([ids["train"], ids["validation"]])) == sorted(
        batches.image_ids(arrays[TRAIN_IMAGES].reshape(-1, 784)))
    assert not set(ids["train"]) & set(ids["validation"])


def test_splits_are_written_as_several_part_files(small_idx_source, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "ROWS_PER_FILE", 300)
    result = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_fraction=1 / 6)
    files = dataset.load_manifest(result["dataset_uri"])["splits"]["train"]["files"]
    assert [f["rows"] for f in files] == [300, 300, 300, result["rows"]["train"] - 900]
    assert [f["path"].rsplit("/", 2)[-2:] for f in files] == [
        ["split=train", f"part-{part:05d}.parquet"] for part in range(4)]
    assert all(f["path"].startswith("../batches/undated-") for f in files)


def test_rerun_reuses_the_dataset_untouched(small_idx_source, tmp_path):
    lake = tmp_path / "lake"
    first = ingest.ingest_dataset(str(small_idx_source), str(lake))
    before = file_state(lake)
    second = ingest.ingest_dataset(str(small_idx_source), str(lake))
    assert not first["reused"] and second["reused"]
    assert second["dataset_version"] == first["dataset_version"]
    assert file_state(lake) == before  # same bytes and same mtimes: nothing rewritten

    # The same content elsewhere, raw instead of gzip, gives the same version and byte-identical files.
    raw_source = tmp_path / "raw-source"
    for name, array in small_arrays().items():
        write_idx(raw_source / name, array, compress=False)
    other_lake = tmp_path / "other-lake"
    third = ingest.ingest_dataset(str(raw_source), str(other_lake))
    assert third["dataset_version"] == first["dataset_version"] and not third["reused"]
    parquet = {path: sha for path, (sha, _) in file_state(lake).items() if path.endswith(".parquet")}
    other_parquet = {path: sha for path, (sha, _) in file_state(other_lake).items() if path.endswith(".parquet")}
    assert parquet == other_parquet


def test_version_follows_content_and_validation_fraction(small_idx_source, small_dataset, tmp_path):
    other_split = ingest.ingest_dataset(str(small_idx_source), str(tmp_path / "a"), validation_fraction=0.25)
    assert other_split["dataset_version"] != small_dataset["dataset_version"]
    assert other_split["rows"]["validation"] > small_dataset["rows"]["validation"]

    changed = tmp_path / "changed"
    shutil.copytree(small_idx_source, changed)
    images = small_arrays()[TEST_IMAGES].copy()
    images[0, 0, 0] ^= 1
    write_idx(changed / f"{TEST_IMAGES}.gz", images)
    changed_result = ingest.ingest_dataset(str(changed), str(tmp_path / "b"), validation_fraction=1 / 6)
    assert changed_result["dataset_version"] not in (small_dataset["dataset_version"], other_split["dataset_version"])


def test_damaged_copy_is_rewritten(small_idx_source, tmp_path):
    result = ingest.ingest_dataset(str(small_idx_source), str(tmp_path))
    [part] = dataset.split_file_uris(result["dataset_uri"], "test")
    part = storage.local_path(part)
    original = part.read_bytes()
    part.write_bytes(original[:-10])
    again = ingest.ingest_dataset(str(small_idx_source), str(tmp_path))
    assert not again["reused"] and again["dataset_version"] == result["dataset_version"]
    assert part.read_bytes() == original


def test_gzip_is_detected_by_content_not_by_name(small_idx_source, small_dataset, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    for name in IDX_NAMES:  # gzip bytes under the plain names
        (source / f"{name}.gz").rename(source / name)
    result = ingest.ingest_dataset(str(source), str(tmp_path / "lake"), validation_fraction=1 / 6)
    assert result["dataset_version"] == small_dataset["dataset_version"]


def test_main_prints_the_result_as_last_line(small_idx_source, tmp_path, capsys):
    lake = tmp_path / "lake"
    result = ingest.main(["--source", f"file://{small_idx_source}", "--lake", str(lake),
                          "--validation-fraction", "0.1"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result
    assert set(result) == {"dataset_uri", "dataset_version", "rows", "reused", "batches", "quarantined"}
    assert (storage.local_path(result["dataset_uri"]) / dataset.MANIFEST_FILE).is_file()


# ---------------------------------------------------------------- dated batches


def test_point_in_time_datasets_from_dated_batches(tmp_path):
    """The run for a date sees the batches dated on or before it, whatever landed since; versions are stable."""
    source, lake = batched_source(tmp_path / "landing", WEEKS[:3]), tmp_path / "lake"
    week3 = ingest.ingest_dataset(str(source), str(lake), as_of="2026-01-18")
    assert week3["batches"] == WEEKS[:3] and week3["rows"]["train"] + week3["rows"]["validation"] == 900
    batched_source(source, WEEKS)  # weeks 4-6 land later; weeks 1-3 landed again, same bytes, new mtimes
    before = file_state(lake)
    backfill = ingest.ingest_dataset(str(source), str(lake), as_of="2026-01-20T00:00:00+00:00")
    assert backfill == {**week3, "reused": False}
    changed = {path for path, state in file_state(lake).items() if before.get(path) != state}
    # the re-landed files were hashed, found unchanged, and their new signatures recorded: nothing else is rewritten
    assert changed == {f"mnist/batches/{week}/{batches.BATCH_RECORD}" for week in WEEKS[:3]}
    before = file_state(lake)
    again = ingest.ingest_dataset(str(source), str(lake), as_of="2026-01-20T00:00:00+00:00")
    assert again == {**week3, "reused": True}
    assert file_state(lake) == before  # re-ingest is a no-op: nothing rewritten
    week6 = ingest.ingest_dataset(str(source), str(lake), as_of="2026-02-08")
    assert week6["batches"] == WEEKS and week6["dataset_version"] != week3["dataset_version"]
    assert ingest.ingest_dataset(str(source), str(lake))["dataset_version"] == week6["dataset_version"]
    windowed = ingest.ingest_dataset(str(source), str(lake), as_of="2026-02-08", window=2)
    assert windowed["batches"] == WEEKS[-2:]

    # each image's split is decided by its own content: adding batches moves no image between splits
    def split_ids(result, split):
        return {i for uri in dataset.split_file_uris(result["dataset_uri"], split)
                for i in pq.read_table(uri, columns=["image_id"]).column("image_id").to_pylist()}
    assert split_ids(week3, "validation") <= split_ids(week6, "validation")
    assert split_ids(week3, "train") <= split_ids(week6, "train")
    manifest = dataset.load_manifest(week6["dataset_uri"])
    assert [batch["id"] for batch in manifest["batches"]] == WEEKS and manifest["as_of"] == WEEKS[-1]
    assert dataset.newest_batch(manifest)["id"] == WEEKS[-1]
    pixels, labels = dataset.read_batch(week6["dataset_uri"], WEEKS[-1])
    np.testing.assert_array_equal(np.sort(labels), np.sort(read_vendored(TRAIN_LABELS)[1500:1800]))
    assert pixels.shape == (300, 784)
    with pytest.raises(ingest.IngestError, match="no batch dated on or before 2025-12-31"):
        ingest.ingest_dataset(str(source), str(lake), as_of="2025-12-31")


def test_changed_batch_under_the_same_date_is_refused(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    ingest.ingest_dataset(str(source), str(lake))
    images = read_vendored(TRAIN_IMAGES)[300:600].copy()
    images[3, 10, 10] ^= 0xFF
    batch_files(source, WEEKS[1], images, read_vendored(TRAIN_LABELS)[300:600])
    with pytest.raises(ingest.IngestError, match=f"batch {WEEKS[1]} changed after it was ingested") as info:
        ingest.ingest_dataset(str(source), str(lake))
    assert str(source / "batches" / WEEKS[1] / f"{TRAIN_IMAGES}.gz") in str(info.value)
    assert "land corrected data under a new date" in str(info.value)
    # the batch before it is still usable on its own
    assert ingest.ingest_dataset(str(source), str(lake), as_of=WEEKS[0])["batches"] == [WEEKS[0]]


def test_batches_the_registry_history_holds_in_quarantine_are_left_out_until_released(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:3]), tmp_path / "lake"
    registry_uri = str(tmp_path / "registry")
    registry.record_decision(registry_uri, {"decision": registry.QUARANTINED, "batch": WEEKS[1]})
    storage.write_json(batches.quarantine_uri(str(lake / "mnist"), WEEKS[2]), {"batch": WEEKS[2]})  # a file alone
    result = ingest.ingest_dataset(str(source), str(lake), registry_uri=registry_uri)
    assert result["batches"] == [WEEKS[0], WEEKS[2]] and result["quarantined"] == [WEEKS[1]]
    registry.record_decision(registry_uri, {"decision": registry.RELEASED, "batch": WEEKS[1], "reviewer": "ann"})
    assert ingest.ingest_dataset(str(source), str(lake), registry_uri=registry_uri)["batches"] == WEEKS[:3]


@pytest.mark.parametrize("layout, problem", [
    ("bad-name", "batch directories are named YYYY-MM-DD"),
    ("impossible-date", "batch directories are named YYYY-MM-DD"),
    ("training-files-beside-batches", "land training data as dated batches only"),
])
def test_bad_landing_layout_names_the_path(layout, problem, tmp_path):
    source = batched_source(tmp_path / "landing", WEEKS[:1])
    bad = {"bad-name": source / "batches" / "week-2", "impossible-date": source / "batches" / "2026-02-30",
           "training-files-beside-batches": source / f"{TRAIN_IMAGES}.gz"}[layout]
    if layout == "training-files-beside-batches":
        write_idx(bad, read_vendored(TRAIN_IMAGES)[:10])
    else:
        batch_files(source, bad.name, read_vendored(TRAIN_IMAGES)[:10], read_vendored(TRAIN_LABELS)[:10])
    with pytest.raises(ingest.IngestError, match=problem) as info:
        ingest.ingest_dataset(str(source), str(tmp_path / "lake"))
    assert str(bad) in str(info.value)


def test_bad_batch_file_names_the_batch_file(tmp_path):
    source = batched_source(tmp_path / "landing", WEEKS[:2])
    labels = source / "batches" / WEEKS[1] / f"{TRAIN_LABELS}.gz"
    write_idx(labels, read_vendored(TRAIN_LABELS)[300:599])
    with pytest.raises(ingest.IngestError, match="299 labels but") as info:
        ingest.ingest_dataset(str(source), str(tmp_path / "lake"))
    assert str(labels) in str(info.value)


def test_command_line_fails_on_bad_input(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "admm_jobs.ingest", "--source", str(tmp_path / "nothing"), "--lake", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert completed.returncode != 0
    assert "IngestError" in completed.stderr and "missing file" in completed.stderr


def committed_directories_only(lake):
    """Every lake file belongs to a directory committed by its record; no staging directory is left."""
    records = {batches.SPLITS_RECORD, batches.TEST_SET_RECORD, dataset.MANIFEST_FILE, batches.BATCH_RECORD,
               profiles.PROFILE_RECORD}
    for path in lake_files(lake):
        assert not any(part.startswith(".") for part in path.parts), path
        directory = lake / path.parent
        while directory.name.startswith("split="):
            directory = directory.parent
        assert any((directory / record).is_file() for record in records), path


def test_failure_while_writing_leaves_nothing_visible(small_idx_source, tmp_path, monkeypatch):
    real_parquet_bytes = batches.parquet_bytes
    calls = []

    def fail_on_second_file(table):
        calls.append(len(table))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_parquet_bytes(table)

    monkeypatch.setattr(batches, "parquet_bytes", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        ingest.ingest_dataset(str(small_idx_source), str(tmp_path))
    committed_directories_only(tmp_path)
    assert not list((tmp_path / "mnist").glob("*/" + dataset.MANIFEST_FILE))  # no dataset
    assert not list((tmp_path / "mnist").glob("batches/*/" + batches.BATCH_RECORD))  # the batch is not ingested
    monkeypatch.setattr(batches, "parquet_bytes", real_parquet_bytes)
    assert ingest.ingest_dataset(str(small_idx_source), str(tmp_path))["rows"]["test"] == 400


# ---------------------------------------------------------------- streaming


def test_streaming_in_chunks_gives_the_dataset_of_one_chunk(small_idx_source, tmp_path, monkeypatch):
    """Chunks of 250 images (not a divisor of the 1,200 images, nor of the 300-row part files) write the same
    ids, rows, splits, part files and profiles as one chunk holding the whole batch."""
    monkeypatch.setattr(batches, "ROWS_PER_FILE", 300)
    whole = ingest.ingest_dataset(str(small_idx_source), str(tmp_path / "whole"), chunk_rows=1_000_000)
    chunked = ingest.ingest_dataset(str(small_idx_source), str(tmp_path / "chunked"), chunk_rows=250)
    assert chunked["dataset_version"] == whole["dataset_version"] and chunked["rows"] == whole["rows"]
    manifests = [dataset.load_manifest(result["dataset_uri"]) for result in (whole, chunked)]
    assert manifests[0]["splits"] == manifests[1]["splits"]  # every part file's rows and sha256, the class counts
    assert len(manifests[0]["splits"]["train"]["files"]) > 2
    states = [file_state(tmp_path / lake / "mnist") for lake in ("whole", "chunked")]
    assert {path: sha for path, (sha, _) in states[0].items() if "profile/ids-" in path} == \
        {path: sha for path, (sha, _) in states[1].items() if "profile/ids-" in path}
    profile_records = [json.loads(path.read_text()) for lake in ("whole", "chunked")
                       for path in sorted((tmp_path / lake).glob("mnist/batches/*/*/profile/profile.json"))]
    assert profile_records[0]["splits"] == profile_records[1]["splits"]


def test_idx_blocks_of_any_size_and_several_gzip_members_decode_the_same(tmp_path):
    images = small_arrays()[TEST_IMAGES][:50]
    content = idx_bytes(images)
    members = gzip.compress(content[:1000], mtime=0) + gzip.compress(content[1000:], mtime=0)
    for stored in (content, gzip.compress(content, mtime=0), members):
        for block in (1, 7, 4096):
            blocks = iter([stored[at:at + block] for at in range(0, len(stored), block)])
            assert b"".join(idx.decoded_blocks("x", blocks)) == content
    (tmp_path / "images.gz").write_bytes(members)
    stream = idx.open_source(str(tmp_path), "images", 3)
    chunks = list(stream.chunks(16))
    assert [len(chunk) for chunk in chunks] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    assert stream.finish().sha256 == hashlib.sha256(content).hexdigest()


def swapped_before_writing(batch_dir, change):
    """An ``open_pair`` for :func:`batches.ingest_batch` that applies ``change`` to the batch's images file
    (its uncompressed bytes) just before streaming it: a file that changes between the checking and the
    writing pass."""

    def open_pair():
        path = batch_dir / f"{TRAIN_IMAGES}.gz"
        path.write_bytes(change(gzip.decompress(path.read_bytes())))
        return landing.PairStream(str(batch_dir), landing.TRAIN_ROLES)

    return open_pair


@pytest.mark.parametrize("change, problem", [
    (lambda data: data[:-784 * 30], r"truncated data: header \(300, 28, 28\) needs 235200 bytes, file has 211680"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "changed while it was being ingested; run again"),
    (lambda data: data + b"\0", "1 trailing bytes"),
])
def test_a_defect_found_at_the_end_of_the_writing_stream_leaves_nothing_visible(change, problem, tmp_path):
    """The batch is streamed in chunks of 64 images; the defect shows only after its last chunk was written to
    the staged directory: the batch is refused, naming its file, and nothing of it is visible."""
    source, lake = batched_source(tmp_path / "landing", WEEKS[:1]), tmp_path / "lake" / "mnist"
    [batch] = landing.landed_batches(str(source))
    pair = landing.scan_pair(batch.uri, landing.TRAIN_ROLES, None, 64)
    batch_dir = source / "batches" / WEEKS[0]
    with pytest.raises(ingest.IngestError, match=problem) as info:
        batches.ingest_batch(str(lake), batch, batches.pair_sha256(pair), 1 / 6,
                             swapped_before_writing(batch_dir, change), 64)
    assert str(batch_dir / f"{TRAIN_IMAGES}.gz") in str(info.value)
    assert lake_files(tmp_path / "lake") == []


def test_a_batch_truncated_after_several_chunks_is_refused_naming_it(tmp_path):
    source, lake = batched_source(tmp_path / "landing", WEEKS[:2]), tmp_path / "lake"
    path = source / "batches" / WEEKS[1] / f"{TRAIN_IMAGES}.gz"
    compressed = path.read_bytes()
    path.write_bytes(compressed[:-50])  # the gzip stream ends early: found after the last chunk was decoded
    with pytest.raises(ingest.IngestError, match="truncated gzip stream") as info:
        ingest.ingest_dataset(str(source), str(lake), chunk_rows=32)
    assert str(path) in str(info.value)
    assert lake_files(lake) == []


# ---------------------------------------------------------------- bad inputs


def _rewrite(name, transform):
    """Mutation replacing the gzip file ``name`` by ``transform(uncompressed bytes)`` (raw bytes written)."""

    def mutate(source):
        path = source / f"{name}.gz"
        path.write_bytes(transform(gzip.decompress(path.read_bytes())))
        return path

    return mutate


def _replace_array(name, transform):
    def mutate(source):
        return write_idx(source / f"{name}.gz", transform(small_arrays()[name]))

    return mutate


def _gzip_bytes(name, transform):
    def mutate(source):
        path = source / f"{name}.gz"
        path.write_bytes(transform(path.read_bytes()))
        return path

    return mutate


def _delete(source):
    (source / f"{TEST_LABELS}.gz").unlink()
    return source / TEST_LABELS


def _same_file_twice(source):
    shutil.copy(source / f"{TRAIN_IMAGES}.gz", source / f"{TEST_IMAGES}.gz")
    shutil.copy(source / f"{TRAIN_LABELS}.gz", source / f"{TEST_LABELS}.gz")
    return source / f"{TEST_IMAGES}.gz"


def _checksum_mismatch(source):
    (source / landing.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))

    def flip_one_pixel(images):
        images = images.copy()
        images[7, 14, 14] ^= 0xFF
        return images

    return _replace_array(TEST_IMAGES, flip_one_pixel)(source)


def _both_names(source):
    shutil.copy(source / f"{TRAIN_LABELS}.gz", source / TRAIN_LABELS)
    return source / TRAIN_LABELS


def _set_label(labels):
    labels = labels.copy()
    labels[5] = 10
    return labels


def _corrupt_crc(data):
    # The gzip trailer is CRC32 + size of the uncompressed data; a wrong CRC is corruption.
    return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


BAD_INPUTS = {
    "bad-magic": (_rewrite(TRAIN_IMAGES, lambda d: b"\x00\x00\x0d\x03" + d[4:]), "not an IDX file of unsigned bytes"),
    "wrong-dims": (_replace_array(TRAIN_IMAGES, lambda a: a.reshape(len(a), 784)), "declares 2 dimension(s)"),
    "labels-as-images": (_rewrite(TEST_IMAGES, lambda d: idx_bytes(small_arrays()[TEST_LABELS])), "magic 0x00000801"),
    "image-size-differs": (_replace_array(TEST_IMAGES, lambda a: a[:, :27, :27]), "images are (27, 27) pixels"),
    "count-mismatch": (_replace_array(TRAIN_LABELS, lambda a: a[:-1]), "1199 labels but"),
    "label-out-of-range": (_replace_array(TRAIN_LABELS, _set_label), "outside 0..9, first at record 5 (value 10)"),
    "truncated-data": (_rewrite(TEST_IMAGES, lambda d: d[:-100]), "truncated data"),
    "trailing-bytes": (_rewrite(TEST_LABELS, lambda d: d + b"\x00" * 7), "7 trailing bytes"),
    "empty": (_gzip_bytes(TRAIN_LABELS, lambda d: b""), "file is empty"),
    "empty-after-gunzip": (_gzip_bytes(TRAIN_LABELS, lambda d: gzip.compress(b"")), "file is empty"),
    "not-idx": (_gzip_bytes(TEST_LABELS, lambda d: b"<html>404 Not Found</html>\n"), "not an IDX file"),
    "gzip-truncated": (_gzip_bytes(TRAIN_IMAGES, lambda d: d[: len(d) // 2]), "truncated gzip stream"),
    "gzip-corrupt": (_gzip_bytes(TEST_IMAGES, _corrupt_crc), "corrupt gzip data"),
    "missing": (_delete, "missing file"),
    "same-file-twice": (_same_file_twice, "same content as"),
    "checksum-mismatch": (_checksum_mismatch, "checksum mismatch"),
    "both-raw-and-gz": (_both_names, "keep one"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_problem(case, small_idx_source, tmp_path):
    mutate, problem = BAD_INPUTS[case]
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    bad_file = mutate(source)
    lake = tmp_path / "lake"
    with pytest.raises(ingest.IngestError) as info:
        ingest.ingest_dataset(str(source), str(lake))
    message = str(info.value)
    assert str(bad_file) in message
    assert problem in message
    assert lake_files(lake) == []


def test_checksum_manifest_accepts_good_files_and_is_found_by_default(small_idx_source, small_dataset, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(small_idx_source, source)
    (source / landing.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))
    result = ingest.ingest_dataset(str(source), str(tmp_path / "lake"), validation_fraction=1 / 6)
    assert result["dataset_version"] == small_dataset["dataset_version"]

    wrong_records = checksum_manifest(small_arrays())
    wrong_records["files"][TRAIN_LABELS]["records"] = 60000
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps(wrong_records))
    with pytest.raises(ingest.IngestError, match=f"1200 records, {explicit} expects 60000"):
        ingest.ingest_dataset(str(source), str(tmp_path / "lake2"), checksums=str(explicit))

    explicit.write_text(json.dumps([wrong_records]))
    with pytest.raises(ingest.IngestError, match=f"{explicit}: not an idx-checksums/1 checksum manifest"):
        ingest.ingest_dataset(str(source), str(tmp_path / "lake2"), checksums=str(explicit))
    assert lake_files(tmp_path / "lake2") == []


def test_validation_fraction_is_bounded(small_idx_source, tmp_path):
    with pytest.raises(SystemExit):
        ingest.main(["--source", str(small_idx_source), "--lake", str(tmp_path), "--validation-fraction", "0.9"])
    with pytest.raises(ConfigError, match="--as-of '2026-13-01': expected a date YYYY-MM-DD"):
        ingest.IngestConfig(source="s", lake="l", as_of="2026-13-01")


@pytest.fixture
def http_source(small_idx_source, tmp_path):
    """``small_idx_source`` served over HTTP at ``/mnist``; yields (served directory, its URL)."""
    root = tmp_path / "www"
    served = root / "mnist"
    shutil.copytree(small_idx_source, served)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/mnist"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_source_requires_checksums(http_source, small_dataset, tmp_path):
    served, url = http_source
    lake = tmp_path / "lake"
    with pytest.raises(ingest.IngestError, match="checksums are mandatory for http") as info:
        ingest.ingest_dataset(url, str(lake))
    assert f"{url}/{landing.CHECKSUMS_FILE}" in str(info.value)
    assert lake_files(lake) == []

    (served / landing.CHECKSUMS_FILE).write_text(json.dumps(checksum_manifest(small_arrays())))
    result = ingest.ingest_dataset(url, str(lake), validation_fraction=1 / 6)
    assert result["dataset_version"] == small_dataset["dataset_version"]
    manifest = dataset.load_manifest(result["dataset_uri"])
    assert manifest["test_set"]["sources"]["test_images"]["uri"] == f"{url}/{TEST_IMAGES}.gz"


# ---------------------------------------------------------------- S3 (moto server)


def test_s3_round_trip(s3_env, tmp_path):
    """Landing directory and lake on the S3 server: dated batches, point in time, reuse."""
    bucket = s3_env
    client = boto3.client("s3")
    source = batched_source(tmp_path / "landing", WEEKS[:3])
    for path in source.rglob("*.gz"):
        client.put_object(Bucket=bucket, Key=f"raw/mnist/{path.relative_to(source)}", Body=path.read_bytes())
    local = ingest.ingest_dataset(str(source), str(tmp_path / "lake"), as_of=WEEKS[1])
    result = ingest.ingest_dataset(f"s3://{bucket}/raw/mnist", f"s3://{bucket}/lake", as_of=WEEKS[1])
    assert result["dataset_uri"] == f"s3://{bucket}/lake/mnist/{result['dataset_version']}"
    assert result["dataset_version"] == local["dataset_version"] and result["batches"] == WEEKS[:2]
    assert result["rows"] == local["rows"]

    for split in dataset.SPLITS:
        for got, expected in zip(dataset.read_split(result["dataset_uri"], split),
                                 dataset.read_split(local["dataset_uri"], split)):
            np.testing.assert_array_equal(got, expected)
    manifest = dataset.load_manifest(result["dataset_uri"])
    for entry, uri in zip(manifest["splits"]["test"]["files"], dataset.split_file_uris(result["dataset_uri"], "test")):
        key = uri.removeprefix(f"s3://{bucket}/")
        assert key.startswith("lake/mnist/test-sets/")
        assert hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() == entry["sha256"]

    again = ingest.ingest_dataset(f"s3://{bucket}/raw/mnist", f"s3://{bucket}/lake", as_of=WEEKS[1])
    assert again["reused"] and again["dataset_version"] == result["dataset_version"]
    assert ingest.ingest_dataset(f"s3://{bucket}/raw/mnist", f"s3://{bucket}/lake")["batches"] == WEEKS[:3]


def test_s3_failure_leaves_no_objects(s3_env, small_idx_source, monkeypatch):
    bucket = s3_env
    client = boto3.client("s3")
    for path in small_idx_source.iterdir():
        client.put_object(Bucket=bucket, Key=f"raw/{path.name}", Body=path.read_bytes())
    real_parquet_bytes = batches.parquet_bytes
    calls = []

    def fail_on_third_file(table):
        calls.append(len(table))
        if len(calls) == 3:
            raise OSError("connection reset")
        return real_parquet_bytes(table)

    monkeypatch.setattr(batches, "parquet_bytes", fail_on_third_file)
    with pytest.raises(OSError, match="connection reset"):
        ingest.ingest_dataset(f"s3://{bucket}/raw", f"s3://{bucket}/lake")
    # pyarrow may leave empty "directory" markers (keys ending in "/"); the failed batch left no data object,
    # only the test set (written before it, committed by its record) remains.
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="lake/").get("Contents", [])]
    data = [key for key in keys if not key.endswith("/")]
    assert data and all(key.startswith("lake/mnist/test-sets/") for key in data)
    assert any(key.endswith(batches.TEST_SET_RECORD) for key in data)


# ---------------------------------------------------------------- full MNIST


def test_full_vendored_mnist(tmp_path):
    result = ingest.ingest_dataset(str(VENDORED_MNIST), str(tmp_path))  # verifies data/mnist/checksums.json
    rows = result["rows"]
    assert rows["train"] + rows["validation"] == 60000 and rows["test"] == 10000
    assert abs(rows["validation"] - 5000) < 300  # a twelfth, drawn per image
    manifest = dataset.load_manifest(result["dataset_uri"])
    splits = manifest["splits"]
    train_counts = np.add(splits["train"]["class_counts"], splits["validation"]["class_counts"])
    assert train_counts.tolist() == README_TRAIN_COUNTS
    assert splits["test"]["class_counts"] == README_TEST_COUNTS
    assert all(file["rows"] <= 10_000 for split in splits.values() for file in split["files"])
    assert len(splits["train"]["files"]) == 6
    readme = (VENDORED_MNIST / "README.md").read_text()
    batch_sources = storage.read_json(storage.join(str(tmp_path), "mnist", "batches", result["batches"][0],
                                                   batches.BATCH_RECORD))["sources"]
    assert all(source["sha256"] in readme for source in [*manifest["test_set"]["sources"].values(),
                                                         *batch_sources.values()])
    all_ids = [
        image_id
        for split in dataset.SPLITS
        for uri in dataset.split_file_uris(result["dataset_uri"], split)
        for image_id in pq.read_table(uri, columns=["image_id"]).column("image_id").to_pylist()
    ]
    assert len(all_ids) == 70_000 and len(set(all_ids)) == 70_000  # MNIST has no byte-identical images


# ---------------------------------------------------------------- the Spark path (an initial load)


def lake_contents(lake):
    """Each lake file's content by relative path, less what records when it was written: batch.json's ingest time
    and the part files' signatures (modification times) in a profile record."""
    def content(path):
        if path.name == batches.BATCH_RECORD:
            return {key: value for key, value in json.loads(path.read_text()).items() if key != "ingested_at"}
        if path.name == profiles.PROFILE_RECORD:
            return {key: value for key, value in json.loads(path.read_text()).items() if key != "files"}
        return path.read_bytes()
    return {str(path.relative_to(lake)): content(path) for path in sorted(lake.rglob("*")) if path.is_file()}


def test_spark_ingest_writes_what_the_worker_writes(spark_context, tmp_path):
    source = batched_source(tmp_path / "landing", WEEKS[:4], rows_per_batch=250)
    worker_lake, spark_lake = tmp_path / "worker-lake", tmp_path / "spark-lake"
    on_worker = ingest.ingest_dataset(str(source), str(worker_lake), as_of=WEEKS[2])
    on_spark = ingest.ingest_dataset(str(source), str(spark_lake), as_of=WEEKS[2],
                                     map_batches=ingest.spark_map(spark_context))
    assert {**on_spark, "dataset_uri": None} == {**on_worker, "dataset_uri": None}
    assert on_spark["batches"] == WEEKS[:3] and not on_spark["reused"]
    manifest = f"mnist/{on_worker['dataset_version']}/{dataset.MANIFEST_FILE}"
    worker_files, spark_files = lake_contents(worker_lake), lake_contents(spark_lake)
    # the same files; the manifest, parts, id files and key filters bit for bit
    assert manifest in spark_files and spark_files == worker_files
    # a backfill on Spark adds the fourth week and reuses the three the worker path left
    grown = ingest.ingest_dataset(str(source), str(worker_lake), map_batches=ingest.spark_map(spark_context))
    assert grown["batches"] == WEEKS[:4] and not grown["reused"]
    again = ingest.ingest_dataset(str(source), str(worker_lake))  # the worker's run after it finds it all written
    assert again["reused"] and {**again, "reused": False} == grown


def test_spark_ingest_refuses_a_corrupt_batch_naming_its_file_and_writes_nothing(spark_context, tmp_path):
    source = batched_source(tmp_path / "landing", WEEKS[:3], rows_per_batch=250)
    labels = source / "batches" / WEEKS[1] / f"{TRAIN_LABELS}.gz"
    write_idx(labels, read_vendored(TRAIN_LABELS)[250:499])
    lake = tmp_path / "lake"
    with pytest.raises(ingest.IngestError, match="249 labels but") as info:
        ingest.ingest_dataset(str(source), str(lake), map_batches=ingest.spark_map(spark_context))
    assert str(labels) in str(info.value)
    assert not lake.exists() or lake_files(lake) == []  # every batch is checked before any is written
