"""Tests of the validate stage: the suite passes a good dataset and names every kind of defect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_TEST_ROWS, SMALL_TRAIN_ROWS, SMALL_VALIDATION_ROWS

from admm_jobs import validate
from admm_jobs.lake import dataset, profiles, storage
from admm_jobs.lake.dataset import PARQUET_SCHEMA, SPLITS, DatasetError, read_split, split_file_uris

TRAIN_ROWS = SMALL_TRAIN_ROWS - SMALL_VALIDATION_ROWS


@pytest.fixture
def dataset_copy(small_dataset, tmp_path):
    """A private copy of the small dataset's lake (validate writes next to it; corruption tests rewrite it)."""
    lake_dataset = storage.local_path(small_dataset["dataset_uri"]).parent
    storage.copy_tree(str(lake_dataset), str(tmp_path / "lake" / "mnist"))
    return str(tmp_path / "lake" / "mnist" / small_dataset["dataset_version"])


def rewrite_split(dataset_uri: str, split: str, change) -> None:
    """Replace the (single) part file of ``split`` by ``change(rows)``, rows as a list of dicts."""
    (part_uri,) = split_file_uris(dataset_uri, split)
    rows = pq.read_table(part_uri).to_pylist()
    pq.write_table(pa.Table.from_pylist(change(rows), schema=PARQUET_SCHEMA), part_uri)


def failure_message(dataset_uri: str) -> str:
    with pytest.raises(validate.ValidationFailed) as failure:
        validate.validate_dataset(dataset_uri)
    assert failure.value.result["success"] is False
    return str(failure.value)


def set_field(index: int, field: str, value):
    def change(rows):
        rows[index][field] = value
        return rows

    return change


# ---------------------------------------------------------------- derived columns


def test_pixel_statistics_count_non_null_values_and_leave_empty_rows_without_min_max():
    pixels = pa.array([[0, 5, 255], [], None, [7, None]], pa.list_(pa.uint8()))
    stats = profiles.pixel_statistics(pa.chunked_array([pixels[:2], pixels[2:]]))
    assert stats["pixel_count"].tolist() == [3, 0, 0, 1]
    assert stats["pixel_min"].tolist()[::3] == [0, 7] and stats["pixel_max"].tolist()[::3] == [255, 7]
    assert stats[["pixel_min", "pixel_max"]].iloc[1:3].isna().all().all()


def test_split_frames_hold_a_row_per_part_and_label_with_ids_found_in_other_parts(dataset_copy):
    manifest = dataset.load_manifest(dataset_copy)
    parts = validate.dataset_parts(dataset_copy, manifest, None)
    assert [part.name for part in parts] == [manifest["batches"][0]["id"], validate.TEST_PART]
    views = {part.name: validate.read_part(part, None, 100) for part in parts}
    batch, test = parts
    # a test image copied into the batch's validation split, under a new label
    test_view, held_out = views[test.name]["test"], views[batch.name]["validation"]
    held_out.keys = np.sort(np.r_[held_out.keys[1:], test_view.keys[:1]])
    held_out.repeated, held_out.in_other_split = np.zeros((2, len(held_out.keys)), bool)
    frames = validate.split_frames(parts, views, validate.match_ids(views))

    assert set(frames) == set(SPLITS)
    train = frames["train"]
    assert train["part"].unique().tolist() == [batch.name] and train["label"].tolist() == list(range(10))
    assert train["rows"].sum() == TRAIN_ROWS
    counts = np.bincount(read_split(dataset_copy, "train")[1], minlength=10)
    np.testing.assert_allclose(train["label_share"], counts / TRAIN_ROWS)
    assert (train["pixel_count_min"] == 784).all() and (train["pixel_max"] <= 255).all()
    assert frames["validation"]["image_ids_in_other_splits"].sum() == 1
    assert frames["test"]["image_ids_in_other_splits"].sum() == 1
    assert frames["test"]["repeated_image_ids"].sum() == 0


def test_expectation_parameters_come_from_the_manifest():
    manifest = {"image_shape": [3, 5], "splits": {"train": {"rows": 17}}}
    assert validate.expectation_parameters(manifest, "train") == {"expected_rows": 17, "pixels_per_image": 15}


