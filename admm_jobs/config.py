"""Command-line parsing shared by every stage.

Each stage declares one frozen dataclass; its fields (type, default and a
``help`` metadata entry) define the CLI, and its ``__post_init__`` validates
the values, so a config object that exists is a valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or out of range; the message names it."""


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
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
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
        option = "--" + field.name.replace("_", "-")
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


def to_argv(config: Any) -> list[str]:
    """The command line that :func:`parse_config` turns back into ``config``."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        argv += ["--" + field.name.replace("_", "-"), str(value)]
    return argv
