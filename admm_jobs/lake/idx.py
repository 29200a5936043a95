"""The MNIST IDX format: streaming decoding (raw or gzip, every structural defect named with its file) and encoding.

An IDX file of unsigned bytes is the magic ``0x000008NN`` (NN dimensions), NN big-endian uint32 sizes,
then the data in row-major order (see ``data/mnist/README.md``). Files are read front to back in blocks
(:class:`IdxStream`), so memory holds one chunk of records whatever the file's size.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import posixpath
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from admm_jobs.lake import storage

GZIP_MAGIC = b"\x1f\x8b"


IDX_UBYTE_PREFIX = b"\x00\x00\x08"  # magic 0x000008NN: unsigned-byte data, NN dimensions


GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib decoding the gzip format, header and CRC trailer included


DECODED_BLOCK_BYTES = 1 << 22  # the most bytes one compressed block may expand to at once (a bound on zip bombs)


class IngestError(ValueError):
    """An input file is missing, malformed or fails its checksum; the message names its URI."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One IDX input, read to its end and found well formed."""

    name: str  # the canonical IDX name, without ".gz": output depends on content only
    uri: str
    sha256: str  # of the uncompressed bytes
    shape: tuple[int, ...]

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "records": self.shape[0]}


def open_source_file(source_uri: str, name: str) -> tuple[str, Iterator[bytes]]:
    """Find ``name`` or ``name.gz`` under ``source_uri``; return its URI and its stored bytes as blocks
    (never transparently decompressed: the gzip check must see the real bytes)."""
    candidates = [storage.join(source_uri, name), storage.join(source_uri, name + ".gz")]
    if storage.scheme(source_uri) in storage.HTTP_SCHEMES:
        for uri in candidates:
            blocks = storage.read_blocks(uri)
            try:
                first = next(blocks, b"")  # opens the download: a missing name fails here
            except storage.TransientStorageError:
                raise  # the server failed, not the name: a retry may download it
            except storage.StorageError:
                continue
            return uri, itertools.chain([first], blocks)
        raise IngestError(f"{candidates[0]}[.gz]: missing file (neither name could be downloaded)")
    present = [uri for uri in candidates if storage.exists(uri)]
    if not present:
        raise IngestError(f"{candidates[0]}[.gz]: missing file")
    if len(present) > 1:
        raise IngestError(f"{candidates[0]}: both {name} and {name}.gz exist; keep one")
    return present[0], storage.read_blocks(present[0])


def fetch_source_file(source_uri: str, name: str) -> tuple[str, bytes]:
    """Find ``name`` or ``name.gz`` under ``source_uri``; return its URI and raw bytes (for copying it as stored)."""
    uri, blocks = open_source_file(source_uri, name)
    return uri, b"".join(stored_blocks(uri, blocks))


