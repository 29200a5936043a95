"""Ingest stage: MNIST-format IDX files, landed in dated batches, -> versioned Parquet datasets in the lake.

    python -m admm_jobs.ingest --source SRC --lake LAKE [--dataset mnist] [--as-of YYYY-MM-DD]
        [--window N] [--validation-fraction 0.0833] [--chunk-rows 10000] [--checksums URI] [--executor spark]
    spark-submit admm_jobs/ingest.py --source SRC --lake LAKE --executor spark [...]

Reads the landing directory ``SRC`` (its contract: :mod:`admm_jobs.lake.landing`; each file raw or
gzip, every structural defect an :class:`IngestError` naming the file), streamed ``chunk_rows`` images at a
time so that memory does not depend on a batch's size, and writes the lake
(:mod:`admm_jobs.lake.batches`): each batch once, reused afterwards, and refused when its content
changed under the same date. The run for logical date ``as_of`` uses every batch dated on or before
it that the registry history does not hold in quarantine (the newest ``window`` of them if set); the dataset version is a hash of
those batches' contents, the test set and the split rule, so the same batches always give the same
version.

Each batch's work (read, check, hash, write its parts, profile, key filter) does not depend on the other
batches: ``--executor worker`` (the default; the weekly increment reads one new batch) does it in this process, one
batch after another; ``--executor spark`` (an initial load or a backfill of many batches, under spark-submit on
the training job's deploy targets) runs it as Spark tasks, one batch per task, and the driver collects only each
batch's small record. Both check every batch before any is written and assemble the same manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import require, setting, validate_fields
from admm_jobs.lake import batches, landing, profiles, storage
from admm_jobs.lake.dataset import MANIFEST_FILE, dataset_uri
from admm_jobs.lake.idx import IngestError, SourceFile, scan_source
from admm_jobs.lake.landing import CHECKSUMS_FILE, LandedBatch, parse_date
from admm_jobs.registry import store as registry

log = logging.getLogger("admm_jobs.ingest")

EXECUTORS = ("worker", "spark")
SPARK_APP_NAME = "admm-mnist-ingest"


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Ingest the batches landed at SOURCE (up to a logical date) into a versioned Parquet dataset in LAKE."""

    source: str = setting(help="landing directory URI: test files plus batches/YYYY-MM-DD/ (or four IDX files)",
                          minLength=1)
    lake: str = setting(help="lake root URI; the dataset goes to LAKE/<dataset>/<version>", minLength=1)
    dataset: str = setting("mnist", "dataset name in the lake")
    as_of: str | None = setting(None, "logical date YYYY-MM-DD: use the batches dated on or before it (none: all)")
    window: int | None = setting(None, "use only the newest N of those batches (none: all)", minimum=1, maximum=100_000)
    validation_fraction: float = setting(1 / 12, "share of each batch's images held out for validation, "
                                         "drawn per image from a hash of its pixels", exclusiveMinimum=0, maximum=0.5)
    registry_uri: str | None = setting(None, "model registry root: the batches its history holds in quarantine "
                                       "(quarantined, not released by a reviewer) are left out (none: none are)")
    chunk_rows: int = setting(profiles.CHUNK_ROWS, "images decoded and written at once (memory holds one chunk, "
                              "whatever the batch size)", minimum=1, maximum=1_000_000)
    checksums: str | None = setting(
        None, f"checksum manifest URI for a four-file source (default: SOURCE/{CHECKSUMS_FILE} if present; "
        "required for https)")
    executor: str = setting("worker", "where each batch is read, checked and written: worker (this process, one "
                            "batch after another) or spark (one Spark task per batch, for an initial load or a "
                            "backfill; run under spark-submit)", enum=list(EXECUTORS))

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.dataset) is not None,
            f"--dataset {self.dataset!r}: use letters, digits, '_', '.', '-'",
        )
        require(self.as_of is None or parse_date(self.as_of) is not None,
                f"--as-of {self.as_of!r}: expected a date YYYY-MM-DD")


