"""The ADMM training loop, independent of where the sample blocks live.

Samples are split into *blocks*; each block holds its samples and their ADMM
state (activations a_l, pre-activations z_l, output multiplier lambda). One
*pass* applies a pure function to every block and sums the small statistics
it returns (Gram matrices, loss sums). The driver solves the weight updates
from those sums and sends the weights to the next pass. A backend decides
where blocks live: :class:`LocalBackend` keeps them in this process (the
single-process reference), ``train.SparkBackend`` keeps them in a cached RDD.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from admm_jobs import admm

Block = dict[str, Any]
Stats = dict[str, Any]
PassFunction = Callable[[Block, dict[str, Any]], tuple[Block, Stats]]

INPUT_SCALE = 1.0 / 255.0


class NumericalFailure(RuntimeError):
    """Training diverged (NaN/Inf or exploding residuals); the message names layer and epoch."""


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    layer_sizes: tuple[int, ...]
    loss: str = "least_squares"
    beta: float = 5.0
    gamma: float = 5.0
    ridge: float = 1e-3
    proximal: float = 0.0
    penalty_growth: float = 1.0
    max_penalty: float = 1e4
    epochs: int = 10
    warmup_epochs: int = 2
    patience: int = 5
    seed: int = 0

    def penalties(self, epoch: int) -> tuple[float, float]:
        """(beta, gamma) of an epoch (0-based): geometric growth, capped."""
        factor = self.penalty_growth**epoch
        return min(self.beta * factor, self.max_penalty), min(self.gamma * factor, self.max_penalty)


def add_stats(left: Stats, right: Stats) -> Stats:
    """Sum two statistics dicts key by key (keys missing on one side are kept)."""
    total = dict(left)
    for key, value in right.items():
        total[key] = total[key] + value if key in total else value
    return total


class Backend(Protocol):
    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        """Replace every block by ``function(block, params)[0]`` and return the sum of the stats."""


class LocalBackend:
    """All blocks in this process: the single-process reference implementation."""

    def __init__(self, blocks: Iterable[Block]):
        self.blocks = list(blocks)

    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        total: Stats = {}
        updated = []
        for block in self.blocks:
            new_block, stats = function(block, params)
            updated.append(new_block)
            total = add_stats(total, stats)
        self.blocks = updated
        return total


def make_block(pixels: np.ndarray, labels: np.ndarray, evaluation: dict[str, tuple[np.ndarray, np.ndarray]]) -> Block:
    """A block of training samples plus this block's share of the evaluation splits."""
    return {"pixels": pixels, "labels": labels.astype(np.int64), "evaluation": evaluation}


def block_input(block: Block) -> np.ndarray:
    return block["pixels"].astype(np.float32) * np.float32(INPUT_SCALE)


def _timed(stats: Stats, started: float) -> Stats:
    stats["worker_seconds"] = time.perf_counter() - started
    return stats


def init_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """Initialise z_l, a_l by a forward pass of the initial weights; lambda = 0.

    Returns the Gram statistics of every layer so that the driver can start
    with weight solves consistent with this state.
    """
    started = time.perf_counter()
    weights = params["weights"]
    a = block_input(block)
    activations, preactivations = [], []
    stats: Stats = {"samples": a.shape[0]}
    for index, weight in enumerate(weights):
        z = (a @ weight[:, :-1].T + weight[:, -1]).astype(np.float32)
        preactivations.append(z)
        stats[f"cross{index}"], stats[f"gram{index}"] = admm.layer_cross(z, a), admm.layer_gram(a)
        if index < len(weights) - 1:
            a = admm.relu(z)
            activations.append(a)
    block = dict(block, a=activations, z=preactivations, multiplier=np.zeros_like(preactivations[-1]))
    return block, _timed(stats, started)


