"""All file I/O of the pipeline, keyed by URI.

Supported: plain local paths, ``file://``, ``s3://`` (and ``gs://`` where pyarrow
was built with GCS) through :mod:`pyarrow.fs`; ``https://`` and ``http://`` for
read-only inputs. Credentials and endpoints come from the standard provider
chains (for S3: environment, profile, instance role, ``AWS_ENDPOINT_URL``);
nothing here takes a secret as an argument. ``AWS_MAX_ATTEMPTS`` bounds pyarrow's own retries as it
bounds boto3's (pyarrow otherwise retries a failing S3 request for up to 6 s).

Failures are :class:`StorageError`; those a later attempt may not meet (throttling, a 5xx answer,
a timeout, a lost or refused connection) are :class:`TransientStorageError`, which the Airflow
tasks retry (:func:`is_transient_failure` tells them apart, :func:`is_retryable` finds one behind
a stage's own error).

Visibility rule used by every stage: a directory of outputs is *committed* by
writing one small marker object last (a manifest, a pointer). Local
directories are additionally staged and renamed into place, so a reader never
sees a half-written directory on disk.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import json
import os
import posixpath
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs")
HTTP_SCHEMES = ("http", "https")
# Error codes of a throttled or overloaded service, or of a request that timed out: boto3's S3 codes and the
# AWS SDK for C++'s names that pyarrow reports ("AWS Error SLOW_DOWN during ..."). Any 5xx status is one too.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestThrottled", "RequestTimeout", "InternalError", "ServiceUnavailable",
    "SLOW_DOWN", "THROTTLING", "REQUEST_LIMIT_EXCEEDED", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    "NETWORK_CONNECTION", "REQUEST_TIMEOUT",
})
# How pyarrow words an S3 failure: "AWS Error SLOW_DOWN during ...", "AWS Error UNKNOWN (HTTP status 503) during ...".
ARROW_AWS_ERROR = re.compile(r"AWS Error (?P<code>\w+)(?: \(HTTP status (?P<status>\d+)\))?")
READ_BLOCK_BYTES = 1 << 20  # what a streamed read holds at once


class StorageError(RuntimeError):
    """An I/O failure that another attempt would meet again (a missing or invalid file, no access);
    the message names the URI."""


class TransientStorageError(StorageError):
    """An I/O failure that a later attempt may not meet: throttling, a 5xx answer, a timeout, a lost
    connection, or (in the registry) losing a race to concurrent writers too often."""


def is_transient_answer(code: str | None, status: int | None) -> bool:
    """Whether a service's error answer (error code, HTTP status) means "try again later"."""
    if code in TRANSIENT_CODES:
        return True
    if status is None:
        return False
    return status == HTTPStatus.TOO_MANY_REQUESTS or (500 <= status < 600 and status != HTTPStatus.NOT_IMPLEMENTED)


def is_transient_failure(exc: BaseException) -> bool:
    """Whether a later attempt may succeed where ``exc``, raised by pyarrow, boto3 or urllib, failed."""
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return is_transient_answer(exc.response.get("Error", {}).get("Code"), status)
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                        botocore.exceptions.IncompleteReadError)):
        return True  # refused, reset, closed early, timed out, unresolvable host
    if isinstance(exc, urllib.error.HTTPError):
        return is_transient_answer(None, exc.code)
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, BaseException) and is_transient_failure(exc.reason)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, http.client.IncompleteRead)):
        return True
    match = ARROW_AWS_ERROR.search(str(exc)) if isinstance(exc, OSError) else None
    if match is None:
        return False
    return is_transient_answer(match["code"], int(match["status"]) if match["status"] else None)


