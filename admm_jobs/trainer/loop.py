"""The ADMM training loop, independent of where the sample blocks live.

Samples are split into *blocks*; each block holds its samples and their ADMM
state (activations a_l, pre-activations z_l, scaled multipliers u_l). One
*pass* applies a pure function to every block and sums the small statistics
it returns (Gram matrices, loss sums). The driver solves the weight updates
from those sums and sends the weights to the next pass. A backend decides
where blocks live: :class:`LocalBackend` keeps them in this process (the
single-process reference), :class:`admm_jobs.trainer.spark_backend.SparkBackend` keeps
them in files on the Spark executors (:mod:`admm_jobs.trainer.block_store`).

One iteration ("epoch") restarts a_l, z_l from the network's forward pass and
then makes a backward sweep over the layers (see :meth:`AdmmTrainer.fit`); each
weight solve needs one reduction, and the per-sample updates between two
solves run in one pass, so an iteration of an L-layer network costs L passes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
from threadpoolctl import ThreadpoolController

from admm_jobs.trainer import admm, reduction
from admm_jobs.trainer.checkpoint import DriverState
from admm_jobs.trainer.reduction import Partial, Stats

Block = dict[str, Any]
PassFunction = Callable[[Block, dict[str, Any]], tuple[Block, Partial]]

INPUT_SCALE = 1.0 / 255.0
INPUT_TILE_ROWS = 2048  # rows of the uint8 input converted to float32 at a time (6 MiB at 784 pixels: stays in cache)
CONSTANT_SUMS = ("gram1", "samples")  # the statistics that stay valid for the whole run
MAX_BLOCK_RELOADS = 3  # block losses survived in one fit before giving up to the task's own retry

log = logging.getLogger(__name__)


class BlocksLost(RuntimeError):
    """The backend lost blocks' state (an executor went away); ``reload()`` brings their data back."""


class NumericalFailure(RuntimeError):
    """Training diverged (NaN/Inf or exploding residuals); the message names layer and epoch."""


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    layer_sizes: tuple[int, ...]
    loss: str = "squared_hinge"
    beta: float = 1.0
    beta_output: float = 0.3
    gamma: float = 10.0
    ridge_input: float = 1e-2
    ridge: float = 1e-4
    ridge_output: float = 1e-4
    extrapolation: float = 0.9
    extrapolation_epochs: int = 7
    extrapolation_late: float = 0.5
    init_ridge: float = 1e-3
    epochs: int = 100
    warmup_epochs: int = 0
    patience: int = 10
    seed: int = 0
    target_rounds: int = 5
    inner_target_rounds: int = 3
    multiplier_step: float = 1.6

    @property
    def layers(self) -> int:
        return len(self.layer_sizes) - 1

    def beta_of(self, layer: int) -> float:
        """beta_l of layer l (1-based): beta_output on the last layer."""
        return self.beta_output if layer == self.layers else self.beta

    def rounds_of(self, layer: int) -> int:
        """Target-placement rounds of hidden layer l: ``target_rounds`` on the last hidden layer (each of its
        rounds is cheap, W_L being narrow), ``inner_target_rounds`` on the ones below it."""
        return self.target_rounds if layer == self.layers - 1 else self.inner_target_rounds

    def extrapolation_at(self, epoch: int) -> float:
        """theta of iteration ``epoch``: strong over-relaxation early, milder once the fit settles."""
        return self.extrapolation if epoch <= self.extrapolation_epochs else self.extrapolation_late

    def ridge_of(self, layer: int, samples: int) -> float:
        """ridge_l = r_l * n: per-sample ridge rates, so regularisation does not fade with more data."""
        rate = self.ridge_input if layer == 1 else self.ridge_output if layer == self.layers else self.ridge
        return rate * samples


