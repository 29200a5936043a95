"""Where the sample blocks live on Spark: in files on the executor that loaded them.

:class:`SparkBackend` implements the trainer's backend (:class:`admm_jobs.trainer.loop.Backend`):
each block's data and ADMM state stay in :class:`admm_jobs.trainer.block_store.BlockStore` files in
the executor's scratch directory, and Spark caches one small handle per block, so every later
task of a block is scheduled where its files are. A pass is one Spark job whose only result is
the reduction of the blocks' statistics; the weights travel as a broadcast.

The statistics are summed on the executors along the fixed tree of :mod:`admm_jobs.trainer.reduction`:
each block's partial is cut by its nodes' ancestors at a level with at most ``result_nodes`` nodes
per split, one reducer task per ancestor sums its subtree, and the driver receives those few
ancestors, whatever the partition count, and adds them up. The sums, hence the weights, are the
same for any partitioning.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from admm_jobs.trainer import reduction
from admm_jobs.trainer.block_store import BlockStore
from admm_jobs.trainer.loop import Block, BlocksLost, PassFunction
from admm_jobs.trainer.reduction import Partial, Stats

BlockLoader = Callable[[dict[str, Any]], Block]
EXECUTOR_WATCH_SECONDS = 0.5  # how often a running pass checks that its executors are still there
DEFAULT_RESULT_NODES = 8


STORE_PREFIX = "admm-blocks-"


def executor_scratch_directory() -> Path:
    """A directory of this executor that the cluster manager deletes with the application, however it ends.

    A standalone worker passes its executors the application's local directories in
    ``SPARK_EXECUTOR_DIRS`` (Spark's own contract with its executors; the Python workers inherit
    it) and deletes them when the application ends, also when the driver was killed; the
    executor's working directory there outlives the application (it keeps the executor logs).
    Elsewhere the working directory (``SparkFiles``' root) is the one that goes: the YARN
    container's or the Kubernetes pod's directory, or in local mode the driver's temporary
    directory, removed when it stops.
    """
    local_dirs = os.environ.get("SPARK_EXECUTOR_DIRS")
    if local_dirs:
        return Path(local_dirs.split(os.pathsep)[0])
    from pyspark import SparkFiles

    return Path(SparkFiles.getRootDirectory())


def _executor_store(token: str) -> BlockStore:
    """This executor's block store of one backend."""
    return BlockStore(executor_scratch_directory() / f"{STORE_PREFIX}{token}")


def _store_block(token: str, loader: BlockLoader, stale_tokens: tuple[str, ...], spec: dict[str, Any]) -> int:
    # the files of an earlier load (before a reload) go when this executor loads its new blocks
    for stale in stale_tokens:
        shutil.rmtree(executor_scratch_directory() / f"{STORE_PREFIX}{stale}", ignore_errors=True)
    _executor_store(token).save_data(loader(spec))
    return spec["index"]


def _stored_pass(token: str, function: PassFunction, broadcast, generation: int, update: bool, index: int) -> Partial:
    store = _executor_store(token)
    started = time.perf_counter()
    block = store.load(index, generation)
    reading = time.perf_counter() - started
    block, partial = function(block, broadcast.value)
    started = time.perf_counter()
    if update:
        store.save_state(block, generation + 1)
    partial.timers["store"] = reading + time.perf_counter() - started
    return partial


def _ancestor_pieces(levels: dict[str, int], offsets: dict[str, int], partial: Partial) -> list[tuple[int, Partial]]:
    """A block's partial cut by ancestor, keyed by the ancestor's ordinal (the reducer that sums it)."""
    return [(offsets[split] + index, piece) for (split, index), piece in partial.split_by_ancestor(levels)]


def _identity(key: int) -> int:
    return key


def driver_result_budget(spark_context) -> int:
    """The bytes that ``spark.driver.maxResultSize`` lets one job's task results add up to (0: no limit)."""
    setting = spark_context.getConf().get("spark.driver.maxResultSize", "1g")
    limit = spark_context._jvm.org.apache.spark.network.util.JavaUtils.byteStringAsBytes(setting)
    return limit if limit > 0 else 2**62


def _count(handles) -> list[int]:
    return [sum(1 for _ in handles)]


def _remove_block(token: str, index: int) -> None:
    _executor_store(token).remove(index)


class SparkBackend:
    """Blocks stay in files on the executor that loaded them (:mod:`admm_jobs.trainer.block_store`).

    ``specs`` says what each block holds (one Spark partition per spec) and ``loader``
    builds a block from its spec on an executor (:func:`admm_jobs.trainer.blocks.load_block` for the lake's
    Parquet splits); each spec says where its rows lie in ``rows`` (``{split: (first row, total rows)}``)
    and the chunk size in ``chunk_rows``. ``result_nodes`` is the most tree nodes of one split the
    driver receives per pass (``reduction.ancestor_levels``).
    """

    def __init__(self, spark_context, specs: list[dict[str, Any]], loader: BlockLoader,
                 result_nodes: int = DEFAULT_RESULT_NODES):
        from pyspark import StorageLevel

        self.sc = spark_context
        self.specs, self.loader, self.storage_level = specs, loader, StorageLevel.MEMORY_AND_DISK
        chunks = {split: reduction.chunk_count(total, specs[0]["chunk_rows"])
                  for split, (_, total) in specs[0]["rows"].items()}
        self.levels = reduction.ancestor_levels(chunks, result_nodes)
        self.offsets, self.reducers = {}, 0  # ancestors of split s are reducers offsets[s] .. offsets[s] + count - 1
        for split, count in sorted(chunks.items()):
            self.offsets[split] = self.reducers
            self.reducers += -(-count >> self.levels[split])
        self.stale_tokens: tuple[str, ...] = ()
        # passes run in this thread while the calling one watches the executors (one thread: one py4j connection)
        self._runner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="admm-pass")
        self._load()

    def _load(self) -> None:
        """Load the blocks, spread evenly over the executors: where a block is loaded, its tasks run until the end.

        One job of all the blocks would let an executor that finished its first block early take a
        third while another still loads its first, for the whole run. So they load in waves of as
        many blocks as the executors have cores (``defaultParallelism``), each wave starting with
        every core free: the scheduler hands each free core one block.
        """
        self.token = uuid.uuid4().hex
        self.handles = self.sc.parallelize(self.specs, len(self.specs)).map(
            functools.partial(_store_block, self.token, self.loader, self.stale_tokens)).persist(self.storage_level)
        wave = max(1, self.sc.defaultParallelism)
        for start in range(0, len(self.specs), wave):
            self.sc.runJob(self.handles, _count, list(range(start, min(start + wave, len(self.specs)))))
        self.generation = 0  # the state generation the next pass reads (0: data only)

    def reload(self) -> None:
        # the surviving executors' old block files are not removed by a job of their own, which would
        # recompute the lost handles, i.e. re-read their data only to delete it: the executors that load
        # the new blocks remove them, and the rest go with the application's scratch directories
        self.handles.unpersist()
        self.stale_tokens += (self.token,)
        self._load()

    def _live_executors(self) -> set[str]:
        return {f"{info.host()}:{info.port()}" for info in self.sc._jsc.sc().statusTracker().getExecutorInfos()}

    def _reduce(self, function: PassFunction, params: dict[str, Any], update: bool) -> Stats:
        """Run one pass as a Spark job and sum its statistics, watching for executors that go away meanwhile.

        A task whose block was cached on a lost executor still prefers that executor, so with a long
        ``spark.locality.wait.process`` the job would wait that long before running it anywhere else
        (only to find no state there). Instead the pass is cancelled as soon as an executor alive at
        its start has gone, and the trainer reloads the blocks and resumes from its checkpoint. An
        executor lost between passes needs no watch: its blocks' tasks have no preference left, run
        elsewhere at once and fail with :class:`~admm_jobs.trainer.block_store.BlockStateLost`.
        """
        broadcast = self.sc.broadcast(params)
        partials = self.handles.map(
            functools.partial(_stored_pass, self.token, function, broadcast, self.generation, update))
        if len(self.specs) > 1:
            # one reducer per ancestor: map-side, each block's pieces of one ancestor merge; reduce-side, the rest
            partials = partials.flatMap(functools.partial(_ancestor_pieces, self.levels, self.offsets)).reduceByKey(
                reduction.merge, max(self.reducers, 1), _identity).values()
        group = f"admm-pass-{uuid.uuid4().hex}"

        def run() -> Stats:
            self.sc.setJobGroup(group, f"ADMM pass (state generation {self.generation})")
            return reduction.total(partials.reduce(reduction.merge))

        executors = self._live_executors()
        future = self._runner.submit(run)
        try:
            while True:
                try:
                    return future.result(timeout=EXECUTOR_WATCH_SECONDS)
                except concurrent.futures.TimeoutError:
                    lost = executors - self._live_executors()
                    if lost and not future.done():
                        self.sc.cancelJobGroup(group)
                        concurrent.futures.wait([future])
                        if future.exception() is not None:
                            raise BlocksLost(f"executor(s) {', '.join(sorted(lost))} lost during a pass; the state "
                                             "of their blocks went with them") from None
        except Exception as exc:
            lost_block = re.search(r"BlockStateLost: (.*)", str(exc))
            if lost_block:
                raise BlocksLost(lost_block.group(1)) from exc
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
        try:
            self.handles.foreach(functools.partial(_remove_block, self.token))
            self.handles.unpersist()
        finally:
            self._runner.shutdown(wait=False)
