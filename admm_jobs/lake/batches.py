"""Batches and test sets in the lake, and the dataset versions assembled from them.

Layout (``D`` = ``LAKE/<dataset>``), every directory committed by its record, written last::

    D/batches/<id>/batch.json                          content identity of a batch (id = its date)
    D/batches/<id>/validation-<f>/split={train,validation}/part-*.parquet, splits.json
    D/test-sets/<sha>/split=test/part-*.parquet, test-set.json
    D/<version>/manifest.json                          the dataset: which batches, which test set
    D/quarantine/<id>.json                             evidence of batches refused by validation

A batch is ingested once and reused afterwards; a batch whose content changed under the same
date is refused. Each image goes to validation when a hash of its pixels falls below the
validation fraction, so the split of a batch never depends on the other batches.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from admm_jobs.lake import storage
from admm_jobs.lake.dataset import (
    DATASET_FORMAT,
    IMAGE_SHAPE,
    NUM_CLASSES,
    PARQUET_SCHEMA,
    PIXELS_PER_IMAGE,
    split_directory,
)
from admm_jobs.lake.idx import IngestError, SourceFile
from admm_jobs.lake.landing import BATCHES_DIR, LandedBatch

log = logging.getLogger("admm_jobs.ingest")

BATCH_FORMAT = "idx-batch/1"


ROWS_PER_FILE = 10_000


TEST_SETS_DIR = "test-sets"


QUARANTINE_DIR = "quarantine"


BATCH_RECORD = "batch.json"


SPLITS_RECORD = "splits.json"


TEST_SET_RECORD = "test-set.json"


UNDATED_PREFIX = "undated-"


def quarantine_uri(lake_dataset_uri: str, batch_id: str) -> str:
    """Where validation keeps the evidence of a refused batch (the registry history says whether it is left out)."""
    return storage.join(lake_dataset_uri, QUARANTINE_DIR, f"{batch_id}.json")


def batch_id(batch: LandedBatch, content_sha256: str) -> str:
    return batch.date or f"{UNDATED_PREFIX}{content_sha256[:16]}"


def pair_sha256(pair: dict[str, SourceFile]) -> str:
    """Content identity of an images/labels pair (from the uncompressed bytes, so gzip or not is the same)."""
    return hashlib.sha256("".join(source.sha256 for source in pair.values()).encode()).hexdigest()


def image_ids(pixels: np.ndarray) -> list[str]:
    """Content ids: the first 16 hex digits of sha256 of each image's 784 bytes.

    The MNIST train and test files contain no byte-identical images, so the ids
    are unique there; a duplicate in other inputs is for validation to flag.
    """
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in pixels]


def validation_mask(ids: list[str], fraction: float) -> np.ndarray:
    """Image i is held out when the first 8 hex digits of its content id, read as u / 16^8, are below ``fraction``.

    Per image and independent of every other image: the split of a batch never
    shifts when batches are added, and a repeated image always lands in the same split.
    """
    return np.array([int(image_id[:8], 16) < fraction * 16**8 for image_id in ids], dtype=bool)


def split_table(images: SourceFile, labels: SourceFile, rows: np.ndarray, ids: list[str]) -> pa.Table:
    """Records ``rows`` (indices) of a source pair as a table with :data:`PARQUET_SCHEMA`."""
    pixels = np.ascontiguousarray(images.array[rows].reshape(-1, PIXELS_PER_IMAGE))
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * PIXELS_PER_IMAGE)
    columns = [
        pa.array([ids[row] for row in rows], pa.string()),
        pa.array(labels.array[rows].astype(np.int8)),
        pa.ListArray.from_arrays(offsets, pa.array(pixels.reshape(-1))),
        pa.array([images.name] * len(rows), pa.string()),
        pa.array(rows.astype(np.int32)),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise one part file; the same table always gives the same bytes (no timestamps)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=ROWS_PER_FILE)
    return sink.getvalue().to_pybytes()


def write_split(directory_uri: str, split: str, pair: dict[str, SourceFile], rows: np.ndarray, ids: list[str]
                ) -> dict[str, Any]:
    """Write records ``rows`` of a pair as part files of at most ROWS_PER_FILE rows; return the split's entry."""
    images, labels = pair.values()
    files = []
    for part, first in enumerate(range(0, len(rows), ROWS_PER_FILE)):
        chunk = rows[first:first + ROWS_PER_FILE]
        payload = parquet_bytes(split_table(images, labels, chunk, ids))
        relative = f"{split_directory(split)}/part-{part:05d}.parquet"
        storage.write_bytes(storage.join(directory_uri, relative), payload)
        files.append({"path": relative, "sha256": hashlib.sha256(payload).hexdigest(), "rows": len(chunk)})
    class_counts = np.bincount(labels.array[rows], minlength=NUM_CLASSES)
    return {"rows": len(rows), "class_counts": [int(c) for c in class_counts], "files": files}