def failure(
    uri: str, action: str, exc: BaseException,
    kinds: tuple[type[Exception], type[Exception]] = (StorageError, TransientStorageError),
) -> Exception:
    """The error to raise when ``action`` on ``uri`` failed with ``exc``: the deterministic or the transient
    one of ``kinds``, as :func:`is_transient_failure` says."""
    deterministic, transient = kinds
    return (transient if is_transient_failure(exc) else deterministic)(f"{uri}: cannot {action}: {exc}")


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a :class:`TransientStorageError` or was raised from one (``raise ... from``):
    a stage that reports a transient failure as its own error keeps it retryable."""
    while exc is not None:
        if isinstance(exc, TransientStorageError):
            return True
        exc = exc.__cause__
    return False


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Raise the ``OSError`` of the block as a :class:`StorageError` naming ``uri`` (see :func:`failure`)."""
    try:
        yield
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise failure(uri, action, exc) from exc


def scheme(uri: str) -> str:
    """Return the URI scheme, ``""`` for plain local paths."""
    parsed = urllib.parse.urlparse(str(uri))
    # A Windows drive letter or a bare path has no scheme worth the name.
    return parsed.scheme if len(parsed.scheme) > 1 else ""


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    if not is_local(uri):
        raise StorageError(f"{uri}: not a local path")
    if scheme(uri) == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return Path(uri)


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI or a local path; ``..`` segments are resolved (object keys have none)."""
    if is_local(base) and scheme(base) == "":
        joined = str(Path(base).joinpath(*parts))
        return os.path.normpath(joined) if ".." in joined else joined
    joined = posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])
    if "/../" not in joined + "/":
        return joined
    prefix, _, path = joined.partition("://")
    head, _, key = path.partition("/")
    return f"{prefix}://{head}/{posixpath.normpath(key).lstrip('/')}"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem serving ``uri`` and the path inside it."""
    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).absolute())
    if scheme(uri) in REMOTE_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants
            raise failure(uri, "open filesystem", exc) from exc
        return with_max_attempts(fs), path
    raise StorageError(f"{uri}: unsupported URI scheme {scheme(uri)!r}")


