"""Sums of per-sample statistics that come out bit-identical however the samples are partitioned.

Floating-point addition is commutative but not associative, so a sum's last bits depend on the
order of its terms: with one term per partition, the weights would change with the partition
count (the cluster size). Here the terms are fixed-size *chunks* of rows instead: each split's
rows are cut into chunks of ``chunk_rows`` in their global order (:func:`chunk_count`), every chunk's statistics are
computed on their own, and chunks are summed along one fixed binary tree over the chunk indices,

    node(level, i) = node(level - 1, 2i) + node(level - 1, 2i + 1),   leaves node(0, c) = chunk c,

a node whose right child lies past the last chunk being its left child unchanged. Every node's
value is then fixed by the rows alone, whichever process adds its two children, in whichever
order (``a + b == b + a`` exactly). A block of consecutive chunks (a partition starts on a chunk
boundary) sums the largest tree nodes inside its range (:func:`chunk_partial`); partials of any
blocks merge by adding siblings (:func:`merge`); the root of each split is the total
(:func:`total`). Where the partials are merged (on the executors, in any grouping) does not
change the result, which is what lets Spark combine them in a tree.

Statistics of different splits (``train``, ``validation``, ``test``) have disjoint keys and
separate trees. Timers (``<phase>_seconds``) are measurements, summed in any order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

Stats = dict[str, Any]
Node = tuple[str, int, int]  # (split, level, index): rows [index * 2^level, (index + 1) * 2^level) of its chunks
DEFAULT_CHUNK_ROWS = 1024


def add_stats(left: Stats, right: Stats) -> Stats:
    """Sum two statistics dicts key by key (keys missing on one side are kept)."""
    total = dict(left)
    for key, value in right.items():
        total[key] = total[key] + value if key in total else value
    return total


def chunk_count(rows: int, chunk_rows: int) -> int:
    """Chunks that ``rows`` rows make: ``chunk_rows`` rows each, the last one taking the remainder too.

    (A remainder of its own could be a single row, and a one-row product takes another BLAS path
    (gemv) whose last bits differ: every chunk has at least ``chunk_rows`` rows, or all of them.)
    """
    return max(1, rows // chunk_rows) if rows else 0


def chunk_starts(rows: int, chunk_rows: int) -> list[int]:
    """The first row of every chunk of ``rows`` rows, then ``rows``: a block is the rows between two of them."""
    return [chunk * chunk_rows for chunk in range(chunk_count(rows, chunk_rows))] + [rows]


def block_bounds(rows: int, blocks: int, chunk_rows: int) -> list[int]:
    """Row bounds of ``blocks`` near-equal blocks of whole chunks: block b holds rows [bounds[b], bounds[b + 1])."""
    starts = chunk_starts(rows, chunk_rows)
    chunks = len(starts) - 1
    return [starts[round(block * chunks / blocks)] for block in range(blocks + 1)]


def tree_height(chunks: int) -> int:
    """The level of the root over ``chunks`` leaves: the smallest h with 2^h >= chunks."""
    return max(chunks - 1, 0).bit_length()


@dataclasses.dataclass
class Partial:
    """Summed tree nodes of some chunks, the chunk count of each split, timers, and per-block values
    that add exactly in any order (counts of blocks; or one key per block)."""

    nodes: dict[Node, Stats] = dataclasses.field(default_factory=dict)
    chunks: dict[str, int] = dataclasses.field(default_factory=dict)
    timers: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def split_by_ancestor(self, levels: dict[str, int]) -> list[tuple[tuple[str, int], Partial]]:
        """This partial cut by the ancestor of its nodes at ``levels[split]``: ``((split, ancestor index), piece)``,
        the timers and counts going with the first piece. A node above that level keys by its first descendant there.

        Pieces of all blocks with the same key merge into that ancestor alone: with one reducer per key,
        the reducers return as many nodes as there are ancestors.
        """
        groups: dict[tuple[str, int], Partial] = {}
        for (split, level, index), stats in self.nodes.items():
            target = levels[split]
            key = (split, index >> (target - level) if level <= target else index << (level - target))
            groups.setdefault(key, Partial(chunks=self.chunks)).nodes[(split, level, index)] = stats
        pieces = sorted(groups.items()) or [((min(levels), 0), Partial(chunks=self.chunks))]  # (a block without rows)
        pieces[0][1].timers, pieces[0][1].counts = dict(self.timers), dict(self.counts)
        return pieces


def ancestor_levels(chunks: dict[str, int], most: int) -> dict[str, int]:
    """Per split, the lowest tree level with at most ``most`` nodes."""
    return {split: next(level for level in range(tree_height(count) + 1) if -(-count >> level) <= most)
            for split, count in chunks.items()}


def node_count(partials: Iterable[Partial]) -> dict[str, int]:
    """How many nodes of each split the partials hold."""
    counts: dict[str, int] = {}
    for partial in partials:
        for split, _, _ in partial.nodes:
            counts[split] = counts.get(split, 0) + 1
    return counts


def _collapse(nodes: dict[Node, Stats], chunks: dict[str, int]) -> dict[Node, Stats]:
    """Replace every pair of sibling nodes by their parent (left + right), and a node whose right
    sibling covers no chunk by its parent (itself), until no more can be replaced."""
    nodes = dict(nodes)
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node not in nodes:
            continue  # already merged into its parent
        split, level, index = node
        if level >= tree_height(chunks[split]):
            continue
        left, right = (split, level, index & ~1), (split, level, index | 1)
        if left in nodes and right in nodes:
            parent_stats = add_stats(nodes.pop(left), nodes.pop(right))
        elif node == left and (right[2] << level) >= chunks[split]:
            parent_stats = nodes.pop(left)
        else:
            continue  # the sibling is elsewhere (or not yet made: making it will merge the two)
        parent = (split, level + 1, index >> 1)
        nodes[parent] = parent_stats
        pending.append(parent)
    return nodes


def merge(left: Partial, right: Partial) -> Partial:
    """The partial of both partials' chunks (their chunk ranges must not overlap)."""
    overlap = left.nodes.keys() & right.nodes.keys()
    if overlap:
        raise ValueError(f"tree nodes {sorted(overlap)} summed twice: blocks overlap")
    chunks = {**left.chunks, **right.chunks}
    return Partial(_collapse({**left.nodes, **right.nodes}, chunks), chunks, add_stats(left.timers, right.timers),
                   add_stats(left.counts, right.counts))


