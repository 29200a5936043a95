"""The model registry: published versions, the pointer to the current one, and the decision history.

Layout (``REG`` = the registry URI, ``NAME`` = the model name, default :data:`DEFAULT_MODEL_NAME`)::

    REG/NAME/<model_version>/model/...          copy of RUN/model, plus model/model.onnx
    REG/NAME/<model_version>/evaluation/...     copy of RUN/evaluation
    REG/NAME/<model_version>/metrics.jsonl      copy of RUN/metrics.jsonl
    REG/NAME/<model_version>/reference/confusion.json   its confusion on held-out data (:func:`reference_confusion`)
    REG/NAME/<model_version>/reference/calibration.json its calibration on them (:func:`reference_calibration`)
    REG/NAME/<model_version>/manifest.json      sha256 of every file above; written LAST
    REG/NAME/current.json                       pointer to the published version
    REG/NAME/history.jsonl                      one line per decision, oldest first

``model_version`` is the first 16 hex digits of the sha256 of ``model.npz`` (the
``weights_sha256`` that ``model.json`` records and ``load_model`` verifies). It
depends only on the weights, so storing the same model again adds no second
copy; a version directory, once complete, is never rewritten.

History: every decision about a model or a batch is one JSON line (see
:data:`DECISIONS` and :func:`record_decision`). Lines written before the
decision kinds existed (``at``, ``reason``, ``model_version``, ``run``, and the
outcome ``unchanged``) are read back in the current form by :func:`read_history`.

Concurrency: on local disk, writers hold an ``fcntl`` lock on a file next to the
pointer (:func:`locked`). Object stores have no locks, so there the pointer and
the history are replaced with conditional PUTs (``If-Match`` the ETag read, or
``If-None-Match: *`` when there is no object yet), and a writer that loses the
race reads again and retries; losing it :data:`MAX_ATTEMPTS` times in a row is a
:class:`TransientRegistryError`, as are throttling, 5xx answers and network failures
(:func:`admm_jobs.lake.storage.is_transient_failure`): the Airflow task retries those.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import posixpath
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import numpy as np

from admm_jobs.lake import storage

DEFAULT_MODEL_NAME = "mnist-admm"
POINTER_FILE = "current.json"
HISTORY_FILE = "history.jsonl"
VERSION_MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".publish.lock"
VERSION_MANIFEST_FORMAT = "admm-model-version/1"
MODEL_DIR = "model"
ONNX_FILE = "model.onnx"  # an ONNX export of the published weights, checked against numpy
EVALUATION_DIR = "evaluation"
EVALUATION_METRICS_FILE = "metrics.json"
EPOCH_METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.html"
REFERENCE_CONFUSION_PATH = "reference/confusion.json"
REFERENCE_CONFUSION_FORMAT = "admm-reference-confusion/1"
REFERENCE_CALIBRATION_PATH = "reference/calibration.json"
REFERENCE_CALIBRATION_FORMAT = "admm-reference-calibration/1"
VERSION_HEX_DIGITS = 16
# Conditional writes that lose a race re-read and retry; this many losses in a row is an error.
MAX_ATTEMPTS = 10
# S3 error codes meaning "the object changed since you read it".
CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409")
# What boto3 raises: an error answer, or none at all (refused, reset, timed out, no credentials).
S3_CLIENT_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)

ACCEPTED, REJECTED, SKIPPED, QUARANTINED = "accepted", "rejected", "skipped", "quarantined"
# A reviewer's answer about a quarantined batch (no answer in time: timed_out, the batch stays out).
RELEASED, CONFIRMED, TIMED_OUT = "released", "confirmed", "timed_out"
# A person's answer before publish (the weekly DAG's ``approval`` param).
APPROVED, DECLINED = "approved", "declined"
DECISIONS = (ACCEPTED, REJECTED, SKIPPED, QUARANTINED, RELEASED, CONFIRMED, TIMED_OUT, APPROVED, DECLINED)
# Decisions about one batch (their entries name it in ``batch``): the latest says whether it is held out.
BATCH_DECISIONS = (QUARANTINED, RELEASED, CONFIRMED, TIMED_OUT)
# Decisions of the quality gate: a model with this training key has been judged.
GATE_DECISIONS = (ACCEPTED, REJECTED)
# Every history entry has these fields (None / [] when they do not apply), plus kind-specific extras.
ENTRY_DEFAULTS: dict[str, Any] = {
    "logical_date": None,
    "run_uri": None,
    "dataset_version": None,
    "batches": [],
    "training_key": None,
    "reasons": [],
    "test_accuracy": None,
    "version": None,
    "report_uri": None,
}


class RegistryError(RuntimeError):
    """The registry or an artifact it is given is unusable; the message names the URI."""


class TransientRegistryError(RegistryError, storage.TransientStorageError):
    """A registry operation that a later attempt may complete (throttled, 5xx, network, too many concurrent
    writers): still a ``RegistryError`` to its callers, and retryable (``storage.is_retryable``)."""


ERROR_KINDS = (RegistryError, TransientRegistryError)  # for storage.failure: deterministic, transient


def model_version(weights_sha256: str) -> str:
    """The registry version of a model: a prefix of its weights' sha256 (see the module docstring)."""
    return weights_sha256[:VERSION_HEX_DIGITS]


