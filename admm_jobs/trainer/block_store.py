"""Executor-local files that keep each sample block's ADMM state between Spark passes.

Caching the blocks themselves in Spark moved the whole per-sample state
(about 6 KB per sample: a_l, z_l, u_l) from the JVM block manager to a Python
worker and back on every pass, and that copy cost more than the arithmetic.
Instead each block's data and state stay in files on the executor that
loaded the block; Spark caches only a small handle per block, so the
scheduler sends every later task of the block back to that executor.

Generations: a pass that updates the state reads generation g and writes
g + 1 under a temporary name renamed into place, so a retried task still
finds generation g intact and rewrites the same result. Arrays the pass
left as they were are hard links to generation g's files, not copies. Generation 0 is the
block's data without any state; generations older than g are removed once
g + 1 is written. If the files are gone (the executor was lost), reading
raises :class:`BlockStateLost`; the trainer then reloads the blocks' data
and resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np

from admm_jobs.trainer.checkpoint import DATA_KEYS, flatten, unflatten

DATA_DIRECTORY = "data"


class BlockStateLost(RuntimeError):
    """A block's files are not on this executor (it was lost or the task ran elsewhere)."""


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray],
                  unchanged: dict[int, tuple[np.ndarray, Path]] | None = None) -> None:
    """Write one ``.npy`` file per array into ``directory``, all or nothing.

    The files go to a temporary directory renamed into place. A complete directory of the same
    name can only come from another attempt of the same deterministic task, so it is kept.
    Plain ``.npy`` files rather than one ``.npz``: no zip CRC to compute, and reads can map them.
    An array that is one of ``unchanged`` (id -> (the read-only map, its file)) is hard-linked
    rather than written again: a pass changes only some of a block's state.
    """
    temporary = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    unchanged = unchanged or {}
    for key, array in arrays.items():
        source = unchanged.get(id(array))
        if source is not None and source[0] is array:
            try:
                os.link(source[1], temporary / f"{key}.npy")
                continue
            except OSError:
                pass  # a filesystem without hard links: write the copy
        np.save(temporary / f"{key}.npy", array, allow_pickle=False)
    try:
        os.rename(temporary, directory)
    except OSError:
        if not directory.is_dir():
            raise
        shutil.rmtree(temporary, ignore_errors=True)


def _read_arrays(directory: Path, files: dict[int, tuple[np.ndarray, Path]] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a directory written by :func:`_write_arrays`, memory-mapped read-only.

    With ``files``, records id -> (array, file) of each array read, for :func:`_write_arrays`.
    """
    arrays = {}
    for path in directory.glob("*.npy"):
        arrays[path.stem] = np.load(path, mmap_mode="r", allow_pickle=False)
        if files is not None:
            files[id(arrays[path.stem])] = (arrays[path.stem], path)
    return arrays


def state_directory(generation: int) -> str:
    return f"state-{generation:06d}"


class BlockStore:
    """Blocks below one directory: ``block-<index>/data/`` and ``block-<index>/state-<generation>/``, ``.npy`` files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.loaded_state: dict[int, tuple[np.ndarray, Path]] = {}  # the state arrays of the last load

    def _directory(self, index: int) -> Path:
        return self.root / f"block-{index:05d}"

    def save_data(self, block: dict[str, Any]) -> None:
        """Store a freshly loaded block's samples, labels, evaluation splits and place in the splits (generation 0)."""
        arrays = {"index": np.asarray(block["index"]), "pixels": block["pixels"], "labels": block["labels"],
                  "chunk_rows": np.asarray(block["chunk_rows"])}
        for split, (pixels, labels) in block["evaluation"].items():
            arrays[f"evaluation.{split}.pixels"], arrays[f"evaluation.{split}.labels"] = pixels, labels
        for split, first_and_total in block["rows"].items():
            arrays[f"rows.{split}"] = np.asarray(first_and_total, np.int64)
        directory = self._directory(block["index"])
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory / DATA_DIRECTORY, ignore_errors=True)  # a reload replaces the data
        _write_arrays(directory / DATA_DIRECTORY, arrays)

    def load(self, index: int, generation: int) -> dict[str, Any]:
        """Block ``index`` with its state of ``generation`` (0: data only); arrays are read-only maps."""
        directory = self._directory(index)
        paths = [directory / DATA_DIRECTORY] + ([directory / state_directory(generation)] if generation else [])
        missing = [path for path in paths if not path.is_dir()]
        if missing:
            raise BlockStateLost(f"block {index}: {missing[0]} is not on host {socket.gethostname()}: the executor "
                                 "holding this block was lost; training reloads the blocks and resumes from its latest checkpoint")
        data = _read_arrays(paths[0])
        evaluation: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in [k for k in data if k.startswith("evaluation.")]:
            _, split, field = key.split(".")
            pixels, labels = evaluation.get(split, (None, None))
            array = data.pop(key)
            evaluation[split] = (array, labels) if field == "pixels" else (pixels, array)
        rows = {key.removeprefix("rows."): (int(data[key][0]), int(data[key][1])) for key in data if key.startswith("rows.")}
        block = {"index": int(data["index"]), "pixels": data["pixels"], "labels": data["labels"],
                 "evaluation": evaluation, "rows": rows, "chunk_rows": int(data["chunk_rows"])}
        self.loaded_state = {}
        if generation:
            block.update(unflatten(_read_arrays(paths[1], self.loaded_state)))
        return block

    def save_state(self, block: dict[str, Any], generation: int) -> None:
        """Write the block's ADMM state as ``generation`` and drop generations older than ``generation - 1``."""
        directory = self._directory(block["index"])
        state = {key: value for key, value in block.items() if key not in DATA_KEYS}
        _write_arrays(directory / state_directory(generation), flatten(state), self.loaded_state)
        for path in directory.glob("state-*"):
            if path.is_dir() and int(path.name.split("-")[1]) < generation - 1:
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, index: int) -> None:
        shutil.rmtree(self._directory(index), ignore_errors=True)
