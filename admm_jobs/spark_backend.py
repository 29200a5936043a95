"""Where the sample blocks live on Spark: in files on the executor that loaded them.

:class:`SparkBackend` implements the trainer's backend (:class:`admm_jobs.trainer.Backend`):
each block's data and ADMM state stay in :class:`admm_jobs.block_store.BlockStore` files in
the executor's scratch directory, and Spark caches one small handle per block, so every later
task of a block is scheduled where its files are. A pass is one Spark job whose only result is
the reduction of the blocks' statistics; the weights travel as a broadcast.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from admm_jobs.block_store import BlockStore
from admm_jobs.trainer import Block, BlocksLost, PassFunction, Stats, add_stats

BlockLoader = Callable[[dict[str, Any]], Block]


def _executor_store(token: str) -> BlockStore:
    """This executor's block store of one backend (in the executor's own scratch directory)."""
    from pyspark import SparkFiles

    return BlockStore(Path(SparkFiles.getRootDirectory()) / f"admm-blocks-{token}")


def _store_block(token: str, loader: BlockLoader, spec: dict[str, Any]) -> int:
    _executor_store(token).save_data(loader(spec))
    return spec["index"]


def _stored_pass(token: str, function: PassFunction, broadcast, generation: int, update: bool, index: int) -> Stats:
    store = _executor_store(token)
    started = time.perf_counter()
    block = store.load(index, generation)
    reading = time.perf_counter() - started
    block, stats = function(block, broadcast.value)
    started = time.perf_counter()
    if update:
        store.save_state(block, generation + 1)
    return {**stats, "store_seconds": reading + time.perf_counter() - started}


def _remove_block(token: str, index: int) -> None:
    _executor_store(token).remove(index)


class SparkBackend:
    """Blocks stay in files on the executor that loaded them (:mod:`admm_jobs.block_store`).

    ``specs`` says what each block holds (one Spark partition per spec) and ``loader``
    builds a block from its spec on an executor (``train.load_block`` for the lake's
    Parquet splits).
    """

    def __init__(self, spark_context, specs: list[dict[str, Any]], loader: BlockLoader):
        from pyspark import StorageLevel

        self.sc = spark_context
        self.specs, self.loader, self.storage_level = specs, loader, StorageLevel.MEMORY_AND_DISK
        self._load()

    def _load(self) -> None:
        self.token = uuid.uuid4().hex
        self.handles = self.sc.parallelize(self.specs, len(self.specs)).map(
            functools.partial(_store_block, self.token, self.loader)).persist(self.storage_level)
        self.generation = 0  # the state generation the next pass reads (0: data only)

    def reload(self) -> None:
        # the surviving executors' old block files are left to go with their scratch directories:
        # removing them now would recompute the lost handles, i.e. re-read their data, only to delete it
        self.handles.unpersist()
        self._load()

    def _reduce(self, function: PassFunction, params: dict[str, Any], update: bool) -> Stats:
        broadcast = self.sc.broadcast(params)
        try:
            # aggregate() merges partition results on the driver in partition order, so
            # the float sums (and hence the weights) do not depend on task timing.
            return self.handles.map(functools.partial(_stored_pass, self.token, function, broadcast,
                                                      self.generation, update)).aggregate({}, add_stats, add_stats)
        except Exception as exc:
            lost = re.search(r"BlockStateLost: (.*)", str(exc))
            if lost:
                raise BlocksLost(lost.group(1)) from exc
            raise
        finally:
            broadcast.unpersist(blocking=False)

    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        stats = self._reduce(function, params, update=True)
        self.generation += 1
        return stats

    def inspect(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        return self._reduce(function, params, update=False)

    def close(self) -> None:
        self.handles.foreach(functools.partial(_remove_block, self.token))
        self.handles.unpersist()
