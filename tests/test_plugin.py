"""The admm_reports Airflow plugin (reports app, "Evaluation report" link) and the DAG's lineage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from admm_jobs import publish, storage, validate
from run_artifacts import make_evaluated_run

PLUGINS_FOLDER = Path(__file__).resolve().parents[1] / "plugins"
sys.path.insert(0, str(PLUGINS_FOLDER))
import admm_reports  # noqa: E402  (the plugins folder is not a package)

RUN_KEY = "20260302T000000"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


@pytest.fixture
def roots(tmp_path):
    """A runs root with one evaluated run (plus files that must not be served) and an empty registry root."""
    runs, registry = tmp_path / "runs", tmp_path / "registry"
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
    registry.mkdir()
    (tmp_path / "report.html").write_text("outside every root")
    return {"runs": str(runs), "registry": str(registry)}


def client_for(roots, lookup=lambda dag_id, run_id, task_id: None, signed_in=True) -> TestClient:
    app = admm_reports.create_app(roots, lookup=lookup)
    if signed_in:
        app.dependency_overrides[admm_reports.authenticated_user] = lambda: "tester"
        app.dependency_overrides[admm_reports.may_read_dag_runs] = lambda: None
    return TestClient(app)


def test_serves_reports_plots_and_metrics_with_their_types(roots):
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
def test_refuses_anything_but_report_artifacts_inside_a_root(roots, path, code):
    response = client_for(roots).get(f"/files/{path}")
    assert response.status_code == code, response.text


def test_a_symlink_may_not_lead_out_of_its_root(roots, tmp_path):
    escape = Path(roots["runs"]) / "escape"
    escape.mkdir()
    (escape / "report.html").symlink_to(tmp_path / "report.html")
    assert client_for(roots).get("/files/runs/escape/report.html").status_code == 403


def test_every_route_needs_a_signed_in_user(roots):
    client = client_for(roots, signed_in=False)
    for route in (f"/files/runs/{RUN_KEY}/evaluation/report.html", "/", "/runs/some_dag/some_run"):
        assert client.get(route).status_code == 401, route


def test_a_run_redirects_to_the_report_its_evaluate_task_returned(roots):
    results = {("dag", "run_1", "evaluate"): {"report_uri": f"{roots['runs']}/{RUN_KEY}/evaluation/report.html"}}
    client = client_for(roots, lookup=lambda *key: results.get(key))
    response = client.get("/runs/dag/run_1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].endswith(f"/files/runs/{RUN_KEY}/evaluation/report.html")
    assert "report of the run" in client.get("/runs/dag/run_1").text
    missing = client.get("/runs/dag/run_2")
    assert missing.status_code == 404 and "no" in missing.text.lower()


def test_index_lists_the_published_model_with_a_working_report_link(tmp_path):
    run, registry = str(tmp_path / "runs" / RUN_KEY), str(tmp_path / "registry")
    make_evaluated_run(run, seed=1, test_accuracy=0.91)
    result = publish.publish_run(run, registry, min_accuracy=0.5)
    client = client_for({"runs": str(tmp_path / "runs"), "registry": registry})
    page = client.get("/")
    assert page.status_code == 200 and result["model_version"] in page.text and "0.9100" in page.text
    href = page.text.split("href='")[1].split("'")[0]
    assert href == f"files/registry/mnist-admm/{result['model_version']}/evaluation/report.html"
    assert client.get("/" + href).status_code == 200


def test_report_link_points_at_the_route_serving_the_report(roots, monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    report_uri = f"{roots['runs']}/{RUN_KEY}/evaluation/report.html"
    link = admm_reports.report_link({"report_uri": report_uri, "test_accuracy": 0.9}, roots)
    assert link == f"admm-reports/files/runs/{RUN_KEY}/evaluation/report.html"
    assert client_for(roots).get(link.removeprefix("admm-reports")).status_code == 200
    # No link: no report, a report outside every root, or a path the app would refuse.
    assert admm_reports.report_link({"test_accuracy": 0.9}, roots) == ""
    assert admm_reports.report_link(None, roots) == ""
    assert admm_reports.report_link({"report_uri": "/elsewhere/report.html"}, roots) == ""
    assert admm_reports.report_link({"report_uri": f"{roots['runs']}/../report.html"}, roots) == ""
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/prefix")
    assert admm_reports.report_link({"report_uri": report_uri}, roots) == (
        f"https://airflow.example.com/prefix/admm-reports/files/runs/{RUN_KEY}/evaluation/report.html")


def test_object_store_roots_map_by_bucket_and_prefix(monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    roots = admm_reports.parse_roots("runs = s3://lake/runs, registry=s3://lake/registry")
    assert roots == {"runs": "s3://lake/runs", "registry": "s3://lake/registry"}
    published_report = "s3://lake/registry/mnist-admm/v1/evaluation/report.html"
    assert admm_reports.report_link({"report_uri": published_report}, roots) == (
        "admm-reports/files/registry/mnist-admm/v1/evaluation/report.html")
    assert admm_reports.report_link({"report_uri": "s3://other/runs/r/evaluation/report.html"}, roots) == ""
    assert admm_reports.artifact_uri(roots, "runs", "r/evaluation/report.html") == (
        "s3://lake/runs/r/evaluation/report.html")


@pytest.mark.parametrize("text", ["runs", "=/tmp/x", "Runs=/tmp/x", "web=https://example.com/runs"])
def test_malformed_roots_are_refused(text):
    with pytest.raises(ValueError, match="roots"):
        admm_reports.parse_roots(text)


def test_configured_roots_default_to_the_project_var_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW__ADMM_REPORTS__ROOTS", raising=False)
    assert admm_reports.configured_roots() == admm_reports.DEFAULT_ROOTS
    monkeypatch.setenv("AIRFLOW__ADMM_REPORTS__ROOTS", f"runs={tmp_path}")
    assert admm_reports.configured_roots() == {"runs": str(tmp_path)}


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
    assert dag.get_task("validate").outlets == [validate.validated_dataset_asset()]
    assert validate.validated_dataset_asset().uri == "x-admm://lake/mnist"
    assert dag.get_task("publish").outlets == [publish.publications_alias()]
    # The published-model asset is only reached through the alias: no event unless the gate accepts.
    assert all(not hasattr(outlet, "uri") for outlet in dag.get_task("publish").outlets)


def test_publish_emits_the_model_asset_event_only_for_an_accepted_model(tmp_path):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    registry = str(tmp_path / "registry")

    def events_of(run_uri: str, min_accuracy: float):
        outlet_events = OutletEventAccessors()
        result = publish.airflow_task(["--run-uri", run_uri, "--registry-uri", registry,
                                       "--min-accuracy", str(min_accuracy)], outlet_events=outlet_events)
        return result, outlet_events[publish.publications_alias()].asset_alias_events

    good, bad = str(tmp_path / "runs" / "good"), str(tmp_path / "runs" / "bad")
    make_evaluated_run(good, seed=1, test_accuracy=0.9)
    make_evaluated_run(bad, seed=2, test_accuracy=0.5)
    result, events = events_of(good, 0.85)
    assert result["decision"] == "accepted" and len(events) == 1
    assert events[0].dest_asset_key.name == publish.published_model_asset().name
    assert events[0].extra["version"] == result["model_version"]
    assert events[0].extra["model_uri"] == result["model_uri"]
    assert result["report_uri"] == storage.join(registry, "mnist-admm", result["model_version"], "evaluation",
                                                "report.html")
    result, events = events_of(bad, 0.85)
    assert result["decision"] == "rejected" and events == []
    assert result["report_uri"] == storage.join(bad, "evaluation", "report.html")
    result, events = events_of(good, 0.85)
    assert result["decision"] == "unchanged" and events == []


def test_validate_task_event_names_the_dataset_version(small_dataset):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    outlet_events = OutletEventAccessors()
    validate.airflow_task(["--dataset-uri", small_dataset["dataset_uri"]], outlet_events=outlet_events)
    extra = outlet_events[validate.validated_dataset_asset()].extra
    manifest = json.loads(storage.read_bytes(storage.join(small_dataset["dataset_uri"], "manifest.json")))
    assert extra["dataset_version"] == manifest["version"] and extra["dataset_uri"] == small_dataset["dataset_uri"]