def hidden_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """Update a_l then z_l of hidden layer l (1-based in the paper, ``layer`` 0-based here).

    Emits the statistics the driver needs next: grams of (z_{l+1}, a_l) for
    W_{l+1} and, since z_l changed, the cross term of (z_l, a_{l-1}) for W_l.
    """
    started = time.perf_counter()
    layer = params["layer"]
    weight, next_weight = params["weight"], params["next_weight"]
    beta, gamma, beta_next = params["beta"], params["gamma"], params["beta_next"]
    a_prev = block_input(block) if layer == 0 else block["a"][layer - 1]
    z, z_next = block["z"][layer], block["z"][layer + 1]

    a_new = admm.update_activation(z, z_next, next_weight, params["inverse"], beta_next, gamma)
    m = a_prev @ weight[:, :-1].T + weight[:, -1]
    z_new = admm.update_preactivation(a_new, m, beta, gamma)

    activations = list(block["a"])
    preactivations = list(block["z"])
    activations[layer] = a_new
    preactivations[layer] = z_new
    stats = {
        f"cross{layer}": admm.layer_cross(z_new, a_prev),
        f"cross{layer + 1}": admm.layer_cross(z_next, a_new),
        f"gram{layer + 1}": admm.layer_gram(a_new),
        f"residual{layer}": float(((z_new - m) ** 2).sum()),
        f"activation_gap{layer}": float(((a_new - admm.relu(z_new)) ** 2).sum()),
    }
    return dict(block, a=activations, z=preactivations), _timed(stats, started)


def _scores(weights: list[np.ndarray], loss: str, a0: np.ndarray, labels: np.ndarray, prefix: str) -> Stats:
    logits = admm.forward(weights, a0)
    return {
        f"{prefix}_loss_sum": float(admm.sample_losses(loss, logits, labels).sum()),
        f"{prefix}_correct": int((logits.argmax(axis=1) == labels).sum()),
        f"{prefix}_count": int(labels.shape[0]),
    }


def output_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """Update z_L by the exact prox of the loss and (after warm-up) the multiplier lambda.

    Also scores the network's forward pass (the current weights) on this
    block's training samples and evaluation splits.
    """
    started = time.perf_counter()
    weights, loss, beta = params["weights"], params["loss"], params["beta"]
    last = len(weights) - 1
    a_prev = block["a"][last - 1] if last > 0 else block_input(block)
    labels = block["labels"]
    m = a_prev @ weights[last][:, :-1].T + weights[last][:, -1]
    targets = admm.one_hot(labels, m.shape[1])
    z_out = admm.OUTPUT_UPDATES[loss](targets, m, block["multiplier"], beta)
    multiplier = block["multiplier"]
    if params["update_multiplier"]:
        multiplier = admm.update_multiplier(multiplier, z_out, m, beta)
    preactivations = list(block["z"])
    preactivations[last] = z_out

    stats: Stats = {f"residual{last}": float(((z_out - m) ** 2).sum())}
    stats.update(_scores(weights, loss, block_input(block), labels, "train"))
    for split, (pixels, split_labels) in block["evaluation"].items():
        a0 = pixels.astype(np.float32) * np.float32(INPUT_SCALE)
        stats.update(_scores(weights, loss, a0, split_labels.astype(np.int64), split))
    return dict(block, z=preactivations, multiplier=multiplier), _timed(stats, started)


@dataclasses.dataclass
class EpochReport:
    epoch: int
    phase: str
    metrics: dict[str, float]
    seconds: float
    timers: dict[str, float]

    def as_record(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "phase": self.phase, **self.metrics,
                "seconds": round(self.seconds, 4), "timers": {k: round(v, 4) for k, v in self.timers.items()}}


@dataclasses.dataclass
class TrainingResult:
    weights: list[np.ndarray]
    best_epoch: int
    history: list[EpochReport]
    stopped_early: bool


def check_finite(stats: Stats, epoch: int, explode_at: float = 1e12) -> None:
    """Raise NumericalFailure naming the layer when a residual is NaN/Inf or explodes.

    Keys look like ``residual0`` (0-based layer index); messages use the
    paper's 1-based layer numbers.
    """
    for key, value in stats.items():
        match = re.fullmatch(r"(residual|activation_gap)(\d+)", key)
        if match and (not math.isfinite(value) or value > explode_at):
            raise NumericalFailure(
                f"epoch {epoch}: {match.group(1)} of layer {int(match.group(2)) + 1} is {value!r} "
                "(NaN/Inf or exploded); lower beta/gamma or raise ridge"
            )


