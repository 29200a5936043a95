"""The body of every command-line entry point: parse, run, print the result."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

from admm_jobs.cli.config import configure_logging, parse_config

Config = TypeVar("Config")


class FailedWithResult(RuntimeError):
    """A command that ran to the end but failed; ``result`` is still its outcome (printed before the exit)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def run_command(config_class: type[Config], run: Callable[[Config], dict[str, Any]],
                argv: Sequence[str] | None, log_stream: TextIO | None = None) -> dict[str, Any]:
    """Log at INFO, build ``config_class`` from ``argv`` (a bad option exits 2 naming it, before any work),
    ``run`` it and print its result as the last stdout line: one JSON object with sorted keys.

    A :class:`FailedWithResult` prints its result the same way, then propagates (non-zero exit).
    """
    configure_logging(log_stream)
    config = parse_config(config_class, argv)
    try:
        result = run(config)
    except FailedWithResult as failure:
        print(json.dumps(failure.result, sort_keys=True))
        raise
    print(json.dumps(result, sort_keys=True))
    return result
