"""Reading the image datasets that ``ingest`` writes into the lake.

A dataset lives at ``LAKE/<dataset>/<version>/``: one directory per split
(``split=train`` etc.) holding Parquet part files, and ``manifest.json``,
written last, which lists every part file with its row count and sha256.
A directory without ``manifest.json`` is not a dataset. The part files may live
outside the dataset directory (a dataset assembled from the lake's batches lists
``../batches/<id>/...``): always resolve them through :func:`split_file_uris`.

``manifest["batches"]`` lists the batches the dataset was assembled from, oldest
first: ``{"id", "date", "sha256", "rows": {"train": n, "validation": m}}``; every
file entry names its ``batch``.

Every Parquet file has the columns of :data:`PARQUET_SCHEMA`; ``pixels`` holds
the 28 x 28 grey levels of one image in row-major order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from admm_jobs.lake import storage

DATASET_FORMAT = "idx-parquet/2"  # /2: built from dated batches (manifest "batches"); /1 is still read
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation", "test")
IMAGE_SHAPE = (28, 28)
PIXELS_PER_IMAGE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
# Rows decoded at a time by the chunked reader: about 8 MB of pixels.
CHUNK_ROWS = 10_000

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("pixels", pa.list_(pa.uint8()), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_index", pa.int32(), nullable=False),
    ]
)


class DatasetError(ValueError):
    """A dataset or one of its files is missing or malformed; the message names the URI."""


def dataset_uri(lake_uri: str, dataset: str, version: str) -> str:
    """Where version ``version`` of ``dataset`` lives in the lake."""
    return storage.join(lake_uri, dataset, version)


def split_directory(split: str) -> str:
    """The directory of a split's part files, relative to the dataset directory."""
    return f"split={split}"


