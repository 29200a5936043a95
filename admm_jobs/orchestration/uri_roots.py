"""The storage URIs of a DAG run confined to the roots the operator configures.

Whoever may trigger a run chooses its URI params (trigger form, REST conf): without a limit, a run could
make the worker fetch any ``https://`` address or write wherever the worker's credentials reach. The
roots are the Airflow option ``[admm] allowed_uri_roots`` (``AIRFLOW__ADMM__ALLOWED_URI_ROOTS``),
comma-separated; unset or empty: the project's ``data/`` and ``var/``. Matching rules:
:mod:`admm_jobs.lake.confinement`.

The DAG checks twice before any I/O: :func:`confine_task`, the ``pre_execute`` hook of every task (the
run's ``*_uri`` params and the URI options of the task's rendered command line, the training job's
arguments included), and :func:`confined` around every task callable (the command line it receives).
The stage CLIs run by hand are not restricted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import conf

from admm_jobs.lake import confinement

SECTION, OPTION = "admm", "allowed_uri_roots"
CONFIG_NAME = f"[{SECTION}] {OPTION}"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOTS = (str(PROJECT_ROOT / "data"), str(PROJECT_ROOT / "var"))
# Options of the stage command lines that name a storage URI, besides every --*-uri.
URI_OPTIONS = ("--source", "--lake", "--checksums")
# The DAG passes 'none' here when training starts from random weights; the train CLI reads it as no URI.
OPTIONAL_URI_OPTIONS = ("--init-model-uri",)
NO_URI = ("", "none", "null")


def allowed_uri_roots() -> tuple[str, ...]:
    """The configured roots (read at each call, so a changed environment counts), or the defaults."""
    text = conf.get(SECTION, OPTION, fallback="")
    return confinement.parse_roots(text, CONFIG_NAME) if text.strip() else DEFAULT_ROOTS


def confine_uris(named_uris: Iterable[tuple[str, str]]) -> None:
    """Raise :class:`~admm_jobs.lake.confinement.UriRefused` (a ``ValueError``) for the first URI outside the
    allowed roots; the message names it (``name``), the URI and the roots.

    The report plugin checks its own roots with
    ``confine_uris((f"[admm_reports] roots {name}", uri) for name, uri in roots.items())``.
    """
    roots = allowed_uri_roots()
    for name, uri in named_uris:
        confinement.confine(name, uri, roots, CONFIG_NAME)


def is_uri_option(option: str) -> bool:
    return option in URI_OPTIONS or (option.startswith("--") and option.endswith("-uri"))


def argv_uris(argv: Sequence[Any]) -> list[tuple[str, str]]:
    """(option, URI) for each URI option of a command line, written ``--opt VALUE`` or ``--opt=VALUE``."""
    pairs = []
    for index, item in enumerate(argv):
        option, separator, value = str(item).partition("=")
        if not is_uri_option(option):
            continue
        if not separator:
            if index + 1 == len(argv):
                continue  # no value: the stage's parser refuses the command line
            value = str(argv[index + 1])
        if option in OPTIONAL_URI_OPTIONS and value.strip().lower() in NO_URI:
            continue
        pairs.append((option, value))
    return pairs


def confine_argv(argv: Sequence[Any]) -> None:
    """Refuse a command line with a URI option outside the allowed roots."""
    confine_uris(argv_uris(argv))


def confined(task_callable: Callable[..., Any]) -> Callable[..., Any]:
    """``task_callable(argv, ...)`` that first confines the URIs of ``argv`` (signature kept for Airflow)."""

    @functools.wraps(task_callable)
    def task(argv: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        confine_argv(argv)
        return task_callable(argv, *args, **kwargs)

    return task


def _lists(value: Any) -> Iterator[Sequence[Any]]:
    """Every list or tuple within a rendered template field (command lines are lists of strings)."""
    if isinstance(value, (list, tuple)):
        yield value
        for item in value:
            yield from _lists(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _lists(item)


def confine_task(context: Mapping[str, Any]) -> None:
    """``pre_execute`` hook of every task: refuse the run's ``*_uri`` params and the URI options in the task's
    rendered template fields (``op_args``, spark-submit's ``application_args``, the EMR steps, job driver or
    Dataproc batch) that lie outside the allowed roots, before the task does anything."""
    task = context["task"]
    params = [(name, str(value)) for name, value in context["params"].items() if name.endswith("_uri")]
    command_lines = [argv for field in task.template_fields for argv in _lists(getattr(task, field, None))]
    confine_uris([*params, *(pair for argv in command_lines for pair in argv_uris(argv))])