def held_in_quarantine(config: IngestConfig) -> set[str]:
    """The batch ids the registry history holds in quarantine; none without a registry."""
    return registry.quarantined_batches(config.registry_uri) if config.registry_uri else set()


def selected_batches(config: IngestConfig) -> tuple[list[LandedBatch], list[str]]:
    """The landed batches the run uses (dated on or before ``as_of``, not quarantined, newest ``window``),
    and the ids of the quarantined ones left out."""
    landed = landing.landed_batches(config.source)
    if config.as_of is not None:
        as_of = parse_date(config.as_of).isoformat()
        landed = [batch for batch in landed if batch.date is None or batch.date <= as_of]
    held = held_in_quarantine(config)
    quarantined = [batch.date for batch in landed if batch.date in held]
    landed = [batch for batch in landed if batch.date not in quarantined]
    if config.window is not None:
        landed = landed[-config.window:]
    if not landed:
        raise IngestError(f"{storage.join(config.source, landing.BATCHES_DIR)}: no batch dated on or before "
                          f"{config.as_of}" + (f" (quarantined: {quarantined})" if quarantined else ""))
    return landed, quarantined


def absolute(uri: str) -> str:
    """Plain local paths made absolute, so recorded URIs do not depend on the working directory."""
    return str(storage.local_path(uri).resolve()) if storage.scheme(uri) == "" else uri