def intact_record(directory_uri: str, record_file: str) -> dict[str, Any] | None:
    """The record committing ``directory_uri`` if it and every part file it lists are intact, else None."""
    record_uri = storage.join(directory_uri, record_file)
    if not storage.exists(record_uri):
        return None
    try:
        record = storage.read_json(record_uri)
        entries = [entry for split in record["splits"].values() for entry in split["files"]]
        intact = all(hashlib.sha256(storage.read_bytes(storage.join(directory_uri, entry["path"]))).hexdigest()
                     == entry["sha256"] for entry in entries)
    except (storage.StorageError, KeyError, TypeError, AttributeError):
        return None
    return record if intact else None


def write_splits(directory_uri: str, record_file: str, record: dict[str, Any], pair: dict[str, SourceFile],
                 rows_by_split: dict[str, np.ndarray]) -> tuple[dict[str, Any], bool]:
    """Write the splits of a pair under ``directory_uri`` (staged, record last), or reuse an intact copy.

    Returns the record and whether an intact copy was reused."""
    existing = intact_record(directory_uri, record_file)
    if existing is not None:
        return existing, True
    ids = image_ids(pair[next(iter(pair))].array.reshape(-1, PIXELS_PER_IMAGE))
    with storage.staged_directory(directory_uri) as staging:
        record = dict(record, splits={split: write_split(staging, split, pair, rows, ids)
                                      for split, rows in rows_by_split.items()})
        storage.write_json(storage.join(staging, record_file), record)
    return record, False


def fraction_tag(fraction: float) -> str:
    return f"validation-{fraction:.6g}"