def test_repository_suite_loads_with_every_expectation():
    document = json.loads(Path(validate.DEFAULT_SUITE).read_text())
    suite = validate.load_suite(str(validate.DEFAULT_SUITE))
    assert suite.name == document["name"]
    assert [e.expectation_type for e in suite.expectations] == [e["type"] for e in document["expectations"]]


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"type": "expect_column_values_to_be_purple", "kwargs": {"column": "label"}}, "not found"),
        ({"type": "expect_column_values_to_be_between", "kwargs": {"colum": "label", "min_value": 0}}, "column"),
    ],
)
def test_invalid_expectation_in_suite_is_an_error_not_silently_dropped(tmp_path, bad, problem):
    document = json.loads(Path(validate.DEFAULT_SUITE).read_text())
    document["expectations"].append(bad)
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(json.dumps(document))
    with pytest.raises(validate.SuiteError) as error:
        validate.load_suite(str(suite_path))
    position = len(document["expectations"]) - 1
    assert f"suite.json: expectation #{position} ({bad['type']}) is invalid" in str(error.value)
    assert problem in str(error.value)


# ---------------------------------------------------------------- a good dataset


def test_small_dataset_passes_and_outputs_are_written_next_to_it(dataset_copy):
    result = validate.validate_dataset(dataset_copy)

    assert result["success"] is True
    assert result["result_uri"] == storage.join(dataset_copy, "validation", "result.json")
    assert result["data_docs_uri"] == storage.join(dataset_copy, "validation", "data_docs", "index.html")
    expectations = len(json.loads(Path(validate.DEFAULT_SUITE).read_text())["expectations"])
    batch_expectations = len(json.loads(Path(validate.BATCH_SUITE).read_text())["expectations"])
    # nothing published: the one batch gets the checks that need no reference
    [batch] = result["checked_batches"]
    assert batch.startswith("undated-") and result["reference_dataset"] is None and result["refused_batches"] == {}
    assert result["statistics"]["evaluated_expectations"] == 3 * expectations + batch_expectations
    assert result["statistics"]["unsuccessful_expectations"] == 0

    written = json.loads(Path(result["result_uri"]).read_text())
    assert written["success"] is True and written["dataset_uri"] == dataset_copy
    assert set(written["results"]) == {"train", "validation", "test", f"batch={batch}"}
    written["results"] = {split: written["results"][split] for split in ("train", "validation", "test")}
    row_counts = {
        split: next(
            r["result"]["observed_value"]
            for r in split_result["results"]
            if r["expectation_config"]["kwargs"].get("column") == "rows"
        )
        for split, split_result in written["results"].items()
    }
    assert row_counts == {"train": TRAIN_ROWS, "validation": SMALL_VALIDATION_ROWS, "test": SMALL_TEST_ROWS}

    docs = Path(result["data_docs_uri"]).parent
    assert "mnist_dataset" in Path(result["data_docs_uri"]).read_text()
    pages = sorted(page.name for page in (docs / "validations").rglob("*.html"))
    assert pages == [f"lake-batch={batch}.html", "lake-test.html", "lake-train.html", "lake-validation.html"]


