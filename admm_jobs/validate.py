"""Validate stage: check a committed dataset with Great Expectations suites, reading the pixels of new batches only.

    python -m admm_jobs.validate --dataset-uri LAKE/mnist/<version> [--suite expectations/mnist_dataset.json]

A dataset is made of parts: its batches and its test set, each a directory with a profile
(:mod:`admm_jobs.lake.profiles`). A part is *new* when the published model's data did not hold it
(every part, when nothing is published): new parts are read and profiled again from their Parquet
files, one chunk of ``chunk_rows`` rows at a time; the others are known by their profiles. Image ids
held twice are found by testing the new parts' sorted keys against every other part's key filter and
confirming the candidates exactly in the row groups of its sorted id file that may hold them (two old
parts were compared when the later of them was new): an old part costs its filter (3.5 bytes per image),
rarely an id file row group. Memory holds one chunk of pixels and the new parts' keys (10 bytes per
image), whatever the length of the history.

Each split becomes one summary frame, one row per part and label (rows, the label's share of the
split, per-row pixel count and grey-level extremes, ids missing, repeated or in another split),
validated against ``expectations/mnist_dataset.json`` with parameters from the manifest (row count
per split, pixels per image), so any dataset in the idx-parquet format validates, not only MNIST's.
Each new batch becomes one row of statistics (shares of blank, saturated and duplicate images, and
with a published model: class divergence, intensity, the model's accuracy), validated against
``mnist_batch.json`` and ``mnist_batch_drift.json`` (and ``mnist_batch_label_sanity.json``, the model's accuracy on
the batch, only where its version has no label reference). With a published model, two statistical families share
``false_alarm_rate`` (half each, :func:`family_false_alarm_rate`): the per-class label checks
(:func:`label_failures`, :mod:`admm_jobs.scoring.label_checks`: the model's counts on the batch, kept chunk by
chunk, against its validation split's, when its version stores its label reference), and the pixel drift check
(:func:`pixel_drift_failures`, :mod:`admm_jobs.scoring.pixel_checks`, trigger patterns: each new batch's
per-class ink counts against the version's reference pixels). A batch failing any of them is quarantined; its
record and the stage result say whether the label checks ran (``label_checks``).

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from admm_jobs.cli.command import FailedWithResult, run_command
from admm_jobs.cli.config import setting, validate_fields
from admm_jobs.lake import batches, profiles, storage
from admm_jobs.lake.dataset import SPLITS, load_manifest, read_chunks
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.scoring import label_checks, pixel_checks
from admm_jobs.scoring.metrics import confusion_matrix

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
LABEL_SANITY_SUITE = EXPECTATIONS / "mnist_batch_label_sanity.json"
VALIDATION_DIR = "validation"
RESULT_FILE = "result.json"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "local_site"
TEST_PART = "test-set"  # the name of the test set among a dataset's parts (the others are batches)


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
    label_sanity_suite: str = setting(str(LABEL_SANITY_SUITE), "expectation suite JSON of every new batch against "
                                      "a published model whose version has no label reference (the coarse "
                                      "label sanity check)", minLength=1)
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
    chunk_rows: int = setting(profiles.CHUNK_ROWS, "rows of a new batch read at once (memory holds one chunk of "
                              "pixels, whatever the size of the batch or the dataset)", minimum=1, maximum=1_000_000)
    false_alarm_rate: float = setting(0.001, "chance that a clean new batch fails any of the statistical label and "
                                      "pixel checks (family-wise: split over every test made on the batch)",
                                      exclusiveMinimum=0, maximum=0.5)
    pixel_drift_margin: float = setting(0.15, "how far a new batch's share of a class's images with ink at a pixel "
                                        "must exceed the reference's share near that pixel (within 2 pixels), "
                                        "beyond sampling, to fail the pixel drift check", minimum=0, maximum=1)
    max_accuracy_drop: float = setting(0.15, "largest drop of the published model's accuracy on a new batch below "
                                       "its test accuracy (label sanity; only for a version without a label reference)",
                                       minimum=0, maximum=1)
    min_cell_excess: float = setting(0.05, "margin of the label checks' confusion cells: a cell's share of its given "
                                     "label must exceed the reference's by more than this (and beyond sampling) to "
                                     "fail", minimum=0, maximum=1)
    min_class_mislabelled_excess: float = setting(0.05, "margin of the label checks' share of likely mislabelled "
                                                  "images of one class over the reference's", minimum=0, maximum=1)
    min_mislabelled_excess: float = setting(0.02, "margin of the label checks' share of likely mislabelled images "
                                            "over all classes over the reference's", minimum=0, maximum=1)

    def __post_init__(self) -> None:
        validate_fields(self)


# ---------------------------------------------------------------- the dataset's parts and the frames GX validates


@dataclasses.dataclass
class Part:
    """One directory of part files of a dataset: a batch's splits, or the test set."""

    name: str  # the batch id, or TEST_PART
    directory: str
    sha256: str  # the content it was written from, as its profile records
    files: dict[str, list[str]]  # split -> part files, relative to ``directory``
    new: bool  # not validated with the published model's data: its pixels are read


