"""Ingest stage: four MNIST IDX files -> a versioned Parquet dataset in the lake.

    python -m admm_jobs.ingest --source SRC --lake LAKE [--dataset mnist]
        [--validation-size 5000] [--checksums URI]

The source is a directory URI (local, ``file://``, ``s3://``, ``https://``)
holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or gzip
(detected by content; the name may carry ``.gz``). Every structural defect is
reported as :class:`IngestError` naming the file.

Splits: train = the first ``N - validation_size`` records of the training
file, validation = its last ``validation_size`` records, test = the test
file. The dataset version is a hash of the uncompressed input contents and the
split settings, so the same inputs always give the same version; an existing,
intact copy of that version is reused untouched. Output is written to a staging
location and committed by ``manifest.json``, written last.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from admm_jobs import storage
from admm_jobs.config import parse_config, require, setting, validate_fields
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

CHECKSUMS_FORMAT = "idx-checksums/1"
CHECKSUMS_FILE = "checksums.json"
ROWS_PER_FILE = 10_000
GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_PREFIX = b"\x00\x00\x08"  # magic 0x000008NN: unsigned-byte data, NN dimensions

# Source role -> (file name without .gz, number of IDX dimensions).
SOURCE_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


class IngestError(ValueError):
    """An input file is missing, malformed or fails its checksum; the message names its URI."""


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Convert the four MNIST IDX files at SOURCE into a versioned Parquet dataset in LAKE."""

    source: str = setting(help="directory URI holding the four IDX files", minLength=1)
    lake: str = setting(help="lake root URI; the dataset goes to LAKE/<dataset>/<version>", minLength=1)
    dataset: str = setting("mnist", "dataset name in the lake")
    validation_size: int = setting(5000, "last N training records held out for validation", minimum=1)
    checksums: str | None = setting(
        None, f"checksum manifest URI (default: SOURCE/{CHECKSUMS_FILE} if present; required for https)")

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.dataset) is not None,
            f"--dataset {self.dataset!r}: use letters, digits, '_', '.', '-'",
        )


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


def load_checksums(config: IngestConfig) -> tuple[str, dict[str, Any]] | None:
    """The checksum manifest (URI, per-file entries), or None where none is given or present."""
    is_http = storage.scheme(config.source) in storage.HTTP_SCHEMES
    manifest_uri = config.checksums or storage.join(config.source, CHECKSUMS_FILE)
    if config.checksums is None and not is_http and not storage.exists(manifest_uri):
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


def verify_checksums(sources: dict[str, SourceFile], checksums: tuple[str, dict[str, Any]]) -> None:
    """Each input's uncompressed sha256 and record count must equal its manifest entry."""
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


def read_sources(config: IngestConfig) -> dict[str, SourceFile]:
    """Read, decode and check the four inputs."""
    checksums = load_checksums(config)
    sources = {role: read_source(config.source, name, ndim) for role, (name, ndim) in SOURCE_FILES.items()}
    if checksums is not None:
        verify_checksums(sources, checksums)
    check_distinct(sources)
    check_pair(sources["train_images"], sources["train_labels"])
    check_pair(sources["test_images"], sources["test_labels"])
    train_records = sources["train_images"].array.shape[0]
    if config.validation_size >= train_records:
        raise IngestError(
            f"{sources['train_images'].uri}: {train_records} records leave no training rows "
            f"after a validation split of {config.validation_size}"
        )
    return sources


# ---------------------------------------------------------------- writing the dataset


def dataset_version(sources: dict[str, SourceFile], validation_size: int) -> str:
    """16 hex digits of sha256 over everything that determines the output."""
    identity = {
        "format": DATASET_FORMAT,
        "rows_per_file": ROWS_PER_FILE,
        "validation_size": validation_size,
        "sources": {role: source.sha256 for role, source in sorted(sources.items())},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def image_ids(pixels: np.ndarray) -> list[str]:
    """Content ids: the first 16 hex digits of sha256 of each image's 784 bytes.

    The MNIST train and test files contain no byte-identical images, so the ids
    are unique there; a duplicate in other inputs is for validation to flag.
    """
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in pixels]


