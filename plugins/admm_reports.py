"""Airflow plugin: the MNIST ADMM pipeline's evaluation reports in the Airflow UI.

Served by the API server under ``/admm-reports`` (an Airflow 3 plugin FastAPI app):

* ``files/<root>/<path>``: one artifact below a configured storage root, read through
  :mod:`admm_jobs.lake.storage` (local paths, ``file://``, ``s3://``, ``gs://``). Only report
  pages (``report.html``), PNG plots and metrics (``metrics.json``, ``metrics.jsonl``) are
  served; a path with an empty, ``.``, ``..`` or hidden segment is refused, and on local
  disk a symlink may not lead out of its root.
* ``runs/<dag_id>/<run_id>``: redirects to the report of a DAG run (the ``report_uri``
  its ``evaluate`` task returned); the "Evaluation report" tab of DAG runs shows it.
* ``quarantine/<dag_id>/<run_id>/<batch>``: redirects to the contact sheet of a quarantined
  batch (the ``contact_sheet_uri`` that the ``evidence`` task of a quarantine review run returned
  for that batch); the review question links it.
* ``/`` (the "Model registry" navigation entry): for every root holding a registry, the
  published model, a plot of test accuracy by logical date (accepted and rejected models,
  skipped runs and quarantined batches marked) and the whole decision history, newest first:
  decision, version, accuracies, dataset version, batch ids, reasons, and links to each
  model's report and metrics.

Tasks whose return value carries ``report_uri`` (``evaluate``, ``publish``) get the
"Evaluation report" extra link to ``files/...``.

Who sees what: every route needs a signed-in Airflow user (the UI's session cookie or a
``Bearer`` JWT; 401 without), and each storage root names the DAG whose runs write it.
Airflow's auth manager decides, as for the REST API's DAG run routes, whether the user
may read that DAG's runs (``is_authorized_dag``, ``GET``, ``DagAccessEntity.RUN``):

* ``files/<root>/...`` answers 403 unless the user may read the root's DAG;
* ``runs/<dag_id>/<run_id>`` and ``quarantine/<dag_id>/...`` answer 403 unless the user may read
  ``dag_id`` and the root holding the report or contact sheet;
* ``/`` shows only the roots (sections, links, list of roots) whose DAG the user may
  read, and answers 403 when there is none.

Roots come from ``[admm_reports] roots`` (``AIRFLOW__ADMM_REPORTS__ROOTS``): comma-separated
``name@dag_id=uri``, e.g. ``runs@mnist_admm_retraining=s3://bucket/runs`` (neither a name nor
a DAG id holds ``@`` or ``=``, so the URI is everything after the first ``=``). The default is
``runs@mnist_admm_retraining=<project>/var/runs,registry@mnist_admm_retraining=<project>/var/registry``
(the DAG's default ``runs_uri`` and ``registry_uri``). An entry without a DAG id (``name=uri``,
the old form) is refused: a root nobody is named to read would be served to everyone. Every root
must lie within ``[admm] allowed_uri_roots`` (:mod:`admm_jobs.orchestration.uri_roots`), where the
DAG's runs may write: otherwise every route answers 500 with the one-line refusal, and no task gets
the link. A run writing outside every root gets no link.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os.path
import posixpath
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from airflow.plugins_manager import AirflowPlugin
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import BaseOperatorLink
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Imported lazily below: admm_jobs (pyarrow, boto3) and the API server's security and
# database modules. Task processes load this plugin too and need none of them.

URL_PREFIX = "/admm-reports"
CONFIG_SECTION = "admm_reports"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ROOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DAG_ID = re.compile(r"^[A-Za-z0-9_.-]+$")  # Airflow's own rule for DAG ids (KEY_REGEX)
RETRAINING_DAG_ID = "mnist_admm_retraining"  # dags/mnist_admm_retraining.py, whose runs write the default roots
REPORT_TASK = "evaluate"
EVIDENCE_TASK = "evidence"  # the quarantine review DAG's task that draws the contact sheets
MEDIA_TYPES = {
    "report.html": "text/html; charset=utf-8",
    "metrics.json": "application/json",
    "metrics.jsonl": "application/x-ndjson",
}
PNG_MEDIA_TYPE = "image/png"
# The report embeds its plots as data: URIs and runs no script; the index links only.
REPORT_HEADERS = {
    "Content-Security-Policy":
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
}

TaskResultLookup = Callable[[str, str, str], Any]

log = logging.getLogger(__name__)


class ArtifactRefused(ValueError):
    """A requested path is not a servable artifact; the message says why."""


@dataclass(frozen=True)
class ServedRoot:
    """A storage root whose artifacts are served, and the DAG whose runs write it: its readers may see them."""

    dag_id: str
    uri: str


DEFAULT_ROOTS = {
    "runs": ServedRoot(RETRAINING_DAG_ID, str(PROJECT_ROOT / "var" / "runs")),
    "registry": ServedRoot(RETRAINING_DAG_ID, str(PROJECT_ROOT / "var" / "registry")),
}


# --- roots and paths ---------------------------------------------------------------------------


def parse_roots(text: str) -> dict[str, ServedRoot]:
    """``"runs@dag=/data/runs, registry@dag=s3://bucket/registry"`` -> ``{"runs": ServedRoot("dag", ...), ...}``."""
    from admm_jobs.lake import storage

    roots = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, separator, uri = (part.strip() for part in item.partition("="))
        name, at, dag_id = (part.strip() for part in head.partition("@"))
        if separator and not at and ROOT_NAME.match(name):
            raise ValueError(f"[{CONFIG_SECTION}] roots: {item!r} names no DAG: write {name}@<dag_id>={uri}, "
                             "where dag_id is the DAG whose runs write it (those who may read its runs see the root)")
        if not (separator and at and ROOT_NAME.match(name) and DAG_ID.match(dag_id) and uri):
            raise ValueError(f"[{CONFIG_SECTION}] roots: expected name@dag_id=uri (name: a-z, 0-9, _ or -; "
                             f"dag_id: letters, digits, _, . or -), got {item!r}")
        if storage.scheme(uri) in storage.HTTP_SCHEMES:
            raise ValueError(f"[{CONFIG_SECTION}] roots: {uri}: http(s) roots cannot be listed or checked")
        if name in roots:
            raise ValueError(f"[{CONFIG_SECTION}] roots: root {name!r} is named twice")
        roots[name] = ServedRoot(dag_id, uri)
    return roots


def configured_roots() -> dict[str, ServedRoot]:
    """The storage roots whose artifacts are served, from the Airflow config (or the project defaults).

    Raises ``UriRefused`` (a ``ValueError``) naming the first root outside ``[admm] allowed_uri_roots``.
    """
    from airflow.configuration import conf

    from admm_jobs.orchestration import uri_roots

    text = conf.get(CONFIG_SECTION, "roots", fallback="")
    roots = parse_roots(text) if text.strip() else dict(DEFAULT_ROOTS)
    uri_roots.confine_uris((f"[{CONFIG_SECTION}] roots {name}", root.uri) for name, root in roots.items())
    return roots


def media_type(name: str) -> str | None:
    """The Content-Type an artifact named ``name`` is served with; None if it is not served."""
    if name.endswith(".png") and len(name) > len(".png"):
        return PNG_MEDIA_TYPE
    return MEDIA_TYPES.get(name)


def artifact_segments(path: str) -> list[str]:
    """The segments of a relative artifact path; raises :class:`ArtifactRefused` if it may not be served."""
    segments = path.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or segment.startswith(".") or "\\" in segment or "\x00" in segment:
            raise ArtifactRefused(f"{path!r}: empty, relative, hidden or escaped path segment {segment!r}")
    if media_type(segments[-1]) is None:
        raise ArtifactRefused(f"{path!r}: only report.html, PNG plots and metrics.json(l) are served")
    return segments


def artifact_uri(roots: dict[str, ServedRoot], root: str, path: str) -> str:
    """The URI of artifact ``path`` below root ``root``; KeyError for an unknown root, ArtifactRefused."""
    from admm_jobs.lake import storage

    root_uri = roots[root].uri
    uri = storage.join(root_uri, *artifact_segments(path))
    if storage.is_local(uri):
        real_root = os.path.realpath(storage.local_path(root_uri))
        if os.path.commonpath([real_root, os.path.realpath(storage.local_path(uri))]) != real_root:
            raise ArtifactRefused(f"{path!r}: leads out of root {root!r}")
    return uri


def _location(uri: str) -> tuple[str, str]:
    """(storage kind, normalised path) of a URI, so that a root and a URI below it compare by prefix."""
    from admm_jobs.lake import storage

    if storage.is_local(uri):
        return "file", os.path.normpath(os.path.abspath(storage.local_path(uri)))
    parsed = urllib.parse.urlsplit(uri)
    return parsed.scheme, posixpath.normpath(f"{parsed.netloc}/{parsed.path.lstrip('/')}")


def artifact_location(uri: str, roots: dict[str, ServedRoot]) -> tuple[str, str] | None:
    """(root name, path below it) of a servable artifact ``uri``; None if no root serves it."""
    kind, path = _location(uri)
    for name, root in roots.items():
        root_kind, root_path = _location(root.uri)
        prefix = root_path.rstrip("/") + "/"
        if kind != root_kind or not path.startswith(prefix):
            continue
        relative = path[len(prefix):]
        try:
            artifact_segments(relative)
        except ArtifactRefused:
            return None
        return name, relative
    return None


def artifact_route(root: str, relative: str) -> str:
    """The app's route for an artifact, relative to the app (``files/<root>/<path>``)."""
    return f"files/{urllib.parse.quote(root)}/{urllib.parse.quote(relative)}"


