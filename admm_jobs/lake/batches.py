"""Batches and test sets in the lake, and the dataset versions assembled from them.

Layout (``D`` = ``LAKE/<dataset>``), every directory committed by its record, written last::

    D/batches/<id>/batch.json                          content identity of a batch (id = its date)
    D/batches/<id>/validation-<f>/split={train,validation}/part-*.parquet, splits.json
    D/batches/<id>/validation-<f>/profile/             its profile (:mod:`admm_jobs.lake.profiles`)
    D/test-sets/<sha>/split=test/part-*.parquet, test-set.json, profile/
    D/<version>/manifest.json                          the dataset: which batches, which test set
    D/quarantine/<id>.json                             evidence of batches refused by validation

A batch is ingested once and reused afterwards; a batch whose content changed under the same
date is refused. ``batch.json`` records each landed file's sha256 and its signature (size, and
ETag on S3 or modification time elsewhere); a later run re-hashes only the files whose
signature differs, so a change is seen unless the writer kept both size and ETag/mtime (an
S3 ETag changes with the content; a local rewrite that restores the mtime is not seen). Likewise
the lake's own part files are checked against the signatures in their profile and re-hashed
only where those differ. Each image goes to validation when a hash of its pixels falls below the
validation fraction, so the split of a batch never depends on the other batches.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from admm_jobs.lake import landing, profiles, storage
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


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Which split each record goes to, from its image id: all to ``splits[0]``, or with a validation fraction
    to train or validation (:func:`validation_mask`)."""

    splits: tuple[str, ...]
    validation_fraction: float | None = None

    def split_of(self, ids: list[str]) -> np.ndarray:
        if self.validation_fraction is None:
            return np.full(len(ids), self.splits[0])
        return np.where(validation_mask(ids, self.validation_fraction), "validation", "train")


TEST_RULE = SplitRule(("test",))


def split_table(name: str, first: int, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, ids: list[str]
                ) -> pa.Table:
    """Records ``rows`` (indices into a chunk of the source file ``name`` that starts at record ``first``) as a
    table with :data:`PARQUET_SCHEMA`."""
    pixels = np.ascontiguousarray(images[rows].reshape(-1, PIXELS_PER_IMAGE))
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * PIXELS_PER_IMAGE)
    columns = [
        pa.array([ids[row] for row in rows], pa.string()),
        pa.array(labels[rows].astype(np.int8)),
        pa.ListArray.from_arrays(offsets, pa.array(pixels.reshape(-1))),
        pa.array([name] * len(rows), pa.string()),
        pa.array((first + rows).astype(np.int32)),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise one part file; the same table always gives the same bytes (no timestamps)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=ROWS_PER_FILE)
    return sink.getvalue().to_pybytes()