def split_table(images: SourceFile, labels: SourceFile, start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` of a source pair as a table with :data:`PARQUET_SCHEMA`."""
    pixels = np.ascontiguousarray(images.array[start:stop].reshape(-1, PIXELS_PER_IMAGE))
    rows = pixels.shape[0]
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * PIXELS_PER_IMAGE)
    columns = [
        pa.array(image_ids(pixels), pa.string()),
        pa.array(labels.array[start:stop].astype(np.int8)),
        pa.ListArray.from_arrays(offsets, pa.array(pixels.reshape(-1))),
        pa.array([images.name] * rows, pa.string()),
        pa.array(np.arange(start, stop, dtype=np.int32)),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise one part file; the same table always gives the same bytes (no timestamps)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=ROWS_PER_FILE)
    return sink.getvalue().to_pybytes()


def split_ranges(sources: dict[str, SourceFile], validation_size: int) -> dict[str, tuple[str, int, int]]:
    """Split -> (source prefix, first record, end record)."""
    train_records = sources["train_images"].array.shape[0]
    test_records = sources["test_images"].array.shape[0]
    return {
        "train": ("train", 0, train_records - validation_size),
        "validation": ("train", train_records - validation_size, train_records),
        "test": ("test", 0, test_records),
    }


def write_split(
    directory_uri: str, split: str, images: SourceFile, labels: SourceFile, start: int, stop: int
) -> dict[str, Any]:
    """Write one split as part files of at most ROWS_PER_FILE rows; return its manifest entry."""
    files = []
    for part, part_start in enumerate(range(start, stop, ROWS_PER_FILE)):
        part_stop = min(part_start + ROWS_PER_FILE, stop)
        payload = parquet_bytes(split_table(images, labels, part_start, part_stop))
        relative = f"{split_directory(split)}/part-{part:05d}.parquet"
        storage.write_bytes(storage.join(directory_uri, relative), payload)
        files.append({"path": relative, "sha256": hashlib.sha256(payload).hexdigest(), "rows": part_stop - part_start})
    class_counts = np.bincount(labels.array[start:stop], minlength=NUM_CLASSES)
    return {"rows": stop - start, "class_counts": [int(c) for c in class_counts], "files": files}


def existing_intact_manifest(target_uri: str, sources: dict[str, SourceFile]) -> dict[str, Any] | None:
    """The manifest of an already committed copy of this version, if it and all its files are intact."""
    manifest_uri = storage.join(target_uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        return None
    try:
        manifest = storage.read_json(manifest_uri)
        same_sources = all(
            manifest["sources"][role]["sha256"] == source.sha256 for role, source in sources.items()
        )
        files = [entry for split in manifest["splits"].values() for entry in split["files"]]
        intact = all(
            hashlib.sha256(storage.read_bytes(storage.join(target_uri, entry["path"]))).hexdigest()
            == entry["sha256"]
            for entry in files
        )
    except (storage.StorageError, KeyError, TypeError):
        return None
    return manifest if same_sources and intact else None


def absolute(uri: str) -> str:
    """Plain local paths made absolute, so recorded URIs do not depend on the working directory."""
    return str(storage.local_path(uri).resolve()) if storage.scheme(uri) == "" else uri


def ingest_dataset(
    source: str,
    lake: str,
    dataset: str = "mnist",
    validation_size: int = 5000,
    checksums: str | None = None,
) -> dict[str, Any]:
    """Ingest the IDX files at ``source`` into ``lake``; return the stage result."""
    config = IngestConfig(
        source=absolute(source),
        lake=absolute(lake),
        dataset=dataset,
        validation_size=validation_size,
        checksums=None if checksums is None else absolute(checksums),
    )
    sources = read_sources(config)
    version = dataset_version(sources, config.validation_size)
    target = dataset_uri(config.lake, config.dataset, version)
    manifest = existing_intact_manifest(target, sources)
    reused = manifest is not None
    if not reused:
        manifest = {
            "dataset": config.dataset,
            "version": version,
            "format": DATASET_FORMAT,
            "image_shape": list(IMAGE_SHAPE),
            "sources": {role: source_file.summary() for role, source_file in sources.items()},
            "splits": {},
        }
        with storage.staged_directory(target) as staging:
            for split, (prefix, start, stop) in split_ranges(sources, config.validation_size).items():
                manifest["splits"][split] = write_split(
                    staging, split, sources[f"{prefix}_images"], sources[f"{prefix}_labels"], start, stop
                )
            storage.write_json(storage.join(staging, MANIFEST_FILE), manifest)
    return {
        "dataset_uri": target,
        "dataset_version": version,
        "rows": {split: entry["rows"] for split, entry in manifest["splits"].items()},
        "reused": reused,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(IngestConfig, argv)
    result = ingest_dataset(**dataclasses.asdict(config))
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
