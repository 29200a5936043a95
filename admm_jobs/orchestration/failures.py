"""Fail-fast handling of Airflow task callables: no retries for deterministic errors.

A missing or corrupt source or document, a missing model version, a checksum mismatch, a failed
expectation, a quarantined batch or an invalid setting fails the same way every time: retrying
only delays the alert. :func:`fail_fast` turns those errors into ``AirflowFailException`` (the task
fails at once, whatever its ``retries``). A transient failure (throttling, a 5xx answer, a timeout,
a lost connection, registry writers racing: ``storage.TransientStorageError``, also when a stage
reports it as its own error raised from one) is re-raised unchanged, so the task's ``retries`` apply.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from admm_jobs.lake import storage
from admm_jobs.registry.store import RegistryError
from admm_jobs.validate import ValidationFailed

# ValueError covers ConfigError, IngestError, DatasetError, SuiteError, ModelError, EvaluationError.
DETERMINISTIC = (ValueError, ValidationFailed, RegistryError, storage.StorageError)


def fail_fast(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with deterministic failures raised as ``AirflowFailException`` (no retry) and transient
    ones unchanged (retried)."""

    @functools.wraps(function)
    def task(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except DETERMINISTIC as exc:
            if storage.is_retryable(exc):
                raise
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        except SystemExit as exc:  # argparse already logged the offending setting on stderr
            if exc.code in (0, None):
                raise
            raise AirflowFailException(f"invalid settings (exit {exc.code}): see the error line above") from exc

    return task
