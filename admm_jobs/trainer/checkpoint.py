"""Checkpoints of ADMM training, so that a killed and retried training task resumes.

A checkpoint of epoch k lives in ``ROOT/epoch-<k>/``: one ``block-<i>.npz``
per sample block with that block's ADMM state (written by whoever holds the
block: a Spark executor or this process), ``driver.npz`` with the weights and
the reduced statistics the next weight solves need, and ``meta.json``,
written last, which commits it. ``ROOT/latest.json`` then points at it.

A checkpoint is only resumed by a run with the same *fingerprint*
(hyper-parameters, dataset version, partitioning): everything that decides
the trajectory. Resuming restores exactly the arrays an uninterrupted run
would hold, so the continued run computes the same floats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
from typing import Any

import numpy as np

from admm_jobs.lake import storage
from admm_jobs.trainer.reduction import Partial

log = logging.getLogger(__name__)

DATA_KEYS = ("index", "pixels", "labels", "evaluation", "rows", "chunk_rows")
LATEST = "latest.json"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names the file."""


def fingerprint(settings: dict[str, Any]) -> str:
    """A stable hash of everything that determines the training trajectory."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(uri: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (storage.StorageError, ValueError, OSError) as exc:
        raise CheckpointError(f"{uri}: unreadable checkpoint file: {exc}") from exc


def flatten(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"a": [x, y], "multiplier": m} -> {"a.0": x, "a.1": y, "multiplier": m}."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, list):
            flat.update({f"{key}.{i}": item for i, item in enumerate(value)})
        else:
            flat[key] = value
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    state: dict[str, Any] = {}
    lists: dict[str, dict[int, np.ndarray]] = {}
    for key, value in flat.items():
        name, _, position = key.rpartition(".")
        if name and position.isdigit():
            lists.setdefault(name, {})[int(position)] = value
        else:
            state[key] = value
    for name, items in lists.items():
        state[name] = [items[i] for i in range(len(items))]
    return state


def block_file(directory: str, index: int) -> str:
    return storage.join(directory, f"block-{index:05d}.npz")


def save_block_state(block: dict[str, Any], params: dict[str, Any]):
    """Pass function: write this block's ADMM state (not its data) to the checkpoint directory."""
    state = {key: value for key, value in block.items() if key not in DATA_KEYS}
    storage.write_bytes(block_file(params["directory"], block["index"]), _npz_bytes(flatten(state)))
    return block, Partial(counts={"saved_blocks": 1})


def restore_block_state(block: dict[str, Any], params: dict[str, Any]):
    """Pass function: put the checkpointed ADMM state back into a freshly loaded block."""
    state = unflatten(_load_npz(block_file(params["directory"], block["index"])))
    return dict(block, **state), Partial(counts={"restored_blocks": 1})


@dataclasses.dataclass
class DriverState:
    """What the driver holds between epochs (after epoch ``epoch``'s weight solves)."""

    epoch: int
    weights: list[np.ndarray]  # extrapolated weights: the network of epoch ``epoch``
    new_weights: list[np.ndarray] | None  # the solves of epoch ``epoch`` before extrapolation
    sums: dict[str, Any]  # reduced statistics the next weight solves need
    mean: np.ndarray  # training input mean (inputs are centred)
    best_weights: list[np.ndarray] | None
    best_loss: float
    best_epoch: int
    stale: int
    history: list[dict[str, Any]]
    pending_timers: dict[str, float]  # timers of epoch ``epoch``, reported with its scores one pass later


class CheckpointStore:
    """Saves and restores checkpoints below ``root_uri`` for one training fingerprint."""

    def __init__(self, root_uri: str, run_fingerprint: str, keep: int = 2):
        self.root = root_uri
        self.fingerprint = run_fingerprint
        self.keep = keep

    def _directory(self, epoch: int) -> str:
        return storage.join(self.root, f"epoch-{epoch:05d}")

    def save(self, backend, state: DriverState) -> str:
        directory = self._directory(state.epoch)
        storage.delete_tree(directory)  # a half-written attempt at this epoch
        saved = backend.inspect(save_block_state, {"directory": directory})
        lists = {"weights": state.weights, "new_weights": state.new_weights or [], "best_weights": state.best_weights or []}
        arrays = {**flatten(lists), "mean": state.mean,
                  **{f"sums.{key}": np.asarray(value) for key, value in state.sums.items()}}
        storage.write_bytes(storage.join(directory, "driver.npz"), _npz_bytes(arrays))
        meta = {"epoch": state.epoch, "fingerprint": self.fingerprint, "blocks": saved["saved_blocks"],
                "best_loss": state.best_loss, "best_epoch": state.best_epoch, "stale": state.stale,
                "history": state.history, "pending_timers": state.pending_timers}
        storage.write_json(storage.join(directory, META), meta)
        storage.write_json(storage.join(self.root, LATEST), {"epoch": state.epoch, "fingerprint": self.fingerprint})
        self._prune(state.epoch)
        return directory

    def _prune(self, newest: int) -> None:
        """Keep the ``keep`` newest checkpoints."""
        epochs = {int(match.group(1)) for uri in storage.list_files(self.root)
                  if (match := re.search(r"epoch-(\d+)/", uri))}
        for epoch in epochs:
            if epoch <= newest - self.keep:
                storage.delete_tree(self._directory(epoch))

    def clear(self) -> None:
        """Remove every checkpoint: the run is complete and its model committed."""
        storage.delete_tree(self.root)

    def restore(self, backend) -> DriverState | None:
        """Restore the latest matching checkpoint into ``backend``'s blocks; None if there is none."""
        latest_uri = storage.join(self.root, LATEST)
        if not storage.exists(latest_uri):
            return None
        latest = storage.read_json(latest_uri)
        if latest.get("fingerprint") != self.fingerprint:
            log.warning("ignoring checkpoint %s: it belongs to other settings (fingerprint %s, this run %s)",
                        latest_uri, latest.get("fingerprint"), self.fingerprint)
            return None
        directory = self._directory(int(latest["epoch"]))
        meta = storage.read_json(storage.join(directory, META))
        restored = backend.run_pass(restore_block_state, {"directory": directory})
        if restored["restored_blocks"] != meta["blocks"]:
            raise CheckpointError(f"{directory}: {meta['blocks']} blocks saved, {restored['restored_blocks']} restored")
        arrays = _load_npz(storage.join(directory, "driver.npz"))
        nested = unflatten({k: v for k, v in arrays.items() if not k.startswith("sums.") and k != "mean"})
        sums = {k[len("sums."):]: v for k, v in arrays.items() if k.startswith("sums.")}
        sums["samples"] = int(sums["samples"])
        log.info("resuming from checkpoint %s (epoch %d)", directory, meta["epoch"])
        return DriverState(
            epoch=int(meta["epoch"]), weights=nested["weights"], new_weights=nested.get("new_weights") or None,
            sums=sums, mean=arrays["mean"], best_weights=nested.get("best_weights") or None,
            best_loss=float(meta["best_loss"]), best_epoch=int(meta["best_epoch"]), stale=int(meta["stale"]),
            history=meta["history"], pending_timers=meta["pending_timers"],
        )