def load_manifest(dataset_uri: str) -> dict[str, Any]:
    """The committed manifest of a dataset; raises :class:`DatasetError` if there is none."""
    manifest_uri = storage.join(dataset_uri, MANIFEST_FILE)
    try:
        manifest = storage.read_json(manifest_uri)
    except storage.StorageError as exc:
        raise DatasetError(f"{dataset_uri}: no committed dataset ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in (DATASET_FORMAT, "idx-parquet/1"):
        raise DatasetError(f"{manifest_uri}: not an {DATASET_FORMAT} dataset manifest")
    missing = [split for split in SPLITS if split not in manifest.get("splits", {})]
    if missing:
        raise DatasetError(f"{manifest_uri}: manifest lacks split(s) {missing}")
    return manifest


def split_file_uris(dataset_uri: str, split: str) -> list[str]:
    """The URIs of the Parquet part files of ``split``, in row order."""
    if split not in SPLITS:
        raise DatasetError(f"{dataset_uri}: unknown split {split!r}, expected one of {SPLITS}")
    manifest = load_manifest(dataset_uri)
    return [storage.join(dataset_uri, entry["path"]) for entry in manifest["splits"][split]["files"]]


def newest_batch(manifest: dict[str, Any]) -> dict[str, Any]:
    """The newest batch a dataset was assembled from."""
    if not manifest.get("batches"):
        raise DatasetError(f"dataset {manifest.get('version')}: the manifest lists no batches")
    return manifest["batches"][-1]


def batch_file_uris(dataset_uri: str, batch_id: str) -> list[str]:
    """The part files (train and validation) holding batch ``batch_id`` of a dataset."""
    manifest = load_manifest(dataset_uri)
    uris = [storage.join(dataset_uri, entry["path"]) for split in ("train", "validation")
            for entry in manifest["splits"][split]["files"] if entry.get("batch") == batch_id]
    if batch_id not in [batch["id"] for batch in manifest.get("batches", [])]:
        raise DatasetError(f"{dataset_uri}: no batch {batch_id!r} in this dataset")
    return uris


def read_batch(dataset_uri: str, batch_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image (train and validation rows) of one batch of a dataset: pixels (n, 784) uint8, labels (n,) int8."""
    return read_files(batch_file_uris(dataset_uri, batch_id))


def check_schema(schema: pa.Schema, uri: str) -> None:
    """Raise :class:`DatasetError` unless ``schema`` has the dataset's columns and types."""
    expected = {field.name: field.type for field in PARQUET_SCHEMA}
    actual = {field.name: field.type for field in schema}
    problems = [
        f"column {name!r} missing" if name not in actual else f"column {name!r} is {actual[name]}, expected {kind}"
        for name, kind in expected.items()
        if actual.get(name) != kind
    ]
    if problems:
        raise DatasetError(f"{uri}: wrong Parquet schema: {'; '.join(problems)}")


def read_chunks(uris: list[str], chunk_rows: int, columns: tuple[str, ...] = ("image_id", "label", "pixels")
                ) -> Iterator[pa.Table]:
    """The rows of part files in order, ``columns`` only, as tables of at most ``chunk_rows`` rows: memory
    holds one chunk whatever the size of the files."""
    for uri in uris:
        try:
            with storage.open_binary(uri) as handle:
                parquet_file = pq.ParquetFile(handle)
                check_schema(parquet_file.schema_arrow, uri)
                for batch in parquet_file.iter_batches(batch_size=chunk_rows, columns=list(columns)):
                    yield pa.Table.from_batches([batch])
        except storage.StorageError as exc:
            raise DatasetError(str(exc)) from exc
        except pa.ArrowException as exc:
            raise DatasetError(f"{uri}: unreadable Parquet file: {exc}") from exc


def read_parquet_file(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one part file: pixels as uint8 ``(n, 784)`` and labels as int8 ``(n,)``."""
    try:
        payload = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise DatasetError(str(exc)) from exc
    try:
        parquet_file = pq.ParquetFile(pa.BufferReader(payload))
        check_schema(parquet_file.schema_arrow, uri)
        table = parquet_file.read(columns=["label", "pixels"])
    except pa.ArrowException as exc:
        raise DatasetError(f"{uri}: unreadable Parquet file: {exc}") from exc
    return _columns_to_numpy(table, uri)


def _columns_to_numpy(
    table: pa.Table | pa.RecordBatch, uri: str, first_row: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(n, 784)`` uint8 and labels ``(n,)`` int8 of a table whose first row is row ``first_row`` of ``uri``."""
    labels_column = table.column("label")
    pixels_column = table.column("pixels")
    if labels_column.null_count or pixels_column.null_count:
        raise DatasetError(f"{uri}: null labels or pixels")
    lengths = pc.list_value_length(pixels_column).to_numpy()
    if np.any(lengths != PIXELS_PER_IMAGE):
        row = int(np.flatnonzero(lengths != PIXELS_PER_IMAGE)[0])
        raise DatasetError(
            f"{uri}: row {first_row + row} has {lengths[row]} pixels, expected {PIXELS_PER_IMAGE}"
        )
    pixels = pc.list_flatten(pixels_column).to_numpy().reshape(len(table), PIXELS_PER_IMAGE)
    labels = labels_column.to_numpy()
    return pixels.astype(np.uint8, copy=False), labels.astype(np.int8, copy=False)


def read_split(dataset_uri: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All rows of ``split`` in file order (the first ``limit`` rows if given)."""
    return read_files(split_file_uris(dataset_uri, split), limit)


def read_files(uris: list[str], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of part files in order (the first ``limit`` rows if given)."""
    pixel_parts, label_parts, rows = [], [], 0
    for uri in uris:
        if limit is not None and rows >= limit:
            break
        pixels, labels = read_parquet_file(uri)
        pixel_parts.append(pixels)
        label_parts.append(labels)
        rows += len(labels)
    if not pixel_parts:
        return np.zeros((0, PIXELS_PER_IMAGE), np.uint8), np.zeros(0, np.int8)
    pixels, labels = np.concatenate(pixel_parts), np.concatenate(label_parts)
    return (pixels, labels) if limit is None else (pixels[:limit], labels[:limit])


def iter_file_chunks(uris: list[str], chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of part files in order, at most ``chunk_rows`` at a time: pixels ``(m, 784)`` uint8, labels ``(m,)``.

    Only the label and pixel columns of one record batch are decoded at a time, so memory is bounded by
    ``chunk_rows`` (and one row group's compressed columns), not by the number or size of the files.
    """
    for uri in uris:
        yield from _file_chunks(uri, chunk_rows)


def _file_chunks(uri: str, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    try:
        with storage.storage_errors(uri, "read"), storage.open_binary(uri) as source:
            parquet_file = pq.ParquetFile(source)
            check_schema(parquet_file.schema_arrow, uri)
            first_row = 0
            for batch in parquet_file.iter_batches(batch_size=chunk_rows, columns=["label", "pixels"]):
                yield _columns_to_numpy(batch, uri, first_row)
                first_row += batch.num_rows
    except storage.StorageError as exc:  # transient ones stay retryable through __cause__
        raise DatasetError(str(exc)) from exc
    except pa.ArrowException as exc:
        raise DatasetError(f"{uri}: unreadable Parquet file: {exc}") from exc