class Backend(Protocol):
    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        """Replace every block by ``function(block, params)[0]`` and return the total of the partials
        (``reduction.total``: the same sums however the rows are cut into blocks)."""

    def inspect(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        """Run ``function`` on every block for its statistics only; the blocks stay as they are."""

    def reload(self) -> None:
        """Start again from the blocks' data without any state (after :class:`BlocksLost`)."""


class LocalBackend:
    """All blocks in this process: the single-process reference implementation."""

    def __init__(self, blocks: Iterable[Block]):
        self.loaded = list(blocks)
        self.blocks = self.loaded

    def reload(self) -> None:
        self.blocks = self.loaded

    def run_pass(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        results = [function(block, params) for block in self.blocks]
        self.blocks = [block for block, _ in results]
        return reduction.total(reduction.merge_all(partial for _, partial in results))

    def inspect(self, function: PassFunction, params: dict[str, Any]) -> Stats:
        return reduction.total(reduction.merge_all(function(block, params)[1] for block in self.blocks))


def statistics_bytes(layer_sizes: tuple[int, ...]) -> int:
    """Bytes of the largest statistics one pass sums (the initialisation's: every layer's Gram
    (n_{l-1} + 1)^2 and the output cross term n_L (n_{L-1} + 1), in float64)."""
    grams = sum((fan_in + 1) ** 2 for fan_in in layer_sizes[:-1])
    return 8 * (grams + layer_sizes[-1] * (layer_sizes[-2] + 1))


def make_block(index: int, pixels: np.ndarray, labels: np.ndarray,
               evaluation: dict[str, tuple[np.ndarray, np.ndarray]], rows: dict[str, tuple[int, int]] | None = None,
               chunk_rows: int = reduction.DEFAULT_CHUNK_ROWS) -> Block:
    """Block ``index``: training samples plus this block's share of the evaluation splits.

    ``rows[split] = (first, total)``: the block's rows of ``split`` start at global row ``first`` of
    ``total`` (whole chunks of ``chunk_rows``, see :mod:`admm_jobs.trainer.reduction`); by default
    the block holds every row of its splits.
    """
    sizes = {"train": labels.shape[0], **{split: split_labels.shape[0] for split, (_, split_labels) in evaluation.items()}}
    rows = rows or {split: (0, size) for split, size in sizes.items()}
    return {"index": index, "pixels": pixels, "labels": labels.astype(np.int64), "evaluation": evaluation,
            "rows": {split: rows[split] for split in sizes}, "chunk_rows": chunk_rows}


def cut_blocks(pixels: np.ndarray, labels: np.ndarray, evaluation: dict[str, tuple[np.ndarray, np.ndarray]],
               count: int, chunk_rows: int = reduction.DEFAULT_CHUNK_ROWS) -> list[Block]:
    """In-memory splits cut into ``count`` blocks of whole chunks (what ``blocks.block_specs`` does for the lake)."""
    splits = {"train": (pixels, labels), **evaluation}
    bounds = {split: reduction.block_bounds(len(split_labels), count, chunk_rows)
              for split, (_, split_labels) in splits.items()}
    blocks = []
    for index in range(count):
        parts = {split: slice(bounds[split][index], bounds[split][index + 1]) for split in splits}
        rows = {split: (part.start, len(splits[split][1])) for split, part in parts.items()}
        share = {split: (splits[split][0][parts[split]], splits[split][1][parts[split]]) for split in evaluation}
        blocks.append(make_block(index, pixels[parts["train"]], labels[parts["train"]], share, rows, chunk_rows))
    return blocks


def _block_rows(block: Block, split: str) -> tuple[int, int, int]:
    """(first global row, rows, total rows) of the block's share of ``split``."""
    first, total = block["rows"][split]
    size = block["labels"].shape[0] if split == "train" else block["evaluation"][split][1].shape[0]
    return first, size, total


def chunked(block: Block, split: str, summarize: Callable[[slice], Stats]) -> Partial:
    """The block's partial of ``split``: ``summarize`` applied to each of its chunks' local row slices."""
    return reduction.chunk_partial(split, *_block_rows(block, split), block["chunk_rows"], summarize)


def _stacked(results: list[Any]) -> Any:
    """Chunk results (arrays, or tuples and lists of them) concatenated along the rows."""
    first = results[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(results) if len(results) > 1 else first
    return type(first)(_stacked([result[i] for result in results]) for i in range(len(first)))


def by_chunk(block: Block, split: str, function: Callable[..., Any], *arrays: np.ndarray) -> Any:
    """``function(*(array[rows] for array in arrays))`` on each chunk of the block's rows of ``split``, stacked.

    Every row's result then comes out of products of one shape, however the rows are cut into
    blocks: BLAS rounds by shape (OpenBLAS's small-matrix and single-row kernels sum in another
    order), and the sums would otherwise depend on the partitioning after all.
    """
    slices = [rows for _, rows in reduction.chunk_slices(split, *_block_rows(block, split), block["chunk_rows"])]
    return _stacked([function(*(array[rows] for array in arrays)) for rows in slices or [slice(0, 0)]])


def scaled_input(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """a_0 = x / 255 - mu: grey levels in [0, 1], centred on the training mean."""
    a0 = pixels.astype(np.float32)
    a0 *= np.float32(INPUT_SCALE)
    a0 -= mean
    return a0


def input_product(weight: np.ndarray, pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """W [a_0, 1] for a_0 = ``scaled_input(pixels, mean)``, from the raw pixels x: x (W / 255)^T + (b - W mu).

    Folding the scale and the mean into the weights leaves one conversion of the wide input,
    made a row tile at a time: no float copy of the whole block is allocated.
    """
    folded = admm.fold_input_mean([weight], mean)[0]
    folded[:, :-1] *= np.float32(INPUT_SCALE)
    product = np.empty((pixels.shape[0], weight.shape[0]), np.float32)
    for rows in admm.row_tiles(pixels.shape[0], INPUT_TILE_ROWS):
        product[rows] = admm.affine(folded, pixels[rows].astype(np.float32))
    return product


def input_cross(target: np.ndarray, pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """C_1 = T^T [a_0, 1] (``admm.layer_cross``) for a_0 = ``scaled_input(pixels, mean)``, summed over row tiles."""
    cross = np.zeros((target.shape[1], pixels.shape[1] + 1))
    for rows in admm.row_tiles(pixels.shape[0], INPUT_TILE_ROWS):
        cross += admm.layer_cross(target[rows], scaled_input(pixels[rows], mean))
    return cross


def input_gram(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """G_1 = [a_0, 1]^T [a_0, 1] (``admm.layer_gram``) for a_0 = ``scaled_input(pixels, mean)``, summed over row tiles."""
    gram = np.zeros((pixels.shape[1] + 1,) * 2)
    for rows in admm.row_tiles(pixels.shape[0], INPUT_TILE_ROWS):
        gram += admm.layer_gram(scaled_input(pixels[rows], mean))
    return gram


def _timed(partial: Partial, started: float) -> Partial:
    partial.timers["worker"] = time.perf_counter() - started
    return partial


def pop_timers(stats: Stats) -> dict[str, float]:
    """Remove the ``<phase>_seconds`` timers (summed over blocks) from ``stats``: {phase: seconds}."""
    return {key[:-len("_seconds")]: stats.pop(key) for key in [k for k in stats if k.endswith("_seconds")]}


def sum_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Partial]:
    """Sum of the scaled training inputs and their count: the driver's input mean."""
    pixels = block["pixels"]  # summed as float64 without a float64 copy of the block
    return block, chunked(block, "train", lambda rows: {
        "input_sum": pixels[rows].sum(axis=0, dtype=np.float64) * INPUT_SCALE, "samples": rows.stop - rows.start})


def hidden_grams(activations: list[np.ndarray]) -> Stats:
    """G_l = [a_{l-1}, 1]^T [a_{l-1}, 1] of layers 2..L, from the forward activations a_1..a_{L-1}."""
    return {f"gram{layer}": admm.layer_gram(a) for layer, a in enumerate(activations, start=2)}


def init_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Partial]:
    """Every u_l = 0, the forward state of the initial weights, and the statistics of the initial
    least-squares fit of the output layer.

    Emits the input Gram (constant for the whole run), the Grams of the forward a_1..a_{L-1} of
    the initial weights and the cross term of a_{L-1} with the loss's fit targets
    (``admm.fit_targets``). Only W_L changes before iteration 1, and the forward a_l (l < L) do
    not depend on it, so the block keeps what iteration 1's forward pass would write (z_1..z_{L-1}
    and the product W_1 [a_0, 1]) and that pass is not run (see ``AdmmTrainer._initialise``).
    """
    started = time.perf_counter()
    weights = params["weights"]
    activations, preactivations = by_chunk(
        block, "train", lambda pixels: admm.forward_from(input_product(weights[0], pixels, params["mean"]), weights[1:]),
        block["pixels"])
    targets = admm.fit_targets(params["loss"], admm.one_hot(block["labels"], weights[-1].shape[0]))
    stats = chunked(block, "train", lambda rows: {
        "gram1": input_gram(block["pixels"][rows], params["mean"]), **hidden_grams([a[rows] for a in activations]),
        "cross_targets": admm.layer_cross(targets[rows], activations[-1][rows])})
    state = {"z": preactivations[:-1], "u": [np.zeros_like(z) for z in preactivations],
             "input_product": preactivations[0]}
    return dict(block, **state), _timed(stats, started)


def _scores(logits: np.ndarray, loss: str, labels: np.ndarray, prefix: str) -> Stats:
    return {
        f"{prefix}_loss_sum": float(admm.sample_losses(loss, logits, labels).sum()),
        f"{prefix}_correct": int((logits.argmax(axis=1) == labels).sum()),
        f"{prefix}_count": int(labels.shape[0]),
    }


def _split_scores(block: Block, split: str, logits: np.ndarray, labels: np.ndarray, loss: str) -> Partial:
    """The loss and accuracy of ``logits`` on the block's rows of ``split``, chunk by chunk."""
    return chunked(block, split, lambda rows: _scores(logits[rows], loss, labels[rows], split))


def forward_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Partial]:
    """The first pass of an iteration: re-synchronise the per-sample variables with the network.

    1. m_1 = W_1 [a_0, 1] with ``input_weight``, W_1 new of the previous iteration (the
       initial W_1 in the first): the pass's only product with the wide input, kept for the
       layer-1 sweep, which completes that iteration's multiplier step with it (u_1 -= alpha m_1;
       the previous sweep already added alpha z_1). The extrapolated layer's pre-activation follows by linearity,
       W_ext [a_0, 1] = m_1 + theta (m_1 - m_1'), where m_1' is the block's previous m_1:
       one product with a_0 instead of two;
    2. a_l, z_l <- the forward pass of the current (extrapolated) ``weights``. Only the
       multipliers u_l carry over between iterations: every weight solve of the sweep
       then fits the inputs the network really produces, instead of auxiliary
       activations that drift away from it (measured: the single largest gain);
    3. emits the Grams of the inputs of layers 2..L (they stay fixed for the whole
       sweep), the cross term [a_{L-1}, 1]^T (z_L + u_L) of the W_L solve and, with
       ``score``, the loss and accuracy of ``weights`` on the training samples (from
       this same forward pass) and on the block's evaluation splits.
    """
    started = time.perf_counter()
    weights, mean, theta = params["weights"], params["mean"], params["theta"]
    product = by_chunk(block, "train", lambda pixels: input_product(params["input_weight"], pixels, mean),
                       block["pixels"])
    first = product if theta == 0.0 else product + np.float32(theta) * (product - block["input_product"])
    a, z = by_chunk(block, "train", lambda rows_first: admm.forward_from(rows_first, weights[1:]), first)
    last = len(weights)
    output_target = z[-1] + block["u"][-1]

    def summarize(rows: slice) -> Stats:
        stats = hidden_grams([activation[rows] for activation in a])
        stats[f"cross{last}"] = admm.layer_cross(output_target[rows], a[-1][rows])
        if params.get("score"):
            stats.update(_scores(z[-1][rows], params["loss"], block["labels"][rows], "train"))
        return stats

    stats = chunked(block, "train", summarize)
    if params.get("score"):
        for split, (pixels, labels) in block["evaluation"].items():
            logits = by_chunk(block, split, lambda chunk: admm.forward_from(
                input_product(weights[0], chunk, mean), weights[1:])[1][-1], pixels)
            stats = reduction.merge(stats, _split_scores(block, split, logits, labels.astype(np.int64), params["loss"]))
    # z_L is not kept: the output update starts from W_L new; nor is a_l = relu(z_l): recomputing it is cheaper
    # than writing and reading it back
    return dict(block, z=z[:-1], input_product=product), _timed(stats, started)


def sweep_pass(block: Block, params: dict[str, Any]) -> tuple[Block, Partial]:
    """The per-sample work between the solves of W_{l+1} and W_l, for hidden layer l = ``layer``.

    0. l = 1 with ``finish``: u_1 -= alpha m_1, m_1 = W_1 [a_0, 1] of the forward pass, completes the
       previous iteration's multiplier step of layer 1 (the forward pass itself writes no u);
    1. l = L-1: m = W_L [a_{L-1}, 1]; z_L = prox of the loss at m - u_L; u_L += alpha (z_L - m).
       l < L-1: u_{l+1} += alpha (z_{l+1} - W_{l+1} [a_l, 1]), the multiplier step of the layer just solved
       (alpha = ``multiplier_step``);
    2. a = argmin_a beta_{l+1} ||z_{l+1} + u_{l+1} - W_{l+1} [a, 1]||^2 + gamma ||a - relu(z_l)||^2
       (exact least squares, W_{l+1} new);
    3. z_l = elementwise prox at m_l - u_l with m_l = W_l [a_{l-1}, 1]: the forward z_l, since
       W_l has not changed since the forward pass; steps 2-3 alternate ``target_rounds`` times
       (``Hyperparameters.rounds_of``, ``admm.place_hidden``), each round starting from the z_l of the one before;
    4. emits the cross term [a_{l-1}, 1]^T (z_l + u_l) of the W_l solve.

    ``a`` only serves to place z_l: the inputs a_{l-1} of every solve stay the forward activations,
    recomputed as relu of the forward z_{l-1} that the block keeps.
    Between iterations a block keeps only the multipliers (u_1 with alpha z_1 already added, step 0
    subtracts the product with W_1 new) and its last product W_1 [a_0, 1].
    """
    started = time.perf_counter()
    layer, next_weight = params["layer"], params["next_weight"]
    z, u = list(block["z"]), list(block["u"])
    if layer == 1 and params["finish"]:
        u[0] = (u[0] - np.float32(params["multiplier_step"]) * block["input_product"]).astype(np.float32)
    last = len(u)
    multiplier_updates = params["multiplier_updates"]
    forward_z = z[layer - 1]  # z_1..z_l are still the forward pass's
    activation = admm.relu(forward_z)  # the input a_l of W_{l+1}
    output_fit = None  # (z_L, m) on the last hidden layer
    if layer == last - 1:
        m = by_chunk(block, "train", functools.partial(admm.affine, next_weight), activation)
        targets = admm.one_hot(block["labels"], m.shape[1])
        z_next = admm.OUTPUT_PROX[params["loss"]](targets, m - u[last - 1], params["beta_output"])
        # always, warm-up included: with a and z restarted from the network every iteration,
        # u_L is what carries the loss into the W_L solve
        u[last - 1] = admm.update_multiplier(u[last - 1], z_next, m, params["multiplier_step"])
        output_fit = (z_next, m)
    else:
        z_next = z[layer]
        if multiplier_updates:
            u[layer] = admm.update_multiplier(
                u[layer], z_next, by_chunk(block, "train", functools.partial(admm.affine, next_weight), activation),
                params["multiplier_step"])
    place = functools.partial(admm.place_hidden, next_weights=next_weight, operator=params["activation"],
                              beta=params["beta"], gamma=params["gamma"], rounds=params["target_rounds"])
    a, z[layer - 1] = by_chunk(block, "train", place, forward_z, forward_z - u[layer - 1], z_next + u[layer])
    target = z[layer - 1] + u[layer - 1]
    layer_input = None if layer == 1 else admm.relu(z[layer - 2])

    def summarize(rows: slice) -> Stats:
        stats = {
            f"cross{layer}": (input_cross(target[rows], block["pixels"][rows], params["mean"]) if layer_input is None
                              else admm.layer_cross(target[rows], layer_input[rows])),
            f"residual{layer}": float(((z[layer - 1][rows] - forward_z[rows]) ** 2).sum()),
            f"activation_gap{layer}": float(((a[rows] - admm.relu(z[layer - 1][rows])) ** 2).sum()),
        }
        if output_fit is not None:
            stats[f"residual{last}"] = float(((output_fit[0][rows] - output_fit[1][rows]) ** 2).sum())
        return stats

    stats = chunked(block, "train", summarize)
    if layer == 1:
        # the first half of u_1 += alpha (z_1 - W_1 [a_0, 1]): the next layer-1 sweep subtracts the product with W_1 new
        if multiplier_updates:
            u[0] = u[0] + np.float32(params["multiplier_step"]) * z[0]
        return dict(block, z=[], u=u), _timed(stats, started)
    # keep only what the rest of the sweep reads: the forward z below l (the inputs a = relu(z)) and the new z_l
    return dict(block, z=z[:layer], u=u), _timed(stats, started)


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

    One iteration t (L layers, L passes):

    * forward pass: score the weights of iteration t-1, restart a_l, z_l from their forward
      pass; W_L = solve(sums) (iteration 1 of a fresh start has none: the initialisation pass
      already ran that network forward);
    * for l = L-1..1, one sweep pass (z_L and u_L, or the u_{l+1} step; a_l, z_l; at l = 1
      first the rest of iteration t-1's u_1 step), then W_l = solve(sums);
    * extrapolate every W: W = W_new + theta_t (W_new - W_new of iteration t-1).

    A final pass scores the last iteration.
    """

    def __init__(self, hp: Hyperparameters, backend: Backend, on_epoch: Callable[[EpochReport], None] | None = None,
                 checkpoints=None, checkpoint_every: int = 0, initial_weights: list[np.ndarray] | None = None):
        if hp.loss not in admm.LOSSES:
            raise ValueError(f"unknown loss {hp.loss!r}; expected one of {admm.LOSSES}")
        self.hp = hp
        self.backend = backend
        self.on_epoch = on_epoch or (lambda report: None)
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.history: list[EpochReport] = []  # every epoch so far, restored ones included
        # The driver's solves are small (G_1 is 785 x 785: ~10 ms on one core). With more BLAS threads they ran
        # 2-3x slower on Spark local[2] (0.065-0.107 s vs 0.030-0.038 s per iteration): the driver's threads
        # contend with the executors' workers for the same cores.
        self.one_blas_thread = functools.partial(ThreadpoolController().limit, limits=1, user_api="blas")
        # warm start: [W_l, b_l] of a trained network for raw input (a_0 = x / 255, as a Model stores them)
        self.initial_weights = initial_weights
        if initial_weights is not None:
            shapes = [w.shape for w in initial_weights]
            expected = [(fan_out, fan_in + 1) for fan_in, fan_out in zip(hp.layer_sizes[:-1], hp.layer_sizes[1:])]
            if shapes != expected:
                raise ValueError(f"initial weights have shapes {shapes}; layers {hp.layer_sizes} need {expected}")

    def _solve(self, cross: np.ndarray, gram: np.ndarray, samples: int, layer: int, epoch: int) -> np.ndarray:
        if not (np.isfinite(cross).all() and np.isfinite(gram).all()):
            raise NumericalFailure(f"epoch {epoch}: the weight statistics of layer {layer} are not finite "
                                   "(NaN/Inf in the data or a diverged state)")
        with self.one_blas_thread():
            return admm.solve_weights(cross, gram, self.hp.ridge_of(layer, samples))

    def _initialise(self) -> DriverState:
        hp = self.hp
        totals = self.backend.inspect(sum_pass, {})
        mean = (totals["input_sum"] / totals["samples"]).astype(np.float32)
        if self.initial_weights is not None:
            weights = admm.centre_input([np.asarray(w, np.float32) for w in self.initial_weights], mean)
        else:
            weights = admm.he_initial_weights(list(hp.layer_sizes), np.random.default_rng(hp.seed))
        sums = self.backend.run_pass(init_pass, {"weights": weights, "mean": mean, "loss": hp.loss})
        pop_timers(sums)
        for key, value in sums.items():
            if not np.isfinite(value).all():
                layer = re.sub(r"\D", "", key) or hp.layers
                raise NumericalFailure(f"epoch 0 (initialisation): the statistics of layer {layer} are not finite "
                                       "(NaN/Inf in the input data)")
        last = hp.layers
        if self.initial_weights is None:
            # a random network's output layer starts as the ridge least-squares fit of the targets
            with self.one_blas_thread():
                weights[-1] = admm.solve_weights(sums["cross_targets"], sums[f"gram{last}"], hp.init_ridge)
        # the input Gram is the only statistic that lives across iterations; the others are iteration 1's
        # forward pass (init_pass): its Grams, and the cross term of z_L + u_L = W_L [a_{L-1}, 1] (u = 0),
        # which is W_L G_L
        first_forward = {f"gram{layer}": sums[f"gram{layer}"] for layer in range(2, last + 1)}
        first_forward[f"cross{last}"] = weights[-1].astype(np.float64) @ sums[f"gram{last}"]
        constant = {"gram1": sums["gram1"], "samples": totals["samples"]}
        return DriverState(epoch=0, weights=weights, new_weights=None, sums={**constant, **first_forward}, mean=mean,
                           best_weights=None, best_loss=math.inf, best_epoch=0, stale=0, history=[],
                           pending_timers={})

    def _pass(self, function: PassFunction, params: dict[str, Any], timers: dict[str, float], name: str,
              epoch: int, update: bool = True) -> Stats:
        """Run one pass, add its timers (wall clock as ``name``, worker phases summed) and check its residuals."""
        tick = time.perf_counter()
        sums = (self.backend.run_pass if update else self.backend.inspect)(function, params)
        timers[name] = time.perf_counter() - tick
        for phase, seconds in pop_timers(sums).items():
            timers[phase] = timers.get(phase, 0.0) + seconds
        check_finite(sums, epoch)
        return sums

    def fit(self) -> TrainingResult:
        """Train; when the backend loses blocks, reload them and go on from the latest checkpoint (or the start)."""
        for reloads in itertools.count():
            try:
                state = self.checkpoints.restore(self.backend) if self.checkpoints else None
                resumed_from = state.epoch if state else None
                return self._fit_from(state or self._initialise(), resumed_from)
            except BlocksLost as exc:
                if reloads >= MAX_BLOCK_RELOADS:
                    raise
                log.warning("%s; reloading the blocks and resuming from the latest checkpoint", exc)
                self.backend.reload()

    def _fit_from(self, state: DriverState, resumed_from: int | None) -> TrainingResult:
        hp = self.hp
        history = self.history = [EpochReport.from_record(r) for r in state.history]
        stopped_early = False
        last, samples = hp.layers, int(state.sums["samples"])
        common = {"mean": state.mean, "loss": hp.loss, "beta_output": hp.beta_output,
                  "multiplier_step": hp.multiplier_step}

        def restart_previous() -> dict[str, Any]:
            """Params that score the previous iteration and restart from its network."""
            if state.new_weights is None:
                return {"weights": state.weights, "input_weight": state.weights[0], "theta": 0.0}
            # W_ext = W_new + theta (W_new - W_new previous); iteration 1 had nothing to extrapolate from
            theta = hp.extrapolation_at(state.epoch) if state.epoch > 1 else 0.0
            return {"weights": state.weights, "input_weight": state.new_weights[0], "theta": theta, "score": True}

        for epoch in range(state.epoch + 1, hp.epochs + 1):
            started = time.perf_counter()
            timers = {"solve": 0.0, "worker": 0.0}
            multiplier_updates = epoch > hp.warmup_epochs
            # the previous iteration's u_1 step waits for the product with its W_1 new (the forward pass's)
            finish = state.new_weights is not None and state.epoch > hp.warmup_epochs
            first_forward = {key: value for key, value in state.sums.items() if key not in CONSTANT_SUMS}
            if first_forward:  # the initialisation ran iteration 1's forward pass
                sums, state.sums = first_forward, {key: state.sums[key] for key in CONSTANT_SUMS}
            else:
                sums = self._pass(forward_pass, {**common, **restart_previous()}, timers, "forward", epoch)
            if "train_count" in sums:
                stopped_early = self._report(state, history, epoch - 1, sums, state.pending_timers)
                if stopped_early:
                    break
            grams = {**sums, "gram1": state.sums["gram1"]}
            new = list(state.weights)
            tick = time.perf_counter()
            new[last - 1] = self._solve(sums[f"cross{last}"], grams[f"gram{last}"], samples, last, epoch)
            timers["solve"] += time.perf_counter() - tick
            for layer in range(last - 1, 0, -1):
                tick = time.perf_counter()
                with self.one_blas_thread():
                    activation = admm.activation_operator(new[layer], hp.beta_of(layer + 1), hp.gamma)
                params = {**common, "multiplier_updates": multiplier_updates, "finish": finish, "layer": layer,
                          "next_weight": new[layer], "beta": hp.beta_of(layer), "gamma": hp.gamma,
                          "target_rounds": hp.rounds_of(layer),
                          "activation": activation}
                timers["solve"] += time.perf_counter() - tick
                sums = self._pass(sweep_pass, params, timers, f"pass{layer}", epoch)
                tick = time.perf_counter()
                new[layer - 1] = self._solve(sums[f"cross{layer}"], grams[f"gram{layer}"], samples, layer, epoch)
                timers["solve"] += time.perf_counter() - tick
            state.weights = admm.extrapolate(new, state.new_weights, hp.extrapolation_at(epoch))
            state.new_weights = new
            state.epoch = epoch
            if not all(np.isfinite(w).all() for w in state.weights):
                raise NumericalFailure(f"epoch {epoch}: weights are not finite")
            state.pending_timers = dict(timers, iteration_seconds=time.perf_counter() - started)
            if self.checkpoints and self.checkpoint_every and epoch % self.checkpoint_every == 0 and epoch < hp.epochs:
                state.history = [r.as_record() for r in history]
                self.checkpoints.save(self.backend, state)
        if not stopped_early and state.new_weights is not None:
            tail: dict[str, float] = {}
            sums = self._pass(forward_pass, {**common, **restart_previous()}, tail, "score", state.epoch, update=False)
            self._report(state, history, state.epoch, sums, dict(state.pending_timers, score=tail["score"]))
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