class AdmmTrainer:
    """Drives the passes and the driver-side weight solves of ADMM training."""

    def __init__(self, hp: Hyperparameters, backend: Backend, on_epoch: Callable[[EpochReport], None] | None = None):
        if hp.loss not in admm.LOSSES:
            raise ValueError(f"unknown loss {hp.loss!r}; expected one of {admm.LOSSES}")
        self.hp = hp
        self.backend = backend
        self.on_epoch = on_epoch or (lambda report: None)
        self.layers = len(hp.layer_sizes) - 1

    def _solve(self, sums: Stats, layer: int, previous: np.ndarray, epoch: int) -> np.ndarray:
        cross, gram = sums[f"cross{layer}"], sums[f"gram{layer}"]
        if not (np.isfinite(cross).all() and np.isfinite(gram).all()):
            raise NumericalFailure(f"epoch {epoch}: the weight statistics of layer {layer + 1} are not finite "
                                   "(NaN/Inf in the data or a diverged state)")
        return admm.solve_weights(cross, gram, self.hp.ridge, previous=previous, proximal=self.hp.proximal)

    def fit(self) -> TrainingResult:
        hp = self.hp
        rng = np.random.default_rng(hp.seed)
        weights = admm.he_initial_weights(list(hp.layer_sizes), rng)
        sums = self.backend.run_pass(init_pass, {"weights": weights})
        constant_input_gram = sums["gram0"]  # a_0 never changes: its Gram is computed once
        history: list[EpochReport] = []
        best_loss, best_epoch, best_weights, stale = math.inf, 0, [w.copy() for w in weights], 0
        stopped_early = False
        for epoch in range(1, hp.epochs + 1):
            started = time.perf_counter()
            timers = {"solve": 0.0, "worker": 0.0}
            beta, gamma = hp.penalties(epoch - 1)
            sums["gram0"] = constant_input_gram
            for layer in range(self.layers - 1):
                tick = time.perf_counter()
                weights[layer] = self._solve(sums, layer, weights[layer], epoch)
                inverse = admm.activation_operator(weights[layer + 1], beta, gamma)
                timers["solve"] += time.perf_counter() - tick
                tick = time.perf_counter()
                layer_sums = self.backend.run_pass(hidden_pass, {
                    "layer": layer, "weight": weights[layer], "next_weight": weights[layer + 1],
                    "inverse": inverse, "beta": beta, "gamma": gamma, "beta_next": beta,
                })
                timers[f"pass{layer + 1}"] = time.perf_counter() - tick
                timers["worker"] += layer_sums.pop("worker_seconds")
                check_finite(layer_sums, epoch)
                sums.update(layer_sums)
            tick = time.perf_counter()
            last = self.layers - 1
            weights[last] = self._solve(sums, last, weights[last], epoch)
            timers["solve"] += time.perf_counter() - tick
            tick = time.perf_counter()
            warmup = epoch <= hp.warmup_epochs
            out = self.backend.run_pass(output_pass, {
                "weights": weights, "loss": hp.loss, "beta": beta, "update_multiplier": not warmup,
            })
            timers["pass_output"] = time.perf_counter() - tick
            timers["worker"] += out.pop("worker_seconds")
            check_finite(out, epoch)
            metrics = {}
            for split in ("train", "validation", "test"):
                count = out.get(f"{split}_count", 0)
                if count:
                    metrics[f"{split}_loss"] = out[f"{split}_loss_sum"] / count
                    metrics[f"{split}_accuracy"] = out[f"{split}_correct"] / count
            report = EpochReport(epoch, "warmup" if warmup else "admm", metrics,
                                 time.perf_counter() - started, timers)
            history.append(report)
            self.on_epoch(report)
            if not all(np.isfinite(w).all() for w in weights):
                raise NumericalFailure(f"epoch {epoch}: weights are not finite")
            monitored = metrics.get("validation_loss", metrics["train_loss"])
            if monitored < best_loss:
                best_loss, best_epoch, best_weights, stale = monitored, epoch, [w.copy() for w in weights], 0
            else:
                stale += 1
                if not warmup and hp.patience and stale >= hp.patience:
                    stopped_early = True
                    break
        return TrainingResult(best_weights, best_epoch, history, stopped_early)