def report_location(task_result: Any, roots: dict[str, ServedRoot]) -> tuple[str, str] | None:
    """(root, path) of the report a task's return value names in ``report_uri``; None if none is servable."""
    report_uri = task_result.get("report_uri") if isinstance(task_result, dict) else None
    if not isinstance(report_uri, str) or not report_uri:
        return None
    return artifact_location(report_uri, roots)


def contact_sheet_location(evidence: Any, batch: str, roots: dict[str, ServedRoot]) -> tuple[str, str] | None:
    """(root, path) of a batch's contact sheet, from the return value of a review run's evidence task (one item
    per batch, each with a ``quarantine`` naming ``batch`` and ``contact_sheet_uri``); None if none is servable."""
    for item in evidence if isinstance(evidence, list) else []:
        quarantine = item.get("quarantine") if isinstance(item, dict) else None
        if isinstance(quarantine, dict) and quarantine.get("batch") == batch:
            uri = quarantine.get("contact_sheet_uri")
            return artifact_location(uri, roots) if isinstance(uri, str) and uri else None
    return None


def report_link(task_result: Any, roots: dict[str, ServedRoot]) -> str:
    """The "Evaluation report" link of a task from its return value; "" (no link) without a servable report.

    Relative to the UI's ``<base href>`` (so it works behind a path prefix), absolute
    when ``[api] base_url`` is set.
    """
    from airflow.configuration import conf

    location = report_location(task_result, roots)
    if location is None:
        return ""
    route = f"{URL_PREFIX.lstrip('/')}/{artifact_route(*location)}"
    base_url = conf.get("api", "base_url", fallback="")
    return urllib.parse.urljoin(base_url.rstrip("/") + "/", route) if base_url else route