def ingest_batch(lake_dataset_uri: str, batch: LandedBatch, pair: dict[str, SourceFile], fraction: float
                 ) -> tuple[str, dict[str, Any], bool]:
    """Ingest one batch once: (its lake directory, the record of its splits, whether it was reused).

    ``batch.json`` pins the content a batch id was first ingested with: the same date
    landed again with other content is refused, the same content is a no-op.
    """
    sha = pair_sha256(pair)
    identity = batch_id(batch, sha)
    batch_uri = storage.join(lake_dataset_uri, BATCHES_DIR, identity)
    record_uri = storage.join(batch_uri, BATCH_RECORD)
    images, labels = pair.values()
    known = storage.read_json(record_uri) if storage.exists(record_uri) else None
    if known is not None and known.get("sha256") != sha:
        raise IngestError(
            f"{images.uri}: batch {identity} changed after it was ingested ({known.get('ingested_at')}): "
            f"the lake holds content sha256 {known.get('sha256')}, the source now has {sha}; a dated batch is "
            "immutable, land corrected data under a new date"
        )
    ids = image_ids(images.array.reshape(-1, PIXELS_PER_IMAGE))
    held_out = validation_mask(ids, fraction)
    splits_uri = storage.join(batch_uri, fraction_tag(fraction))
    record, reused = write_splits(splits_uri, SPLITS_RECORD,
                                  {"id": identity, "sha256": sha, "validation_fraction": fraction},
                                  pair, {"train": np.flatnonzero(~held_out), "validation": np.flatnonzero(held_out)})
    if known is None:  # pinned once its data is in the lake
        storage.write_json(record_uri, {
            "format": BATCH_FORMAT, "id": identity, "date": batch.date, "sha256": sha,
            "sources": {role: source.summary() for role, source in pair.items()},
            "ingested_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        log.info("batch %s: ingested %d images from %s", identity, images.array.shape[0], batch.uri)
    return splits_uri, record, reused


def ingest_test_set(lake_dataset_uri: str, pair: dict[str, SourceFile]) -> tuple[str, dict[str, Any], bool]:
    """The fixed test set, stored once per content: (its lake directory, its record, whether it was reused)."""
    sha = pair_sha256(pair)
    test_uri = storage.join(lake_dataset_uri, TEST_SETS_DIR, sha[:16])
    summary = {"sha256": sha, "sources": {role: source.summary() for role, source in pair.items()}}
    rows = np.arange(pair["test_images"].array.shape[0])
    return (test_uri, *write_splits(test_uri, TEST_SET_RECORD, summary, pair, {"test": rows}))


def relative_to(file_uri: str, dataset_directory: str) -> str:
    """Path of a lake file relative to a dataset directory (a sibling of ``batches/`` and ``test-sets/``)."""
    parent = dataset_directory.rstrip("/").rsplit("/", 1)[0]
    if not file_uri.startswith(parent + "/"):
        raise ValueError(f"{file_uri} is not inside {parent}")
    return "../" + file_uri[len(parent) + 1:]


def dataset_version(batches: list[dict[str, Any]], test_sha256: str, fraction: float) -> str:
    """16 hex digits of sha256 over everything that determines the dataset: its batches, test set and split rule."""
    identity = {
        "format": DATASET_FORMAT,
        "rows_per_file": ROWS_PER_FILE,
        "validation_fraction": fraction,
        "batches": [[batch["id"], batch["sha256"]] for batch in batches],
        "test_set": test_sha256,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def assemble_manifest(name: str, version: str, target: str, parts: list[tuple[str, dict[str, Any]]],
                      test: tuple[str, dict[str, Any]], fraction: float) -> dict[str, Any]:
    """The dataset manifest: every split's part files (paths relative to ``target``) with their batch."""
    splits: dict[str, dict[str, Any]] = {}
    for directory, record in [*parts, test]:
        for split, entry in record["splits"].items():
            merged = splits.setdefault(split, {"rows": 0, "class_counts": [0] * NUM_CLASSES, "files": []})
            merged["rows"] += entry["rows"]
            merged["class_counts"] = [a + b for a, b in zip(merged["class_counts"], entry["class_counts"])]
            merged["files"] += [dict(file, path=relative_to(storage.join(directory, file["path"]), target),
                                     batch=record.get("id")) for file in entry["files"]]
    batches = [{"id": record["id"], "date": None if record["id"].startswith(UNDATED_PREFIX) else record["id"],
                "sha256": record["sha256"], "rows": {split: entry["rows"] for split, entry in record["splits"].items()}}
               for _, record in parts]
    dated = [batch["date"] for batch in batches if batch["date"]]
    return {
        "dataset": name, "version": version, "format": DATASET_FORMAT, "image_shape": list(IMAGE_SHAPE),
        "validation_fraction": fraction, "as_of": max(dated) if dated else None, "batches": batches,
        "test_set": {"sha256": test[1]["sha256"], "sources": test[1]["sources"]},
        "splits": {split: splits.get(split, {"rows": 0, "class_counts": [0] * NUM_CLASSES, "files": []})
                   for split in ("train", "validation", "test")},
    }
