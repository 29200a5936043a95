"""DAG params and templated command lines built from the stage config dataclasses, so the trigger form,
the REST conf and the stage CLIs check the same bounds."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Param

from admm_jobs.cli.config import ConfigError, field_schemas, option_name


def airflow_params(cls: type, defaults: dict[str, Any] | None = None, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Airflow ``Param`` objects for the fields of a config dataclass (typed, bounded, documented)."""
    defaults = defaults or {}
    params = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        default = defaults.get(field.name, field.default)
        if default is dataclasses.MISSING:
            raise ConfigError(f"{cls.__name__}.{field.name} has no default; pass one for the DAG params")
        default = list(default) if isinstance(default, tuple) else default
        params[field.name] = Param(default, description=field.metadata.get("help", ""), **field_schemas(cls)[field.name])
    return params


def templated_argv(cls: type, fields: Sequence[str] | None = None) -> list[str]:
    """Command-line arguments that Airflow renders from ``params`` of the same names.

    Lists render comma-separated and ``None`` renders as ``none`` (which the
    parser reads back as ``None``), so the DAG passes params through unchanged.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)] if fields is None else list(fields)
    argv: list[str] = []
    for name in names:
        value = f"params.{name}"
        hint = hints[name]
        if typing.get_origin(hint) is tuple:
            value = f"{value} | join(',')"
        elif type(None) in typing.get_args(hint):
            value = f"'none' if {value} is none else {value}"
        argv += [option_name(name), "{{ " + value + " }}"]
    return argv
