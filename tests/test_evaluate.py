"""Tests of the evaluate stage: scores, plots, the HTML report and atomic output."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from admm_jobs import evaluate, publish
from admm_jobs.lake import dataset, storage
from admm_jobs.registry import store as registry
from admm_jobs.scoring import metrics

from run_artifacts import HYPERPARAMETERS, make_trained_run, write_epoch_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_evaluation(run: Path, dataset_uri: str, **kwargs) -> dict:
    return evaluate.evaluate_run(
        str(run / "model"), dataset_uri, str(run / "metrics.jsonl"), str(run / "evaluation"), **kwargs
    )


def test_class_scores_on_a_hand_made_case():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2])
    confusion = metrics.confusion_matrix(labels, predictions, classes=4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    scores = metrics.class_scores(confusion)
    np.testing.assert_allclose(scores["precision"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(scores["recall"], [2 / 3, 0.5, 1.0, 0.0])
    # F1 = 2PR/(P+R): class 0: 2*(2/3)/(5/3) = 0.8; class 2: 2*0.5/1.5 = 2/3; class 3 has no examples.
    np.testing.assert_allclose(scores["f1"], [0.8, 0.5, 2 / 3, 0.0])
    assert scores["support"].tolist() == [3, 2, 1, 0]


def test_constant_model_scores_the_class_fraction(small_dataset, tmp_path):
    predicted_class = 1
    make_trained_run(str(tmp_path), seed=0, constant_class=predicted_class)
    result = run_evaluation(tmp_path, small_dataset["dataset_uri"])

    test_split = dataset.load_manifest(small_dataset["dataset_uri"])["splits"]["test"]
    class_counts, rows = test_split["class_counts"], test_split["rows"]
    assert result["test_examples"] == rows
    assert result["test_accuracy"] == pytest.approx(class_counts[predicted_class] / rows)
    confusion = np.array(result["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum(axis=1).tolist() == class_counts  # rows are true classes
    assert confusion[:, predicted_class].tolist() == class_counts  # everything lands in one column
    per_class = result["per_class"]
    assert per_class[predicted_class]["recall"] == 1.0
    assert per_class[predicted_class]["precision"] == pytest.approx(class_counts[predicted_class] / rows)
    assert all(
        entry["recall"] == 0.0 and entry["f1"] == 0.0
        for k, entry in enumerate(per_class)
        if k != predicted_class
    )
    assert [entry["support"] for entry in per_class] == class_counts

    written = storage.read_json(str(tmp_path / "evaluation" / "metrics.json"))
    assert written["test_accuracy"] == result["test_accuracy"]
    assert written["dataset"]["version"] == small_dataset["dataset_version"]
    assert written["model"]["hyperparameters"]["beta"] == HYPERPARAMETERS["beta"]
    assert written["model"]["version"] == registry.model_version(written["model"]["weights_sha256"])
    assert written["training"] == {
        "metrics_uri": str(tmp_path / "metrics.jsonl"),
        "epochs": 6,
        "warmup_epochs": 2,
    }


def test_batched_scoring_matches_one_forward_pass(small_dataset, tmp_path):
    model = make_trained_run(str(tmp_path), seed=3)
    result = run_evaluation(tmp_path, small_dataset["dataset_uri"], batch_size=37)
    pixels, labels = dataset.read_split(small_dataset["dataset_uri"], "test")
    assert result["correct"] == int((model.predict(pixels) == labels).sum())
    assert np.trace(np.array(result["confusion_matrix"])) == result["correct"]


def test_scores_do_not_depend_on_the_chunk_size(small_dataset, tmp_path):
    """Every score is computed from counts summed chunk by chunk: 7-row chunks give exactly what one chunk per
    part file gives, for both models on every set, the validation split and the discordant pairs included."""
    dataset_uri, registry_uri = small_dataset["dataset_uri"], str(tmp_path / "registry")
    make_trained_run(str(tmp_path / "champion"), seed=5)
    run_evaluation(tmp_path / "champion", dataset_uri)
    assert publish.publish_run(str(tmp_path / "champion"), registry_uri, min_accuracy=0.0)["published"]
    challenger = make_trained_run(str(tmp_path / "run"), seed=6)

    def evaluation(chunk_rows: int) -> dict:
        run = tmp_path / "run"
        result = evaluate.evaluate_run(str(run / "model"), dataset_uri, str(run / "metrics.jsonl"),
                                       str(tmp_path / f"evaluation-{chunk_rows}"), registry_uri=registry_uri,
                                       batch_size=chunk_rows)
        del result["evaluated_at"]
        return result

    tiny, whole = evaluation(7), evaluation(1_000_000)
    assert tiny == whole
    assert whole["champion"] is not None and whole["comparison"]["newest_batch"] is not None
    # ... and both are the scores of all rows at once.
    for name, split in (("test", "test"), ("validation", "validation")):
        pixels, labels = dataset.read_split(dataset_uri, split)
        expected = metrics.confusion_matrix(labels, challenger.predict(pixels), 10)
        scores = whole if name == "test" else whole["validation"]
        assert scores["confusion_matrix"] == expected.tolist()
    assert whole["validation"]["examples"] == dataset.load_manifest(dataset_uri)["splits"]["validation"]["rows"]
    champion = publish.model_io.load_model(registry.published_model_uri(registry_uri))
    pixels, labels = dataset.read_split(dataset_uri, "test")
    mine, theirs = challenger.predict(pixels) == labels, champion.predict(pixels) == labels
    assert whole["comparison"]["test"]["challenger_only_correct"] == int(np.sum(mine & ~theirs)) > 0
    assert whole["comparison"]["test"]["champion_only_correct"] == int(np.sum(theirs & ~mine)) > 0


def test_plots_and_self_contained_report(small_dataset, tmp_path):
    make_trained_run(str(tmp_path), seed=1)
    result = run_evaluation(tmp_path, small_dataset["dataset_uri"])
    output = tmp_path / "evaluation"
    assert sorted(p.name for p in output.iterdir()) == [
        "accuracy.png",
        "confusion_matrix.png",
        "loss.png",
        "metrics.json",
        "report.html",
    ]
    pngs = {
        name: (output / name).read_bytes() for name in ("accuracy.png", "loss.png", "confusion_matrix.png")
    }
    for name, png in pngs.items():
        assert png.startswith(PNG_MAGIC), name
        assert b"Matplotlib" in png[:200], name  # the PNG Software text chunk

    page = (output / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted(pngs.values())
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch from elsewhere
    for name in HYPERPARAMETERS:
        assert f'<td class="key">{name}</td>' in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page
    assert small_dataset["dataset_version"] in page and small_dataset["dataset_uri"] in page
    assert f"{result['test_accuracy']:.4f}" in page
    assert "No published model to compare with." in page
    assert "trained on dataset version 0000000000000000, not on the evaluated" in page


def test_champion_and_challenger_are_scored_side_by_side(small_dataset, tmp_path):
    registry_uri = str(tmp_path / "registry")
    published_run, candidate_run = tmp_path / "run-a", tmp_path / "run-b"
    make_trained_run(str(published_run), seed=0, constant_class=1)
    published_eval = run_evaluation(published_run, small_dataset["dataset_uri"])
    outcome = publish.publish_run(str(published_run), registry_uri, min_accuracy=0.0)
    assert outcome["published"]

    make_trained_run(str(candidate_run), seed=0, constant_class=7)
    result = run_evaluation(candidate_run, small_dataset["dataset_uri"], registry_uri=registry_uri)

    class_counts = dataset.load_manifest(small_dataset["dataset_uri"])["splits"]["test"]["class_counts"]
    champion = result["champion"]
    assert champion["version"] == outcome["model_version"] == champion["pointer"]["version"]
    assert champion["test"]["accuracy"] == published_eval["test_accuracy"] == class_counts[1] / sum(class_counts)
    deltas = result["comparison"]["test"]
    assert deltas["accuracy"] == pytest.approx(result["test_accuracy"] - published_eval["test_accuracy"])
    # The champion always says 1, the challenger always 7: recall moves by one on those two classes only.
    per_class = {entry["class"]: entry for entry in deltas["per_class"]}
    assert per_class[1]["recall"] == -1.0 and per_class[7]["recall"] == 1.0
    assert all(per_class[k]["recall"] == per_class[k]["f1"] == 0.0 for k in range(10) if k not in (1, 7))
    assert (deltas["challenger_only_correct"], deltas["champion_only_correct"]) == (class_counts[7], class_counts[1])
    # The fixture's source is one undated batch: every train and validation row.
    manifest = dataset.load_manifest(small_dataset["dataset_uri"])
    newest = result["newest_batch"]
    assert newest["id"] == manifest["batches"][-1]["id"] == result["dataset"]["batches"][-1]
    _, batch_labels = dataset.read_batch(small_dataset["dataset_uri"], newest["id"])
    batch_counts = np.bincount(batch_labels, minlength=10)
    assert newest["examples"] == len(batch_labels) == sum(manifest["batches"][-1]["rows"].values())
    assert newest["accuracy"] == batch_counts[7] / len(batch_labels)
    assert champion["newest_batch"]["accuracy"] == batch_counts[1] / len(batch_labels)
    batch_deltas = result["comparison"]["newest_batch"]
    assert (batch_deltas["challenger_only_correct"], batch_deltas["champion_only_correct"]) == (
        batch_counts[7],
        batch_counts[1],
    )

    output = candidate_run / "evaluation"
    assert (output / evaluate.COMPARISON_PLOT).read_bytes().startswith(PNG_MAGIC)
    assert evaluate.COMPARISON_PLOT in result["files"]["plots"]
    page = (output / "report.html").read_text()
    assert outcome["model_version"] in page
    assert f"{deltas['accuracy']:+.4f}" in page
    assert '<td class="bad">-1.0000</td>' in page and '<td class="good">+1.0000</td>' in page
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert (output / evaluate.COMPARISON_PLOT).read_bytes() in embedded


def test_corrupt_epoch_metrics_fail_without_touching_the_previous_evaluation(small_dataset, tmp_path):
    make_trained_run(str(tmp_path), seed=2)
    run_evaluation(tmp_path, small_dataset["dataset_uri"])
    before = (tmp_path / "evaluation" / "metrics.json").read_bytes()

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "{truncated\n")
    with pytest.raises(evaluate.EvaluationError, match=re.escape(str(metrics)) + ".*line 7"):
        run_evaluation(tmp_path, small_dataset["dataset_uri"])
    assert (tmp_path / "evaluation" / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation", "metrics.jsonl", "model"]


def test_failure_while_writing_leaves_no_output(small_dataset, tmp_path, monkeypatch):
    make_trained_run(str(tmp_path), seed=2)

    def broken_report(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(evaluate.report, "render_report", broken_report)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        run_evaluation(tmp_path, small_dataset["dataset_uri"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "model"]


def test_main_prints_the_result_as_last_line(small_dataset, tmp_path, capsys):
    make_trained_run(str(tmp_path), seed=4)
    output = tmp_path / "evaluation"
    result = evaluate.main(
        [
            "--model-uri",
            str(tmp_path / "model"),
            "--dataset-uri",
            small_dataset["dataset_uri"],
            "--metrics-uri",
            str(tmp_path / "metrics.jsonl"),
            "--output-uri",
            str(output),
            "--registry-uri",
            str(tmp_path / "empty-registry"),
        ]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert printed["metrics_uri"] == str(output / "metrics.json")
    assert printed["report_uri"] == str(output / "report.html")
    assert printed["published_version"] is None
    assert printed["test_accuracy"] == storage.read_json(printed["metrics_uri"])["test_accuracy"]


def test_evaluation_written_to_s3(small_dataset, s3_env, tmp_path):
    make_trained_run(str(tmp_path), seed=5)
    output = f"s3://{s3_env}/runs/r1/evaluation"
    evaluate.evaluate_run(
        str(tmp_path / "model"), small_dataset["dataset_uri"], str(tmp_path / "metrics.jsonl"), output
    )
    names = [uri.rsplit("/", 1)[1] for uri in storage.list_files(output)]
    assert sorted(names) == [
        "accuracy.png",
        "confusion_matrix.png",
        "loss.png",
        "metrics.json",
        "report.html",
    ]
    assert storage.read_bytes(f"{output}/loss.png").startswith(PNG_MAGIC)


def test_epoch_metrics_without_epochs_are_rejected(tmp_path):
    path = write_epoch_metrics(str(tmp_path / "metrics.jsonl"), [{"phase": "admm"}])
    with pytest.raises(metrics.EvaluationError, match="line 1 has no integer 'epoch'"):
        evaluate.read_epoch_metrics(path)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--metrics-uri", ""], "--metrics-uri"),
        (["--output-uri", ""], "--output-uri"),
    ],
)
def test_bad_settings_are_usage_errors_naming_the_option(capsys, argv, option):
    required = ["--model-uri", "m", "--dataset-uri", "d", "--metrics-uri", "m.jsonl", "--output-uri", "o"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*required, *argv])
    assert exit_info.value.code == 2
    assert f"error: {option}: " in capsys.readouterr().err
