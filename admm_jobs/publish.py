"""Publish a trained, evaluated model to the registry, behind a quality gate.

Registry layout (``REG`` = ``--registry-uri``, ``NAME`` = ``--model-name``)::

    REG/NAME/<model_version>/model/...          copy of RUN/model
    REG/NAME/<model_version>/evaluation/...     copy of RUN/evaluation
    REG/NAME/<model_version>/metrics.jsonl      copy of RUN/metrics.jsonl
    REG/NAME/<model_version>/manifest.json      sha256 of every file above; written LAST
    REG/NAME/current.json                       pointer to the published version
    REG/NAME/history.jsonl                      one line per publish decision

``model_version`` is the first 16 hex digits of the sha256 of ``model.npz``
(the ``weights_sha256`` that ``model.json`` records and ``load_model``
verifies), the same length as a dataset version. It depends only on the
weights, so publishing the same run again yields the same version and adds
no second copy; a version directory, once complete, is never rewritten.

Quality gate: the candidate's test accuracy (``RUN/evaluation/metrics.json``)
must reach ``min_accuracy`` and must not be more than ``max_regression`` below
the published model's. A rejection leaves the pointer and the versions alone
and is a normal outcome (exit 0); a missing or corrupt artifact raises.

Concurrent publishes: the read-pointer / gate / switch-pointer sequence is
serialised by an ``fcntl`` lock file next to the pointer on local disk. Object
stores have no locks, so there the pointer is replaced with a conditional PUT
(``If-Match`` its ETag, or ``If-None-Match: *`` when there is none yet) and the
gate is re-run against the new pointer when another publisher got there first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import posixpath
import urllib.parse
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions

from admm_jobs import model as model_io
from admm_jobs import storage
from admm_jobs.config import configure_logging, parse_config, require, setting, validate_fields

log = logging.getLogger("admm_jobs.publish")  # not "__main__" under python -m

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
VERSION_HEX_DIGITS = 16
# Conditional writes that lose a race re-read and retry; this many losses in a row is an error.
MAX_ATTEMPTS = 10
# S3 error codes meaning "the object changed since you read it".
CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409")


class PublishError(RuntimeError):
    """A run's artifacts or the registry are unusable; the message names the URI."""


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    """Publish RUN's model to the registry if it passes the quality gate."""

    run_uri: str = setting(help="run directory holding model/, evaluation/ and metrics.jsonl", minLength=1)
    registry_uri: str = setting(help="root of the model registry", minLength=1)
    min_accuracy: float = setting(0.85, "publish only at or above this test accuracy", minimum=0, maximum=1)
    max_regression: float = setting(
        0.005, "publish only if test accuracy is at most this much below the published model", minimum=0, maximum=1
    )
    model_name: str = setting(DEFAULT_MODEL_NAME, "registry entry name")

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            bool(self.model_name) and "/" not in self.model_name and not self.model_name.startswith("."),
            f"--model-name must be a plain directory name, got {self.model_name!r}",
        )


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What the gate needs to know about a run's model."""

    run_uri: str
    version: str
    test_accuracy: float
    dataset_version: str | None


@dataclasses.dataclass(frozen=True)
class Decision:
    outcome: str  # "accepted" (switch the pointer), "rejected", or "unchanged" (already current)
    reason: str


def model_version(weights_sha256: str) -> str:
    """The registry version of a model: a prefix of its weights' sha256 (see the module docstring)."""
    return weights_sha256[:VERSION_HEX_DIGITS]