@dataclasses.dataclass
class PartSplit:
    """What validation knows of one split of a part: its group statistics by label and, when the part is new
    (read in this run), its sorted keys with their labels and, with a published model, its whole images'
    confusion under the model and their confident joint (when the model's version has a calibration)."""

    groups: pd.DataFrame
    directory: str = ""  # of an old part: where its profile is
    entry: Mapping[str, Any] | None = None  # of an old part: the split's entry in its profile (id file, key filter)
    keys: np.ndarray | None = None
    labels: np.ndarray | None = None
    repeated: np.ndarray | None = None  # per sorted key: the id occurs in another row of the split
    in_other_split: np.ndarray | None = None
    confusion: np.ndarray | None = None  # given label x predicted class
    confident_joint: np.ndarray | None = None  # given label x confident class (label_checks.confident_joint)
    ink: pd.DataFrame | None = None  # images with ink at each pixel, by label (profiles.ink_by_label)


def dataset_parts(dataset_uri: str, manifest: Mapping[str, Any], reference: Reference | None) -> list[Part]:
    """The parts of a dataset, in manifest order; those the reference was not validated with are new."""
    return [Part(part.batch or TEST_PART, part.directory, part.sha256, part.files,
                 new=reference is None or (part.batch not in reference.batches if part.batch
                                           else part.sha256 != reference.test_set_sha256))
            for part in profiles.part_directories(dataset_uri, manifest)]


def read_part(part: Part, reference: Reference | None, chunk_rows: int) -> dict[str, PartSplit]:
    """Profile a new part from its pixels, one chunk at a time; with a reference, the published model scores
    each chunk and only counts are kept (the confusion, and the confident joint when the version has a
    calibration), so memory holds one chunk whatever the size of the part."""
    splits = {}
    for split, paths in part.files.items():
        profiler = profiles.SplitProfiler()
        classes = reference.model.layer_sizes[-1] if reference is not None else 0
        confusion = np.zeros((classes, classes), np.int64) if reference is not None else None
        joint = np.zeros((classes, classes), np.int64) if reference is not None and reference.labels else None
        for table in read_chunks([storage.join(part.directory, path) for path in paths], chunk_rows):
            rows, pixels = profiler.add(table)
            if confusion is not None and len(rows):
                scores, labels = reference.model.logits(pixels), profiles.labels_of(table)[rows]
                known = (labels >= 0) & (labels < classes)  # other labels are the split suite's concern
                confusion += confusion_matrix(labels[known], scores[known].argmax(axis=1), classes)
                if joint is not None:
                    joint += label_checks.confident_joint(scores, labels, reference.labels.calibration)
        profile = profiler.finish()
        splits[split] = PartSplit(profile.groups, keys=profile.keys, labels=profile.labels,
                                  repeated=profiles.repeated_rows(profile.keys),
                                  in_other_split=np.zeros(len(profile.keys), bool), confusion=confusion,
                                  confident_joint=joint, ink=profile.ink)
    return splits


