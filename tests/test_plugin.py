"""The admm_reports Airflow plugin (reports app, "Evaluation report" link) and the DAG's lineage.

The app is exercised as the API server runs it: users sign in with tokens that the configured auth manager
(``report_auth.RunReadersAuthManager``, created by Airflow's ``create_auth_manager``) issued, and that manager
alone decides who may read which DAG's runs.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from admm_jobs import publish
from admm_jobs.lake import storage
from admm_jobs.orchestration import assets, review, tasks
from admm_jobs.registry import review as registry_review
from admm_jobs.registry import store as registry

import report_auth
from report_auth import ANALYST, RETRAINING_DAG, REVIEW_DAG, REVIEWER, SCORER, SCORING_DAG, STRANGER
from run_artifacts import make_evaluated_run

PLUGINS_FOLDER = Path(__file__).resolve().parents[1] / "plugins"
sys.path.insert(0, str(PLUGINS_FOLDER))
import admm_reports  # noqa: E402  (the plugins folder is not a package)

RUN_KEY = "20260302T000000"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def retraining_roots(**uris) -> dict[str, admm_reports.ServedRoot]:
    """Storage roots by name, each written by the retraining DAG."""
    return {name: admm_reports.ServedRoot(RETRAINING_DAG, str(uri)) for name, uri in uris.items()}


@pytest.fixture(scope="module")
def auth_manager(airflow_db):
    """The test auth manager, configured and created as the API server does. Checking a token and a DAG's team
    reads the metadata DB (revoked tokens, DAG bundles), hence ``airflow_db``."""
    from airflow.api_fastapi.app import create_auth_manager, purge_cached_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__AUTH_MANAGER", report_auth.AUTH_MANAGER)
        patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))  # as a deployment sets it
        purge_cached_app()
        manager = create_auth_manager()
        assert type(manager) is report_auth.RunReadersAuthManager
        yield manager
    purge_cached_app()


@pytest.fixture
def client_for(auth_manager):
    """``client_for(roots, user=ANALYST, lookup=...)``: a client of the app over ``roots``, signed in as ``user``
    with a token the auth manager issued (``user=None``: not signed in)."""

    def client_for(roots, user: str | None = ANALYST, lookup=lambda dag_id, run_id, task_id: None) -> TestClient:
        client = TestClient(admm_reports.create_app(roots, lookup=lookup))
        if user is not None:
            client.headers["Authorization"] = f"Bearer {report_auth.token_for(user)}"
        return client

    return client_for


@pytest.fixture
def roots(tmp_path):
    """A runs root with one evaluated run (plus files that must not be served) and an empty registry root."""
    runs, registry_root = tmp_path / "runs", tmp_path / "registry"
    evaluation = runs / RUN_KEY / "evaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "report.html").write_text("<html><body>report of the run</body></html>")
    (evaluation / "accuracy.png").write_bytes(PNG)
    (evaluation / "metrics.json").write_text('{"test_accuracy": 0.9}')
    (runs / RUN_KEY / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (runs / RUN_KEY / "model").mkdir()
    (runs / RUN_KEY / "model" / "model.npz").write_bytes(b"weights")
    (runs / RUN_KEY / ".staging-evaluation").mkdir()
    (runs / RUN_KEY / ".staging-evaluation" / "report.html").write_text("half-written")
    registry_root.mkdir()
    (tmp_path / "report.html").write_text("outside every root")
    return retraining_roots(runs=runs, registry=registry_root)


def test_serves_reports_plots_and_metrics_with_their_types(roots, client_for):
    client = client_for(roots)
    report = client.get(f"/files/runs/{RUN_KEY}/evaluation/report.html")
    assert report.status_code == 200 and "report of the run" in report.text
    assert report.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in report.headers["content-security-policy"]  # no script runs in a report
    plot = client.get(f"/files/runs/{RUN_KEY}/evaluation/accuracy.png")
    assert plot.content == PNG and plot.headers["content-type"] == "image/png"
    metrics = client.get(f"/files/runs/{RUN_KEY}/evaluation/metrics.json")
    assert metrics.json() == {"test_accuracy": 0.9}
    assert client.get(f"/files/runs/{RUN_KEY}/metrics.jsonl").text == '{"epoch": 1}\n'


@pytest.mark.parametrize("path, code", [
    (f"runs/{RUN_KEY}/model/model.npz", 403),                    # not a report artifact
    (f"runs/{RUN_KEY}/.staging-evaluation/report.html", 403),    # hidden (half-written) directory
    (f"runs/{RUN_KEY}/%2e%2e/%2e%2e/report.html", 403),          # traversal, percent-encoded
    (f"runs/{RUN_KEY}%2F..%2F..%2Freport.html", 403),            # traversal with encoded slashes
    (f"runs/{RUN_KEY}//evaluation/report.html", 403),            # empty segment
    ("lake/mnist/report.html", 404),                             # no such root
    (f"runs/{RUN_KEY}/evaluation/loss.png", 404),                # allowed name, absent
])
def test_refuses_anything_but_report_artifacts_inside_a_root(roots, client_for, path, code):
    response = client_for(roots).get(f"/files/{path}")
    assert response.status_code == code, response.text
    if code == 403:
        assert "not allowed to read" not in response.text  # refused for the path, not for the user


def test_a_symlink_may_not_lead_out_of_its_root(roots, client_for, tmp_path):
    escape = Path(roots["runs"].uri) / "escape"
    escape.mkdir()
    (escape / "report.html").symlink_to(tmp_path / "report.html")
    response = client_for(roots).get("/files/runs/escape/report.html")
    assert response.status_code == 403 and "leads out of root" in response.text


def routes_to_every_page(roots) -> tuple[Callable, list[str]]:
    """The task result lookup of a run whose evaluate task reported into the runs root, and the app's route to
    each of its pages: the report file, the registry page and the run's report tab."""
    results = {(RETRAINING_DAG, "run_1", "evaluate"): {
        "report_uri": f"{roots['runs'].uri}/{RUN_KEY}/evaluation/report.html"}}
    routes = [f"/files/runs/{RUN_KEY}/evaluation/report.html", "/", f"/runs/{RETRAINING_DAG}/run_1"]
    return lambda *key: results.get(key), routes


