"""The ADMM training loop, independent of where the sample blocks live.

Samples are split into *blocks*; each block holds its samples and their ADMM
state (activations a_l, pre-activations z_l, scaled multipliers u_l). One
*pass* applies a pure function to every block and sums the small statistics
it returns (Gram matrices, loss sums). The driver solves the weight updates
from those sums and sends the weights to the next pass. A backend decides
where blocks live: :class:`LocalBackend` keeps them in this process (the
single-process reference), ``train.SparkBackend`` keeps them in files on the
Spark executors (:mod:`admm_jobs.block_store`).

One iteration ("epoch") is a backward sweep over the layers (see
:meth:`AdmmTrainer.fit`); each weight solve needs one reduction, and the
per-sample updates between two solves run in one pass, so an iteration of an
L-layer network costs L - 1 passes.
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
from admm_jobs.checkpoint import DriverState

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
    beta: float = 1.0
    beta_output: float = 3.0
    gamma: float = 3.0
    ridge_input: float = 1e-2
    ridge: float = 1e-3
    ridge_output: float = 1e-4
    extrapolation: float = 0.9
    init_ridge: float = 1e-3
    epochs: int = 60
    warmup_epochs: int = 0
    patience: int = 10
    seed: int = 0

    @property
    def layers(self) -> int:
        return len(self.layer_sizes) - 1

    def beta_of(self, layer: int) -> float:
        """beta_l of layer l (1-based): beta_output on the last layer."""
        return self.beta_output if layer == self.layers else self.beta

    def ridge_of(self, layer: int, samples: int) -> float:
        """ridge_l = r_l * n: per-sample ridge rates, so regularisation does not fade with more data."""
        rate = self.ridge_input if layer == 1 else self.ridge_output if layer == self.layers else self.ridge
        return rate * samples


def add_stats(left: Stats, right: Stats) -> Stats:
    """Sum two statistics dicts key by key (keys missing on one side are kept)."""
    total = dict(left)
    for key, value in right.items():
        total[key] = total[key] + value if key in total else value
    return total


class Backend(Protocol):
    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        """Replace every block by ``function(block, params)[0]`` and return the sum of the stats."""

    def inspect(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        """Run ``function`` on every block for its side effects and stats only; the blocks stay as they are."""


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

    def inspect(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        total: Stats = {}
        for block in self.blocks:
            total = add_stats(total, function(block, params)[1])
        return total


def make_block(index: int, pixels: np.ndarray, labels: np.ndarray,
               evaluation: dict[str, tuple[np.ndarray, np.ndarray]]) -> Block:
    """Block ``index``: training samples plus this block's share of the evaluation splits."""
    return {"index": index, "pixels": pixels, "labels": labels.astype(np.int64), "evaluation": evaluation}


