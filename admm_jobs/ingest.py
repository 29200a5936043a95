"""Ingest stage: MNIST-format IDX files, landed in dated batches, -> versioned Parquet datasets in the lake.

    python -m admm_jobs.ingest --source SRC --lake LAKE [--dataset mnist] [--as-of YYYY-MM-DD]
        [--window N] [--validation-fraction 0.0833] [--checksums URI]

Landing contract (``SRC`` a directory URI: local, ``file://``, ``s3://``; ``https://`` for layout 2 only)::

    SRC/t10k-images-idx3-ubyte[.gz], SRC/t10k-labels-idx1-ubyte[.gz]     the fixed test set
    SRC/batches/YYYY-MM-DD/train-images-idx3-ubyte[.gz], ...labels...    1. one labelled batch per date
    SRC/train-images-idx3-ubyte[.gz], SRC/train-labels-idx1-ubyte[.gz]   2. or: one undated batch

Each file is raw or gzip (detected by content). Every structural defect is reported as
:class:`IngestError` naming the file. An optional ``checksums.json`` (idx-checksums/1) in a
directory is verified for the files of that directory (mandatory for https).

Lake layout (``D`` = ``LAKE/<dataset>``), every directory committed by its record, written last::

    D/batches/<id>/batch.json                          content identity of a batch (id = its date)
    D/batches/<id>/validation-<f>/split={train,validation}/part-*.parquet, splits.json
    D/test-sets/<sha>/split=test/part-*.parquet, test-set.json
    D/<version>/manifest.json                          the dataset: which batches, which test set
    D/quarantine/<id>.json                             batches refused by validation (excluded)

A batch is ingested once and reused afterwards; a batch whose content changed under the same
date is refused. Each image goes to validation when a hash of its pixels falls below
``validation_fraction``, so the split of a batch never depends on the other batches. The run for
logical date ``as_of`` uses every non-quarantined batch dated on or before it (the newest
``window`` of them if set); the dataset version is a hash of those batches' contents, the test
set and the split rule, so the same batches always give the same version.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import json
import logging
import re
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from admm_jobs import storage
from admm_jobs.config import configure_logging, parse_config, require, setting, validate_fields
from admm_jobs.dataset import (
    DATASET_FORMAT,
    IMAGE_SHAPE,
    MANIFEST_FILE,
    NUM_CLASSES,
    PARQUET_SCHEMA,
    PIXELS_PER_IMAGE,
    dataset_uri,
    split_directory,
)

log = logging.getLogger("admm_jobs.ingest")

CHECKSUMS_FORMAT = "idx-checksums/1"
CHECKSUMS_FILE = "checksums.json"
BATCH_FORMAT = "idx-batch/1"
ROWS_PER_FILE = 10_000
GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_PREFIX = b"\x00\x00\x08"  # magic 0x000008NN: unsigned-byte data, NN dimensions
BATCHES_DIR = "batches"
TEST_SETS_DIR = "test-sets"
QUARANTINE_DIR = "quarantine"
BATCH_RECORD = "batch.json"
SPLITS_RECORD = "splits.json"
TEST_SET_RECORD = "test-set.json"
UNDATED_PREFIX = "undated-"

# Source role -> (file name without .gz, number of IDX dimensions).
SOURCE_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}
TRAIN_ROLES = ("train_images", "train_labels")
TEST_ROLES = ("test_images", "test_labels")


class IngestError(ValueError):
    """An input file is missing, malformed or fails its checksum; the message names its URI."""


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Ingest the batches landed at SOURCE (up to a logical date) into a versioned Parquet dataset in LAKE."""

    source: str = setting(help="landing directory URI: test files plus batches/YYYY-MM-DD/ (or four IDX files)",
                          minLength=1)
    lake: str = setting(help="lake root URI; the dataset goes to LAKE/<dataset>/<version>", minLength=1)
    dataset: str = setting("mnist", "dataset name in the lake")
    as_of: str | None = setting(None, "logical date YYYY-MM-DD: use the batches dated on or before it (none: all)")
    window: int | None = setting(None, "use only the newest N of those batches (none: all)", minimum=1, maximum=100_000)
    validation_fraction: float = setting(1 / 12, "share of each batch's images held out for validation, "
                                         "drawn per image from a hash of its pixels", exclusiveMinimum=0, maximum=0.5)
    checksums: str | None = setting(
        None, f"checksum manifest URI for a four-file source (default: SOURCE/{CHECKSUMS_FILE} if present; "
        "required for https)")

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.dataset) is not None,
            f"--dataset {self.dataset!r}: use letters, digits, '_', '.', '-'",
        )
        require(self.as_of is None or parse_date(self.as_of) is not None,
                f"--as-of {self.as_of!r}: expected a date YYYY-MM-DD")