def test_every_route_needs_a_signed_in_user(roots, client_for):
    lookup, routes = routes_to_every_page(roots)
    client = client_for(roots, user=None, lookup=lookup)
    for route in routes:
        assert client.get(route).status_code == 401, route


def test_every_route_refuses_a_user_the_auth_manager_denies_the_dag(roots, client_for):
    lookup, routes = routes_to_every_page(roots)
    stranger, analyst = client_for(roots, user=STRANGER, lookup=lookup), client_for(roots, user=ANALYST, lookup=lookup)
    for route in routes:
        refused = stranger.get(route, follow_redirects=False)
        assert refused.status_code == 403 and "not allowed to read the runs of" in refused.text, route
        assert analyst.get(route).status_code == 200, route  # the same route, for a user who may read the DAG
    for name in roots:  # no root lets the stranger in, not even one without a registry
        assert stranger.get(f"/files/{name}/{RUN_KEY}/evaluation/report.html").status_code == 403, name


def test_a_run_redirects_to_the_report_its_evaluate_task_returned(roots, client_for):
    report_uri = f"{roots['runs'].uri}/{RUN_KEY}/evaluation/report.html"
    results = {(dag_id, "run_1", "evaluate"): {"report_uri": report_uri} for dag_id in (RETRAINING_DAG, "other_dag")}
    client = client_for(roots, user=ANALYST, lookup=lambda *key: results.get(key))
    response = client.get(f"/runs/{RETRAINING_DAG}/run_1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].endswith(f"/files/runs/{RUN_KEY}/evaluation/report.html")
    assert "report of the run" in client.get(f"/runs/{RETRAINING_DAG}/run_1").text
    missing = client.get(f"/runs/{RETRAINING_DAG}/run_2")
    assert missing.status_code == 404 and "no" in missing.text.lower()
    # The analyst may read the report's root, but not the runs of other_dag: its run tab is refused.
    refused = client.get("/runs/other_dag/run_1", follow_redirects=False)
    assert refused.status_code == 403 and "not allowed to read the runs of 'other_dag'" in refused.text


def test_a_review_run_links_the_contact_sheet_of_each_batch_to_its_readers(roots, client_for):
    """The review question's link (orchestration.review.contact_sheet_link) redirects to the PNG that the run's
    evidence task drew, for users who may read the runs of the review DAG and of the DAG writing the root."""
    from idx_files import TRAIN_IMAGES, TRAIN_LABELS, read_vendored

    labels = read_vendored(TRAIN_LABELS)[:200]
    failures = [{"check": "label confusion", "given": 3, "predicted": 8}, {"check": "blank images"}]
    chosen = registry_review.sample_indices(labels, registry_review.flagged_classes(failures), 60)
    assert list(chosen) == list(np.flatnonzero((labels == 3) | (labels == 8)))  # every 3 and 8: fewer than 60
    sheet = registry_review.contact_sheet_png(read_vendored(TRAIN_IMAGES)[chosen].reshape(-1, 784), labels[chosen],
                                              [28, 28], "batch 2026-03-01: labels 3, 8")
    sheet_uri = registry_review.contact_sheet_uri(f"{roots['runs'].uri}/{RUN_KEY}", "2026-03-01")
    storage.write_bytes(sheet_uri, sheet)
    evidence = [{"subject": "...", "body": "...",
                 "quarantine": {"batch": batch, "contact_sheet_uri": registry_review.contact_sheet_uri(
                     f"{roots['runs'].uri}/{RUN_KEY}", batch)}} for batch in ("2026-02-22", "2026-03-01")]
    results = {(REVIEW_DAG, "review_1", review.EVIDENCE_TASK): evidence}
    link = review.contact_sheet_link(REVIEW_DAG, "review_1", "2026-03-01")
    assert link.startswith("admm-reports/")
    route = "/" + link.removeprefix("admm-reports/")

    reviewer = client_for(roots, user=REVIEWER, lookup=lambda *key: results.get(key))
    redirect = reviewer.get(route, follow_redirects=False)
    assert redirect.status_code == 303
    assert redirect.headers["location"].endswith(f"/files/runs/{RUN_KEY}/quarantine/2026-03-01/contact-sheet.png")
    served = reviewer.get(route)
    assert served.content == sheet and served.headers["content-type"] == "image/png"
    assert reviewer.get(route.replace("2026-03-01", "2026-02-22")).status_code == 404  # listed, not drawn
    assert reviewer.get(route.replace("2026-03-01", "2026-03-08")).status_code == 404  # not in this review
    refused = client_for(roots, user=ANALYST, lookup=lambda *key: results.get(key)).get(route)
    assert refused.status_code == 403 and f"not allowed to read the runs of '{REVIEW_DAG}'" in refused.text
    assert client_for(roots, user=None, lookup=lambda *key: results.get(key)).get(route).status_code == 401


STRAY_RUN_KEY = "20260309T000000"


@pytest.fixture
def two_dags(tmp_path):
    """The retraining DAG's runs and registry roots and the scoring DAG's registry root, each registry with a
    published model. A second, rejected scoring run lies in the retraining DAG's runs root: the scoring
    registry's history and the run's evaluate task point there."""
    runs, scoring_runs = tmp_path / "runs", tmp_path / "scoring-runs"
    make_evaluated_run(str(runs / RUN_KEY), seed=1, test_accuracy=0.91)
    make_evaluated_run(str(scoring_runs / RUN_KEY), seed=2, test_accuracy=0.88)
    make_evaluated_run(str(runs / STRAY_RUN_KEY), seed=3, test_accuracy=0.6)
    retrained = publish.publish_run(str(runs / RUN_KEY), str(tmp_path / "registry"), min_accuracy=0.5)
    scored = publish.publish_run(str(scoring_runs / RUN_KEY), str(tmp_path / "scoring"), min_accuracy=0.5)
    stray = publish.publish_run(str(runs / STRAY_RUN_KEY), str(tmp_path / "scoring"), min_accuracy=0.5)
    assert stray["decision"] == "rejected"
    roots = {**retraining_roots(runs=runs, registry=tmp_path / "registry"),
             "scoring": admm_reports.ServedRoot(SCORING_DAG, str(tmp_path / "scoring"))}
    results = {(SCORING_DAG, "run_1", "evaluate"): {"report_uri": stray["report_uri"]}}
    return {"roots": roots, "retrained": retrained["model_version"], "scored": scored["model_version"],
            "lookup": lambda *key: results.get(key)}


def test_a_user_sees_only_the_roots_of_the_dags_they_may_read(two_dags, client_for):
    roots, retrained, scored = two_dags["roots"], two_dags["retrained"], two_dags["scored"]
    scorer = client_for(roots, user=SCORER, lookup=two_dags["lookup"])
    page = scorer.get("/")
    assert page.status_code == 200 and scored in page.text and retrained not in page.text
    assert "<h2>scoring: " in page.text and "<h2>registry: " not in page.text
    assert "<li>scoring: " in page.text and "<li>runs: " not in page.text and "<li>registry: " not in page.text
    links = re.findall(r"href='([^']+)'", page.text)
    assert links and all(link.startswith("files/scoring/") for link in links)  # not the stray run's report
    for link in links:
        assert scorer.get("/" + link).status_code == 200, link
    retrained_report = f"/files/registry/mnist-admm/{retrained}/evaluation/report.html"
    assert scorer.get(retrained_report).status_code == 403
    assert scorer.get(f"/files/runs/{RUN_KEY}/evaluation/report.html").status_code == 403
    # A run of the DAG the scorer may read whose report lies in a root of the other DAG: no redirect there.
    refused = scorer.get(f"/runs/{SCORING_DAG}/run_1", follow_redirects=False)
    assert refused.status_code == 403 and "which write root 'runs'" in refused.text

    analyst = client_for(roots, user=ANALYST, lookup=two_dags["lookup"])
    page = analyst.get("/").text
    assert scored in page and retrained in page
    assert f"href='files/runs/{STRAY_RUN_KEY}/evaluation/report.html'" in page
    assert analyst.get(retrained_report).status_code == 200
    assert analyst.get(f"/runs/{SCORING_DAG}/run_1", follow_redirects=False).status_code == 303


def test_index_lists_the_published_model_with_a_working_report_link(tmp_path, client_for):
    run, registry_uri = str(tmp_path / "runs" / RUN_KEY), str(tmp_path / "registry")
    make_evaluated_run(run, seed=1, test_accuracy=0.91)
    result = publish.publish_run(run, registry_uri, min_accuracy=0.5)
    client = client_for(retraining_roots(runs=tmp_path / "runs", registry=registry_uri))
    page = client.get("/")
    assert page.status_code == 200 and result["model_version"] in page.text and "0.9100" in page.text
    href = page.text.split("href='")[1].split("'")[0]
    assert href == f"files/registry/mnist-admm/{result['model_version']}/evaluation/report.html"
    assert client.get("/" + href).status_code == 200


@pytest.fixture
def registry_of_every_kind(tmp_path):
    """A registry whose history holds each decision kind (and a line in the format before them), newest last."""
    runs, registry_uri = tmp_path / "runs", str(tmp_path / "registry")
    make_evaluated_run(str(runs / "20260105T000000"), seed=1, test_accuracy=0.91, dataset_version="a" * 16,
                       batches=["2026-01-05"])
    make_evaluated_run(str(runs / "20260112T000000"), seed=2, test_accuracy=0.82, dataset_version="b" * 16,
                       batches=["2026-01-05", "2026-01-12"])
    old_line = {"at": "2026-01-01T00:00:00+00:00", "decision": "rejected", "reason": "from before the kinds",
                "model_version": "0123456789abcdef", "test_accuracy": 0.7, "dataset_version": "c" * 16,
                "run": str(runs / "old")}
    history = Path(registry.history_uri(registry_uri))
    history.parent.mkdir(parents=True)
    history.write_text(json.dumps(old_line) + "\n")
    accepted = publish.publish_run(str(runs / "20260105T000000"), registry_uri, min_accuracy=0.85,
                                   training_key="key-a", logical_date="2026-01-05")
    rejected = publish.publish_run(str(runs / "20260112T000000"), registry_uri, min_accuracy=0.85,
                                   training_key="key-b", logical_date="2026-01-12")
    registry.record_decision(registry_uri, {
        "decision": "skipped", "logical_date": "2026-01-19", "training_key": "key-a", "dataset_version": "a" * 16,
        "batches": ["2026-01-05"], "reasons": ["model version already judged for this training key"]})
    registry.record_decision(registry_uri, {
        "decision": "quarantined", "logical_date": "2026-01-26", "batch": "2026-01-26", "check": "class_proportions",
        "observed": 0.41, "threshold": 0.25, "batches": ["2026-01-26"], "reasons": ["class 3 is 41% of the batch"],
        "report_uri": str(runs / "data-docs" / "index.html")})
    return {"runs": str(runs), "registry": registry_uri, "accepted": accepted, "rejected": rejected}


def test_registry_page_shows_the_whole_history_newest_first_with_plot_and_links(registry_of_every_kind, client_for):
    kinds = registry_of_every_kind
    client = client_for(retraining_roots(runs=kinds["runs"], registry=kinds["registry"]))
    page = client.get("/")
    assert page.status_code == 200
    text = page.text
    decisions = re.findall(r"<td><span class='(\w+)'>", text)
    assert decisions == ["quarantined", "skipped", "rejected", "accepted", "rejected"]  # newest first

    accepted, rejected = kinds["accepted"], kinds["rejected"]
    rows = text.split("<tr>")[2:]  # after the header row
    quarantined, skipped, rejected_row, accepted_row, old_row = rows
    assert "2026-01-26" in quarantined and "class_proportions observed 0.41, threshold 0.25" in quarantined
    assert "href" not in quarantined and f"report: {kinds['runs']}/data-docs/index.html" in quarantined
    assert "model version already judged" in skipped
    assert accepted["model_version"] in accepted_row and "0.9100" in accepted_row and "a" * 16 in accepted_row
    assert ">2026-01-05<" in accepted_row.replace("<td>", ">").replace("</td>", "<")
    assert "2026-01-05, 2026-01-12" in rejected_row and "0.8200" in rejected_row
    assert f"champion {accepted['model_version']}: test 0.9100" in rejected_row
    assert "from before the kinds" in old_row and "0.7000" in old_row

    # Reports: the registry's copy for the accepted model, the run's own for the rejected one.
    accepted_links = re.findall(r"href='([^']+)'", accepted_row)
    assert accepted_links == [
        f"files/registry/mnist-admm/{accepted['model_version']}/evaluation/report.html",
        f"files/registry/mnist-admm/{accepted['model_version']}/evaluation/metrics.json",
    ]
    rejected_links = re.findall(r"href='([^']+)'", rejected_row)
    assert rejected_links[0] == "files/runs/20260112T000000/evaluation/report.html"
    for link in accepted_links + rejected_links:
        assert client.get("/" + link).status_code == 200, link

    plots = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(plots) == 1 and base64.b64decode(plots[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_registry_page_shows_who_reviewed_a_quarantine_and_when(tmp_path, client_for):
    runs, registry_uri = tmp_path / "runs", str(tmp_path / "registry")
    sheet_uri = registry_review.contact_sheet_uri(str(runs / RUN_KEY), "2026-03-01")
    storage.write_bytes(sheet_uri, PNG)
    quarantine = {"batch": "2026-03-01", "registry_uri": registry_uri, "run_uri": str(runs / RUN_KEY),
                  "logical_date": "2026-03-02", "dataset_version": "d" * 16, "contact_sheet_uri": sheet_uri}
    registry.record_decision(registry_uri, {"decision": "quarantined", "batch": "2026-03-01"})
    registry_review.record_review(quarantine, "released", {"id": "7", "name": "ann"}, "2026-03-03T10:00:00+00:00")
    registry_review.record_review({**quarantine, "batch": "2026-03-08"}, "timed_out", None, "2026-03-10T00:00:00")
    client = client_for(retraining_roots(runs=runs, registry=registry_uri))
    rows = client.get("/").text.split("<tr>")[2:]
    timed_out, released, _ = rows
    assert "by nobody (no answer in time) at 2026-03-10T00:00:00" in timed_out
    assert "by ann at 2026-03-03T10:00:00+00:00" in released and "batch 2026-03-01 released" in released
    (link,) = re.findall(r"href='([^']+)'>contact sheet<", released)
    assert client.get("/" + link).content == PNG


def test_registry_page_reads_a_registry_on_s3(s3_env, tmp_path, client_for):
    registry_uri = f"s3://{s3_env}/registry"
    accepted_run, rejected_run = str(tmp_path / "good"), str(tmp_path / "bad")
    make_evaluated_run(accepted_run, seed=1, test_accuracy=0.93)
    make_evaluated_run(rejected_run, seed=2, test_accuracy=0.80)
    accepted = publish.publish_run(accepted_run, registry_uri, logical_date="2026-02-02")
    publish.publish_run(rejected_run, registry_uri, logical_date="2026-02-09")
    client = client_for(retraining_roots(registry=registry_uri))

    text = client.get("/").text
    assert re.findall(r"<td><span class='(\w+)'>", text) == ["rejected", "accepted"]
    report = f"files/registry/mnist-admm/{accepted['model_version']}/evaluation/report.html"
    assert text.count(f"href='{report}'") == 2  # the published model and its history row
    assert client.get("/" + report).status_code == 200
    assert "href='files/" not in text.split("<tr>")[2]  # the rejected run's report lies outside every root


def test_registry_page_names_the_class_that_failed_the_per_class_gate(tmp_path, client_for):
    registry_uri = str(tmp_path / "registry")
    settings = publish.GateSettings()
    recalls = [0.99, 0.98, 0.97, 0.96, 0.95, 0.96, 0.97, 0.98, 0.99, 0.97]
    champion, current = publish.Scores(0.97, None, recalls), {"version": "old", "test_accuracy": 0.97}
    forgetful = publish.Scores(0.97, None, [0.9 if k == 4 else recall for k, recall in enumerate(recalls)])
    candidate = publish.Candidate(run_uri=str(tmp_path / "run"), version="new", scores=forgetful, dataset_uri=None,
                                  dataset_version="a" * 16, batches=[], newest_batch=None, evaluation={})
    decision = publish.quality_gate(candidate, current, champion, settings)
    registry.record_decision(registry_uri, publish.history_entry(
        candidate, decision, current, champion, settings, str(tmp_path / "run" / "report.html"), None, "2026-01-12"))
    text = client_for(retraining_roots(registry=registry_uri)).get("/").text
    assert (f"class 4 failed the per-class gate: test recall 0.9000, the champion 0.9500, allowed drop "
            f"{settings.max_class_regression:.4f}") in text


def test_registry_page_reports_a_corrupt_history_instead_of_failing(tmp_path, client_for):
    registry_uri = str(tmp_path / "registry")
    registry.record_decision(registry_uri, {"decision": "skipped"})
    Path(registry.history_uri(registry_uri)).write_text("{broken\n")
    page = client_for(retraining_roots(registry=registry_uri)).get("/")
    assert page.status_code == 200 and "line 1 is not valid JSON" in page.text


def test_report_link_points_at_the_route_serving_the_report(roots, client_for, monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    report_uri = f"{roots['runs'].uri}/{RUN_KEY}/evaluation/report.html"
    link = admm_reports.report_link({"report_uri": report_uri, "test_accuracy": 0.9}, roots)
    assert link == f"admm-reports/files/runs/{RUN_KEY}/evaluation/report.html"
    assert client_for(roots).get(link.removeprefix("admm-reports")).status_code == 200
    # No link: no report, a report outside every root, or a path the app would refuse.
    assert admm_reports.report_link({"test_accuracy": 0.9}, roots) == ""
    assert admm_reports.report_link(None, roots) == ""
    assert admm_reports.report_link({"report_uri": "/elsewhere/report.html"}, roots) == ""
    assert admm_reports.report_link({"report_uri": f"{roots['runs'].uri}/../report.html"}, roots) == ""
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/prefix")
    assert admm_reports.report_link({"report_uri": report_uri}, roots) == (
        f"https://airflow.example.com/prefix/admm-reports/files/runs/{RUN_KEY}/evaluation/report.html")


def test_object_store_roots_map_by_bucket_and_prefix(monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    roots = admm_reports.parse_roots("runs @ mnist_admm_retraining = s3://lake/runs, "
                                     "registry@other.dag-1=s3://lake/registry?a=b@c")
    assert roots == {"runs": admm_reports.ServedRoot(RETRAINING_DAG, "s3://lake/runs"),
                     "registry": admm_reports.ServedRoot("other.dag-1", "s3://lake/registry?a=b@c")}
    published_report = "s3://lake/registry/mnist-admm/v1/evaluation/report.html"
    assert admm_reports.report_link({"report_uri": published_report}, roots) == (
        "admm-reports/files/registry/mnist-admm/v1/evaluation/report.html")
    assert admm_reports.report_link({"report_uri": "s3://other/runs/r/evaluation/report.html"}, roots) == ""
    assert admm_reports.artifact_uri(roots, "runs", "r/evaluation/report.html") == (
        "s3://lake/runs/r/evaluation/report.html")


@pytest.mark.parametrize("text, message", [
    ("runs", "expected name@dag_id=uri"),
    ("@dag=/tmp/x", "expected name@dag_id=uri"),
    ("Runs@dag=/tmp/x", "expected name@dag_id=uri"),
    ("runs@=/tmp/x", "expected name@dag_id=uri"),
    ("runs@a dag=/tmp/x", "expected name@dag_id=uri"),
    ("runs@dag=", "expected name@dag_id=uri"),
    ("web@dag=https://example.com/runs", "http(s) roots"),
    ("runs@dag=/tmp/x, runs@other=/tmp/y", "'runs' is named twice"),
    # The old form names no DAG: refused, never served to everyone.
    ("runs=s3://bucket/runs", "'runs=s3://bucket/runs' names no DAG: write runs@<dag_id>=s3://bucket/runs"),
])
def test_malformed_roots_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=r"^\[admm_reports\] roots: [^\n]*" + re.escape(message)):
        admm_reports.parse_roots(text)


def test_configured_roots_default_to_the_project_var_directory_of_the_retraining_dag(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW__ADMM_REPORTS__ROOTS", raising=False)
    monkeypatch.delenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS")  # the default allowed roots: the project's data/, var/
    project = Path(admm_reports.__file__).resolve().parents[1]
    assert admm_reports.configured_roots() == retraining_roots(runs=project / "var" / "runs",
                                                               registry=project / "var" / "registry")
    monkeypatch.setenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__ADMM_REPORTS__ROOTS", f"runs@{SCORING_DAG}={tmp_path}")
    assert admm_reports.configured_roots() == {"runs": admm_reports.ServedRoot(SCORING_DAG, str(tmp_path))}


def test_a_configured_root_outside_the_allowed_roots_is_refused_on_every_route(roots, client_for, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("AIRFLOW__ADMM_REPORTS__ROOTS",
                       ",".join(f"{name}@{root.dag_id}={root.uri}" for name, root in roots.items()))
    monkeypatch.setenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS", roots["runs"].uri)  # the registry root lies outside
    refusal = (f"[admm_reports] roots registry: {roots['registry'].uri} is outside the allowed roots "
               f"([admm] allowed_uri_roots): {roots['runs'].uri}")
    client = client_for(None)  # the configured roots
    for route in (f"/files/runs/{RUN_KEY}/evaluation/report.html", f"/runs/{RETRAINING_DAG}/r", "/"):
        answer = client.get(route)
        assert (answer.status_code, answer.json()) == (500, {"detail": refusal})
    ti_key = SimpleNamespace(dag_id=RETRAINING_DAG, run_id="r", task_id="evaluate", map_index=-1)
    assert admm_reports.EvaluationReportLink().get_link(None, ti_key=ti_key) == ""

    monkeypatch.setenv("AIRFLOW__ADMM__ALLOWED_URI_ROOTS", f"{roots['runs'].uri},{roots['registry'].uri}")
    answer = client_for(None).get(f"/files/runs/{RUN_KEY}/evaluation/report.html")
    assert answer.status_code == 200 and "report of the run" in answer.text


@pytest.fixture(scope="module")
def serialized_dag():
    """The DAG as the API server sees it: serialized, then deserialized with the plugins loaded."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["mnist_admm_retraining"]
    return dag, DagSerialization.from_dict(DagSerialization.to_dict(dag))


def test_the_plugin_adds_the_report_link_to_python_tasks(serialized_dag):
    _, deserialized = serialized_dag
    for task_id in ("evaluate", "publish"):
        assert "Evaluation report" in deserialized.get_task(task_id).extra_links
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [app["url_prefix"] for app in apps if app["name"] == "admm_reports"] == ["/admm-reports"]


def test_the_dag_declares_its_assets(serialized_dag):
    dag, _ = serialized_dag
    assert dag.get_task("validate").outlets == [assets.validated_dataset_asset()]
    assert assets.validated_dataset_asset().uri == "x-admm://lake/mnist"
    assert dag.get_task("publish").outlets == [assets.publications_alias()]
    # The published-model asset is only reached through the alias: no event unless the gate accepts.
    assert all(not hasattr(outlet, "uri") for outlet in dag.get_task("publish").outlets)


def test_publish_emits_the_model_asset_event_only_for_an_accepted_model(tmp_path):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    registry_uri = str(tmp_path / "registry")

    def events_of(run_uri: str, min_accuracy: float):
        outlet_events = OutletEventAccessors()
        result = tasks.publish_task(["--run-uri", run_uri, "--registry-uri", registry_uri,
                                       "--min-accuracy", str(min_accuracy)], outlet_events=outlet_events)
        return result, outlet_events[assets.publications_alias()].asset_alias_events

    good, bad = str(tmp_path / "runs" / "good"), str(tmp_path / "runs" / "bad")
    make_evaluated_run(good, seed=1, test_accuracy=0.9)
    make_evaluated_run(bad, seed=2, test_accuracy=0.5)
    result, events = events_of(good, 0.85)
    assert result["decision"] == "accepted" and len(events) == 1
    assert events[0].dest_asset_key.name == assets.published_model_asset().name
    assert events[0].extra["version"] == result["model_version"]
    assert events[0].extra["model_uri"] == result["model_uri"]
    assert result["report_uri"] == storage.join(registry_uri, "mnist-admm", result["model_version"], "evaluation",
                                                "report.html")
    result, events = events_of(bad, 0.85)
    assert result["decision"] == "rejected" and events == []
    assert result["report_uri"] == storage.join(bad, "evaluation", "report.html")
    result, events = events_of(good, 0.85)
    assert result["decision"] == "unchanged" and events == []


def test_validate_task_event_names_the_dataset_version(small_dataset):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    outlet_events = OutletEventAccessors()
    tasks.validate_task(["--dataset-uri", small_dataset["dataset_uri"]], outlet_events=outlet_events)
    extra = outlet_events[assets.validated_dataset_asset()].extra
    manifest = json.loads(storage.read_bytes(storage.join(small_dataset["dataset_uri"], "manifest.json")))
    assert extra["dataset_version"] == manifest["version"] and extra["dataset_uri"] == small_dataset["dataset_uri"]
