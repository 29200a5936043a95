"""Command-line parsing shared by every stage.

Each stage declares one frozen dataclass. Its fields, declared with
:func:`setting` (type, default, help text and JSON-schema bounds), define the
CLI, the Airflow params of the DAG (so the UI trigger form checks the same
bounds) and the validation done when the object is built: a config object
that exists is a valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or out of range; the message names it."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(stream=None) -> None:
    """INFO log lines with time, level and logger name, for a stage run from the command line."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=stream)


def setting(default: Any = dataclasses.MISSING, help: str = "", **schema: Any) -> Any:
    """A config field with its help text and JSON-schema bounds (minimum, maximum, enum, items, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, "schema": schema})


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _json_type(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = _json_type(next(arg for arg in args if arg is not type(None)))
        return {**inner, "type": [inner["type"], "null"]}
    if origin is tuple:
        return {"type": "array", "items": {"type": "integer"}}
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in names:
        return {"type": names[annotation]}
    raise TypeError(f"unsupported config field type {annotation!r}")


def field_schemas(cls: type) -> dict[str, dict[str, Any]]:
    """The JSON schema of every field: its type plus the bounds given to :func:`setting`."""
    hints = typing.get_type_hints(cls)
    schemas = {}
    for field in dataclasses.fields(cls):
        schema = _json_type(hints[field.name])
        bounds = dict(field.metadata.get("schema", {}))
        if "items" in bounds:
            schema["items"] = {**schema["items"], **bounds.pop("items")}
        schemas[field.name] = {**schema, **bounds}
    return schemas


def validate_fields(config: Any) -> None:
    """Check every field of a config dataclass against its schema; raise ConfigError naming the option."""
    import jsonschema

    for name, schema in field_schemas(type(config)).items():
        value = getattr(config, name)
        value = list(value) if isinstance(value, tuple) else value
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            raise ConfigError(f"{option_name(name)}: {exc.message}") from None


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def int_tuple(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``"256,256"`` (or a JSON list, or a sequence) into a tuple of ints."""
    if isinstance(text, str):
        stripped = text.strip()
        if stripped in ("", "[]"):
            return ()
        items = json.loads(stripped) if stripped.startswith("[") else stripped.split(",")
    else:
        items = list(text)
    try:
        return tuple(int(str(item).strip()) for item in items)
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from exc


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def convert(text: str):
        return None if str(text).strip().lower() in ("", "none", "null") else kind(text)

    return convert


def _converter(annotation: Any):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return _optional(_converter(inner))
    if annotation is bool:
        return _bool
    if origin is tuple:
        return int_tuple
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"unsupported config field type {annotation!r}")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per dataclass field."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        option = option_name(field.name)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "type": _converter(hints[field.name]),
            "help": field.metadata.get("help", ""),
            "required": required,
        }
        if not required:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kwargs["default"] = default
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(option, **kwargs)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None) -> T:
    """Build and validate a stage config from command-line arguments.

    Invalid values exit with status 2 and a one-line message naming the
    setting, before any work (or Spark job) starts.
    """
    parser = build_parser(cls)
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return cls(**vars(namespace))
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