def merge_all(partials: Iterable[Partial]) -> Partial:
    """All partials merged (in any order: the result is the same)."""
    result = Partial()
    for partial in partials:
        result = merge(result, partial)
    return result


def total(partial: Partial) -> Stats:
    """The sums over every chunk of every split (the roots of their trees) plus the timers and counts.

    Raises ValueError when chunks are missing, i.e. some block's statistics never arrived.
    """
    nodes = _collapse(partial.nodes, partial.chunks)
    stats: Stats = {}
    for split, chunks in sorted(partial.chunks.items()):
        roots = [node for node in nodes if node[0] == split]
        if chunks and roots != [(split, tree_height(chunks), 0)]:
            raise ValueError(f"{split}: the statistics of some chunks are missing (partial nodes {sorted(roots)})")
        for root in roots:
            stats = add_stats(stats, nodes[root])
    return {**stats, **partial.counts, **{f"{name}_seconds": seconds for name, seconds in partial.timers.items()}}


def chunk_partial(split: str, first_row: int, rows: int, total_rows: int, chunk_rows: int,
                  summarize: Callable[[slice], Stats]) -> Partial:
    """The partial of a block's ``rows`` rows of ``split``, global rows ``first_row`` onwards of
    ``total_rows`` (whole chunks): ``summarize(local row slice)`` gives one chunk's statistics.

    Chunks are merged as they come, so at most one node per tree level is held at a time.
    """
    chunks = chunk_count(total_rows, chunk_rows)
    partial = Partial(chunks={split: chunks})
    for chunk, rows_of_chunk in chunk_slices(split, first_row, rows, total_rows, chunk_rows):
        partial = merge(partial, Partial({(split, 0, chunk): summarize(rows_of_chunk)}, {split: chunks}))
    return partial


def chunk_slices(split: str, first_row: int, rows: int, total_rows: int, chunk_rows: int) -> list[tuple[int, slice]]:
    """(global chunk index, local row slice) of each chunk in a block's ``rows`` rows of ``split``, which
    start at global row ``first_row`` of ``total_rows``; ValueError unless they are whole chunks."""
    starts = chunk_starts(total_rows, chunk_rows)
    if first_row not in starts or first_row + rows not in starts:
        raise ValueError(f"{split}: a block of rows [{first_row}, {first_row + rows}) is not made of whole chunks "
                         f"of {chunk_rows} rows (of {total_rows})")
    return [(chunk, slice(starts[chunk] - first_row, starts[chunk + 1] - first_row))
            for chunk in range(starts.index(first_row), starts.index(first_row + rows))]
