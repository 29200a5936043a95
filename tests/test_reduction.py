"""The chunk-tree sums: the same bits however the rows are cut into blocks and the partials grouped."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from admm_jobs.trainer import reduction

ROWS, CHUNK_ROWS = 1000, 16
VALUES = np.random.default_rng(7).normal(size=(ROWS, 6)) * 10.0 ** np.random.default_rng(8).integers(-8, 8, (ROWS, 1))


def summarize(first: int):
    def of_rows(rows: slice) -> reduction.Stats:
        chunk = VALUES[first + rows.start:first + rows.stop]
        return {"sum": chunk.sum(axis=0), "squares": float((chunk ** 2).sum()), "count": len(chunk)}
    return of_rows


def block_partials(blocks: int, rows: int = ROWS) -> list[reduction.Partial]:
    bounds = reduction.block_bounds(rows, blocks, CHUNK_ROWS)
    return [reduction.chunk_partial("train", start, end - start, rows, CHUNK_ROWS, summarize(start))
            for start, end in itertools.pairwise(bounds)]


def test_chunks_have_at_least_chunk_rows_rows():
    assert reduction.chunk_starts(50, 16) == [0, 16, 32, 50]  # the remainder joins the last chunk
    assert reduction.chunk_starts(10, 16) == [0, 10]
    assert reduction.chunk_starts(0, 16) == [0]
    assert reduction.block_bounds(50, 5, 16) == [0, 16, 16, 32, 32, 50]  # more blocks than chunks: some empty


def test_the_total_is_bit_identical_for_any_blocks_and_any_merge_order():
    reference = reduction.total(reduction.merge_all(block_partials(1)))
    assert reference["count"] == ROWS
    # the order of the terms matters in floating point: the plain sum differs from the tree's
    assert not np.array_equal(VALUES.sum(axis=0), reference["sum"])
    shuffler = random.Random(3)
    for blocks in (2, 3, 7, 62, 80):
        partials = block_partials(blocks)
        shuffler.shuffle(partials)
        total = reduction.total(reduction.merge_all(partials))
        np.testing.assert_array_equal(total["sum"], reference["sum"])
        assert total["squares"] == reference["squares"] and total["count"] == ROWS


def test_grouping_by_ancestor_merges_each_group_into_one_node():
    partials = block_partials(9)
    levels = reduction.ancestor_levels({"train": reduction.chunk_count(ROWS, CHUNK_ROWS)}, most=4)
    groups: dict = {}
    for partial in partials:
        for key, piece in partial.split_by_ancestor(levels):
            groups[key] = reduction.merge(groups[key], piece) if key in groups else piece
    assert len(groups) <= 4 and all(len(group.nodes) == 1 for group in groups.values())
    reference = reduction.total(reduction.merge_all(block_partials(1)))
    total = reduction.total(reduction.merge_all(groups.values()))
    np.testing.assert_array_equal(total["sum"], reference["sum"])


def test_timers_are_summed_and_reported_as_seconds():
    first, second = block_partials(2)
    first.timers, second.timers = {"worker": 1.5}, {"worker": 2.0, "store": 0.5}
    total = reduction.total(reduction.merge(first, second))
    assert total["worker_seconds"] == 3.5 and total["store_seconds"] == 0.5


def test_missing_overlapping_and_misaligned_blocks_are_refused():
    partials = block_partials(4)
    with pytest.raises(ValueError, match="some chunks are missing"):
        reduction.total(reduction.merge_all(partials[:3]))
    with pytest.raises(ValueError, match="summed twice"):
        reduction.merge(partials[0], partials[0])
    with pytest.raises(ValueError, match="not made of whole chunks"):
        reduction.chunk_partial("train", 8, 16, ROWS, CHUNK_ROWS, summarize(8))
