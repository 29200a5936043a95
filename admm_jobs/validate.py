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
import logging
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

from admm_jobs.cli.command import FailedWithResult, run_command
from admm_jobs.cli.config import setting, validate_fields
from admm_jobs.lake import batches, storage
from admm_jobs.lake.dataset import (
    SPLITS,
    DatasetError,
    batch_file_uris,
    check_schema,
    load_manifest,
    read_batch,
    read_split,
    split_file_uris,
)
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry

log = logging.getLogger("admm_jobs.validate")

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.data_context import EphemeralDataContext

# great_expectations is imported inside the functions that use it: importing it takes
# seconds, and the DAG file imports this module every time Airflow parses it.

EXPECTATIONS = Path(__file__).resolve().parents[1] / "expectations"
DEFAULT_SUITE = EXPECTATIONS / "mnist_dataset.json"
BATCH_SUITE = EXPECTATIONS / "mnist_batch.json"
DRIFT_SUITE = EXPECTATIONS / "mnist_batch_drift.json"
BLANK_MAX_GREY = 10  # an image with no grey level above this has nothing drawn
SATURATED_GREY = 250  # an image with more than half its pixels at this level or above is saturated
VALIDATION_DIR = "validation"
RESULT_FILE = "result.json"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "local_site"
SOURCE_COLUMNS = ("image_id", "label", "pixels")


class ValidationFailed(FailedWithResult):
    """The dataset broke at least one expectation; ``result`` is the stage result dict."""


class BatchQuarantined(ValidationFailed):
    """New batches failed their checks against the reference; ``quarantined`` maps batch id -> record."""

    def __init__(self, message: str, result: dict[str, Any], quarantined: dict[str, dict[str, Any]]):
        super().__init__(message, result)
        self.quarantined = quarantined


class SuiteError(ValueError):
    """The expectation suite file is unreadable or holds an invalid expectation."""


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Validate a committed dataset against a Great Expectations suite, and its new batches against the
    data of the published model; write results next to it and quarantine refused batches."""

    dataset_uri: str = setting(help="dataset directory URI (LAKE/<dataset>/<version>)", minLength=1)
    suite: str = setting(str(DEFAULT_SUITE), "expectation suite JSON of every split (path or URI)", minLength=1)
    batch_suite: str = setting(str(BATCH_SUITE), "expectation suite JSON of every new batch", minLength=1)
    drift_suite: str = setting(str(DRIFT_SUITE), "expectation suite JSON of every new batch against the "
                               "published model's data", minLength=1)
    registry_uri: str | None = setting(None, "model registry root: the published model is the reference of the "
                                       "batch checks, refusals are recorded in its history (none: no reference)")
    logical_date: str | None = setting(None, "logical date of the run, recorded with a quarantine")
    max_class_divergence: float = setting(0.1, "largest KL divergence of a new batch's class proportions from the "
                                          "reference's", exclusiveMinimum=0, maximum=100)
    max_intensity_shift: float = setting(0.25, "largest relative change of a new batch's mean grey level (and of its "
                                         "spread over images) from the reference's", exclusiveMinimum=0, maximum=10)
    max_blank_share: float = setting(0.02, "largest share of blank images in a new batch above the reference's",
                                     minimum=0, maximum=1)
    max_saturated_share: float = setting(0.02, "largest share of saturated images in a new batch above the "
                                         "reference's", minimum=0, maximum=1)
    max_duplicate_share: float = setting(0.01, "largest share of a new batch's images already in the dataset",
                                         minimum=0, maximum=1)
    max_accuracy_drop: float = setting(0.15, "largest drop of the published model's accuracy on a new batch below "
                                       "its test accuracy (label sanity)", minimum=0, maximum=1)

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


def substitute(value: Any, parameters: Mapping[str, Any]) -> Any:
    """``value`` with every ``{"$PARAMETER": name}`` replaced by ``parameters[name]``."""
    if isinstance(value, dict):
        if set(value) == {"$PARAMETER"} and value["$PARAMETER"] in parameters:
            return parameters[value["$PARAMETER"]]
        return {key: substitute(item, parameters) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, parameters) for item in value]
    return value


def load_suite(uri: str, parameters: Mapping[str, Any] | None = None) -> gx.ExpectationSuite:
    """The suite stored as JSON at ``uri``; an invalid expectation in it raises :class:`SuiteError`.

    ``parameters`` fill the suite's ``$PARAMETER`` placeholders when the suite is built (so
    Data Docs show the values) instead of at validation time.
    """
    import great_expectations as gx
    from great_expectations.exceptions import GreatExpectationsError
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        document = storage.read_json(uri)
    except storage.StorageError as exc:
        raise SuiteError(str(exc)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("expectations"), list):
        raise SuiteError(f"{uri}: not an expectation suite (needs 'name' and an 'expectations' list)")
    if parameters:
        document = substitute(document, parameters)
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


Check = tuple["gx.ExpectationSuite", pd.DataFrame, Mapping[str, Any]]  # suite, frame, its $PARAMETER values


def run_suites(checks: Mapping[str, Check], data_docs_dir: str, run_name: str
               ) -> dict[str, ExpectationSuiteValidationResult]:
    """Validate each named frame against its suite (one dataframe asset per name) and build Data Docs
    into ``data_docs_dir``. All share one run id named ``run_name``, so Data Docs list them as one run.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = ephemeral_context(data_docs_dir)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.timezone.utc))
    datasource = context.data_sources.add_pandas("lake")
    suites: dict[str, gx.ExpectationSuite] = {}
    results = {}
    for name, (suite, frame, parameters) in checks.items():
        if suite.name not in suites:
            suites[suite.name] = context.suites.add(suite)
        batch_definition = datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}-{name}", data=batch_definition, suite=suites[suite.name])
        )
        results[name] = definition.run(
            batch_parameters={"dataframe": frame}, expectation_parameters=dict(parameters), run_id=run_id)
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return results


