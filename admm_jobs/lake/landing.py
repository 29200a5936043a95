"""The landing contract: where labelled batches and the fixed test set arrive, and how they are read and checked.

``SRC`` is a directory URI (local, ``file://``, ``s3://``; ``https://`` for a four-file source only)::

    SRC/t10k-images-idx3-ubyte[.gz], SRC/t10k-labels-idx1-ubyte[.gz]     the fixed test set
    SRC/batches/YYYY-MM-DD/train-images-idx3-ubyte[.gz], ...labels...    1. one labelled batch per date
    SRC/train-images-idx3-ubyte[.gz], SRC/train-labels-idx1-ubyte[.gz]   2. or: one undated batch

An optional ``checksums.json`` (idx-checksums/1) in a directory is verified for the files of that
directory (mandatory for https).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from admm_jobs.lake import storage
from admm_jobs.lake.dataset import IMAGE_SHAPE, NUM_CLASSES
from admm_jobs.lake.idx import IdxStream, IngestError, SourceFile, open_source

CHECKSUMS_FORMAT = "idx-checksums/1"


CHECKSUMS_FILE = "checksums.json"


BATCHES_DIR = "batches"


# Source role -> (file name without .gz, number of IDX dimensions).
SOURCE_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


TRAIN_ROLES = ("train_images", "train_labels")


TEST_ROLES = ("test_images", "test_labels")


def parse_date(text: str) -> datetime.date | None:
    """``YYYY-MM-DD`` (a timestamp's date part is accepted too) as a date, None when it is not one."""
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})([T ].*)?", text.strip())
    try:
        return datetime.date.fromisoformat(match.group(1)) if match else None
    except ValueError:
        return None


def check_shapes(images: IdxStream, labels: IdxStream) -> None:
    """Images are 28 x 28, one label per image (from the headers, before any record is read)."""
    if images.shape[1:] != IMAGE_SHAPE:
        raise IngestError(f"{images.uri}: images are {images.shape[1:]} pixels, expected {IMAGE_SHAPE}")
    if images.shape[0] != labels.shape[0]:
        raise IngestError(f"{labels.uri}: {labels.shape[0]} labels but {images.uri} has {images.shape[0]} images")


class PairStream:
    """An images/labels pair of a directory read in lockstep, a chunk of records at a time (memory: one chunk,
    whatever the files' size); :meth:`finish` checks what only the whole files tell (their ends, labels within
    0..9) and returns them."""

    def __init__(self, directory_uri: str, roles: tuple[str, str]):
        self.roles = roles
        self.images, self.labels = (open_source(directory_uri, *SOURCE_FILES[role]) for role in roles)
        check_shapes(self.images, self.labels)
        self.bad_labels = 0
        self.first_bad: tuple[int, int] | None = None  # (record, label)

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(index of the first record, images, labels) of each chunk of at most ``rows`` records."""
        for images, labels in zip(self.images.chunks(rows), self.labels.chunks(rows)):
            first = self.images.records_read - len(images)
            bad = np.flatnonzero(labels >= NUM_CLASSES)
            if bad.size and self.first_bad is None:
                self.first_bad = (first + int(bad[0]), int(labels[bad[0]]))
            self.bad_labels += bad.size
            yield first, images, labels

    def finish(self) -> dict[str, SourceFile]:
        pair = {role: stream.finish() for role, stream in zip(self.roles, (self.images, self.labels))}
        if self.first_bad is not None:
            record, value = self.first_bad
            raise IngestError(f"{self.labels.uri}: {self.bad_labels} label(s) outside 0..{NUM_CLASSES - 1}, "
                              f"first at record {record} (value {value})")
        return pair


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
        if entry.get("records") != source.shape[0]:
            raise IngestError(
                f"{source.uri}: {source.shape[0]} records, {manifest_uri} expects {entry.get('records')}"
            )


def scan_pair(directory_uri: str, roles: tuple[str, str], checksums: tuple[str, dict[str, Any]] | None,
              chunk_rows: int) -> dict[str, SourceFile]:
    """Read one images/labels pair of a directory to its end, ``chunk_rows`` records at a time, and check it
    (structure, shapes, labels, checksums); nothing is kept but its :class:`SourceFile` records."""
    stream = PairStream(directory_uri, roles)
    for _ in stream.chunks(chunk_rows):
        pass
    pair = stream.finish()
    verify_checksums(pair, checksums)
    check_distinct(pair)
    return pair


@dataclasses.dataclass(frozen=True)
class LandedBatch:
    """A labelled batch in the landing directory: ``date`` None for a plain four-file source. ``signatures``:
    what the store said about its files when they were listed (:func:`storage.file_signatures`; empty when
    the source cannot be listed)."""

    date: str | None
    uri: str
    signatures: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def landed_batches(source_uri: str) -> list[LandedBatch]:
    """The batches under ``SOURCE/batches/YYYY-MM-DD/`` oldest first, or the source itself as one undated batch."""
    root = storage.join(source_uri, BATCHES_DIR)
    if storage.scheme(source_uri) in storage.HTTP_SCHEMES or not storage.exists(root):
        return [LandedBatch(None, source_uri)]
    signatures = storage.file_signatures(root)
    names = sorted({file_uri[len(root):].lstrip("/").split("/")[0] for file_uri in signatures})
    for name in names:
        if parse_date(name) is None or name != parse_date(name).isoformat():
            raise IngestError(f"{storage.join(root, name)}: batch directories are named YYYY-MM-DD")
    stray = [storage.join(source_uri, name + suffix) for name, _ in map(SOURCE_FILES.get, TRAIN_ROLES)
             for suffix in ("", ".gz") if storage.exists(storage.join(source_uri, name + suffix))]
    if stray:
        raise IngestError(f"{stray[0]}: training files next to {root}/; land training data as dated batches only")
    batch_uris = {name: storage.join(root, name) for name in names}
    return [LandedBatch(name, uri, {file: signature for file, signature in signatures.items()
                                    if file.startswith(uri + "/")}) for name, uri in batch_uris.items()]
