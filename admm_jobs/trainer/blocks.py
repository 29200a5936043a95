"""Which rows of the dataset each Spark partition (sample block) reads, and reading them on the executor."""

from __future__ import annotations

from typing import Any

import numpy as np

from admm_jobs.lake import dataset, storage
from admm_jobs.trainer import reduction
from admm_jobs.trainer.loop import Block, make_block

RowSlice = tuple[str, int, int]  # (part file URI, first row, end row)


def split_rows(files: list[tuple[str, int]], limit: int | None) -> int:
    """The rows of a split that training reads: the first ``limit`` (all without one)."""
    total = sum(rows for _, rows in files)
    return total if limit is None else min(total, limit)


def default_partitions(rows: int, cores: int, block_rows: int) -> int:
    """max(cores, ceil(rows / block_rows)): one block per core (each pass is then one wave of tasks, whose fixed
    cost is paid once per core), more when a block would exceed ``block_rows`` rows: a pass holds its block's
    state in one Python worker's memory, so the block size, not the dataset size, bounds a worker's memory."""
    return max(cores, -(-rows // block_rows))


def partition_slices(files: list[tuple[str, int]], limit: int | None, partitions: int,
                     chunk_rows: int = reduction.DEFAULT_CHUNK_ROWS) -> list[list[RowSlice]]:
    """Cut the first ``limit`` rows of a split (part files with row counts) into near-equal contiguous
    ranges of whole reduction chunks (``reduction.block_bounds``)."""
    bounds = reduction.block_bounds(split_rows(files, limit), partitions, chunk_rows)
    slices: list[list[RowSlice]] = [[] for _ in range(partitions)]
    offset = 0
    for uri, rows in files:
        for part in range(partitions):
            start, end = max(bounds[part], offset), min(bounds[part + 1], offset + rows)
            if start < end:
                slices[part].append((uri, start - offset, end - offset))
        offset += rows
    return slices


def read_slices(row_slices: list[RowSlice]) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate row ranges of part files (runs on the executors)."""
    pixels, labels = [], []
    for uri, start, end in row_slices:
        file_pixels, file_labels = dataset.read_parquet_file(uri)
        pixels.append(file_pixels[start:end])
        labels.append(file_labels[start:end])
    if not pixels:
        return np.zeros((0, dataset.PIXELS_PER_IMAGE), np.uint8), np.zeros(0, np.int8)
    return np.concatenate(pixels), np.concatenate(labels)


def load_block(spec: dict[str, Any]) -> Block:
    """Build one partition's block from its row ranges of every split."""
    pixels, labels = read_slices(spec["train"])
    evaluation = {split: read_slices(spec[split]) for split in ("validation", "test")}
    return make_block(spec["index"], pixels, labels, evaluation, spec["rows"], spec["chunk_rows"])


def block_specs(dataset_uri: str, partitions: int, train_limit: int | None,
                chunk_rows: int = reduction.DEFAULT_CHUNK_ROWS) -> list[dict[str, Any]]:
    """Per partition, which rows of which part files it reads and where they lie in each split
    (computed from the manifest only)."""
    manifest = dataset.load_manifest(dataset_uri)
    per_split, totals = {}, {}
    for split in dataset.SPLITS:
        files = [(storage.join(dataset_uri, entry["path"]), int(entry["rows"]))
                 for entry in manifest["splits"][split]["files"]]
        limit = train_limit if split == "train" else None
        totals[split] = split_rows(files, limit)
        per_split[split] = partition_slices(files, limit, partitions, chunk_rows)
    bounds = {split: reduction.block_bounds(totals[split], partitions, chunk_rows) for split in dataset.SPLITS}
    return [{"index": part, **{split: per_split[split][part] for split in dataset.SPLITS},
             "rows": {split: (bounds[split][part], totals[split]) for split in dataset.SPLITS}, "chunk_rows": chunk_rows}
            for part in range(partitions)]