def test_main_prints_the_result_as_last_line_and_finds_the_suite_from_any_directory(
    dataset_copy, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    result = validate.main(["--dataset-uri", dataset_copy])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result
    assert result["success"] is True


def test_validates_a_dataset_on_s3(dataset_copy, s3_env):
    lake_dataset = dataset_copy.rsplit("/", 1)[0]
    storage.copy_tree(lake_dataset, f"s3://{s3_env}/lake/mnist")
    dataset_uri = f"s3://{s3_env}/lake/mnist/{dataset_copy.rsplit('/', 1)[1]}"

    result = validate.validate_dataset(dataset_uri)

    assert result["success"] is True
    assert result["result_uri"] == f"{dataset_uri}/validation/result.json"
    assert storage.read_json(result["result_uri"])["success"] is True
    assert storage.exists(result["data_docs_uri"])


# ---------------------------------------------------------------- each family of defects


def test_label_outside_0_to_9_is_reported_with_its_row_count(dataset_copy):
    rewrite_split(dataset_copy, "train", set_field(3, "label", 12))
    message = failure_message(dataset_copy)
    # rows of the split's frame: one per label present (the ten digits and 12)
    assert "split=train: expect_column_values_to_be_between(label) failed on 1 of 11 rows (e.g. [12.0])" in message
    assert "split=validation" not in message and "split=test" not in message


def test_row_with_783_pixels_is_reported(dataset_copy):
    def drop_one_pixel(rows):
        rows[5]["pixels"] = rows[5]["pixels"][:-1]
        return rows

    rewrite_split(dataset_copy, "validation", drop_one_pixel)
    message = failure_message(dataset_copy)
    assert "split=validation: expect_column_values_to_be_between(pixel_count_min) failed on 1 of 10 rows (e.g. [783])" \
        in message


def test_duplicate_image_id_within_a_split_is_reported(dataset_copy):
    def duplicate(rows):
        rows[7]["image_id"] = rows[6]["image_id"]
        return rows

    rewrite_split(dataset_copy, "test", duplicate)
    message = failure_message(dataset_copy)
    # Both rows sharing the id are counted.
    assert "split=test: expect_column_sum_to_be_between(repeated_image_ids) failed (observed 2)" in message


def test_test_image_copied_into_train_is_reported_in_both_splits(dataset_copy):
    test_id = pq.read_table(split_file_uris(dataset_copy, "test")[0]).column("image_id")[0].as_py()
    rewrite_split(dataset_copy, "train", set_field(0, "image_id", test_id))
    message = failure_message(dataset_copy)
    assert "split=train: expect_column_sum_to_be_between(image_ids_in_other_splits) failed (observed 1)" in message
    assert "split=test: expect_column_sum_to_be_between(image_ids_in_other_splits) failed (observed 1)" in message


def test_class_holding_30_percent_of_a_split_is_reported(dataset_copy):
    # Labels 0..9 in turn (10% each), then rows labelled 1 and 2 relabelled 0: class 0 holds 30%.
    def skew(rows):
        for index, row in enumerate(rows):
            row["label"] = 0 if index % 10 in (0, 1, 2) else index % 10
        return rows

    rewrite_split(dataset_copy, "train", skew)
    message = failure_message(dataset_copy)
    share_lines = [line for line in message.splitlines() if "(label_share)" in line]
    zeros = sum(1 for index in range(TRAIN_ROWS) if index % 10 in (0, 1, 2))
    share = zeros / TRAIN_ROWS
    # one row per label present: 0 and 3..9
    assert share_lines == [(f"split=train: expect_column_values_to_be_between(label_share) failed on 1 of 8 rows "
                            f"(e.g. [{share}])")]


def test_row_count_differing_from_the_manifest_is_reported(dataset_copy):
    rewrite_split(dataset_copy, "test", lambda rows: rows[:-1])
    message = failure_message(dataset_copy)
    assert f"split=test: expect_column_sum_to_be_between(rows) failed (observed {SMALL_TEST_ROWS - 1})" in message


def test_failed_run_replaces_earlier_outputs_and_records_the_failure(dataset_copy):
    first = validate.validate_dataset(dataset_copy)
    rewrite_split(dataset_copy, "train", set_field(3, "label", 12))
    failure_message(dataset_copy)

    written = storage.read_json(first["result_uri"])
    assert written["success"] is False
    assert written["statistics"]["splits"]["train"]["unsuccessful_expectations"] >= 1
    label_check = next(
        r
        for r in written["results"]["train"]["results"]
        if r["expectation_config"]["kwargs"].get("column") == "label" and not r["success"]
    )
    assert label_check["result"]["unexpected_count"] == 1
    assert label_check["result"]["partial_unexpected_list"] == [12]
    # Only the latest run's pages remain in Data Docs.
    pages = list((Path(first["data_docs_uri"]).parent / "validations").rglob("lake-train.html"))
    assert len(pages) == 1


def test_command_line_exits_non_zero_and_names_the_failure(dataset_copy, tmp_path):
    rewrite_split(dataset_copy, "train", set_field(3, "label", 12))
    completed = subprocess.run(
        [sys.executable, "-m", "admm_jobs.validate", "--dataset-uri", dataset_copy],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode != 0
    assert "ValidationFailed" in completed.stderr
    assert "expect_column_values_to_be_between(label) failed on 1 of" in completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1])["success"] is False


def test_missing_manifest_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no committed dataset"):
        validate.validate_dataset(str(tmp_path / "nothing-here"))



@pytest.mark.parametrize("argv, option", [(["--dataset-uri", ""], "--dataset-uri"), (["--suite", ""], "--suite")])
def test_bad_settings_are_usage_errors_naming_the_option(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        validate.main(["--dataset-uri", "lake/mnist/v1", *argv])
    assert exit_info.value.code == 2
    assert f"error: {option}: " in capsys.readouterr().err
