"""Whether a storage URI lies under one of a set of allowed roots, decided on normalised URIs.

A URI and a root are compared as :class:`Location` s: scheme, authority and path segments.

* Local paths and ``file://`` URIs (scheme ``file``) are made absolute and resolved with
  ``os.path.realpath``: ``..`` and ``.`` go, and so do symlinks along the longest existing part of
  the path (a link inside a root that points outside it leads outside).
* ``s3://`` and ``gs://`` (and other schemes): the authority is the bucket; ``https://`` and
  ``http://``: the lower-case host and its port (none written for the scheme's default). ``..`` and
  ``.`` are resolved; a ``..`` that climbs above the bucket or host, a query string, a fragment, user
  info, a percent-escape, a backslash or whitespace is refused outright (whether a client or server
  decodes ``%2e%2e`` or ``%2F``, or reads a backslash as ``/``, is theirs to decide: no reading may escape).

A URI is under a root when scheme and authority are equal and the root's segments begin the URI's:
``/data/lake-evil/x`` is not under ``/data/lake``, nor ``s3://bucket2/lake`` under ``s3://bucket/lake``.
Local paths are read as :mod:`admm_jobs.lake.storage` reads them, so the check sees the path the I/O
will use.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from admm_jobs.cli.config import ConfigError
from admm_jobs.lake import storage

DEFAULT_PORTS = {"https": 443, "http": 80}
# Characters a URI with a scheme may not hold: anything that urllib, pyarrow or an HTTP server could read
# as a query, a fragment, an escape or a path separator, and what urllib silently strips. A file:// URI
# may hold escapes: storage decodes them once, and so does the check.
REFUSED_IN_FILE_URI = re.compile(r"[?#\\\s\x00-\x1f\x7f]")
REFUSED_IN_REMOTE = re.compile(r"[?#%\\\s\x00-\x1f\x7f]")


class UriRefused(ValueError):
    """A URI that may not be used: outside the allowed roots, or in a form that cannot be checked."""


@dataclasses.dataclass(frozen=True)
class Location:
    """A normalised URI: ``file`` with no authority for local paths."""

    scheme: str
    authority: str
    segments: tuple[str, ...]

    def __str__(self) -> str:
        path = "/" + "/".join(self.segments)
        return path if self.scheme == "file" else f"{self.scheme}://{self.authority}{path}"

    def is_within(self, root: Location) -> bool:
        """True when this location is ``root`` or below it, by whole path segments."""
        return ((self.scheme, self.authority) == (root.scheme, root.authority)
                and self.segments[:len(root.segments)] == root.segments)


def _resolved_segments(path: str, uri: str) -> tuple[str, ...]:
    """The segments of a URI path with ``.`` and ``..`` resolved; refuses climbing above the bucket or host."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if not segments:
                raise UriRefused(f"{uri}: '..' climbs above the bucket or host")
            segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return tuple(segments)


def _authority(parsed: urllib.parse.SplitResult, uri: str) -> str:
    if "@" in parsed.netloc:
        raise UriRefused(f"{uri}: user info is not allowed in a storage URI")
    if not parsed.netloc:
        raise UriRefused(f"{uri}: no bucket or host")
    if parsed.scheme not in DEFAULT_PORTS:
        return parsed.netloc
    try:
        port = parsed.port
    except ValueError as exc:
        raise UriRefused(f"{uri}: {exc}") from None
    return parsed.hostname if port in (None, DEFAULT_PORTS[parsed.scheme]) else f"{parsed.hostname}:{port}"


def normalise(uri: str) -> Location:
    """The :class:`Location` of ``uri`` (see the module docstring); :class:`UriRefused` if it has none."""
    uri = str(uri)
    if storage.is_local(uri):
        if storage.scheme(uri) == "file" and REFUSED_IN_FILE_URI.search(uri):
            raise UriRefused(f"{uri}: query, fragment, backslash or whitespace in a file:// URI")
        # realpath makes the path absolute, then resolves symlinks and '..' in order (a '..' after a link
        # leaves the link's target); the part that does not exist yet is kept as written.
        real = os.path.realpath(storage.local_path(uri))
        return Location("file", "", Path(real).parts[1:])
    if REFUSED_IN_REMOTE.search(uri):
        raise UriRefused(f"{uri}: query, fragment, percent-escape, backslash or whitespace in a storage URI")
    parsed = urllib.parse.urlsplit(uri)
    return Location(parsed.scheme.lower(), _authority(parsed, uri), _resolved_segments(parsed.path, uri))


def parse_roots(text: str, source: str) -> tuple[str, ...]:
    """Comma-separated roots (empty items ignored), each checked to be absolute and normalisable.

    ``source`` names where the text comes from, for the error message (:class:`ConfigError`).
    """
    roots = tuple(filter(None, (item.strip() for item in text.split(","))))
    for root in roots:
        if storage.scheme(root) == "" and not os.path.isabs(root):
            raise ConfigError(f"{source}: root {root!r} is a relative path; give an absolute one")
        try:
            normalise(root)
        except UriRefused as exc:
            raise ConfigError(f"{source}: root {exc}") from None
    return roots


def confine(name: str, uri: str, roots: Sequence[str], source: str) -> None:
    """Raise :class:`UriRefused`, one line naming ``name``, ``uri`` and the roots, unless ``uri`` lies under one.

    ``source`` names where the roots are configured.
    """
    allowed = f"allowed roots ({source}): {', '.join(roots) if roots else 'none'}"
    try:
        location = normalise(uri)
    except UriRefused as exc:
        raise UriRefused(f"{name}: {exc}; {allowed}") from None
    if any(location.is_within(normalise(root)) for root in roots):
        return
    resolved = "" if str(location) in (uri, uri.rstrip("/")) else f" (resolves to {location})"
    raise UriRefused(f"{name}: {uri}{resolved} is outside the {allowed}")
