"""Validate stage: check a committed dataset with a Great Expectations suite.

    python -m admm_jobs.validate --dataset-uri LAKE/mnist/<version> [--suite expectations/mnist_dataset.json]

Each split becomes one pandas DataFrame batch of an ephemeral GX context and is
validated against the same suite (kept as JSON in ``expectations/``), with the
suite parameters filled from the manifest (row count per split, pixels per
image), so any dataset in the idx-parquet format validates, not only MNIST's.

The frames hold one row per image with columns derived from the Parquet rows
(per-row pixel count/min/max instead of 784 exploded values, the share of the
split carrying the row's label, and the other split, if any, holding the same
image_id), so every expectation is a plain column or table expectation and
each failure counts the offending rows.

Outputs go to ``<dataset_uri>/validation/``: ``data_docs/`` (GX Data Docs,
built in a local temporary directory and copied) and ``result.json`` (the
serialised GX results of every split), written last. A failed validation
still writes both, then raises :class:`ValidationFailed`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from admm_jobs import storage
from admm_jobs.config import parse_config, setting, validate_fields
from admm_jobs.dataset import SPLITS, DatasetError, check_schema, load_manifest, split_file_uris

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.data_context import EphemeralDataContext

# great_expectations is imported inside the functions that use it: importing it takes
# seconds, and the DAG file imports this module every time Airflow parses it.

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "expectations" / "mnist_dataset.json"
VALIDATION_DIR = "validation"
RESULT_FILE = "result.json"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "local_site"
SOURCE_COLUMNS = ("image_id", "label", "pixels")


class ValidationFailed(RuntimeError):
    """The dataset broke at least one expectation; ``result`` is the stage result dict."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class SuiteError(ValueError):
    """The expectation suite file is unreadable or holds an invalid expectation."""


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Validate a committed dataset against a Great Expectations suite; write results next to it."""

    dataset_uri: str = setting(help="dataset directory URI (LAKE/<dataset>/<version>)", minLength=1)
    suite: str = setting(str(DEFAULT_SUITE), "expectation suite JSON (path or URI)", minLength=1)

    def __post_init__(self) -> None:
        validate_fields(self)


# ---------------------------------------------------------------- the frames GX validates


def read_split_table(dataset_uri: str, split: str) -> pa.Table:
    """The ``image_id``, ``label`` and ``pixels`` columns of all part files of ``split``."""
    tables = []
    for uri in split_file_uris(dataset_uri, split):
        try:
            parquet_file = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri)))
            check_schema(parquet_file.schema_arrow, uri)
            tables.append(parquet_file.read(columns=list(SOURCE_COLUMNS)))
        except storage.StorageError as exc:
            raise DatasetError(str(exc)) from exc
        except pa.ArrowException as exc:
            raise DatasetError(f"{uri}: unreadable Parquet file: {exc}") from exc
    if not tables:
        raise DatasetError(f"{dataset_uri}: manifest lists no files for split {split!r}")
    return pa.concat_tables(tables)


def pixel_statistics(pixels: pa.ChunkedArray | pa.ListArray) -> pd.DataFrame:
    """Per row of a list column: ``pixel_count`` (non-null values), ``pixel_min``, ``pixel_max``.

    A row without values (null or empty list) has count 0 and null min/max.
    """
    pixels = pixels.combine_chunks() if isinstance(pixels, pa.ChunkedArray) else pixels
    values = pa.table({"row": pc.list_parent_indices(pixels), "value": pc.list_flatten(pixels)})
    per_row = values.group_by("row").aggregate([("value", "count"), ("value", "min"), ("value", "max")])
    rows = per_row.column("row").to_numpy()
    count = np.zeros(len(pixels), dtype=np.int64)
    low = np.full(len(pixels), np.nan)
    high = np.full(len(pixels), np.nan)
    count[rows] = per_row.column("value_count").to_numpy()
    # min/max are null for rows whose values are all null; to_numpy turns those into NaN.
    low[rows] = per_row.column("value_min").to_numpy(zero_copy_only=False)
    high[rows] = per_row.column("value_max").to_numpy(zero_copy_only=False)
    return pd.DataFrame({"pixel_count": count, "pixel_min": low, "pixel_max": high})


def split_frame(table: pa.Table, other_split_ids: Mapping[str, pd.Series]) -> pd.DataFrame:
    """One row per image: ``image_id``, ``label`` and the derived columns the suite checks.

    ``label_share`` is the fraction of the split's rows with the row's label;
    ``image_id_also_in_split`` names the first split of ``other_split_ids``
    holding the row's image_id, null when none does.
    """
    frame = table.select(["image_id", "label"]).to_pandas()
    frame = frame.join(pixel_statistics(table.column("pixels")))
    frame["label_share"] = frame["label"].map(frame["label"].value_counts(normalize=True)).astype(float)
    also_in = pd.Series(None, index=frame.index, dtype=object)
    for other_split, ids in other_split_ids.items():
        also_in = also_in.where(also_in.notna() | ~frame["image_id"].isin(ids), other_split)
    frame["image_id_also_in_split"] = also_in
    return frame


def split_frames(dataset_uri: str) -> dict[str, pd.DataFrame]:
    """The validation frame of every split."""
    tables = {split: read_split_table(dataset_uri, split) for split in SPLITS}
    ids = {split: table.column("image_id").to_pandas() for split, table in tables.items()}
    return {
        split: split_frame(table, {other: ids[other] for other in SPLITS if other != split})
        for split, table in tables.items()
    }


def expectation_parameters(manifest: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Values of the suite's ``$PARAMETER`` placeholders for one split, from the manifest."""
    return {
        "expected_rows": int(manifest["splits"][split]["rows"]),
        "pixels_per_image": math.prod(int(size) for size in manifest["image_shape"]),
    }