def parse_date(text: str) -> datetime.date | None:
    """``YYYY-MM-DD`` (a timestamp's date part is accepted too) as a date, None when it is not one."""
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})([T ].*)?", text.strip())
    try:
        return datetime.date.fromisoformat(match.group(1)) if match else None
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One decoded IDX input."""

    name: str  # the canonical IDX name, without ".gz": output depends on content only
    uri: str
    sha256: str  # of the uncompressed bytes
    array: np.ndarray

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "records": int(self.array.shape[0])}


# ---------------------------------------------------------------- reading inputs


def read_raw(uri: str) -> bytes:
    """The stored bytes of ``uri``, never transparently decompressed.

    (``storage.read_bytes`` goes through pyarrow input streams, which gunzip
    ``*.gz`` names on their own; the gzip check here must see the real bytes.)
    """
    with storage.open_binary(uri) as handle:
        return handle.read()


def fetch_source_file(source_uri: str, name: str) -> tuple[str, bytes]:
    """Find ``name`` or ``name.gz`` under ``source_uri``; return its URI and raw bytes."""
    candidates = [storage.join(source_uri, name), storage.join(source_uri, name + ".gz")]
    if storage.scheme(source_uri) in storage.HTTP_SCHEMES:
        for uri in candidates:
            try:
                return uri, read_raw(uri)
            except storage.StorageError:
                continue
        raise IngestError(f"{candidates[0]}[.gz]: missing file (neither name could be downloaded)")
    present = [uri for uri in candidates if storage.exists(uri)]
    if not present:
        raise IngestError(f"{candidates[0]}[.gz]: missing file")
    if len(present) > 1:
        raise IngestError(f"{candidates[0]}: both {name} and {name}.gz exist; keep one")
    try:
        return present[0], read_raw(present[0])
    except storage.StorageError as exc:
        raise IngestError(str(exc)) from exc


def decompress(uri: str, raw: bytes) -> bytes:
    """The uncompressed content: gunzip when the bytes start with the gzip magic."""
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise IngestError(f"{uri}: truncated gzip stream ({exc})") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IngestError(f"{uri}: corrupt gzip data ({exc})") from exc


def parse_idx(uri: str, data: bytes, expected_ndim: int) -> np.ndarray:
    """Decode an unsigned-byte IDX file: magic ``0x000008NN`` (NN dims), NN big-endian uint32 sizes, data."""
    expected_magic = int.from_bytes(IDX_UBYTE_PREFIX + bytes([expected_ndim]), "big")
    if not data:
        raise IngestError(f"{uri}: file is empty")
    if len(data) < 4 or data[:3] != IDX_UBYTE_PREFIX:
        raise IngestError(
            f"{uri}: not an IDX file of unsigned bytes (magic {data[:4].hex() or 'none'}, "
            f"expected 0x{expected_magic:08x})"
        )
    magic, ndim = int.from_bytes(data[:4], "big"), data[3]
    if ndim != expected_ndim:
        raise IngestError(
            f"{uri}: magic 0x{magic:08x} declares {ndim} dimension(s), expected 0x{expected_magic:08x} "
            f"({expected_ndim} dimension(s))"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IngestError(f"{uri}: truncated header ({len(data)} bytes, need {header_size})")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_bytes, actual_bytes = int(np.prod(shape, dtype=np.int64)), len(data) - header_size
    if actual_bytes < expected_bytes:
        raise IngestError(
            f"{uri}: truncated data: header {shape} needs {expected_bytes} bytes, file has {actual_bytes}"
        )
    if actual_bytes > expected_bytes:
        raise IngestError(
            f"{uri}: {actual_bytes - expected_bytes} trailing bytes after the {expected_bytes} bytes "
            f"that header {shape} describes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_source(source_uri: str, name: str, expected_ndim: int) -> SourceFile:
    uri, raw = fetch_source_file(source_uri, name)
    data = decompress(uri, raw)
    return SourceFile(
        name=name, uri=uri, sha256=hashlib.sha256(data).hexdigest(), array=parse_idx(uri, data, expected_ndim)
    )


def check_pair(images: SourceFile, labels: SourceFile) -> None:
    """Images are 28 x 28, one label per image, labels within 0..9."""
    if images.array.shape[1:] != IMAGE_SHAPE:
        raise IngestError(f"{images.uri}: images are {images.array.shape[1:]} pixels, expected {IMAGE_SHAPE}")
    if images.array.shape[0] != labels.array.shape[0]:
        raise IngestError(
            f"{labels.uri}: {labels.array.shape[0]} labels but {images.uri} has {images.array.shape[0]} images"
        )
    bad = np.flatnonzero(labels.array >= NUM_CLASSES)
    if bad.size:
        raise IngestError(
            f"{labels.uri}: {bad.size} label(s) outside 0..{NUM_CLASSES - 1}, "
            f"first at record {bad[0]} (value {labels.array[bad[0]]})"
        )


def check_distinct(sources: dict[str, SourceFile]) -> None:
    """No two inputs may have the same content (e.g. the training file given as the test file)."""
    seen: dict[str, SourceFile] = {}
    for source in sources.values():
        if source.sha256 in seen:
            raise IngestError(f"{source.uri}: same content as {seen[source.sha256].uri} (file given twice?)")
        seen[source.sha256] = source


def load_checksums(directory_uri: str, explicit_uri: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The checksum manifest of a directory (URI, per-file entries), or None where none is given or present."""
    is_http = storage.scheme(directory_uri) in storage.HTTP_SCHEMES
    manifest_uri = explicit_uri or storage.join(directory_uri, CHECKSUMS_FILE)
    if explicit_uri is None and not is_http and not storage.exists(manifest_uri):
        return None
    try:
        manifest = storage.read_json(manifest_uri)
    except storage.StorageError as exc:
        hint = " (checksums are mandatory for http(s) sources)" if is_http else ""
        raise IngestError(f"{exc}{hint}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != CHECKSUMS_FORMAT:
        raise IngestError(f"{manifest_uri}: not an {CHECKSUMS_FORMAT} checksum manifest")
    return manifest_uri, files


def verify_checksums(sources: dict[str, SourceFile], checksums: tuple[str, dict[str, Any]] | None) -> None:
    """Each input's uncompressed sha256 and record count must equal its manifest entry."""
    if checksums is None:
        return
    manifest_uri, entries = checksums
    for source in sources.values():
        entry = entries.get(source.name)
        if not isinstance(entry, dict):
            raise IngestError(f"{source.uri}: no entry {source.name!r} in checksum manifest {manifest_uri}")
        if entry.get("sha256") != source.sha256:
            raise IngestError(
                f"{source.uri}: checksum mismatch: uncompressed sha256 {source.sha256}, "
                f"{manifest_uri} expects {entry.get('sha256')}"
            )
        if entry.get("records") != source.array.shape[0]:
            raise IngestError(
                f"{source.uri}: {source.array.shape[0]} records, {manifest_uri} expects {entry.get('records')}"
            )


def read_pair(directory_uri: str, roles: tuple[str, str], checksums: tuple[str, dict[str, Any]] | None
              ) -> dict[str, SourceFile]:
    """Read, decode and check one images/labels pair of a directory."""
    pair = {role: read_source(directory_uri, *SOURCE_FILES[role]) for role in roles}
    verify_checksums(pair, checksums)
    check_distinct(pair)
    check_pair(*pair.values())
    return pair


@dataclasses.dataclass(frozen=True)
class LandedBatch:
    """A labelled batch in the landing directory: ``date`` None for a plain four-file source."""

    date: str | None
    uri: str


def landed_batches(source_uri: str) -> list[LandedBatch]:
    """The batches under ``SOURCE/batches/YYYY-MM-DD/`` oldest first, or the source itself as one undated batch."""
    root = storage.join(source_uri, BATCHES_DIR)
    if storage.scheme(source_uri) in storage.HTTP_SCHEMES or not storage.exists(root):
        return [LandedBatch(None, source_uri)]
    names = sorted({file_uri[len(root):].lstrip("/").split("/")[0] for file_uri in storage.list_files(root)})
    for name in names:
        if parse_date(name) is None or name != parse_date(name).isoformat():
            raise IngestError(f"{storage.join(root, name)}: batch directories are named YYYY-MM-DD")
    stray = [storage.join(source_uri, name + suffix) for name, _ in map(SOURCE_FILES.get, TRAIN_ROLES)
             for suffix in ("", ".gz") if storage.exists(storage.join(source_uri, name + suffix))]
    if stray:
        raise IngestError(f"{stray[0]}: training files next to {root}/; land training data as dated batches only")
    return [LandedBatch(name, storage.join(root, name)) for name in names]


def quarantine_uri(lake_dataset_uri: str, batch_id: str) -> str:
    """Where validation records a refused batch; ingest leaves such batches out of later datasets."""
    return storage.join(lake_dataset_uri, QUARANTINE_DIR, f"{batch_id}.json")


def batch_id(batch: LandedBatch, content_sha256: str) -> str:
    return batch.date or f"{UNDATED_PREFIX}{content_sha256[:16]}"


def pair_sha256(pair: dict[str, SourceFile]) -> str:
    """Content identity of an images/labels pair (from the uncompressed bytes, so gzip or not is the same)."""
    return hashlib.sha256("".join(source.sha256 for source in pair.values()).encode()).hexdigest()


# ---------------------------------------------------------------- writing the dataset


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


def selected_batches(config: IngestConfig, lake_dataset_uri: str) -> tuple[list[LandedBatch], list[str]]:
    """The landed batches the run uses (dated on or before ``as_of``, not quarantined, newest ``window``),
    and the ids of the quarantined ones left out."""
    landed = landed_batches(config.source)
    if config.as_of is not None:
        as_of = parse_date(config.as_of).isoformat()
        landed = [batch for batch in landed if batch.date is None or batch.date <= as_of]
    quarantined = [batch.date for batch in landed
                   if batch.date and storage.exists(quarantine_uri(lake_dataset_uri, batch.date))]
    landed = [batch for batch in landed if batch.date not in quarantined]
    if config.window is not None:
        landed = landed[-config.window:]
    if not landed:
        raise IngestError(f"{storage.join(config.source, BATCHES_DIR)}: no batch dated on or before {config.as_of}"
                          + (f" (quarantined: {quarantined})" if quarantined else ""))
    return landed, quarantined


def absolute(uri: str) -> str:
    """Plain local paths made absolute, so recorded URIs do not depend on the working directory."""
    return str(storage.local_path(uri).resolve()) if storage.scheme(uri) == "" else uri


def ingest(config: IngestConfig) -> dict[str, Any]:
    """Ingest the batches of ``config.source`` up to ``config.as_of`` into the lake; return the stage result."""
    lake_dataset = storage.join(config.lake, config.dataset)
    batches, quarantined = selected_batches(config, lake_dataset)
    fraction = config.validation_fraction
    four_file_source = batches[0].date is None
    source_checksums = load_checksums(config.source, config.checksums) if four_file_source else load_checksums(
        config.source)
    # read and check every input before writing anything
    test_pair = read_pair(config.source, TEST_ROLES, source_checksums)
    pairs = []
    for batch in batches:
        pair = read_pair(batch.uri, TRAIN_ROLES, source_checksums if four_file_source else load_checksums(batch.uri))
        check_distinct({**pair, **test_pair})
        pairs.append(pair)
    test_uri, test_record, test_reused = ingest_test_set(lake_dataset, test_pair)
    parts, reused_parts = [], [test_reused]
    for batch, pair in zip(batches, pairs):
        splits_uri, record, reused = ingest_batch(lake_dataset, batch, pair, fraction)
        parts.append((splits_uri, record))
        reused_parts.append(reused)
    train_rows = sum(record["splits"]["train"]["rows"] for _, record in parts)
    if train_rows == 0:
        raise IngestError(f"{batches[-1].uri}: no training rows left after holding out "
                          f"{fraction:.4g} of the images for validation")
    version = dataset_version([record for _, record in parts], test_record["sha256"], fraction)
    target = dataset_uri(config.lake, config.dataset, version)
    manifest_uri = storage.join(target, MANIFEST_FILE)
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
    else:
        reused_parts.append(False)
        manifest = assemble_manifest(config.dataset, version, target, parts, (test_uri, test_record), fraction)
        with storage.staged_directory(target) as staging:
            storage.write_json(storage.join(staging, MANIFEST_FILE), manifest)
    if quarantined:
        log.warning("left out quarantined batch(es) %s (see %s)", quarantined,
                    storage.join(lake_dataset, QUARANTINE_DIR))
    return {
        "dataset_uri": target,
        "dataset_version": version,
        "rows": {split: entry["rows"] for split, entry in manifest["splits"].items()},
        "batches": [batch["id"] for batch in manifest["batches"]],
        "quarantined": quarantined,
        "reused": all(reused_parts),  # nothing was written
    }


def ingest_dataset(source: str, lake: str, **settings: Any) -> dict[str, Any]:
    """Ingest with local paths made absolute (see :class:`IngestConfig` for ``settings``)."""
    checksums = settings.pop("checksums", None)
    return ingest(IngestConfig(source=absolute(source), lake=absolute(lake),
                               checksums=None if checksums is None else absolute(checksums), **settings))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    config = parse_config(IngestConfig, argv)
    result = ingest_dataset(**dataclasses.asdict(config))
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