def describe_failure(name: str, outcome: Mapping[str, Any]) -> str:
    """One line for a failed expectation result (a JSON dict of ``ExpectationValidationResult``) of a
    split (``name`` = the split) or a batch (``name`` = ``batch=<id>``)."""
    where = name if "=" in name else f"split={name}"
    config = outcome["expectation_config"]
    kwargs = {key: value for key, value in config["kwargs"].items() if key != "batch_id"}
    column = kwargs.pop("column", None)
    arguments = column if column is not None else ", ".join(f"{key}={value!r}" for key, value in sorted(kwargs.items()))
    target = f"{config['type']}({arguments})"
    details = outcome.get("result") or {}
    exception = outcome.get("exception_info") or {}
    if exception.get("raised_exception"):
        return f"{where}: {target} raised {exception.get('exception_message')}"
    if "unexpected_count" in details:
        examples = details.get("partial_unexpected_list") or []
        return (
            f"{where}: {target} failed on {details['unexpected_count']} of {details['element_count']} rows"
            + (f" (e.g. {examples[:3]})" if examples else "")
        )
    return f"{where}: {target} failed (observed {details.get('observed_value')})"


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


# ---------------------------------------------------------------- new batches against the reference


def image_statistics(pixels: np.ndarray) -> pd.DataFrame:
    """Per image (rows of uint8 grey levels): ``mean_intensity`` in [0, 1], ``blank``, ``saturated``."""
    return pd.DataFrame({
        "mean_intensity": pixels.mean(axis=1) / 255.0,
        "blank": pixels.max(axis=1) <= BLANK_MAX_GREY,
        "saturated": (pixels >= SATURATED_GREY).mean(axis=1) > 0.5,
    })


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the published model was trained on, summarised for the batch checks."""

    dataset_uri: str
    batches: tuple[str, ...]
    class_shares: tuple[float, ...]
    intensity_mean: float
    intensity_stdev: float
    blank_share: float
    saturated_share: float
    test_accuracy: float
    model: model_io.Model


def load_reference(registry_uri: str | None) -> Reference | None:
    """The published model and the statistics of its training split; None when nothing is published."""
    model_uri = registry.published_model_uri(registry_uri) if registry_uri else None
    if model_uri is None:
        return None
    model = model_io.load_model(model_uri)
    reference_uri = model.metadata["dataset"]["uri"]
    pixels, labels = read_split(reference_uri, "train")
    counts = np.bincount(labels, minlength=model.layer_sizes[-1]) + 1.0  # +1: no class has zero weight
    stats = image_statistics(pixels)
    manifest = load_manifest(reference_uri)
    return Reference(
        dataset_uri=reference_uri,
        batches=tuple(batch["id"] for batch in manifest.get("batches", [])),
        class_shares=tuple(float(share) for share in counts / counts.sum()),
        intensity_mean=float(stats["mean_intensity"].mean()),
        intensity_stdev=float(stats["mean_intensity"].std()),
        blank_share=float(stats["blank"].mean()),
        saturated_share=float(stats["saturated"].mean()),
        test_accuracy=float(registry.read_pointer(registry_uri)["test_accuracy"]),
        model=model,
    )


def image_id_set(uris: list[str]) -> set[str]:
    """The image ids (content hashes) held by part files."""
    return {image_id for uri in uris for image_id in pq.read_table(
        pa.BufferReader(storage.read_bytes(uri)), columns=["image_id"]).column("image_id").to_pylist()}


def batch_frame(pixels: np.ndarray, labels: np.ndarray, known_ids: set[str], model: model_io.Model | None
                ) -> pd.DataFrame:
    """One row per image of a batch: ``label``, :func:`image_statistics`, ``duplicate`` (its bytes are in
    ``known_ids`` or earlier in the batch) and, with a published model, ``model_correct``."""
    frame = image_statistics(pixels)
    frame["label"] = labels.astype(int)
    ids = pd.Series(batches.image_ids(pixels))
    frame["duplicate"] = ids.isin(known_ids) | ids.duplicated()
    if model is not None:
        frame["model_correct"] = (model.predict(pixels) == labels).astype(float)
    return frame


def batch_parameters(config: ValidateConfig, reference: Reference | None) -> dict[str, Any]:
    """Thresholds of the batch suites: the config's limits applied to the reference's statistics."""
    blank, saturated = (reference.blank_share, reference.saturated_share) if reference else (0.0, 0.0)
    parameters = {
        "blank_mostly": max(0.0, 1.0 - blank - config.max_blank_share),
        "saturated_mostly": max(0.0, 1.0 - saturated - config.max_saturated_share),
        "duplicate_mostly": 1.0 - config.max_duplicate_share,
    }
    if reference is not None:
        shift = config.max_intensity_shift
        parameters.update({
            "class_partition": {"values": list(range(len(reference.class_shares))),
                                "weights": list(reference.class_shares)},
            "max_class_divergence": config.max_class_divergence,
            "intensity_mean_min": reference.intensity_mean * (1 - shift),
            "intensity_mean_max": reference.intensity_mean * (1 + shift),
            "intensity_stdev_min": reference.intensity_stdev * (1 - shift),
            "intensity_stdev_max": reference.intensity_stdev * (1 + shift),
            "min_batch_accuracy": max(0.0, reference.test_accuracy - config.max_accuracy_drop),
        })
    return parameters


CHECK_NAMES = {"label": "class proportions", "mean_intensity": "pixel intensity", "blank": "blank images",
               "saturated": "saturated images", "duplicate": "duplicates", "model_correct": "label sanity"}


def check_failures(outcomes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each failed batch check: its name, the statistic observed and the threshold it broke."""
    failures = []
    for outcome in outcomes:
        if outcome["success"]:
            continue
        config, details = outcome["expectation_config"], outcome.get("result") or {}
        kwargs = config["kwargs"]
        if "mostly" in kwargs:  # share of flagged images against the largest share allowed
            observed, threshold = details.get("unexpected_percent", 100.0) / 100.0, 1.0 - kwargs["mostly"]
            bound = "at most"
        elif "threshold" in kwargs:
            observed, threshold, bound = details.get("observed_value"), kwargs["threshold"], "below"
        else:
            observed, threshold = details.get("observed_value"), [kwargs.get("min_value"), kwargs.get("max_value")]
            bound = "within"
        failures.append({"check": CHECK_NAMES.get(kwargs.get("column"), config["type"]),
                         "expectation": config["type"], "column": kwargs.get("column"),
                         "observed": observed, "threshold": threshold, "bound": bound})
    return failures