def checked_batch(config: IngestConfig, lake_dataset: str, batch: LandedBatch, test_pair: dict[str, SourceFile]
                  ) -> tuple[str, dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Check a landed batch before anything is written: (its content sha256, the record pinning it if it was
    ingested before, summaries of the files read). A pinned batch's files are read only where their signature
    differs from the one recorded at ingest, and refused when their content changed."""
    pinned = batches.pinned_batch(lake_dataset, batch.date) if batch.date else None
    if pinned is not None:
        read = {role: scan_source(batch.uri, *landing.SOURCE_FILES[role], config.chunk_rows)
                for role in batches.changed_roles(pinned, batch)}
        for role, source in read.items():
            batches.check_unchanged(pinned, source, role)
        return pinned["sha256"], pinned, {role: source.summary() for role, source in read.items()}
    checksums = landing.load_checksums(config.source, config.checksums) if batch.date is None \
        else landing.load_checksums(batch.uri)
    pair = landing.scan_pair(batch.uri, landing.TRAIN_ROLES, checksums, config.chunk_rows)
    landing.check_distinct({**pair, **test_pair})
    return batches.pair_sha256(pair), None, {role: source.summary() for role, source in pair.items()}


# How the per-batch work is run: ``map_batches(work, items)`` returns ``[work(item) for item in items]``.
BatchMap = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def in_process(work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The worker's way: one batch after another in this process; the first failure stops the run."""
    return [work(item) for item in items]


@dataclasses.dataclass(frozen=True)
class BatchRefused:
    """A Spark task's :class:`IngestError`, returned rather than raised: a refused input is deterministic, so Spark
    must not retry it, and the driver raises it again with the worker path's message."""

    message: str


def refusal_returned(work: Callable[[Any], Any], item: Any) -> Any:
    try:
        return work(item)
    except IngestError as error:
        return BatchRefused(str(error))


def spark_map(spark_context) -> BatchMap:
    """One Spark task per batch; the driver receives each batch's small result. Of several refused batches the
    oldest is reported, as the worker path would; other failures (storage hiccups) keep Spark's task retries."""
    def map_batches(work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        results = spark_context.parallelize(list(items), max(1, len(items))).map(
            functools.partial(refusal_returned, work)).collect()
        refused = next((result for result in results if isinstance(result, BatchRefused)), None)
        if refused is not None:
            raise IngestError(refused.message)
        return results
    return map_batches


def written_batch(config: IngestConfig, lake_dataset: str, checked: tuple[LandedBatch, tuple]
                  ) -> tuple[str, dict[str, Any], bool]:
    """Write a checked batch's splits (unless an intact copy exists) and pin it: (its splits directory, their
    record, whether nothing was written)."""
    batch, (sha, pinned, read) = checked
    splits_uri, record, reused = batches.ingest_batch(
        lake_dataset, batch, sha, config.validation_fraction,
        functools.partial(landing.PairStream, batch.uri, landing.TRAIN_ROLES), config.chunk_rows)
    written = batches.pin_batch(lake_dataset, batch, sha, pinned, read)
    return splits_uri, record, reused and not written


def ingest(config: IngestConfig, map_batches: BatchMap = in_process) -> dict[str, Any]:
    """Ingest the batches of ``config.source`` up to ``config.as_of`` into the lake, each batch's work run by
    ``map_batches``; return the stage result."""
    lake_dataset = storage.join(config.lake, config.dataset)
    landed, quarantined = selected_batches(config)
    fraction = config.validation_fraction
    four_file_source = landed[0].date is None
    test_pair = landing.scan_pair(config.source, landing.TEST_ROLES, landing.load_checksums(
        config.source, config.checksums if four_file_source else None), config.chunk_rows)
    # Every input is checked before anything is written, streamed one chunk at a time: a new batch is read
    # again to be written (and must hash the same), a batch ingested before only where its files' signatures
    # changed.
    checked = map_batches(functools.partial(checked_batch, config, lake_dataset, test_pair=test_pair), landed)
    test_uri, test_record, test_reused = batches.ingest_test_set(
        lake_dataset, test_pair, functools.partial(landing.PairStream, config.source, landing.TEST_ROLES),
        config.chunk_rows)
    written = map_batches(functools.partial(written_batch, config, lake_dataset), list(zip(landed, checked)))
    parts = [(splits_uri, record) for splits_uri, record, _ in written]
    reused_parts = [test_reused, *(reused for _, _, reused in written)]
    train_rows = sum(record["splits"]["train"]["rows"] for _, record in parts)
    if train_rows == 0:
        raise IngestError(f"{landed[-1].uri}: no training rows left after holding out "
                          f"{fraction:.4g} of the images for validation")
    version = batches.dataset_version([record for _, record in parts], test_record["sha256"], fraction)
    target = dataset_uri(config.lake, config.dataset, version)
    manifest_uri = storage.join(target, MANIFEST_FILE)
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
    else:
        reused_parts.append(False)
        manifest = batches.assemble_manifest(config.dataset, version, target, parts, (test_uri, test_record),
                                             fraction)
        with storage.staged_directory(target) as staging:
            storage.write_json(storage.join(staging, MANIFEST_FILE), manifest)
    if quarantined:
        log.warning("left out quarantined batch(es) %s (registry history %s; evidence in %s)", quarantined,
                    registry.history_uri(config.registry_uri), storage.join(lake_dataset, batches.QUARANTINE_DIR))
    return {
        "dataset_uri": target,
        "dataset_version": version,
        "rows": {split: entry["rows"] for split, entry in manifest["splits"].items()},
        "batches": [batch["id"] for batch in manifest["batches"]],
        "quarantined": quarantined,
        "reused": all(reused_parts),  # nothing was written
    }


def ingest_dataset(source: str, lake: str, map_batches: BatchMap = in_process, **settings: Any) -> dict[str, Any]:
    """Ingest with local paths made absolute (see :class:`IngestConfig` for ``settings``)."""
    checksums = settings.pop("checksums", None)
    return ingest(IngestConfig(source=absolute(source), lake=absolute(lake),
                               checksums=None if checksums is None else absolute(checksums), **settings), map_batches)


def run_ingest(config: IngestConfig) -> dict[str, Any]:
    """Ingest on the executor ``config.executor`` names (spark: in this process's Spark session, as spark-submit
    starts it)."""
    settings = dataclasses.asdict(config)
    if config.executor == "worker":
        return ingest_dataset(**settings)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName(SPARK_APP_NAME).getOrCreate()
    try:
        return ingest_dataset(**settings, map_batches=spark_map(spark.sparkContext))
    finally:
        spark.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(IngestConfig, run_ingest, argv)


if __name__ == "__main__":
    main()