def scaled_input(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """a_0 = x / 255 - mu: grey levels in [0, 1], centred on the training mean."""
    return pixels.astype(np.float32) * np.float32(INPUT_SCALE) - mean


def _timed(stats: Stats, started: float) -> Stats:
    stats["worker_seconds"] = time.perf_counter() - started
    return stats


def pop_timers(stats: Stats) -> dict[str, float]:
    """Remove the ``<phase>_seconds`` timers (summed over blocks) from ``stats``: {phase: seconds}."""
    return {key[:-len("_seconds")]: stats.pop(key) for key in [k for k in stats if k.endswith("_seconds")]}


def sum_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """Sum of the scaled training inputs and their count: the driver's input mean."""
    pixels = block["pixels"].astype(np.float64) * INPUT_SCALE
    return block, {"input_sum": pixels.sum(axis=0), "samples": pixels.shape[0]}


def init_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """Initialise z_l, a_l by a forward pass of the initial weights; every u_l = 0.

    Emits the input Gram (constant for the whole run) and, for the initial
    least-squares fit of the output layer to the targets, the Gram of
    a_{L-1} and its cross term with the one-hot targets.
    """
    started = time.perf_counter()
    weights, mean = params["weights"], params["mean"]
    a0 = scaled_input(block["pixels"], mean)
    activations, preactivations = [], []
    a = a0
    for weight in weights[:-1]:
        z = admm.affine(weight, a).astype(np.float32)
        a = admm.relu(z)
        preactivations.append(z)
        activations.append(a)
    z_out = admm.affine(weights[-1], a).astype(np.float32)
    preactivations.append(z_out)
    targets = admm.one_hot(block["labels"], z_out.shape[1])
    last = len(weights)
    stats = {"gram1": admm.layer_gram(a0), f"gram{last}": admm.layer_gram(a),
             "cross_targets": admm.layer_cross(targets, a)}
    block = dict(block, a=activations, z=preactivations, u=[np.zeros_like(z) for z in preactivations])
    return block, _timed(stats, started)


def _scores(weights: list[np.ndarray], loss: str, a0: np.ndarray, labels: np.ndarray, prefix: str) -> Stats:
    logits = admm.forward(weights, a0)
    return {
        f"{prefix}_loss_sum": float(admm.sample_losses(loss, logits, labels).sum()),
        f"{prefix}_correct": int((logits.argmax(axis=1) == labels).sum()),
        f"{prefix}_count": int(labels.shape[0]),
    }


def sweep_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Stats]:
    """The per-sample work between two weight solves of the backward sweep.

    Each part runs only when ``params`` asks for it, in this order:

    1. ``finish``: (l, W_l new) -> u_l += z_l - W_l [a_{l-1}, 1], the multiplier
       step of the layer whose weights were just solved;
    2. ``score``: weights -> loss and accuracy of the plain forward pass on
       this block's training samples and evaluation splits;
    3. ``output``: W_L new -> z_L = prox of the loss at W_L [a_{L-1}, 1] - u_L,
       then u_L += z_L - W_L [a_{L-1}, 1];
    4. ``layer``: hidden layer l -> a_l (exact least squares against
       z_{l+1} + u_{l+1} through W_{l+1} new), then z_l (elementwise prox at
       W_l [a_{l-1}, 1] - u_l with the current W_l); emits the statistics of
       the W_l solve and, after an output update, those of the next W_L solve.
    """
    started = time.perf_counter()
    a, z, u = list(block["a"]), list(block["z"]), list(block["u"])
    mean = params["mean"]
    a0 = scaled_input(block["pixels"], mean)  # once per pass: layer 1's input, the scores and the finish step share it
    inputs = lambda l: a0 if l == 1 else a[l - 2]  # a_{l-1}, 1-based l
    stats: Stats = {}
    multiplier_updates = params["multiplier_updates"]

    if params.get("finish") is not None:
        layer, weight = params["finish"]
        if multiplier_updates:
            u[layer - 1] = admm.update_multiplier(u[layer - 1], z[layer - 1], admm.affine(weight, inputs(layer)))

    if params.get("score") is not None:
        weights = params["score"]
        stats.update(_scores(weights, params["loss"], a0, block["labels"], "train"))
        for split, (pixels, labels) in block["evaluation"].items():
            stats.update(_scores(weights, params["loss"], scaled_input(pixels, mean), labels.astype(np.int64), split))

    last = len(z)
    if params.get("output") is not None:
        weight, beta = params["output"], params["beta_output"]
        m = admm.affine(weight, a[last - 2])
        z[last - 1] = admm.OUTPUT_PROX[params["loss"]](admm.one_hot(block["labels"], m.shape[1]), m - u[last - 1], beta)
        if multiplier_updates:
            u[last - 1] = admm.update_multiplier(u[last - 1], z[last - 1], m)
        stats[f"residual{last}"] = float(((z[last - 1] - m) ** 2).sum())

    if params.get("layer") is not None:
        layer = params["layer"]
        next_weight, weight = params["next_weight"], params["weight"]
        a[layer - 1] = admm.update_activation(z[layer - 1], z[layer] + u[layer], next_weight, params["inverse"],
                                              params["beta_next"], params["gamma"])
        m = admm.affine(weight, inputs(layer))
        z[layer - 1] = admm.update_preactivation(a[layer - 1], m - u[layer - 1], params["beta"], params["gamma"])
        stats[f"cross{layer}"] = admm.layer_cross(z[layer - 1] + u[layer - 1], inputs(layer))
        if layer > 1:
            stats[f"gram{layer}"] = admm.layer_gram(inputs(layer))
        stats[f"residual{layer}"] = float(((z[layer - 1] - m) ** 2).sum())
        stats[f"activation_gap{layer}"] = float(((a[layer - 1] - admm.relu(z[layer - 1])) ** 2).sum())
        if layer == last - 1 and params.get("output") is not None:
            stats[f"gram{last}"] = admm.layer_gram(a[layer - 1])
            stats[f"cross{last}"] = admm.layer_cross(z[last - 1] + u[last - 1], a[layer - 1])
    return dict(block, a=a, z=z, u=u), _timed(stats, started)


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

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "EpochReport":
        fixed = ("epoch", "phase", "seconds", "timers")
        return cls(record["epoch"], record["phase"], {k: v for k, v in record.items() if k not in fixed},
                   record["seconds"], record["timers"])