def failure_text(batch: str, failure: Mapping[str, Any]) -> str:
    observed = failure["observed"]
    shown = f"{observed:.4g}" if isinstance(observed, float) else observed
    return f"batch {batch}: {failure['check']}: observed {shown}, {failure['bound']} {failure['threshold']}"


def batches_to_check(config: ValidateConfig, manifest: Mapping[str, Any], reference: Reference | None) -> list[str]:
    """The batches the reference was not trained on, less those a reviewer released after their quarantine
    (the registry history's decision overrules the checks, so a released batch is not refused again)."""
    released = registry.released_batches(config.registry_uri) if config.registry_uri else set()
    new = [batch["id"] for batch in manifest.get("batches", [])
           if reference is None or batch["id"] not in reference.batches]
    if released.intersection(new):
        log.info("not checking batch(es) %s: released by a reviewer", sorted(released.intersection(new)))
    return [batch for batch in new if batch not in released]


def new_batch_checks(config: ValidateConfig, manifest: Mapping[str, Any], reference: Reference | None
                     ) -> dict[str, Check]:
    """The checks of every batch of the dataset the reference was not trained on and no reviewer released."""
    new = batches_to_check(config, manifest, reference)
    if not new:
        return {}
    suites = [load_suite(config.batch_suite, batch_parameters(config, reference))]
    if reference is not None:
        suites.append(load_suite(config.drift_suite, batch_parameters(config, reference)))
    combined = suites[0] if len(suites) == 1 else merged_suite(suites)
    ids_by_batch = {batch["id"]: image_id_set(batch_file_uris(config.dataset_uri, batch["id"]))
                    for batch in manifest["batches"]}
    test_ids = image_id_set(split_file_uris(config.dataset_uri, "test"))
    checks = {}
    for batch in new:
        known = test_ids.union(*[ids for other, ids in ids_by_batch.items() if other != batch])
        try:
            pixels, labels = read_batch(config.dataset_uri, batch)
        except DatasetError as exc:  # malformed rows: the split suite reports them row by row
            log.warning("batch %s not checked against the reference: %s", batch, exc)
            continue
        model = reference.model if reference is not None else None
        checks[f"batch={batch}"] = (combined, batch_frame(pixels, labels, known, model), {})
    return checks