def with_max_attempts(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` retrying each S3 request at most ``AWS_MAX_ATTEMPTS`` times in all, where that is set.

    ``FileSystem.from_uri`` ignores the variable and retries for up to 6 s; boto3 honours it.
    """
    attempts = os.environ.get("AWS_MAX_ATTEMPTS")
    if not attempts or not isinstance(fs, pafs.S3FileSystem):
        return fs
    options = fs.__reduce__()[1][0]  # the constructor's keyword arguments, as pickling rebuilds it
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(attempts)))


def exists(uri: str) -> bool:
    if scheme(uri) in HTTP_SCHEMES:
        raise StorageError(f"{uri}: existence checks are not supported over HTTP")
    fs, path = filesystem(uri)
    with storage_errors(uri, "look up"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """Read a whole object or file."""
    if scheme(uri) in HTTP_SCHEMES:
        try:
            with urllib.request.urlopen(uri, timeout=120) as response:
                return response.read()
        except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: the connection broke mid-body
            raise failure(uri, "download", exc) from exc
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"), fs.open_input_stream(path, compression=None) as stream:
        return stream.read()


def read_blocks(uri: str, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[bytes]:
    """The stored bytes of ``uri`` front to back, in blocks of at most ``block_bytes`` (never decompressed):
    memory holds one block whatever the object's size. Opens on the first ``next``."""
    if scheme(uri) in HTTP_SCHEMES:
        try:
            with urllib.request.urlopen(uri, timeout=120) as response:
                while block := response.read(block_bytes):
                    yield block
        except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: the connection broke mid-body
            raise failure(uri, "download", exc) from exc
        return
    fs, path = filesystem(uri)
    with storage_errors(uri, "read"), fs.open_input_stream(path, compression=None) as stream:
        while block := stream.read(block_bytes):
            yield block


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old or the new content.

    Local files are written to a sibling temporary file and renamed over the
    target (``rename(2)`` is atomic); object stores make a single PUT visible
    atomically.
    """
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(uri)
    with storage_errors(uri, "write"), fs.open_output_stream(path, compression=None) as stream:
        stream.write(data)


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: not valid JSON: {exc}") from exc


def json_lines(raw: bytes, uri: str, error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a JSON-lines file; ``error`` names a bad line."""
    parsed = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise error(f"{uri}: line {number} is not valid JSON: {exc}") from exc
    return parsed


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def list_files(uri: str) -> list[str]:
    """All files below ``uri`` (recursively), as URIs of the same form, sorted."""
    fs, root = filesystem(uri)
    with storage_errors(uri, "list"):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            return [uri]
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    relative = sorted(posixpath.relpath(entry.path, root) for entry in entries if entry.type == pafs.FileType.File)
    return [join(uri, rel) for rel in relative]


def file_signatures(uri: str) -> dict[str, dict[str, Any]]:
    """What the store tells about every file below ``uri`` without reading it: {file URI: signature}.

    A signature is the size and, on S3, the ETag (one listing request per 1,000 objects); elsewhere the
    modification time in nanoseconds. A file rewritten with other content gets another signature (on a
    file system unless the writer restored its size and modification time).
    """
    if scheme(uri) == "s3":
        bucket, _, prefix = uri.partition("://")[2].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        try:
            pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix)
            objects = [item for page in pages for item in page.get("Contents", [])]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise failure(uri, "list", exc) from exc
        return {join(uri, item["Key"][len(prefix):]): {"bytes": item["Size"], "etag": item["ETag"]}
                for item in objects if not item["Key"].endswith("/")}
    fs, root = filesystem(uri)
    with storage_errors(uri, "list"):
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return {}
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {join(uri, posixpath.relpath(entry.path, root)): {"bytes": entry.size, "mtime_ns": entry.mtime_ns}
            for entry in entries if entry.type == pafs.FileType.File}


def delete_tree(uri: str) -> None:
    """Remove a directory/prefix and everything below it; no error if absent."""
    if is_local(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    fs, path = filesystem(uri)
    with storage_errors(uri, "delete"):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir_contents(path, missing_dir_ok=True)
    with contextlib.suppress(OSError):
        fs.delete_dir(path)


def copy_tree(src: str, dst: str) -> list[str]:
    """Copy every file below ``src`` to the same relative place below ``dst``."""
    copied = []
    src_files = list_files(src)
    src_fs, src_root = filesystem(src)
    for file_uri in src_files:
        _, file_path = filesystem(file_uri)
        rel = posixpath.relpath(file_path, src_root)
        target = join(dst, rel)
        dst_fs, dst_path = filesystem(target)
        if is_local(target):
            Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
        with storage_errors(f"{file_uri} -> {target}", "copy"):
            pafs.copy_files(file_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
        copied.append(target)
    return copied


@contextlib.contextmanager
def staged_directory(final_uri: str) -> Iterator[str]:
    """Yield a place to write a directory that appears at ``final_uri`` only on success.

    Local: a hidden sibling directory renamed into place at the end (an
    existing ``final_uri`` is swapped out, then removed), and removed on error.
    Object stores have no rename, so objects are written directly under
    ``final_uri`` and callers commit by writing their marker object last;
    on error the partial prefix is deleted.
    """
    if not is_local(final_uri):
        try:
            yield final_uri
        except BaseException:
            delete_tree(final_uri)
            raise
        return
    final = local_path(final_uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".staging-{final.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        yield str(staging)
        _swap_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, final: Path, attempts: int = 5) -> None:
    """Rename ``staging`` to ``final``, retiring an existing ``final`` first.

    Another writer may swap its own directory in between our two renames;
    then the rename fails on the non-empty target and we retire and retry.
    """
    for attempt in range(attempts):
        retired = final.with_name(f".retired-{final.name}-{uuid.uuid4().hex[:12]}")
        try:
            if final.exists():
                os.rename(final, retired)
            os.rename(staging, final)
            return
        except OSError as exc:
            if attempt == attempts - 1 or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise StorageError(f"{final}: cannot move the staged directory into place: {exc}") from exc
        finally:
            shutil.rmtree(retired, ignore_errors=True)


def open_binary(uri: str) -> io.BufferedIOBase:
    """A readable binary file object for ``uri`` (fully buffered for HTTP)."""
    if scheme(uri) in HTTP_SCHEMES:
        return io.BytesIO(read_bytes(uri))
    fs, path = filesystem(uri)
    with storage_errors(uri, "open"):
        return fs.open_input_file(path)