@dataclasses.dataclass
class TrainingResult:
    weights: list[np.ndarray]  # best epoch's, for raw input (input mean folded into the first bias)
    best_epoch: int
    history: list[EpochReport]
    stopped_early: bool
    resumed_from: int | None = None


def check_finite(stats: Stats, epoch: int, explode_at: float = 1e12) -> None:
    """Raise NumericalFailure naming the layer when a residual is NaN/Inf or explodes."""
    for key, value in stats.items():
        match = re.fullmatch(r"(residual|activation_gap)(\d+)", key)
        if match and (not math.isfinite(value) or value > explode_at):
            raise NumericalFailure(
                f"epoch {epoch}: {match.group(1)} of layer {match.group(2)} is {value!r} "
                "(NaN/Inf or exploded); lower beta/gamma or raise the ridge"
            )


def epoch_metrics(stats: Stats) -> dict[str, float]:
    metrics = {}
    for split in ("train", "validation", "test"):
        count = stats.get(f"{split}_count", 0)
        if count:
            metrics[f"{split}_loss"] = stats[f"{split}_loss_sum"] / count
            metrics[f"{split}_accuracy"] = stats[f"{split}_correct"] / count
    return metrics


class AdmmTrainer:
    """Drives the passes and the driver-side weight solves of ADMM training.

    One iteration t, for layers L..1 (a backward sweep):

    * W_L = solve(sums over samples from the previous pass), then one pass:
      finish layer 1 of iteration t-1, score the weights of iteration t-1,
      update z_L and u_L, update a_{L-1} and z_{L-1};
    * for l = L-1..1: W_l = solve(sums), then (for l > 1) one pass: u_l step,
      update a_{l-1} and z_{l-1};
    * extrapolate every W: W = W_new + theta (W_new - W_new of iteration t-1).

    A final pass finishes layer 1 and scores the last iteration.
    """

    def __init__(self, hp: Hyperparameters, backend: Backend, on_epoch: Callable[[EpochReport], None] | None = None,
                 checkpoints=None, checkpoint_every: int = 0):
        if hp.loss not in admm.LOSSES:
            raise ValueError(f"unknown loss {hp.loss!r}; expected one of {admm.LOSSES}")
        self.hp = hp
        self.backend = backend
        self.on_epoch = on_epoch or (lambda report: None)
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.history: list[EpochReport] = []  # every epoch so far, restored ones included

    def _solve(self, sums: Stats, layer: int, epoch: int) -> np.ndarray:
        cross, gram = sums.pop(f"cross{layer}"), sums[f"gram{layer}"]
        if not (np.isfinite(cross).all() and np.isfinite(gram).all()):
            raise NumericalFailure(f"epoch {epoch}: the weight statistics of layer {layer} are not finite "
                                   "(NaN/Inf in the data or a diverged state)")
        return admm.solve_weights(cross, gram, self.hp.ridge_of(layer, int(sums["samples"])))

    def _initialise(self) -> DriverState:
        hp = self.hp
        totals = self.backend.inspect(sum_pass, {})
        mean = (totals["input_sum"] / totals["samples"]).astype(np.float32)
        weights = admm.he_initial_weights(list(hp.layer_sizes), np.random.default_rng(hp.seed))
        sums = self.backend.run_pass(init_pass, {"weights": weights, "mean": mean})
        pop_timers(sums)
        for key, value in sums.items():
            if not np.isfinite(value).all():
                layer = re.sub(r"\D", "", key) or hp.layers
                raise NumericalFailure(f"epoch 0 (initialisation): the statistics of layer {layer} are not finite "
                                       "(NaN/Inf in the input data)")
        last = hp.layers
        # the output layer starts as the ridge least-squares fit of the targets: z_L = W_L [a_{L-1}, 1]
        weights[-1] = admm.solve_weights(sums.pop("cross_targets"), sums[f"gram{last}"], hp.init_ridge)
        sums[f"cross{last}"] = weights[-1].astype(np.float64) @ sums[f"gram{last}"]
        sums["samples"] = totals["samples"]
        return DriverState(epoch=0, weights=weights, new_weights=None, sums=sums, mean=mean,
                           best_weights=None, best_loss=math.inf, best_epoch=0, stale=0, history=[],
                           pending_timers={})

    def fit(self) -> TrainingResult:
        hp = self.hp
        state = self.checkpoints.restore(self.backend) if self.checkpoints else None
        resumed_from = state.epoch if state else None
        if state is None:
            state = self._initialise()
        history = self.history = [EpochReport.from_record(r) for r in state.history]
        stopped_early = False
        last = hp.layers
        common = {"mean": state.mean, "loss": hp.loss, "beta_output": hp.beta_output}
        for epoch in range(state.epoch + 1, hp.epochs + 1):
            started = time.perf_counter()
            timers = {"solve": 0.0, "worker": 0.0}
            multiplier_updates = epoch > hp.warmup_epochs
            new = list(state.weights)
            tick = time.perf_counter()
            new[last - 1] = self._solve(state.sums, last, epoch)
            timers["solve"] += time.perf_counter() - tick
            for layer in range(last - 1, 0, -1):
                tick = time.perf_counter()
                beta_next = hp.beta_of(layer + 1)
                params = {**common, "multiplier_updates": multiplier_updates, "layer": layer,
                          "weight": state.weights[layer - 1], "next_weight": new[layer],
                          "inverse": admm.activation_operator(new[layer], beta_next, hp.gamma),
                          "beta": hp.beta_of(layer), "beta_next": beta_next, "gamma": hp.gamma}
                if layer == last - 1:
                    params["output"] = new[last - 1]
                    if state.new_weights is not None:  # finish and score the previous iteration
                        params["finish"] = (1, state.new_weights[0])
                        params["score"] = state.weights
                else:
                    params["finish"] = (layer + 1, new[layer])
                timers["solve"] += time.perf_counter() - tick
                tick = time.perf_counter()
                sums = self.backend.run_pass(sweep_pass, params)
                timers[f"pass{layer}"] = time.perf_counter() - tick
                for phase, seconds in pop_timers(sums).items():
                    timers[phase] = timers.get(phase, 0.0) + seconds
                check_finite(sums, epoch)
                if "train_count" in sums:
                    stopped_early = self._report(state, history, epoch - 1, sums, state.pending_timers)
                state.sums.update({k: v for k, v in sums.items() if k.startswith(("cross", "gram"))})
                tick = time.perf_counter()
                new[layer - 1] = self._solve(state.sums, layer, epoch)
                timers["solve"] += time.perf_counter() - tick
            if stopped_early:
                break
            state.weights = admm.extrapolate(new, state.new_weights, hp.extrapolation)
            state.new_weights = new
            state.epoch = epoch
            if not all(np.isfinite(w).all() for w in state.weights):
                raise NumericalFailure(f"epoch {epoch}: weights are not finite")
            state.pending_timers = dict(timers, iteration_seconds=time.perf_counter() - started)
            if self.checkpoints and self.checkpoint_every and epoch % self.checkpoint_every == 0 and epoch < hp.epochs:
                state.history = [r.as_record() for r in history]
                self.checkpoints.save(self.backend, state)
        if not stopped_early and state.new_weights is not None:
            tick = time.perf_counter()
            sums = self.backend.run_pass(sweep_pass, {**common, "multiplier_updates": state.epoch > hp.warmup_epochs,
                                                      "finish": (1, state.new_weights[0]), "score": state.weights})
            pop_timers(sums)
            self._report(state, history, state.epoch, sums, dict(state.pending_timers, score=time.perf_counter() - tick))
        best = state.best_weights if state.best_weights is not None else state.weights
        return TrainingResult(admm.fold_input_mean(best, state.mean), state.best_epoch, history, stopped_early,
                              resumed_from)

    def _report(self, state: DriverState, history: list[EpochReport], epoch: int, sums: Stats,
                timers: dict[str, float]) -> bool:
        """Record epoch ``epoch``'s scores (computed one pass later); True when early stopping triggers."""
        metrics = epoch_metrics(sums)
        timers = dict(timers)
        seconds = timers.pop("iteration_seconds", 0.0)
        report = EpochReport(epoch, "warmup" if epoch <= self.hp.warmup_epochs else "admm", metrics, seconds, timers)
        history.append(report)
        self.on_epoch(report)
        monitored = metrics.get("validation_loss", metrics["train_loss"])
        if monitored < state.best_loss:
            state.best_loss, state.best_epoch, state.stale = monitored, epoch, 0
            state.best_weights = [w.copy() for w in state.weights]
            return False
        state.stale += 1
        return epoch > self.hp.warmup_epochs and bool(self.hp.patience) and state.stale >= self.hp.patience
