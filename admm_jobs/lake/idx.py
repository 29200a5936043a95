"""The MNIST IDX format: decoding (raw or gzip, every structural defect named with its file) and encoding.

An IDX file of unsigned bytes is the magic ``0x000008NN`` (NN dimensions), NN big-endian uint32 sizes,
then the data in row-major order (see ``data/mnist/README.md``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from admm_jobs.lake import storage

GZIP_MAGIC = b"\x1f\x8b"


IDX_UBYTE_PREFIX = b"\x00\x00\x08"  # magic 0x000008NN: unsigned-byte data, NN dimensions


class IngestError(ValueError):
    """An input file is missing, malformed or fails its checksum; the message names its URI."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One decoded IDX input."""

    name: str  # the canonical IDX name, without ".gz": output depends on content only
    uri: str
    sha256: str  # of the uncompressed bytes
    array: np.ndarray

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "records": int(self.array.shape[0])}


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
            except storage.TransientStorageError:
                raise  # the server failed, not the name: a retry may download it
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



def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of a uint8 array: magic 0x000008NN (NN = ndim), NN big-endian uint32 sizes,
    data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` as an IDX file at ``path``, gzip-compressed unless ``compress`` is false (with mtime 0, so
    the same array always gives the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path
