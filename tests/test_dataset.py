"""Dataset reader: manifest, part files, schema checks, split reads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from admm_jobs import ingest
from admm_jobs.lake import batches, dataset, storage

from idx_files import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_vendored


def test_read_split_returns_the_idx_content(small_dataset):
    uri = small_dataset["dataset_uri"]
    pixels, labels = dataset.read_split(uri, "test")
    assert pixels.dtype == np.uint8 and labels.dtype == np.int8
    assert pixels.shape == (400, dataset.PIXELS_PER_IMAGE)
    np.testing.assert_array_equal(pixels, read_vendored(TEST_IMAGES)[:400].reshape(400, -1))
    np.testing.assert_array_equal(labels, read_vendored(TEST_LABELS)[:400])


def test_read_split_limit_spans_part_files(small_idx_source, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "ROWS_PER_FILE", 300)
    uri = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_fraction=1 / 6)["dataset_uri"]
    train_rows = dataset.load_manifest(uri)["splits"]["train"]["rows"]
    assert len(dataset.split_file_uris(uri, "train")) == 4  # about 1,000 rows: 300 + 300 + 300 + the rest
    pixels, labels = dataset.read_split(uri, "train", limit=450)
    assert pixels.shape == (450, 784)
    held_out = batches.validation_mask(batches.image_ids(read_vendored(TRAIN_IMAGES)[:1200].reshape(-1, 784)), 1 / 6)
    kept = np.flatnonzero(~held_out)[:450]
    np.testing.assert_array_equal(pixels, read_vendored(TRAIN_IMAGES)[kept].reshape(450, -1))
    np.testing.assert_array_equal(labels, read_vendored(TRAIN_LABELS)[kept])
    full_pixels, _ = dataset.read_split(uri, "train")
    assert full_pixels.shape == (train_rows, 784) and train_rows == (~held_out).sum()


def test_chunked_reads_give_the_rows_of_a_whole_read_a_few_at_a_time(small_idx_source, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "ROWS_PER_FILE", 300)
    uri = ingest.ingest_dataset(str(small_idx_source), str(tmp_path), validation_fraction=1 / 6)["dataset_uri"]
    files = dataset.split_file_uris(uri, "train")
    chunks = list(dataset.iter_file_chunks(files, chunk_rows=128))
    # 300-row files in chunks of 128: 128 + 128 + 44 per full file; a chunk never spans two files.
    assert [len(labels) for _, labels in chunks[:3]] == [128, 128, 44]
    assert all(len(labels) <= 128 for _, labels in chunks)
    pixels, labels = dataset.read_split(uri, "train")
    np.testing.assert_array_equal(np.concatenate([chunk for chunk, _ in chunks]), pixels)
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in chunks]), labels)
    assert chunks[0][0].dtype == np.uint8 and chunks[0][1].dtype == np.int8


def test_split_file_uris_follow_the_manifest(small_dataset):
    uri = small_dataset["dataset_uri"]
    manifest = dataset.load_manifest(uri)
    for split in dataset.SPLITS:
        files = dataset.split_file_uris(uri, split)
        assert files == [storage.join(uri, entry["path"]) for entry in manifest["splits"][split]["files"]]
        assert all(storage.exists(path) for path in files)
        assert all(f"/split={split}/part-" in path for path in files)
    with pytest.raises(dataset.DatasetError, match="unknown split 'holdout'"):
        dataset.split_file_uris(uri, "holdout")


def test_directory_without_manifest_is_not_a_dataset(small_dataset, tmp_path):
    uncommitted = tmp_path / "mnist" / "0123456789abcdef"
    (uncommitted / "split=train").mkdir(parents=True)
    with pytest.raises(dataset.DatasetError, match="no committed dataset") as info:
        dataset.read_split(str(uncommitted), "train")
    assert str(uncommitted) in str(info.value)


def test_manifest_of_another_format_is_rejected(tmp_path):
    (tmp_path / dataset.MANIFEST_FILE).write_text(json.dumps({"format": "csv/1", "splits": {}}))
    with pytest.raises(dataset.DatasetError, match="not an idx-parquet/2 dataset manifest") as info:
        dataset.load_manifest(str(tmp_path))
    assert str(tmp_path / dataset.MANIFEST_FILE) in str(info.value)


def _write_table(path, columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_wrong_schema_names_the_file_and_the_columns(tmp_path):
    path = _write_table(
        tmp_path / "part-00000.parquet",
        {
            "image_id": ["a"],
            "label": pa.array([3], pa.int64()),
            "pixels": pa.array([[0] * 784], pa.list_(pa.uint8())),
            "source_file": ["x"],
        },
    )
    with pytest.raises(dataset.DatasetError) as info:
        dataset.read_parquet_file(path)
    message = str(info.value)
    assert path in message and "wrong Parquet schema" in message
    assert "column 'label' is int64, expected int8" in message
    assert "column 'source_index' missing" in message


def test_wrong_pixel_count_names_the_row(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"image_id": "a", "label": 1, "pixels": [0] * 784, "source_file": "f", "source_index": 0},
            {"image_id": "b", "label": 2, "pixels": [0] * 783, "source_file": "f", "source_index": 1},
        ],
        schema=dataset.PARQUET_SCHEMA,
    )
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path)
    with pytest.raises(dataset.DatasetError, match="row 1 has 783 pixels, expected 784") as info:
        dataset.read_parquet_file(str(path))
    assert str(path) in str(info.value)
    # Read a row at a time, the row number still counts from the start of the file.
    with pytest.raises(dataset.DatasetError, match=f"{path}: row 1 has 783 pixels, expected 784"):
        list(dataset.iter_file_chunks([str(path)], chunk_rows=1))


def test_not_parquet_and_missing_file(tmp_path):
    garbage = tmp_path / "part-00000.parquet"
    garbage.write_bytes(b"definitely not parquet")
    with pytest.raises(dataset.DatasetError, match="unreadable Parquet file") as info:
        dataset.read_parquet_file(str(garbage))
    assert str(garbage) in str(info.value)
    missing = tmp_path / "part-00001.parquet"
    with pytest.raises(dataset.DatasetError, match="no such file") as info:
        dataset.read_parquet_file(str(missing))
    assert str(missing) in str(info.value)
    for path, message in ((garbage, "unreadable Parquet file"), (missing, "no such file")):
        with pytest.raises(dataset.DatasetError, match=message) as info:
            list(dataset.iter_file_chunks([str(path)]))
        assert str(path) in str(info.value)