# --- Airflow metadata and security (API server only) -------------------------------------------


def task_result(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
    """A task instance's return value (its ``return_value`` XCom) from the metadata DB; None if none."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = session.scalar(
            XComModel.get_many(
                key="return_value", run_id=run_id, dag_ids=dag_id, task_ids=task_id, map_indexes=map_index
            ).with_only_columns(XComModel.value)
        )
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


_bearer = HTTPBearer(auto_error=False)


async def authenticated_user(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Any:
    """The signed-in Airflow user (Bearer JWT, else the UI's session cookie), as the core API resolves it."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, credentials)


SignedInUser = Annotated[Any, Depends(authenticated_user)]


def may_read_dag_runs(dag_id: str, user: Any) -> bool:
    """Whether Airflow's auth manager lets ``user`` read the runs of ``dag_id``, asked as the REST API's DAG run
    routes ask it (the DAG's team, if any, from the metadata DB)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    return get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user
    )


def require_dag_runs_readable(dag_id: str, user: Any, what: str = "") -> None:
    """Refuse (403) a user the auth manager does not let read the runs of ``dag_id``; ``what`` says what they write."""
    if not may_read_dag_runs(dag_id, user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"not allowed to read the runs of {dag_id!r}{what}")


def readable_roots(roots: dict[str, ServedRoot], user: Any) -> dict[str, ServedRoot]:
    """The roots whose DAG's runs ``user`` may read (each DAG asked once)."""
    readable_dags = {dag_id for dag_id in {root.dag_id for root in roots.values()} if may_read_dag_runs(dag_id, user)}
    return {name: root for name, root in roots.items() if root.dag_id in readable_dags}


# --- the app -----------------------------------------------------------------------------------


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em 1em;text-align:left;vertical-align:top}"
        "table{border-collapse:collapse}tr{border-bottom:1px solid #ddd}img{max-width:100%}"
        ".accepted{color:#17692a}.rejected{color:#a11}.quarantined{color:#b45f06}.skipped{color:#666}"
        ".released,.approved{color:#17692a}.confirmed,.timed_out,.declined{color:#b45f06}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status_code, headers=REPORT_HEADERS)


def _link(label: str, uri: str | None, roots: dict[str, ServedRoot]) -> str:
    """An HTML link to the app's route for ``uri``; "" when no root serves it."""
    location = artifact_location(uri, roots) if uri else None
    if location is None:
        return ""
    return f"<a href='{html.escape(artifact_route(*location))}'>{html.escape(label)}</a>"


def _entry_report_uri(entry: dict[str, Any], root_uri: str) -> str | None:
    """The report of a history entry: the one it names, else (older lines) the registry's copy of an
    accepted version or the run's own report."""
    from admm_jobs.lake import storage
    from admm_jobs.registry import store as registry

    if entry.get("report_uri"):
        return entry["report_uri"]
    if entry["decision"] == registry.ACCEPTED and entry.get("version"):
        return registry.version_report_uri(root_uri, entry["version"])
    if entry["decision"] == registry.REJECTED and entry.get("run_uri"):
        return storage.join(entry["run_uri"], registry.EVALUATION_DIR, registry.REPORT_FILE)
    return None


def _links(report_uri: str | None, roots: dict[str, ServedRoot]) -> str:
    """Links to a report and to the metrics.json next to it; "" unless a root serves the report."""
    from admm_jobs.registry import store as registry

    report = _link("report", report_uri, roots)
    if not report:
        return ""
    metrics_uri = posixpath.join(posixpath.dirname(report_uri), registry.EVALUATION_METRICS_FILE)
    return " ".join(filter(None, (report, _link("metrics", metrics_uri, roots))))


def _accuracy(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


def _details(entry: dict[str, Any]) -> str:
    """What a decision was about beyond its reasons: the quarantined batch's check, or the champion and the
    classes that failed the per-class gate."""
    from admm_jobs.registry import store as registry

    parts = []
    if entry["decision"] == registry.QUARANTINED and entry.get("check"):
        parts.append(f"batch {entry.get('batch')}: {entry['check']} observed {entry.get('observed')}, "
                     f"threshold {entry.get('threshold')}")
    if entry["decision"] in (registry.RELEASED, registry.CONFIRMED, registry.TIMED_OUT, registry.APPROVED,
                             registry.DECLINED):
        parts.append(f"by {entry.get('reviewer') or 'nobody (no answer in time)'} at {entry.get('responded_at')}")
    champion = entry.get("champion")
    if isinstance(champion, dict) and champion.get("version"):
        scores = [f"test {_accuracy(champion.get('test_accuracy'))}"]
        if champion.get("batch_accuracy") is not None:
            scores.append(f"newest batch {_accuracy(champion['batch_accuracy'])}")
        parts.append(f"champion {champion['version']}: {', '.join(scores)}")
    parts += [f"class {failed['class']} failed the per-class gate: test recall {_accuracy(failed['recall'])}, "
              f"the champion {_accuracy(failed['champion_recall'])}, allowed drop {_accuracy(failed['allowed'])}"
              for failed in entry.get("failed_classes") or []]
    parts += [str(reason) for reason in entry.get("reasons") or []]
    if entry.get("report_uri") and posixpath.basename(entry["report_uri"]) != registry.REPORT_FILE:
        parts.append(f"report: {entry['report_uri']}")  # e.g. a quarantined batch's Data Docs, not served here
    return "<br>".join(html.escape(part) for part in parts)


HISTORY_COLUMNS = ("recorded at", "logical date", "decision", "version", "test accuracy", "newest batch accuracy",
                   "dataset", "batches", "details", "")


def _history_row(entry: dict[str, Any], root_uri: str, roots: dict[str, ServedRoot]) -> str:
    batches = entry.get("batches") or ([entry["batch"]] if entry.get("batch") else [])
    cells = [
        html.escape(str(entry.get("recorded_at") or "")),
        html.escape(str(entry.get("logical_date") or "")),
        f"<span class='{html.escape(str(entry['decision']))}'>{html.escape(str(entry['decision']))}</span>",
        html.escape(str(entry.get("version") or "")),
        _accuracy(entry.get("test_accuracy")),
        _accuracy(entry.get("batch_accuracy")),
        html.escape(str(entry.get("dataset_version") or "")),
        html.escape(", ".join(map(str, batches))),
        _details(entry),
        " ".join(filter(None, (_links(_entry_report_uri(entry, root_uri), roots),
                               _link("contact sheet", entry.get("contact_sheet_uri"), roots)))),
    ]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _registry_section(name: str, root_uri: str, roots: dict[str, ServedRoot]) -> str | None:
    """The published model, the accuracy plot and the whole history (newest first) of one root; None
    when the root holds no registry."""
    import base64

    from admm_jobs.lake import storage
    from admm_jobs.registry import store as registry
    from admm_jobs.scoring import report

    if not (storage.exists(registry.pointer_uri(root_uri)) or storage.exists(registry.history_uri(root_uri))):
        return None
    title = f"<h2>{html.escape(name)}: {html.escape(registry.DEFAULT_MODEL_NAME)}</h2>"
    try:
        pointer = registry.read_pointer(root_uri)
        history = registry.read_history(root_uri)
    except registry.RegistryError as exc:
        return f"{title}<p class='rejected'>{html.escape(str(exc))}</p>"
    if pointer is None:
        published = "<p>No model published yet.</p>"
    else:
        report_uri = registry.version_report_uri(root_uri, pointer["version"])
        published = (
            f"<p>Published: <strong>{html.escape(pointer['version'])}</strong>, test accuracy "
            f"{_accuracy(pointer['test_accuracy'])}, dataset {html.escape(str(pointer.get('dataset_version')))}, "
            f"published at {html.escape(str(pointer.get('published_at')))} {_links(report_uri, roots)}</p>"
        )
    png = report.history_png(history)
    plot = (f"<img alt='test accuracy by logical date' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            if png else "")
    header = "".join(f"<th>{column}</th>" for column in HISTORY_COLUMNS)
    rows = "".join(_history_row(entry, root_uri, roots) for entry in reversed(history))
    table = f"<table><tr>{header}</tr>{rows}</table>" if history else "<p>No decisions recorded yet.</p>"
    return f"{title}{published}{plot}<h3>History ({len(history)} decisions, newest first)</h3>{table}"


def redirect_to_artifact(request: Request, location: tuple[str, str], roots: dict[str, ServedRoot],
                         user: Any) -> RedirectResponse:
    """A 303 to the files route of an artifact, refused (403) unless ``user`` may read the runs of the DAG
    writing its root: a run may write into a root of another DAG, so redirect only where the files route serves."""
    root, path = location
    require_dag_runs_readable(roots[root].dag_id, user, f", which write root {root!r}")
    return RedirectResponse(str(request.url_for("artifact", root=root, path=path)), status.HTTP_303_SEE_OTHER)


def create_app(roots: dict[str, ServedRoot] | None = None, lookup: TaskResultLookup = task_result) -> FastAPI:
    """The reports app over ``roots`` (default: the configured ones); ``lookup`` reads task return values."""
    # The configured roots are read on the first request: this module is imported by every task process.
    given_roots = (lambda: roots) if roots is not None else functools.cache(configured_roots)

    def served_roots() -> dict[str, ServedRoot]:
        """The served roots; a misconfigured one (malformed, outside the allowed roots) answers 500 naming it."""
        try:
            return given_roots()
        except ValueError as exc:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from None

    app = FastAPI(title="MNIST ADMM reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/files/{root}/{path:path}", name="artifact")
    def artifact(root: str, path: str, user: SignedInUser) -> Response:
        from admm_jobs.lake import storage

        roots = served_roots()
        if root not in roots:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no storage root named {root!r}")
        require_dag_runs_readable(roots[root].dag_id, user, f", which write root {root!r}")
        try:
            uri = artifact_uri(roots, root, path)
        except ArtifactRefused as refused:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(refused)) from None
        if not storage.exists(uri):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"{root}/{path}: no such artifact")
        return Response(storage.read_bytes(uri), media_type=media_type(posixpath.basename(path)),
                        headers=REPORT_HEADERS)

    @app.get("/runs/{dag_id}/{run_id}")
    def run_report(request: Request, dag_id: str, run_id: str, user: SignedInUser,
                   task_id: str = REPORT_TASK) -> Response:
        require_dag_runs_readable(dag_id, user)
        roots = served_roots()
        location = report_location(lookup(dag_id, run_id, task_id), roots)
        if location is None:
            return _page("No evaluation report", f"<p>Task {html.escape(task_id)} of run {html.escape(run_id)} "
                         "has not produced a report in a served storage root (yet).</p>", status.HTTP_404_NOT_FOUND)
        return redirect_to_artifact(request, location, roots, user)

    @app.get("/quarantine/{dag_id}/{run_id}/{batch}")
    def contact_sheet(request: Request, dag_id: str, run_id: str, batch: str, user: SignedInUser,
                      task_id: str = EVIDENCE_TASK) -> Response:
        require_dag_runs_readable(dag_id, user)
        roots = served_roots()
        location = contact_sheet_location(lookup(dag_id, run_id, task_id), batch, roots)
        if location is None:
            return _page("No contact sheet", f"<p>Task {html.escape(task_id)} of run {html.escape(run_id)} has not "
                         f"drawn a contact sheet of batch {html.escape(batch)} in a served storage root (yet).</p>",
                         status.HTTP_404_NOT_FOUND)
        return redirect_to_artifact(request, location, roots, user)

    @app.get("/")
    def index(user: SignedInUser) -> HTMLResponse:
        roots = readable_roots(served_roots(), user)  # sections and links of these roots only
        if not roots:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "not allowed to read the runs of any DAG served here")
        sections = [section for name, root in roots.items() if (section := _registry_section(name, root.uri, roots))]
        served = "".join(f"<li>{html.escape(name)}: {html.escape(root.uri)} (runs of {html.escape(root.dag_id)})</li>"
                         for name, root in roots.items())
        body = "".join(sections) or "<p>No model published yet.</p>"
        return _page("Model registry", f"{body}<h2>Served roots</h2><ul>{served}</ul>")

    return app


class EvaluationReportLink(BaseOperatorLink):
    """The "Evaluation report" button of PythonOperator tasks whose return value carries ``report_uri``."""

    name = "Evaluation report"
    operators = [PythonOperator]

    def get_link(self, operator, *, ti_key) -> str:
        try:
            roots = configured_roots()
        except ValueError as exc:  # the routes answer 500 with the same line; the task page still renders
            log.error("no %s link: %s", self.name, exc)
            return ""
        result = task_result(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index)
        return report_link(result, roots)


class AdmmReportsPlugin(AirflowPlugin):
    name = "admm_reports"
    fastapi_apps = [{"name": "admm_reports", "app": create_app(), "url_prefix": URL_PREFIX}]
    operator_extra_links = [EvaluationReportLink()]
    external_views = [
        {"name": "Model registry", "href": f"{URL_PREFIX.lstrip('/')}/", "destination": "nav",
         "category": "browse", "url_route": "admm-model-registry"},
        {"name": "Evaluation report", "href": f"{URL_PREFIX.lstrip('/')}/runs/{{DAG_ID}}/{{RUN_ID}}",
         "destination": "dag_run", "url_route": "admm-evaluation-report"},
    ]