# ---------------------------------------------------------------- Great Expectations


def load_suite(uri: str) -> gx.ExpectationSuite:
    """The suite stored as JSON at ``uri``; an invalid expectation in it raises :class:`SuiteError`."""
    import great_expectations as gx
    from great_expectations.exceptions import GreatExpectationsError
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        document = storage.read_json(uri)
    except storage.StorageError as exc:
        raise SuiteError(str(exc)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("expectations"), list):
        raise SuiteError(f"{uri}: not an expectation suite (needs 'name' and an 'expectations' list)")
    # Built one by one because ExpectationSuite(**document) logs and drops an invalid expectation.
    expectations = []
    for index, entry in enumerate(document["expectations"]):
        try:
            expectations.append(ExpectationConfiguration(**entry).to_domain_obj())
        except (TypeError, ValueError, GreatExpectationsError) as exc:
            kind = entry.get("type") if isinstance(entry, dict) else None
            raise SuiteError(f"{uri}: expectation #{index} ({kind}) is invalid: {exc}") from exc
    try:
        return gx.ExpectationSuite(**{**document, "expectations": expectations})
    except (TypeError, ValueError) as exc:
        raise SuiteError(f"{uri}: invalid expectation suite: {exc}") from exc


def ephemeral_context(data_docs_dir: str) -> EphemeralDataContext:
    """An in-memory GX context whose only Data Docs site is the local directory ``data_docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DATA_DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": data_docs_dir},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suite(
    suite: gx.ExpectationSuite,
    frames: Mapping[str, pd.DataFrame],
    parameters: Mapping[str, Mapping[str, Any]],
    data_docs_dir: str,
    run_name: str,
) -> dict[str, ExpectationSuiteValidationResult]:
    """Validate each split's frame (one dataframe asset per split) and build Data Docs into ``data_docs_dir``.

    All splits share one run id named ``run_name``, so Data Docs list them as one run.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = ephemeral_context(data_docs_dir)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.timezone.utc))
    datasource = context.data_sources.add_pandas("lake")
    suite = context.suites.add(suite)
    results = {}
    for split, frame in frames.items():
        batch_definition = datasource.add_dataframe_asset(split).add_batch_definition_whole_dataframe(split)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}-{split}", data=batch_definition, suite=suite)
        )
        results[split] = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=dict(parameters[split]),
            run_id=run_id,
        )
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return results


def describe_failure(split: str, outcome: Mapping[str, Any]) -> str:
    """One line for a failed expectation result (a JSON dict of ``ExpectationValidationResult``)."""
    config = outcome["expectation_config"]
    kwargs = {key: value for key, value in config["kwargs"].items() if key != "batch_id"}
    column = kwargs.pop("column", None)
    arguments = column if column is not None else ", ".join(f"{key}={value!r}" for key, value in sorted(kwargs.items()))
    target = f"{config['type']}({arguments})"
    details = outcome.get("result") or {}
    exception = outcome.get("exception_info") or {}
    if exception.get("raised_exception"):
        return f"split={split}: {target} raised {exception.get('exception_message')}"
    if "unexpected_count" in details:
        examples = details.get("partial_unexpected_list") or []
        return (
            f"split={split}: {target} failed on {details['unexpected_count']} of {details['element_count']} rows"
            + (f" (e.g. {examples[:3]})" if examples else "")
        )
    return f"split={split}: {target} failed (observed {details.get('observed_value')})"