def model_root(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(registry_uri, model_name)


def pointer_uri(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    return storage.join(model_root(registry_uri, model_name), POINTER_FILE)


def parse_pointer(raw: bytes | None, uri: str) -> dict[str, Any] | None:
    """The pointer object, ``None`` if there is none yet; raises if it is corrupt."""
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PublishError(f"{uri}: registry pointer is not valid JSON: {exc}") from exc
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise PublishError(f"{uri}: registry pointer lacks a 'version'")
    if not _is_accuracy(pointer.get("test_accuracy")):
        raise PublishError(f"{uri}: registry pointer has no valid 'test_accuracy'")
    return pointer


def read_pointer(registry_uri: str, model_name: str = DEFAULT_MODEL_NAME) -> dict[str, Any] | None:
    """The currently published model's pointer, or ``None`` if nothing is published."""
    uri = pointer_uri(registry_uri, model_name)
    return parse_pointer(read_versioned(uri)[0], uri)


def _is_accuracy(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def load_candidate(run_uri: str) -> Candidate:
    """Check a run's model, evaluation and epoch log, and summarise them for the gate."""
    model_uri = storage.join(run_uri, MODEL_DIR)
    weights_sha256 = model_io.load_model(model_uri).metadata["weights_sha256"]
    metrics_uri = storage.join(run_uri, EVALUATION_DIR, EVALUATION_METRICS_FILE)
    evaluation = storage.read_json(metrics_uri)
    if not isinstance(evaluation, dict) or not _is_accuracy(evaluation.get("test_accuracy")):
        raise PublishError(f"{metrics_uri}: no valid 'test_accuracy' (expected a number in [0, 1])")
    evaluated_sha256 = (evaluation.get("model") or {}).get("weights_sha256")
    if evaluated_sha256 != weights_sha256:
        raise PublishError(
            f"{metrics_uri}: evaluates model weights {evaluated_sha256!r}, "
            f"but {model_uri} holds {weights_sha256!r}"
        )
    epoch_metrics_uri = storage.join(run_uri, EPOCH_METRICS_FILE)
    if not storage.exists(epoch_metrics_uri):
        raise PublishError(
            f"{epoch_metrics_uri}: no such file (the training log is published with the model)"
        )
    return Candidate(
        run_uri=run_uri,
        version=model_version(weights_sha256),
        test_accuracy=float(evaluation["test_accuracy"]),
        dataset_version=(evaluation.get("dataset") or {}).get("version"),
    )


def quality_gate(
    candidate: Candidate, current: dict[str, Any] | None, min_accuracy: float, max_regression: float
) -> Decision:
    """Accept iff  acc >= min_accuracy  and  acc >= acc_published - max_regression.

    Accuracies are ratios of counts; the tolerance keeps a drop of exactly
    ``max_regression`` from being rejected through float rounding.
    """
    tolerance = 1e-12
    accuracy = candidate.test_accuracy
    if current is not None and current["version"] == candidate.version:
        return Decision("unchanged", f"version {candidate.version} is already the published model")
    if accuracy + tolerance < min_accuracy:
        return Decision("rejected", f"test accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f}")
    if current is None:
        return Decision(
            "accepted", f"test accuracy {accuracy:.4f} >= minimum {min_accuracy:.4f}; first published model"
        )
    published = float(current["test_accuracy"])
    delta = accuracy - published
    if delta + tolerance < -max_regression:
        return Decision(
            "rejected",
            f"test accuracy {accuracy:.4f} is {-delta:.4f} below the published version {current['version']} "
            f"({published:.4f}); at most {max_regression:.4f} is allowed",
        )
    return Decision(
        "accepted",
        f"test accuracy {accuracy:.4f} >= minimum {min_accuracy:.4f}; "
        f"{delta:+.4f} against the published version {current['version']} ({published:.4f})",
    )


# --- conditional writes -----------------------------------------------------------------------


def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_client():
    # A fresh session per call: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client("s3")


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The content of ``uri`` (``None`` if absent) and a token for :func:`write_if_unchanged`.

    The token is the S3 ETag; local files have none (callers hold :func:`registry_lock`).
    """
    if storage.is_local(uri):
        return (storage.read_bytes(uri) if storage.exists(uri) else None), None
    if storage.scheme(uri) != "s3":
        raise PublishError(f"{uri}: the registry supports local paths and s3:// only")
    bucket, key = _s3_location(uri)
    try:
        response = _s3_client().get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise PublishError(f"{uri}: cannot read: {exc}") from exc
    return response["Body"].read(), response["ETag"]


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
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in CONFLICT_CODES:
            return False
        raise PublishError(f"{uri}: cannot write: {exc}") from exc
    return True


@contextlib.contextmanager
def registry_lock(root_uri: str) -> Iterator[None]:
    """Exclusive lock over one registry entry on local disk; a no-op on object stores."""
    if not storage.is_local(root_uri):
        yield
        return
    path = storage.local_path(root_uri) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock binds to the open file description, so this excludes threads as well as processes.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def append_history(uri: str, entry: dict[str, Any]) -> None:
    """Append one JSON line to the decision log without losing a concurrent writer's line.

    S3: a conditional rewrite, retried; local: callers hold :func:`registry_lock`.
    """
    line = json.dumps(entry, sort_keys=True).encode() + b"\n"
    for _ in range(MAX_ATTEMPTS):
        previous, token = read_versioned(uri)
        if write_if_unchanged(uri, (previous or b"") + line, token):
            return
    raise PublishError(f"{uri}: gave up appending after {MAX_ATTEMPTS} concurrent modifications")


# --- publishing -------------------------------------------------------------------------------


def _relative_path(file_uri: str, root_uri: str) -> str:
    return posixpath.relpath(storage.filesystem(file_uri)[1], storage.filesystem(root_uri)[1])


def store_version(run_uri: str, version_uri: str, now: str) -> bool:
    """Copy the run's artifacts and an ONNX export of the model to ``version_uri``, ``manifest.json`` last.

    Returns False if the version is already complete.
    """
    # imported here: onnx_export resolves registry URIs through this module
    from admm_jobs.onnx_export import verified_onnx

    if storage.exists(storage.join(version_uri, VERSION_MANIFEST_FILE)):
        return False
    onnx_bytes, _ = verified_onnx(model_io.load_model(storage.join(run_uri, MODEL_DIR)))
    sources = [
        *storage.list_files(storage.join(run_uri, MODEL_DIR)),
        *storage.list_files(storage.join(run_uri, EVALUATION_DIR)),
        storage.join(run_uri, EPOCH_METRICS_FILE),
    ]
    with storage.staged_directory(version_uri) as staging:
        files = []
        for source in sources:
            relative = _relative_path(source, run_uri)
            data = storage.read_bytes(source)
            storage.write_bytes(storage.join(staging, relative), data)
            files.append({"path": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        onnx_path = f"{MODEL_DIR}/{ONNX_FILE}"
        storage.write_bytes(storage.join(staging, onnx_path), onnx_bytes)
        files.append({"path": onnx_path, "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)})
        manifest = {
            "format": VERSION_MANIFEST_FORMAT,
            "version": posixpath.basename(version_uri.rstrip("/")),
            "run": run_uri,
            "created_at": now,
            "files": files,
        }
        storage.write_json(storage.join(staging, VERSION_MANIFEST_FILE), manifest)
    return True


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def publish_run(
    run_uri: str,
    registry_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    min_accuracy: float = 0.85,
    max_regression: float = 0.005,
) -> dict[str, Any]:
    """Gate the run's model against the published one and, if accepted, make it current."""
    candidate = load_candidate(run_uri)
    root = model_root(registry_uri, model_name)
    current_uri = storage.join(root, POINTER_FILE)
    version_uri = storage.join(root, candidate.version)
    created_version = False
    for _ in range(MAX_ATTEMPTS):
        with registry_lock(root):
            raw, token = read_versioned(current_uri)
            current = parse_pointer(raw, current_uri)
            decision = quality_gate(candidate, current, min_accuracy, max_regression)
            now = _utc_now()
            if decision.outcome == "accepted":
                created_version |= store_version(run_uri, version_uri, now)
                new_pointer = {
                    "version": candidate.version,
                    "test_accuracy": candidate.test_accuracy,
                    "dataset_version": candidate.dataset_version,
                    "published_at": now,
                    "run": run_uri,
                }
                if not write_if_unchanged(current_uri, _json_bytes(new_pointer), token):
                    log.info(
                        "%s changed while publishing %s; re-running the gate", current_uri, candidate.version
                    )
                    continue
                current_after = new_pointer
            else:
                current_after = current
                if decision.outcome == "rejected" and created_version:
                    # Copied on an attempt that lost the pointer race: a rejected model leaves no trace.
                    storage.delete_tree(version_uri)
            append_history(
                storage.join(root, HISTORY_FILE),
                {
                    "at": now,
                    "decision": decision.outcome,
                    "reason": decision.reason,
                    "model_version": candidate.version,
                    "test_accuracy": candidate.test_accuracy,
                    "dataset_version": candidate.dataset_version,
                    "run": run_uri,
                    "previous_version": current["version"] if current else None,
                    "min_accuracy": min_accuracy,
                    "max_regression": max_regression,
                },
            )
        published = decision.outcome != "rejected"
        if published:
            log.info(
                "%s model %s from %s: %s",
                decision.outcome.upper(),
                candidate.version,
                run_uri,
                decision.reason,
            )
        else:
            log.warning("REJECTED model %s from %s: %s", candidate.version, run_uri, decision.reason)
        return {
            "published": published,
            "decision": decision.outcome,
            "reason": decision.reason,
            "model_version": candidate.version,
            "test_accuracy": candidate.test_accuracy,
            "model_name": model_name,
            "model_uri": storage.join(version_uri, MODEL_DIR) if published else None,
            # The registry's copy once published, else the run's own (the UI links it).
            "report_uri": storage.join(version_uri if published else run_uri, EVALUATION_DIR, REPORT_FILE),
            "current": current_after,
        }
    raise PublishError(f"{current_uri}: gave up after {MAX_ATTEMPTS} concurrent pointer changes")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(PublishConfig, argv)
    configure_logging()
    result = publish_run(
        config.run_uri,
        config.registry_uri,
        model_name=config.model_name,
        min_accuracy=config.min_accuracy,
        max_regression=config.max_regression,
    )
    print(json.dumps(result, sort_keys=True))
    return result


# --- lineage (Airflow) ------------------------------------------------------------------------


def published_model_asset(model_name: str = DEFAULT_MODEL_NAME):
    """The Airflow Asset of the published model: updated only when the gate accepts a new version.

    Logical identity ``x-admm://registry/<model_name>`` (the registry's location is a run
    parameter); each event's extra says where the version is (see :func:`airflow_task`).
    """
    from airflow.sdk import Asset

    return Asset(name=f"{model_name}-published-model", uri=f"x-admm://registry/{model_name}", group="model")


def publications_alias(model_name: str = DEFAULT_MODEL_NAME):
    """The publish task's outlet: events are added to it at run time, so a rejected model emits none."""
    from airflow.sdk import AssetAlias

    return AssetAlias(name=f"{model_name}-publications", group="model")


def airflow_task(argv: list[str], outlet_events=None) -> dict[str, Any]:
    """:func:`main` as an Airflow task: an accepted model becomes an event of :func:`published_model_asset`.

    The event's extra is the new registry pointer plus ``model_uri`` and ``model_name``;
    a rejected model, or one that is already the published version, emits no event.
    """
    result = main(argv)
    if outlet_events is not None and result["decision"] == "accepted":
        outlet_events[publications_alias(result["model_name"])].add(
            published_model_asset(result["model_name"]),
            extra={**result["current"], "model_uri": result["model_uri"], "model_name": result["model_name"]},
        )
    return result


if __name__ == "__main__":
    main()