def stored_blocks(uri: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
    """``blocks`` with a storage failure raised as an :class:`IngestError` naming ``uri`` (a transient one
    stays a :class:`storage.TransientStorageError`, which the tasks retry)."""
    try:
        yield from blocks
    except storage.TransientStorageError:
        raise
    except storage.StorageError as exc:
        raise IngestError(str(exc)) from exc


def decoded_blocks(uri: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The uncompressed content of stored ``blocks``: gunzipped (every member) when they start with the gzip
    magic, else as they are."""
    head = b""
    for block in blocks:
        head += block
        if len(head) >= len(GZIP_MAGIC):
            break
    if head[:2] != GZIP_MAGIC:
        yield head
        yield from blocks
        return
    decompressor = zlib.decompressobj(GZIP_WBITS)
    try:
        for block in itertools.chain([head], blocks):
            while block:
                if decompressor.eof:  # another gzip member follows
                    decompressor = zlib.decompressobj(GZIP_WBITS)
                yield decompressor.decompress(block, DECODED_BLOCK_BYTES)
                block = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
        while not decompressor.eof:  # output still held back by the bound on one block's expansion
            tail = decompressor.decompress(b"", DECODED_BLOCK_BYTES)
            if not tail:
                break
            yield tail
    except zlib.error as exc:
        raise IngestError(f"{uri}: corrupt gzip data ({exc})") from exc
    if not decompressor.eof:
        raise IngestError(f"{uri}: truncated gzip stream (it ended before the end-of-stream marker)")


class IdxStream:
    """An unsigned-byte IDX file read front to back: its header when opened (:attr:`shape`), then its records
    in chunks (:meth:`read`, :meth:`chunks`), then :meth:`finish`, which returns the :class:`SourceFile` with
    the sha256 of the uncompressed bytes. Every structural defect is an :class:`IngestError` naming the file,
    a truncation or trailing bytes found only at the end included. Memory: one chunk."""

    def __init__(self, uri: str, name: str, expected_ndim: int, blocks: Iterator[bytes]):
        self.name, self.uri = name, uri
        self._digest = hashlib.sha256()
        self._blocks = decoded_blocks(self.uri, stored_blocks(self.uri, blocks))
        self._buffer = bytearray()
        self._consumed = 0  # bytes taken from the front of the uncompressed content
        self.shape = self._header(expected_ndim)
        self.record_bytes = int(np.prod(self.shape[1:], dtype=np.int64))
        self.records_read = 0

    def _take(self, size: int) -> bytes:
        """The next ``size`` uncompressed bytes (fewer only at the end), hashed as they pass."""
        while len(self._buffer) < size:
            block = next(self._blocks, None)
            if block is None:
                break
            self._digest.update(block)
            self._buffer += block
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._consumed += len(taken)
        return taken

    def _rest(self) -> int:
        """Read to the end; return how many bytes were left."""
        left = len(self._buffer)
        self._buffer.clear()
        for block in self._blocks:
            self._digest.update(block)
            left += len(block)
        self._consumed += left
        return left

    def _header(self, expected_ndim: int) -> tuple[int, ...]:
        expected_magic = int.from_bytes(IDX_UBYTE_PREFIX + bytes([expected_ndim]), "big")
        magic = self._take(4)
        if not magic:
            raise IngestError(f"{self.uri}: file is empty")
        if len(magic) < 4 or magic[:3] != IDX_UBYTE_PREFIX:
            raise IngestError(f"{self.uri}: not an IDX file of unsigned bytes (magic {magic.hex()}, "
                              f"expected 0x{expected_magic:08x})")
        ndim = magic[3]
        if ndim != expected_ndim:
            raise IngestError(f"{self.uri}: magic 0x{int.from_bytes(magic, 'big'):08x} declares {ndim} dimension(s), "
                              f"expected 0x{expected_magic:08x} ({expected_ndim} dimension(s))")
        sizes = self._take(4 * ndim)
        if len(sizes) < 4 * ndim:
            raise IngestError(f"{self.uri}: truncated header ({4 + len(sizes)} bytes, need {4 + 4 * ndim})")
        return struct.unpack(f">{ndim}I", sizes)

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` records (at most those left), uint8 of shape (count, *shape[1:])."""
        count = min(count, self.shape[0] - self.records_read)
        data = self._take(count * self.record_bytes)
        if len(data) < count * self.record_bytes:
            header_bytes = 4 + 4 * len(self.shape)
            actual = self._consumed + self._rest() - header_bytes
            raise IngestError(f"{self.uri}: truncated data: header {self.shape} needs "
                              f"{int(np.prod(self.shape, dtype=np.int64))} bytes, file has {actual}")
        self.records_read += count
        return np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The records left, ``rows`` at a time."""
        while self.records_read < self.shape[0]:
            yield self.read(rows)

    def finish(self) -> SourceFile:
        """Check that nothing follows the records (all read) and return the file's :class:`SourceFile`."""
        if self.records_read < self.shape[0]:
            raise ValueError(f"{self.uri}: finish() before all {self.shape[0]} records were read")
        trailing = self._rest()
        if trailing:
            raise IngestError(f"{self.uri}: {trailing} trailing bytes after the "
                              f"{int(np.prod(self.shape, dtype=np.int64))} bytes that header {self.shape} describes")
        return SourceFile(name=self.name, uri=self.uri, sha256=self._digest.hexdigest(), shape=self.shape)


def open_source(source_uri: str, name: str, expected_ndim: int) -> IdxStream:
    """The IDX file ``name`` or ``name.gz`` under ``source_uri``, opened and its header checked."""
    uri, blocks = open_source_file(source_uri, name)
    return IdxStream(uri, name, expected_ndim, blocks)


def scan_source(source_uri: str, name: str, expected_ndim: int, chunk_rows: int) -> SourceFile:
    """Read an IDX file to its end, ``chunk_rows`` records at a time, checking its structure and hashing it."""
    stream = open_source(source_uri, name, expected_ndim)
    for _ in stream.chunks(chunk_rows):
        pass
    return stream.finish()


def whole_array(stream: IdxStream) -> np.ndarray:
    """All records of a freshly opened stream as one array, the file checked to its end (for small files)."""
    array = stream.read(stream.shape[0])
    stream.finish()
    return array


def read_array(source_uri: str, name: str, expected_ndim: int) -> np.ndarray:
    """The content of the IDX file ``name`` or ``name.gz`` under ``source_uri`` as one array."""
    return whole_array(open_source(source_uri, name, expected_ndim))


def read_idx(uri: str, expected_ndim: int) -> np.ndarray:
    """The content of the IDX file at ``uri`` (raw or gzip) as one array."""
    return whole_array(IdxStream(uri, posixpath.basename(uri), expected_ndim, storage.read_blocks(uri)))


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