def failure_lines(serialised: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line per failed expectation of each split's serialised result."""
    return [
        describe_failure(split, outcome)
        for split, result in serialised.items()
        for outcome in result["results"]
        if not outcome["success"]
    ]


def summary_statistics(serialised: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """GX's expectation counts summed over splits, plus each split's own."""
    per_split = {split: result["statistics"] for split, result in serialised.items()}
    totals = {
        key: sum(int(stats[key]) for stats in per_split.values())
        for key in ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations")
    }
    evaluated = totals["evaluated_expectations"]
    totals["success_percent"] = 100.0 * totals["successful_expectations"] / evaluated if evaluated else 100.0
    return {**totals, "splits": per_split}


# ---------------------------------------------------------------- the stage


def validate_dataset(dataset_uri: str, suite_uri: str = str(DEFAULT_SUITE)) -> dict[str, Any]:
    """Validate every split of the dataset at ``dataset_uri``; write the result and Data Docs next to it.

    Returns the stage result; raises :class:`ValidationFailed` (after writing
    the outputs) when an expectation fails.
    """
    manifest = load_manifest(dataset_uri)
    suite = load_suite(suite_uri)
    frames = split_frames(dataset_uri)
    parameters = {split: expectation_parameters(manifest, split) for split in SPLITS}
    validation_uri = storage.join(dataset_uri, VALIDATION_DIR)
    result_uri = storage.join(validation_uri, RESULT_FILE)
    data_docs_uri = storage.join(validation_uri, DATA_DOCS_DIR)
    with tempfile.TemporaryDirectory(prefix="gx-data-docs-") as data_docs_dir:
        run_name = f"{manifest['dataset']}-{manifest['version']}"
        results = run_suite(suite, frames, parameters, data_docs_dir, run_name)
        serialised = {split: result.to_json_dict() for split, result in results.items()}
        success = all(result["success"] for result in serialised.values())
        stage_result = {
            "dataset_uri": dataset_uri,
            "success": success,
            "result_uri": result_uri,
            "data_docs_uri": storage.join(data_docs_uri, "index.html"),
            "statistics": summary_statistics(serialised),
        }
        # Staged and swapped in whole (result.json last on object stores): concurrent runs on
        # the same dataset never see each other's half-written outputs.
        with storage.staged_directory(validation_uri) as staging:
            storage.copy_tree(data_docs_dir, storage.join(staging, DATA_DOCS_DIR))
            storage.write_json(
                storage.join(staging, RESULT_FILE),
                {**stage_result, "dataset_version": manifest["version"], "suite": suite.name, "results": serialised},
            )
    if not success:
        raise ValidationFailed(
            f"{dataset_uri}: dataset failed validation against suite {suite.name!r} ({result_uri}):\n"
            + "\n".join(failure_lines(serialised)),
            stage_result,
        )
    return stage_result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(ValidateConfig, argv)
    try:
        result = validate_dataset(config.dataset_uri, config.suite)
    except ValidationFailed as failure:
        # The outcome is still the last stdout line; the exception makes the exit status non-zero.
        print(json.dumps(failure.result, sort_keys=True))
        raise
    print(json.dumps(result, sort_keys=True))
    return result


def validated_dataset_asset(dataset_name: str = "mnist"):
    """The Airflow Asset a passed validation updates: logical identity ``x-admm://lake/<dataset>``.

    The lake's location is a run parameter; each event's extra says which dataset
    version passed and where it is (see :func:`airflow_task`).
    """
    from airflow.sdk import Asset

    return Asset(name=f"{dataset_name}-validated-dataset", uri=f"x-admm://lake/{dataset_name}", group="dataset")


def airflow_task(argv: list[str], outlet_events=None) -> dict[str, Any]:
    """:func:`main` as an Airflow task: the asset event of a passed validation names the dataset version.

    A failed validation raises, so the task fails and emits no event.
    """
    result = main(argv)
    if outlet_events is not None:
        manifest = load_manifest(result["dataset_uri"])
        outlet_events[validated_dataset_asset(manifest["dataset"])].extra = {
            "dataset_uri": result["dataset_uri"],
            "dataset_version": manifest["version"],
            "result_uri": result["result_uri"],
        }
    return result


if __name__ == "__main__":
    main()