def stored_part(part: Part) -> dict[str, PartSplit]:
    """An old part as its profile describes it (written first if it has none)."""
    profile = profiles.ensure_profile(part.directory, part.sha256, part.files)
    return {split: PartSplit(profiles.groups_frame(entry["groups"]), part.directory, entry,
                             ink=profiles.ink_frame(entry["ink"]))
            for split, entry in profile["splits"].items() if split in part.files}


def old_id_chunks(view: PartSplit, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The row groups of an old split's id file that may hold some of ``keys``: those its key filter does not
    rule out (nothing is read past the filter when it rules out every key, the usual case)."""
    if not len(keys):
        return
    candidates = keys[profiles.load_filter(view.directory, view.entry).may_contain(keys)]
    groups = profiles.groups_holding(view.entry["id_groups"], candidates)
    if groups:
        yield from profiles.id_chunks(storage.join(view.directory, profiles.PROFILE_DIR, view.entry["ids"]), groups)


def match_ids(views: dict[str, dict[str, PartSplit]]) -> dict[tuple[str, str], tuple[pd.Series, pd.Series]]:
    """Find image ids held by two parts, where at least one is new (two old parts were compared when the
    later of them was new): marks the new parts' keys (``repeated``: in the same split, ``in_other_split``)
    and returns, per (old part, split), the counts by label of its rows found in a new part (same split,
    other split). Memory: the new parts' keys, sorted with their order (24 bytes per image), and one row group
    of an old id file."""
    new = [(name, split, view) for name, splits in views.items() for split, view in splits.items()
           if view.keys is not None]
    keys = np.concatenate([view.keys for *_, view in new]) if new else np.zeros(0, np.uint64)
    starts = np.cumsum([0] + [len(view.keys) for *_, view in new])  # where each new split's keys start in ``keys``
    order = np.argsort(keys, kind="stable")
    keys = keys[order]  # 24 bytes per new image with ``order``: whose key each is, is looked up only for matches

    def owner(index: int) -> tuple[int, int]:
        """(which new split, which of its keys) the sorted key ``index`` is."""
        number = int(np.searchsorted(starts, order[index], "right")) - 1
        return number, int(order[index] - starts[number])

    def mark(index: int, split: str) -> None:
        number, position = owner(index)
        _, own_split, view = new[number]
        flags = view.repeated if own_split == split else view.in_other_split
        flags[position] = True

    for key in np.unique(keys[1:][keys[1:] == keys[:-1]]):  # ids held more than once among the new parts
        run = range(int(np.searchsorted(keys, key, "left")), int(np.searchsorted(keys, key, "right")))
        for a in run:
            for b in run:
                if new[owner(a)[0]][0] != new[owner(b)[0]][0]:
                    mark(a, new[owner(b)[0]][1])
    old_counts = {}
    for name, splits in views.items():
        for split, view in splits.items():
            if view.keys is not None:
                continue
            same, other = pd.Series(dtype=int), pd.Series(dtype=int)
            for chunk_keys, chunk_labels in old_id_chunks(view, keys):
                left, right = np.searchsorted(keys, chunk_keys, "left"), np.searchsorted(keys, chunk_keys, "right")
                for row in np.flatnonzero(right > left):
                    splits_hit = set()
                    for index in range(left[row], right[row]):
                        mark(index, split)
                        splits_hit.add(new[owner(index)[0]][1])
                    label = pd.Series([chunk_labels[row]])
                    if split in splits_hit:
                        same = same.add(label.value_counts(), fill_value=0)
                    if splits_hit - {split}:
                        other = other.add(label.value_counts(), fill_value=0)
            old_counts[(name, split)] = (same, other)
    return old_counts


def split_frames(parts: list[Part], views: dict[str, dict[str, PartSplit]],
                 old_counts: Mapping[tuple[str, str], tuple[pd.Series, pd.Series]]) -> dict[str, pd.DataFrame]:
    """The frame of each split: one row per part and label (see ``expectations/mnist_dataset.json``)."""
    frames = {split: [] for split in SPLITS}
    for part in parts:
        for split, view in views[part.name].items():
            groups = view.groups.copy()
            if view.keys is not None:
                repeated = profiles.counts_by_label(view.labels, view.repeated)
                other = profiles.counts_by_label(view.labels, view.in_other_split)
            else:
                same, other = old_counts[(part.name, split)]
                repeated = groups["repeated_image_ids"].add(same, fill_value=0)
            groups["repeated_image_ids"] = repeated.reindex(groups.index, fill_value=0).astype(int)
            groups["image_ids_in_other_splits"] = other.reindex(groups.index, fill_value=0).astype(int)
            frames[split].append(groups.assign(part=part.name))
    result = {}
    for split, pieces in frames.items():
        frame = pd.concat(pieces).reset_index() if pieces else pd.DataFrame(columns=["label", "rows"])
        frame["label"] = frame["label"].astype(float).where(frame["label"] != profiles.NULL_LABEL)
        totals = frame.groupby("label", dropna=False)["rows"].transform("sum")
        frame["label_share"] = totals / max(int(frame["rows"].sum()), 1)
        result[split] = frame.reset_index(drop=True)
    return result


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


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the published model was trained on, summarised for the batch checks (from the profiles)."""

    dataset_uri: str
    batches: tuple[str, ...]
    test_set_sha256: str | None
    class_shares: tuple[float, ...]
    intensity_mean: float
    intensity_stdev: float
    blank_share: float
    saturated_share: float
    test_accuracy: float
    model: model_io.Model
    labels: label_checks.LabelReference | None  # None: the version was published before calibrations were stored
    pixels: profiles.ClassInk  # per class, its images with ink at each pixel (the pixel drift check's reference)


def intensity_moments(groups: pd.DataFrame) -> tuple[float, float]:
    """Mean and sample standard deviation of the images' mean grey levels, from summed group statistics."""
    images, total, squares = (float(groups[column].sum()) for column in ("images", "intensity_sum",
                                                                          "intensity_square_sum"))
    if images < 2:
        return (total / images if images else 0.0), 0.0
    return total / images, math.sqrt(max(squares - total * total / images, 0.0) / (images - 1))


def class_counts(groups: pd.DataFrame, classes: int) -> np.ndarray:
    """Rows per class 0..classes-1 (labels outside are the split suite's concern)."""
    return groups["rows"].reindex(range(classes), fill_value=0).to_numpy(dtype=float)


def load_reference(registry_uri: str | None) -> Reference | None:
    """The published model, the statistics of its training split, summed from the profiles of its batches
    (no pixel is read), and its version's label reference; None when nothing is published."""
    pointer = registry.read_pointer(registry_uri) if registry_uri else None
    if pointer is None:
        return None
    model = model_io.load_model(storage.join(registry.version_uri(registry_uri, pointer["version"]),
                                             registry.MODEL_DIR))
    reference_uri = model.metadata["dataset"]["uri"]
    manifest = load_manifest(reference_uri)
    groups = profiles.merge_groups(stored_part(part)["train"].groups for part in dataset_parts(reference_uri, manifest, None)
                                   if "train" in part.files)
    counts = class_counts(groups, model.layer_sizes[-1]) + 1.0  # +1: no class has zero weight
    mean, stdev = intensity_moments(groups)
    images = max(float(groups["images"].sum()), 1.0)
    # a version published before reference pixels were stored: the same sums, from the profiles
    pixels = (registry.reference_pixels(registry_uri, pointer["version"])
              or profiles.dataset_class_ink(reference_uri, model.layer_sizes[-1]))
    return Reference(
        dataset_uri=reference_uri,
        batches=tuple(batch["id"] for batch in manifest.get("batches", [])),
        test_set_sha256=manifest.get("test_set", {}).get("sha256"),
        class_shares=tuple(float(share) for share in counts / counts.sum()),
        intensity_mean=mean,
        intensity_stdev=stdev,
        blank_share=float(groups["blank"].sum()) / images,
        saturated_share=float(groups["saturated"].sum()) / images,
        test_accuracy=float(pointer["test_accuracy"]),
        model=model,
        labels=label_reference(registry_uri, pointer["version"]),
        pixels=pixels,
    )


def label_reference(registry_uri: str, version: str) -> label_checks.LabelReference | None:
    """What the label checks compare a batch with: the version's confusion and calibration on its validation
    split, stored at publish; None when the version has either missing."""
    confusion = registry.reference_confusion(registry_uri, version)
    calibration = registry.reference_calibration(registry_uri, version)
    if confusion is None or calibration is None:
        return None
    return label_checks.LabelReference(
        confusion["confusion_matrix"], label_checks.Calibration(float(calibration["temperature"]),
                                                                calibration["thresholds"]),
        calibration["confident_joint"])


def class_divergence(counts: np.ndarray, reference_shares: np.ndarray) -> float:
    """KL divergence of the class proportions ``counts`` from the reference's shares (as GX's
    expect_column_kl_divergence_to_be_less_than computes it for a categorical partition)."""
    shares = counts / max(counts.sum(), 1.0)
    present = shares > 0
    return float(np.sum(shares[present] * np.log(shares[present] / reference_shares[present])))


def duplicate_count(view: PartSplit) -> int:
    """Images of a new split whose id occurs in another part or earlier in this one."""
    earlier = np.zeros(len(view.keys), dtype=bool)
    earlier[1:] = view.keys[1:] == view.keys[:-1]
    return int((earlier | (view.repeated & ~profiles.repeated_rows(view.keys)) | view.in_other_split).sum())


def batch_frame(views: Mapping[str, PartSplit], reference: Reference | None) -> pd.DataFrame:
    """One row of statistics of a new batch (all its splits): the columns the batch suites check."""
    groups = profiles.merge_groups(view.groups for view in views.values())
    rows = max(int(groups["rows"].sum()), 1)
    images = max(float(groups["images"].sum()), 1.0)
    frame = {
        "images": int(groups["images"].sum()),
        "blank_share": float(groups["blank"].sum()) / images,
        "saturated_share": float(groups["saturated"].sum()) / images,
        "duplicate_share": sum(duplicate_count(view) for view in views.values()) / rows,
    }
    if reference is not None:
        shares = np.array(reference.class_shares)
        frame["class_divergence"] = class_divergence(class_counts(groups, len(shares)), shares)
        frame["intensity_mean"], frame["intensity_stdev"] = intensity_moments(groups)
        frame["accuracy"] = sum(int(np.trace(view.confusion)) for view in views.values()) / images
    return pd.DataFrame([frame])


def batch_parameters(config: ValidateConfig, reference: Reference | None) -> dict[str, Any]:
    """Thresholds of the batch suites: the config's limits applied to the reference's statistics."""
    blank, saturated = (reference.blank_share, reference.saturated_share) if reference else (0.0, 0.0)
    parameters = {
        "max_blank_share": min(1.0, blank + config.max_blank_share),
        "max_saturated_share": min(1.0, saturated + config.max_saturated_share),
        "max_duplicate_share": config.max_duplicate_share,
    }
    if reference is not None:
        shift = config.max_intensity_shift
        parameters.update({
            "max_class_divergence": config.max_class_divergence,
            "intensity_mean_min": reference.intensity_mean * (1 - shift),
            "intensity_mean_max": reference.intensity_mean * (1 + shift),
            "intensity_stdev_min": reference.intensity_stdev * (1 - shift),
            "intensity_stdev_max": reference.intensity_stdev * (1 + shift),
            "min_batch_accuracy": max(0.0, reference.test_accuracy - config.max_accuracy_drop),
        })
    return parameters


CHECK_NAMES = {"class_divergence": "class proportions", "intensity_mean": "pixel intensity",
               "intensity_stdev": "pixel intensity", "blank_share": "blank images",
               "saturated_share": "saturated images", "duplicate_share": "duplicates", "accuracy": "label sanity"}
LABEL_CELL_CHECK, MISLABELLED_CHECK = "confusion cell", "mislabelled share"


def check_failures(outcomes: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each failed batch check: its name, the statistic observed and the threshold it broke."""
    failures = []
    for outcome in outcomes:
        if outcome["success"]:
            continue
        config, details = outcome["expectation_config"], outcome.get("result") or {}
        kwargs = config["kwargs"]
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        threshold, bound = (high, "at most") if low is None else ([low, high], "within")
        failures.append({"check": CHECK_NAMES.get(kwargs.get("column"), config["type"]),
                         "expectation": config["type"], "column": kwargs.get("column"),
                         "observed": builtin(details.get("observed_value")), "threshold": builtin(threshold),
                         "bound": bound})
    return failures


def builtin(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python numbers and lists: a quarantine record travels as
    JSON (XCom, an asset event's extra, the registry history), and Airflow's serialiser refuses numpy types."""
    if isinstance(value, (list, tuple)):
        return [builtin(item) for item in value]
    return value.tolist() if isinstance(value, (np.generic, np.ndarray)) else value


# The families of statistical checks of a new batch. ``false_alarm_rate`` is the chance that a clean batch fails
# any of them; it is split evenly between the families (Bonferroni across families), and each family splits its
# share over every test it makes (Bonferroni inside), so the batch's family-wise rate stays within the budget.
STATISTICAL_FAMILIES = ("labels", "pixels")  # the per-class label checks; the per-pixel trigger checks


def family_false_alarm_rate(config: ValidateConfig) -> float:
    """The share of ``config.false_alarm_rate`` one family of statistical checks may spend on a batch."""
    return config.false_alarm_rate / len(STATISTICAL_FAMILIES)


def label_failures(confusion: np.ndarray, joint: np.ndarray, reference: label_checks.LabelReference,
                   config: ValidateConfig) -> list[dict[str, Any]]:
    """The per-class label checks of a batch (its confusion and confident joint under the published model)
    against the reference, as failure dicts: each risen cell of the confident joint (``given`` label,
    ``predicted`` class: the confusion of confident predictions, see :mod:`admm_jobs.scoring.label_checks`) and
    each class (``given``; None: all classes) whose share of likely mislabelled images rose, with the observed
    share, the expected (the reference's) and the bound. Bonferroni over every test in the family."""
    test_level = family_false_alarm_rate(config) / label_checks.tests_per_batch(len(confusion))
    cells = label_checks.risen_cells(joint, reference.confident_joint, test_level, config.min_cell_excess,
                                     confusion.sum(axis=1), reference.confusion.sum(axis=1))
    classes = label_checks.risen_mislabelled(joint, confusion.sum(axis=1), reference.confident_joint,
                                             reference.confusion.sum(axis=1), test_level,
                                             config.min_class_mislabelled_excess, config.min_mislabelled_excess)

    def shares(risen: label_checks.RisenCell | label_checks.RisenMislabelled) -> dict[str, Any]:
        # "threshold": the bound on the share; "bound": how it bounds it (as the batch suites' failures say)
        return {"observed": risen.observed, "expected": risen.expected, "threshold": risen.bound, "bound": "at most",
                "p_value": risen.p_value, "test_level": test_level}

    return ([{"check": LABEL_CELL_CHECK, "given": cell.given, "predicted": cell.predicted, **shares(cell)}
             for cell in cells]
            + [{"check": MISLABELLED_CHECK, "given": share.given, **shares(share)} for share in classes])


def failure_text(batch: str, failure: Mapping[str, Any]) -> str:
    observed = failure["observed"]
    shown = f"{observed:.4g}" if isinstance(observed, float) else observed
    return f"batch {batch}: {failure['check']}: observed {shown}, {failure['bound']} {failure['threshold']}"


def batches_to_check(config: ValidateConfig, parts: list[Part]) -> list[str]:
    """Every batch of the dataset the reference was not trained on and no reviewer released (the registry
    history's decision overrules the checks, so a released batch is not refused again)."""
    released = registry.released_batches(config.registry_uri) if config.registry_uri else set()
    new = [part.name for part in parts if part.new and part.name != TEST_PART]
    if released.intersection(new):
        log.info("not checking batch(es) %s: released by a reviewer", sorted(released.intersection(new)))
    return [batch for batch in new if batch not in released]


def new_batch_checks(config: ValidateConfig, new: list[str], views: Mapping[str, Mapping[str, PartSplit]],
                     reference: Reference | None) -> dict[str, Check]:
    """The GX checks of the batches ``new`` (:func:`batches_to_check`)."""
    if not new:
        return {}
    parameters = batch_parameters(config, reference)
    suites = [load_suite(config.batch_suite, parameters)]
    if reference is not None:
        suites.append(load_suite(config.drift_suite, parameters))
    if reference is not None and reference.labels is None:
        # Only where the per-class label checks cannot run: the model's overall accuracy also falls on clean batches
        # shifted by 2 pixels (bench/README.md, "Poisoned batches"), which the label checks' confident joint allows.
        suites.append(load_suite(config.label_sanity_suite, parameters))
    combined = suites[0] if len(suites) == 1 else merged_suite(suites)
    return {f"batch={batch}": (combined, batch_frame(views[batch], reference), {}) for batch in new}


LABEL_CHECKS_WITHOUT_MODEL = "skipped: no published model (the first batch): nothing to compare its labels with"
LABEL_CHECKS_WITHOUT_REFERENCE = ("skipped: the published version has no reference calibration (published before "
                                  "they were stored); the coarse label sanity check runs instead")


def label_outcome(views: Mapping[str, PartSplit], reference: Reference | None,
                  config: ValidateConfig) -> tuple[str, list[dict[str, Any]]]:
    """The per-class label checks of one new batch (all its splits): what ran or why nothing did, and the
    failures (:func:`label_failures`)."""
    if reference is None:
        return LABEL_CHECKS_WITHOUT_MODEL, []
    if reference.labels is None:
        return LABEL_CHECKS_WITHOUT_REFERENCE, []
    confusion = np.sum([view.confusion for view in views.values()], axis=0)  # a new batch's splits were all read
    joint = np.sum([view.confident_joint for view in views.values()], axis=0)
    tests = label_checks.tests_per_batch(len(confusion))
    status = (f"ran: {tests} tests (every confusion cell, every class's and the overall mislabelled share), "
              f"each at level {family_false_alarm_rate(config) / tests:.3g}")
    return status, label_failures(confusion, joint, reference.labels, config)


def pixel_drift_failures(config: ValidateConfig, image_shape: list[int], views: Mapping[str, PartSplit],
                         reference: Reference) -> list[dict[str, Any]]:
    """The pixel drift check of a new batch (all its splits, ``views``) against the reference's images: one
    failure per class with drifted pixels (:mod:`admm_jobs.scoring.pixel_checks`). It gets half the batch's
    false-alarm budget (the label checks the other half), split over every class and pixel."""
    classes, pixels = reference.pixels.ink.shape
    batch = profiles.class_ink(profiles.merge_groups(view.groups for view in views.values()),
                               profiles.merge_ink(view.ink for view in views.values()), classes)
    level = family_false_alarm_rate(config) / pixel_checks.pixel_tests(classes, pixels)
    return [{"check": "pixel drift", "given": drifted.given, "pixels": [list(pixel) for pixel in drifted.pixels],
             "drifted_pixels": drifted.drifted, "observed": rounded(drifted.observed),
             "expected": rounded(drifted.expected), "threshold": rounded(drifted.bound), "bound": "at most"}
            for drifted in pixel_checks.drifted_classes(batch, reference.pixels, image_shape, level,
                                                        config.pixel_drift_margin)]


def rounded(shares: list[float]) -> list[float]:
    """Shares to 4 digits: what a reviewer reads, and a short record."""
    return [round(share, 4) for share in shares]


def merged_suite(suites: list[gx.ExpectationSuite]) -> gx.ExpectationSuite:
    """One suite holding the expectations of ``suites`` (named after them), so each batch is one asset."""
    import great_expectations as gx

    return gx.ExpectationSuite(name="+".join(suite.name for suite in suites),
                               expectations=[e for suite in suites for e in suite.expectations])


def quarantine(config: ValidateConfig, manifest: Mapping[str, Any], batch: str, failures: list[dict[str, Any]],
               result_uri: str, data_docs_uri: str, reference: Reference | None, label_status: str) -> dict[str, Any]:
    """Record a refused batch in the registry history (ingest leaves it out until a reviewer releases it) and its
    evidence in the lake."""
    lake_dataset = config.dataset_uri.rstrip("/").rsplit("/", 1)[0]
    record = {
        "batch": batch, "dataset_version": manifest["version"], "logical_date": config.logical_date,
        "failures": failures, "result_uri": result_uri, "data_docs_uri": data_docs_uri,
        "reference_dataset": reference.dataset_uri if reference else None, "label_checks": label_status,
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
    reference = load_reference(config.registry_uri)
    parts = dataset_parts(dataset_uri, manifest, reference)
    views = {part.name: read_part(part, reference, config.chunk_rows) if part.new else stored_part(part)
             for part in parts}
    frames = split_frames(parts, views, match_ids(views))
    checks: dict[str, Check] = {split: (suite, frames[split], expectation_parameters(manifest, split))
                                for split in SPLITS}
    new = batches_to_check(config, parts)
    checks.update(new_batch_checks(config, new, views, reference))
    labels = {batch: label_outcome(views[batch], reference, config) for batch in new}
    pixel_failures = {batch: pixel_drift_failures(config, manifest["image_shape"], views[batch], reference)
                      for batch in new if reference is not None}
    validation_uri = storage.join(dataset_uri, VALIDATION_DIR)
    result_uri = storage.join(validation_uri, RESULT_FILE)
    data_docs_uri = storage.join(validation_uri, DATA_DOCS_DIR)
    with tempfile.TemporaryDirectory(prefix="gx-data-docs-") as data_docs_dir:
        run_name = f"{manifest['dataset']}-{manifest['version']}"
        results = run_suites(checks, data_docs_dir, run_name)
        serialised = {name: result.to_json_dict() for name, result in results.items()}
        # the statistical checks' failures go with GX's: they refuse the batch the same way
        failed = {name.removeprefix("batch="): check_failures(result["results"])
                  for name, result in serialised.items() if name.startswith("batch=")}
        statistical = {batch: labels[batch][1] + pixel_failures.get(batch, []) for batch in failed}
        refused = {batch: failures + statistical[batch] for batch, failures in failed.items()
                   if failures or statistical[batch]}
        success = all(result["success"] for result in serialised.values()) and not refused
        stage_result = {
            "dataset_uri": dataset_uri,
            "success": success and not refused,
            "result_uri": result_uri,
            "data_docs_uri": storage.join(data_docs_uri, "index.html"),
            "statistics": summary_statistics(serialised),
            "checked_batches": [name.removeprefix("batch=") for name in serialised if name.startswith("batch=")],
            "reference_dataset": reference.dataset_uri if reference else None,
            "label_checks": {batch: status for batch, (status, _) in labels.items()},
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
                                         stage_result["data_docs_uri"], reference, labels[batch][0])
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