def merged_suite(suites: list[gx.ExpectationSuite]) -> gx.ExpectationSuite:
    """One suite holding the expectations of ``suites`` (named after them), so each batch is one asset."""
    import great_expectations as gx

    return gx.ExpectationSuite(name="+".join(suite.name for suite in suites),
                               expectations=[e for suite in suites for e in suite.expectations])


def quarantine(config: ValidateConfig, manifest: Mapping[str, Any], batch: str, failures: list[dict[str, Any]],
               result_uri: str, data_docs_uri: str, reference: Reference | None) -> dict[str, Any]:
    """Record a refused batch in the registry history (ingest leaves it out until a reviewer releases it) and its
    evidence in the lake."""
    lake_dataset = config.dataset_uri.rstrip("/").rsplit("/", 1)[0]
    record = {
        "batch": batch, "dataset_version": manifest["version"], "logical_date": config.logical_date,
        "failures": failures, "result_uri": result_uri, "data_docs_uri": data_docs_uri,
        "reference_dataset": reference.dataset_uri if reference else None,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(batches.quarantine_uri(lake_dataset, batch), record)
    if config.registry_uri:
        first = failures[0]
        registry.record_decision(config.registry_uri, {
            "decision": registry.QUARANTINED, "logical_date": config.logical_date, "run_uri": None,
            "dataset_version": manifest["version"], "batches": [b["id"] for b in manifest["batches"]],
            "training_key": None, "reasons": [failure_text(batch, failure) for failure in failures],
            "test_accuracy": None, "version": None, "report_uri": data_docs_uri,
            "batch": batch, "check": first["check"], "observed": first["observed"], "threshold": first["threshold"],
        })
    return record


# ---------------------------------------------------------------- the stage


def validate_dataset(dataset_uri: str, suite_uri: str = str(DEFAULT_SUITE), **settings: Any) -> dict[str, Any]:
    """Validate every split of the dataset at ``dataset_uri``, and its new batches against the published
    model's data (``settings``: the other :class:`ValidateConfig` fields); write the result and Data Docs
    next to it.

    Returns the stage result; raises :class:`ValidationFailed` (after writing the outputs) when an
    expectation fails, :class:`BatchQuarantined` when a new batch failed its checks (after quarantining it).
    """
    config = ValidateConfig(dataset_uri=dataset_uri, suite=suite_uri, **settings)
    manifest = load_manifest(dataset_uri)
    suite = load_suite(config.suite)
    frames = split_frames(dataset_uri)
    checks: dict[str, Check] = {split: (suite, frames[split], expectation_parameters(manifest, split))
                                for split in SPLITS}
    reference = load_reference(config.registry_uri)
    checks.update(new_batch_checks(config, manifest, reference))
    validation_uri = storage.join(dataset_uri, VALIDATION_DIR)
    result_uri = storage.join(validation_uri, RESULT_FILE)
    data_docs_uri = storage.join(validation_uri, DATA_DOCS_DIR)
    with tempfile.TemporaryDirectory(prefix="gx-data-docs-") as data_docs_dir:
        run_name = f"{manifest['dataset']}-{manifest['version']}"
        results = run_suites(checks, data_docs_dir, run_name)
        serialised = {name: result.to_json_dict() for name, result in results.items()}
        success = all(result["success"] for result in serialised.values())
        refused = {name.removeprefix("batch="): check_failures(result["results"])
                   for name, result in serialised.items() if name.startswith("batch=") and not result["success"]}
        stage_result = {
            "dataset_uri": dataset_uri,
            "success": success,
            "result_uri": result_uri,
            "data_docs_uri": storage.join(data_docs_uri, "index.html"),
            "statistics": summary_statistics(serialised),
            "checked_batches": [name.removeprefix("batch=") for name in serialised if name.startswith("batch=")],
            "reference_dataset": reference.dataset_uri if reference else None,
            "refused_batches": {batch: [failure_text(batch, f) for f in failures] for batch, failures in refused.items()},
        }
        # Staged and swapped in whole (result.json last on object stores): concurrent runs on
        # the same dataset never see each other's half-written outputs.
        with storage.staged_directory(validation_uri) as staging:
            storage.copy_tree(data_docs_dir, storage.join(staging, DATA_DOCS_DIR))
            storage.write_json(
                storage.join(staging, RESULT_FILE),
                {**stage_result, "dataset_version": manifest["version"], "suite": suite.name, "results": serialised},
            )
    if refused:
        quarantined = {batch: quarantine(config, manifest, batch, failures, result_uri,
                                         stage_result["data_docs_uri"], reference)
                       for batch, failures in refused.items()}
        raise BatchQuarantined(
            f"{dataset_uri}: quarantined batch(es) {sorted(refused)}; the published model stays, later runs leave "
            f"them out ({result_uri}):\n" + "\n".join(line for lines in stage_result["refused_batches"].values()
                                                       for line in lines),
            stage_result, quarantined)
    if not success:
        raise ValidationFailed(
            f"{dataset_uri}: dataset failed validation against suite {suite.name!r} ({result_uri}):\n"
            + "\n".join(failure_lines(serialised)),
            stage_result,
        )
    return stage_result


def run(config: ValidateConfig) -> dict[str, Any]:
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in ("dataset_uri", "suite")}
    return validate_dataset(config.dataset_uri, config.suite, **settings)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # A failed validation still prints its result as the last stdout line, then exits non-zero.
    return run_command(ValidateConfig, run, argv)


if __name__ == "__main__":
    main()