def model_root(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(registry_uri, model_name)


def pointer_uri(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(model_root(registry_uri, model_name), POINTER_FILE)


def history_uri(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(model_root(registry_uri, model_name), HISTORY_FILE)


def version_uri(registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(model_root(registry_uri, model_name), version)


def version_report_uri(registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    """Where a stored version keeps its evaluation report."""
    return storage.join(version_uri(registry_uri, version, model_name), EVALUATION_DIR, REPORT_FILE)


def is_accuracy(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


# --- the pointer ------------------------------------------------------------------------------


def parse_pointer(raw: bytes | None, uri: str) -> dict[str, Any] | None:
    """The pointer object, ``None`` if there is none yet; raises if it is corrupt."""
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{uri}: registry pointer is not valid JSON: {exc}") from exc
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise RegistryError(f"{uri}: registry pointer lacks a 'version'")
    if not is_accuracy(pointer.get("test_accuracy")):
        raise RegistryError(f"{uri}: registry pointer has no valid 'test_accuracy'")
    return pointer


def read_pointer_versioned(
    registry_uri: str, model_name: str = DEFAULT_MODEL_NAME
) -> tuple[dict[str, Any] | None, str | None]:
    """The pointer (None if nothing is published) and the token :func:`switch_pointer` needs."""
    uri = pointer_uri(registry_uri, model_name)
    raw, token = read_versioned(uri)
    return parse_pointer(raw, uri), token


def read_pointer(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> dict[str, Any] | None:
    """The currently published model's pointer, or ``None`` if nothing is published."""
    return read_pointer_versioned(registry_uri, model_name)[0]


def published_model_uri(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str | None:
    """The ``model/`` directory of the published version (for ``model.load_model``); None if none."""
    pointer = read_pointer(registry_uri, model_name)
    if pointer is None:
        return None
    return storage.join(version_uri(registry_uri, pointer["version"], model_name), MODEL_DIR)


def switch_pointer(
    registry_uri: str, pointer: dict[str, Any], token: str | None, model_name: str = DEFAULT_MODEL_NAME
) -> bool:
    """Make ``pointer`` current unless the pointer changed since it was read with ``token``.

    Returns False when another writer got there first (read again, decide again).
    Local callers hold :func:`locked`.
    """
    return write_if_unchanged(pointer_uri(registry_uri, model_name), _json_bytes(pointer), token)


# --- conditional writes -----------------------------------------------------------------------


def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _error_code(exc: Exception) -> str | None:
    """The S3 error code of a boto3 error answer; None when there was no answer."""
    return exc.response.get("Error", {}).get("Code") if isinstance(exc, botocore.exceptions.ClientError) else None


def _s3_client():
    # A fresh session per call: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client("s3")


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The content of ``uri`` (``None`` if absent) and a token for :func:`write_if_unchanged`.

    The token is the S3 ETag; local files have none (callers hold :func:`locked`).
    """
    if storage.is_local(uri):
        return (storage.read_bytes(uri) if storage.exists(uri) else None), None
    if storage.scheme(uri) != "s3":
        raise RegistryError(f"{uri}: the registry supports local paths and s3:// only")
    bucket, key = _s3_location(uri)
    try:
        response = _s3_client().get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ETag"]
    except S3_CLIENT_ERRORS as exc:
        if _error_code(exc) in ("NoSuchKey", "404"):
            return None, None
        raise storage.failure(uri, "read", exc, ERROR_KINDS) from exc


def write_if_unchanged(uri: str, data: bytes, token: str | None) -> bool:
    """Replace ``uri`` by ``data`` unless it changed since :func:`read_versioned` returned ``token``.

    S3: ``PutObject`` with ``IfMatch=token`` (``IfNoneMatch="*"`` when the
    object did not exist); returns False when S3 refuses because another writer
    came first. Local: an atomic replace; the caller's lock excludes other writers.
    """
    if storage.is_local(uri):
        storage.write_bytes(uri, data)
        return True
    bucket, key = _s3_location(uri)
    condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
    try:
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except S3_CLIENT_ERRORS as exc:
        if _error_code(exc) in CONFLICT_CODES:
            return False
        raise storage.failure(uri, "write", exc, ERROR_KINDS) from exc
    return True


_held_locks = threading.local()


@contextlib.contextmanager
def locked(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> Iterator[None]:
    """Exclusive lock over one registry entry on local disk; a no-op on object stores.

    Re-entrant within a thread (so :func:`record_decision` works inside a held lock);
    ``flock`` binds to the open file description, so it excludes other threads and processes.
    """
    root = model_root(registry_uri, model_name)
    if not storage.is_local(root):
        yield
        return
    path = storage.local_path(root) / LOCK_FILE
    held = _held_locks.__dict__.setdefault("paths", set())
    key = str(path.absolute())
    if key in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def append_line(uri: str, entry: dict[str, Any]) -> None:
    """Append one JSON line to ``uri`` without losing a concurrent writer's line.

    S3: a conditional rewrite, retried; local: callers hold :func:`locked`.
    """
    line = json.dumps(entry, sort_keys=True).encode() + b"\n"
    for _ in range(MAX_ATTEMPTS):
        previous, token = read_versioned(uri)
        if write_if_unchanged(uri, (previous or b"") + line, token):
            return
    raise TransientRegistryError(f"{uri}: gave up appending after {MAX_ATTEMPTS} concurrent modifications")


# --- the history ------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_entry(entry: dict[str, Any]) -> None:
    if entry.get("decision") not in DECISIONS:
        raise RegistryError(f"history entry: 'decision' must be one of {DECISIONS}, got {entry.get('decision')!r}")
    for name in ("reasons", "batches"):
        if not isinstance(entry[name], list) or not all(isinstance(item, str) for item in entry[name]):
            raise RegistryError(f"history entry: {name!r} must be a list of strings, got {entry[name]!r}")
    accuracy = entry["test_accuracy"]
    if accuracy is not None and not is_accuracy(accuracy):
        raise RegistryError(f"history entry: 'test_accuracy' must be in [0, 1] or null, got {accuracy!r}")


def record_decision(
    registry_uri: str, entry: dict[str, Any], model_name: str = DEFAULT_MODEL_NAME
) -> dict[str, Any]:
    """Append one decision to the history; returns the stored entry (with ``recorded_at``, UTC ISO).

    ``entry`` needs ``decision`` (one of :data:`DECISIONS`); the other fields of
    :data:`ENTRY_DEFAULTS` default to null / empty, and any further keys are kept.
    Safe under concurrent writers (see the module docstring).
    """
    stored = {**ENTRY_DEFAULTS, **entry, "recorded_at": utc_now()}
    for name in ("batches", "reasons"):  # tuples are fine; a lone string is not a list of them
        if isinstance(stored[name], tuple):
            stored[name] = list(stored[name])
    _check_entry(stored)
    with locked(registry_uri, model_name):
        append_line(history_uri(registry_uri, model_name), stored)
    return stored


def normalise_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """A history line in the current form; lines from before the decision kinds are translated.

    Old lines: ``at`` -> ``recorded_at``, ``model_version`` -> ``version``, ``run`` ->
    ``run_uri``, ``reason`` -> ``reasons``; the outcome ``unchanged`` (the model was
    already the published one) becomes ``accepted`` with ``pointer_changed`` false.
    """
    entry = dict(raw)
    renames = {"at": "recorded_at", "model_version": "version", "run": "run_uri"}
    for old, new in renames.items():
        if old in entry and new not in entry:
            entry[new] = entry.pop(old)
    if "reason" in entry and "reasons" not in entry:
        entry["reasons"] = [entry.pop("reason")]
    if entry.get("decision") == "unchanged":
        entry.update(decision=ACCEPTED, pointer_changed=False)
    return {**ENTRY_DEFAULTS, **entry}


def read_history(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first, in the current form; [] when there is no history."""
    uri = history_uri(registry_uri, model_name)
    raw, _ = read_versioned(uri)
    entries = []
    for number, entry in storage.json_lines(raw or b"", uri, RegistryError):
        if not isinstance(entry, dict):
            raise RegistryError(f"{uri}: line {number} is not a JSON object")
        entries.append(normalise_entry(entry))
    return entries


def find_decision(
    registry_uri: str, training_key: str, model_name: str = DEFAULT_MODEL_NAME
) -> dict[str, Any] | None:
    """The latest gate decision (accepted or rejected) about a model with ``training_key``; None if none."""
    for entry in reversed(read_history(registry_uri, model_name)):
        if entry["decision"] in GATE_DECISIONS and entry.get("training_key") == training_key:
            return entry
    return None


def batch_decisions(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> dict[str, str]:
    """The latest decision about each batch that one names (:data:`BATCH_DECISIONS`), by batch id."""
    return {entry["batch"]: entry["decision"] for entry in read_history(registry_uri, model_name)
            if entry["decision"] in BATCH_DECISIONS and entry.get("batch")}


def quarantined_batches(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> set[str]:
    """The batches held out of later datasets: quarantined and not released since (a review that confirmed the
    quarantine, or got no answer in time, keeps them out). The history is the record of truth, not a file."""
    return {batch for batch, decision in batch_decisions(registry_uri, model_name).items() if decision != RELEASED}


def released_batches(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> set[str]:
    """The batches a reviewer released after their quarantine: later runs include them without checking them
    again (the reviewer overruled the checks)."""
    return {batch for batch, decision in batch_decisions(registry_uri, model_name).items() if decision == RELEASED}


# --- versions ---------------------------------------------------------------------------------


def _relative_path(file_uri: str, root_uri: str) -> str:
    return posixpath.relpath(storage.filesystem(file_uri)[1], storage.filesystem(root_uri)[1])


def version_exists(registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME) -> bool:
    """Whether the version directory is complete (its manifest is written last)."""
    return storage.exists(storage.join(version_uri(registry_uri, version, model_name), VERSION_MANIFEST_FILE))


def store_version(
    run_uri: str,
    registry_uri: str,
    version: str,
    extra_files: dict[str, bytes],
    model_name: str = DEFAULT_MODEL_NAME,
) -> bool:
    """Copy the run's model, evaluation and epoch log, plus ``extra_files`` (relative path -> bytes),
    into the version directory, ``manifest.json`` last. Returns False if the version is already complete.
    """
    target = version_uri(registry_uri, version, model_name)
    if version_exists(registry_uri, version, model_name):
        return False
    sources = [
        *storage.list_files(storage.join(run_uri, MODEL_DIR)),
        *storage.list_files(storage.join(run_uri, EVALUATION_DIR)),
        storage.join(run_uri, EPOCH_METRICS_FILE),
    ]
    contents = {_relative_path(source, run_uri): storage.read_bytes(source) for source in sources}
    contents.update(extra_files)
    with storage.staged_directory(target) as staging:
        files = []
        for relative, data in contents.items():
            storage.write_bytes(storage.join(staging, relative), data)
            files.append({"path": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        manifest = {
            "format": VERSION_MANIFEST_FORMAT,
            "version": version,
            "run": run_uri,
            "created_at": utc_now(),
            "files": files,
        }
        storage.write_json(storage.join(staging, VERSION_MANIFEST_FILE), manifest)
    return True


def delete_version(registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME) -> None:
    storage.delete_tree(version_uri(registry_uri, version, model_name))


# --- reference statistics ---------------------------------------------------------------------


def reference_confusion_bytes(confusion: list[list[int]], split: str, dataset_version: str | None) -> bytes:
    """The file a version keeps its reference confusion in: ``confusion[i][j]`` = images of given label i that
    the model predicts as j, on ``split`` of dataset ``dataset_version`` (data it never fitted)."""
    return _json_bytes({
        "format": REFERENCE_CONFUSION_FORMAT,
        "split": split,
        "dataset_version": dataset_version,
        "examples": int(sum(map(sum, confusion))),
        "confusion_matrix": confusion,
    })


def reference_confusion(
    registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME
) -> dict[str, Any] | None:
    """A published version's reference confusion: ``confusion_matrix`` (classes x classes int64 array, rows the
    given label, columns the predicted class), ``examples``, ``split`` and ``dataset_version``.

    None when the version has none (published before references were stored, or its evaluation had no
    held-out rows); raises :class:`RegistryError` when the file is corrupt.
    """
    def valid(reference: dict[str, Any]) -> bool:
        confusion = np.array(reference["confusion_matrix"], dtype=np.int64)
        return (confusion.ndim == 2 and confusion.shape[0] == confusion.shape[1] and (confusion >= 0).all()
                and confusion.sum() == reference["examples"] > 0)

    reference = _reference_document(registry_uri, version, model_name, REFERENCE_CONFUSION_PATH,
                                    REFERENCE_CONFUSION_FORMAT, valid, "a square matrix of counts")
    return None if reference is None else {**reference, "confusion_matrix": np.array(reference["confusion_matrix"],
                                                                                     dtype=np.int64)}


def reference_calibration_bytes(temperature: float, thresholds: list[float], confident_joint: list[list[int]],
                                split: str, dataset_version: str | None) -> bytes:
    """The file a version keeps its calibration in: the temperature that turns its scores into probabilities
    (softmax(scores / temperature)), each class's confident-learning threshold and the confident joint
    (``confident_joint[i][j]``: images of given label i confidently of class j), all on ``split`` of dataset
    ``dataset_version`` (see :mod:`admm_jobs.scoring.label_checks`)."""
    return _json_bytes({
        "format": REFERENCE_CALIBRATION_FORMAT,
        "split": split,
        "dataset_version": dataset_version,
        "temperature": temperature,
        "thresholds": thresholds,
        "confident_joint": confident_joint,
    })


def reference_calibration(
    registry_uri: str, version: str, model_name: str = DEFAULT_MODEL_NAME
) -> dict[str, Any] | None:
    """A published version's calibration: ``temperature``, ``thresholds`` (float array, one per class) and
    ``confident_joint`` (classes x classes int64 array), ``split`` and ``dataset_version``.

    None when the version has none (published before calibrations were stored, or without held-out rows);
    raises :class:`RegistryError` when the file is corrupt.
    """
    def valid(reference: dict[str, Any]) -> bool:
        thresholds = np.array(reference["thresholds"], dtype=np.float64)
        joint = np.array(reference["confident_joint"], dtype=np.int64)
        return (float(reference["temperature"]) > 0 and thresholds.ndim == 1
                and joint.shape == (len(thresholds), len(thresholds)) and (joint >= 0).all())

    reference = _reference_document(registry_uri, version, model_name, REFERENCE_CALIBRATION_PATH,
                                    REFERENCE_CALIBRATION_FORMAT, valid, "a temperature, thresholds and a joint")
    if reference is None:
        return None
    return {**reference, "thresholds": np.array(reference["thresholds"], dtype=np.float64),
            "confident_joint": np.array(reference["confident_joint"], dtype=np.int64)}


def _reference_document(registry_uri: str, version: str, model_name: str, path: str, document_format: str,
                        valid: Callable[[dict[str, Any]], bool], holds: str) -> dict[str, Any] | None:
    """A reference file of a version (None when it has none), checked by ``valid``; raises
    :class:`RegistryError` when it is unreadable, of another format or fails the check."""
    uri = storage.join(version_uri(registry_uri, version, model_name), path)
    if not storage.exists(uri):
        return None
    try:
        reference = storage.read_json(uri)
    except storage.StorageError as exc:  # a transient one stays retryable through __cause__
        raise RegistryError(str(exc)) from exc
    try:
        ok = isinstance(reference, dict) and reference.get("format") == document_format and valid(reference)
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise RegistryError(f"{uri}: not an {document_format} reference ({holds})")
    return reference