class SplitWriter:
    """Writes the rows of one split, as they arrive, as part files of ROWS_PER_FILE rows (the last one shorter),
    each profiled as it is written. Memory: less than two part files' rows."""

    def __init__(self, directory_uri: str, split: str):
        self.directory_uri, self.split = directory_uri, split
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict[str, Any]] = []
        self.class_counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.profiler = profiles.SplitProfiler()

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += len(table)
        while self.pending_rows >= ROWS_PER_FILE:
            self.write_part(ROWS_PER_FILE)

    def write_part(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as the next part file."""
        pending = pa.concat_tables(self.pending).combine_chunks()
        table, rest = pending.slice(0, rows), pending.slice(rows)
        self.pending, self.pending_rows = [rest] if len(rest) else [], len(rest)
        self.profiler.add(table)
        self.class_counts += np.bincount(table.column("label").to_numpy(), minlength=NUM_CLASSES)
        payload = parquet_bytes(table)
        relative = f"{split_directory(self.split)}/part-{len(self.files):05d}.parquet"
        storage.write_bytes(storage.join(self.directory_uri, relative), payload)
        self.files.append({"path": relative, "sha256": hashlib.sha256(payload).hexdigest(), "rows": len(table)})

    def finish(self) -> tuple[dict[str, Any], profiles.SplitProfile]:
        """The split's entry of its directory's record, and its profile."""
        if self.pending_rows:
            self.write_part(self.pending_rows)
        entry = {"rows": sum(file["rows"] for file in self.files),
                 "class_counts": [int(count) for count in self.class_counts], "files": self.files}
        return entry, self.profiler.finish()


def part_paths(record: dict[str, Any]) -> dict[str, list[str]]:
    """The part files of each split of a directory's record, relative to the directory."""
    return {split: [entry["path"] for entry in entry_list["files"]] for split, entry_list in record["splits"].items()}


def hashes_match(directory_uri: str, record: dict[str, Any]) -> bool:
    """Whether every part file a record lists has the sha256 recorded (reads them all)."""
    entries = [entry for split in record["splits"].values() for entry in split["files"]]
    return all(hashlib.sha256(storage.read_bytes(storage.join(directory_uri, entry["path"]))).hexdigest()
               == entry["sha256"] for entry in entries)


def intact_record(directory_uri: str, record_file: str, sha256: str) -> tuple[dict[str, Any] | None, bool]:
    """The record committing ``directory_uri``, written from content ``sha256``, if it and every part file it
    lists are intact, else None; and whether its profile had to be written or updated (its lacking one or its key
    filters, as in lakes from before them, or new signatures).

    Part files whose signature (size and ETag or modification time) is the one their profile recorded are
    taken as intact without reading them; otherwise every part file is hashed, and when all match the new
    signatures are recorded.
    """
    record_uri = storage.join(directory_uri, record_file)
    if not storage.exists(record_uri):
        return None, False
    try:
        record = storage.read_json(record_uri)
        paths = part_paths(record)
        profile = profiles.load_profile(directory_uri, sha256) if record.get("sha256") == sha256 else None
        listed = [path for split_paths in paths.values() for path in split_paths]
        if profile is not None and profiles.unchanged_files(directory_uri, profile, listed):
            if profiles.has_filters(profile):
                return record, False
            profiles.add_filters(directory_uri, profile)
            return record, True
        if record.get("sha256") != sha256 or not hashes_match(directory_uri, record):
            return None, False
    except (storage.StorageError, KeyError, TypeError, AttributeError):
        return None, False
    if profile is None:
        profiles.ensure_profile(directory_uri, sha256, paths)
    else:
        profiles.record_signatures(directory_uri, profile, listed)
    return record, True


def write_splits(directory_uri: str, record_file: str, record: dict[str, Any], pair: landing.PairStream,
                 rule: SplitRule, chunk_rows: int) -> dict[str, Any]:
    """Write a pair streamed ``chunk_rows`` records at a time under ``directory_uri``, each record to the split
    ``rule`` names for its image id (staged, record last), then their profile; return the record. The pair
    must have the content ``record["sha256"]``, checked once it was read to its end, before anything is
    committed."""
    with storage.staged_directory(directory_uri) as staging:
        writers = {split: SplitWriter(staging, split) for split in rule.splits}
        for first, images, labels in pair.chunks(chunk_rows):
            ids = image_ids(images.reshape(-1, PIXELS_PER_IMAGE))
            splits = rule.split_of(ids)
            for split, writer in writers.items():
                rows = np.flatnonzero(splits == split)
                if len(rows):
                    writer.add(split_table(pair.images.name, first, images, labels, rows, ids))
        if pair_sha256(pair.finish()) != record["sha256"]:
            raise IngestError(f"{pair.images.uri}, {pair.labels.uri}: changed while it was being ingested; run again")
        finished = {split: writer.finish() for split, writer in writers.items()}
        record = dict(record, splits={split: entry for split, (entry, _) in finished.items()})
        storage.write_json(storage.join(staging, record_file), record)
    paths = part_paths(record)
    profiles.write_profile(directory_uri, record["sha256"], [path for split in paths.values() for path in split],
                           {split: profile for split, (_, profile) in finished.items()})
    return record


def fraction_tag(fraction: float) -> str:
    return f"validation-{fraction:.6g}"


def pinned_batch(lake_dataset_uri: str, identity: str) -> dict[str, Any] | None:
    """The record pinning the content batch ``identity`` was first ingested with; None before its first ingest."""
    record_uri = storage.join(lake_dataset_uri, BATCHES_DIR, identity, BATCH_RECORD)
    return storage.read_json(record_uri) if storage.exists(record_uri) else None


def changed_roles(pinned: dict[str, Any], batch: LandedBatch) -> list[str]:
    """The source roles of a pinned batch whose landed file may have changed since it was ingested: its
    signature is not the one recorded then (or none was recorded, as before signatures existed)."""
    return [role for role, source in pinned["sources"].items()
            if source.get("signature") is None or batch.signatures.get(source["uri"]) != source["signature"]]


def check_unchanged(pinned: dict[str, Any], source: SourceFile, role: str) -> None:
    """Refuse a landed file whose content differs from what its batch was ingested with: a dated batch is
    immutable."""
    expected = pinned["sources"][role]["sha256"]
    if source.sha256 != expected:
        raise IngestError(
            f"{source.uri}: batch {pinned['id']} changed after it was ingested ({pinned.get('ingested_at')}): "
            f"the lake holds {source.name} with sha256 {expected}, the source now has {source.sha256}; a dated "
            "batch is immutable, land corrected data under a new date"
        )


def pin_batch(lake_dataset_uri: str, batch: LandedBatch, sha: str, pinned: dict[str, Any] | None,
              read: dict[str, dict[str, Any]]) -> bool:
    """Record the content a batch was first ingested with, and its landed files' signatures; later, the
    signatures of files found unchanged by their hash (``read``: summaries of the files read this run).
    Returns whether anything was written."""
    identity = batch_id(batch, sha)
    record_uri = storage.join(lake_dataset_uri, BATCHES_DIR, identity, BATCH_RECORD)
    pinned = pinned or pinned_batch(lake_dataset_uri, identity)
    if pinned is None:
        pinned = {"format": BATCH_FORMAT, "id": identity, "date": batch.date, "sha256": sha, "sources": {},
                  "ingested_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    sources = {**pinned["sources"], **read}
    signed = {role: {**source, "signature": batch.signatures.get(source["uri"])} for role, source in sources.items()}
    if pinned["sources"] == signed and storage.exists(record_uri):
        return False
    storage.write_json(record_uri, {**pinned, "sources": signed})
    return True


def ingest_batch(lake_dataset_uri: str, batch: LandedBatch, sha: str, fraction: float,
                 open_pair: Callable[[], landing.PairStream], chunk_rows: int) -> tuple[str, dict[str, Any], bool]:
    """The splits of a batch of content ``sha`` in the lake, streamed from ``open_pair()`` unless an intact copy
    exists: (their directory, their record, whether an intact copy was reused with nothing written)."""
    identity = batch_id(batch, sha)
    splits_uri = storage.join(lake_dataset_uri, BATCHES_DIR, identity, fraction_tag(fraction))
    record, profiled = intact_record(splits_uri, SPLITS_RECORD, sha)
    if record is not None:
        return splits_uri, record, not profiled
    pair = open_pair()
    record = write_splits(splits_uri, SPLITS_RECORD, {"id": identity, "sha256": sha, "validation_fraction": fraction},
                          pair, SplitRule(("train", "validation"), fraction), chunk_rows)
    log.info("batch %s: ingested %d images from %s", identity, pair.images.shape[0], batch.uri)
    return splits_uri, record, False


def ingest_test_set(lake_dataset_uri: str, pair: dict[str, SourceFile], open_pair: Callable[[], landing.PairStream],
                    chunk_rows: int) -> tuple[str, dict[str, Any], bool]:
    """The fixed test set (``pair``: its checked files), stored once per content, streamed from ``open_pair()``:
    (its lake directory, its record, whether it was reused with nothing written)."""
    sha = pair_sha256(pair)
    test_uri = storage.join(lake_dataset_uri, TEST_SETS_DIR, sha[:16])
    summary = {"sha256": sha, "sources": {role: source.summary() for role, source in pair.items()}}
    record, profiled = intact_record(test_uri, TEST_SET_RECORD, sha)
    if record is not None:
        return test_uri, record, not profiled
    return test_uri, write_splits(test_uri, TEST_SET_RECORD, summary, open_pair(), TEST_RULE, chunk_rows), False


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
