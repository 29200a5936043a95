"""The training settings: one dataclass for the train stage's CLI, the DAG's params and the plan stage's
training key, and the code version recorded with a model."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from admm_jobs.cli.config import int_tuple, require, setting, validate_fields
from admm_jobs.trainer import admm, reduction
from admm_jobs.trainer.loop import Hyperparameters

MAX_LAYER_WIDTH = 8192


INITS = ("published", "random")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a ReLU network with ADMM on Spark."""

    dataset_uri: str = setting(help="committed dataset directory (LAKE/<dataset>/<version>)", minLength=1)
    output_uri: str = setting(help="run directory; model/ and metrics.jsonl go here", minLength=1)
    hidden_layers: tuple[int, ...] = setting((256, 256), "hidden layer widths, e.g. 256,256",
                                             minItems=1, maxItems=16, items={"minimum": 1, "maximum": MAX_LAYER_WIDTH})
    loss: str = setting("squared_hinge", "output loss (its exact prox is the output update)", enum=list(admm.LOSSES))
    beta: float = setting(1.0, "penalty weight of the hidden layers' z_l = W_l [a_{l-1}, 1]", exclusiveMinimum=0, maximum=1e6)
    beta_output: float = setting(0.3, "penalty weight of the output layer's constraint", exclusiveMinimum=0, maximum=1e6)
    gamma: float = setting(10.0, "penalty weight of a_l = relu(z_l)", exclusiveMinimum=0, maximum=1e6)
    target_rounds: int = setting(5, "rounds of exact alternating a/z minimisation that place the last hidden layer's "
                                 "targets per sweep (1: the classic one-step ADMM update)", minimum=1, maximum=50)
    inner_target_rounds: int = setting(3, "the same for the hidden layers below the last one (each round there costs an "
                                       "n x width x width product)", minimum=1, maximum=50)
    multiplier_step: float = setting(1.6, "step length alpha of the multiplier updates u_l += alpha (z_l - W_l [a_{l-1}, 1]) "
                                     "(1: the plain ADMM step; above (1 + sqrt 5) / 2 even convex ADMM may diverge)",
                                     exclusiveMinimum=0, maximum=2)
    ridge_input: float = setting(1e-2, "ridge of the first layer's weight solve, per training sample", minimum=0, maximum=1e3)
    ridge: float = setting(1e-4, "ridge of the hidden layers' weight solves, per training sample", minimum=0, maximum=1e3)
    ridge_output: float = setting(1e-4, "ridge of the output layer's weight solve, per training sample", minimum=0, maximum=1e3)
    extrapolation: float = setting(0.9, "theta in W = W_new + theta (W_new - W_previous) in the first iterations",
                                   minimum=0, exclusiveMaximum=1)
    extrapolation_epochs: int = setting(7, "iterations up to which --extrapolation is used (the first iteration has "
                                        "nothing to extrapolate from)", minimum=0, maximum=10_000)
    extrapolation_late: float = setting(0.5, "theta in the later iterations", minimum=0, exclusiveMaximum=1)
    epochs: int = setting(100, "ADMM iterations (sweeps over the layers), warm-up included", minimum=1, maximum=10_000)
    warmup_epochs: int = setting(0, "first iterations without hidden-layer multiplier updates", minimum=0, maximum=10_000)
    patience: int = setting(10, "stop after this many iterations without a better validation loss (0: never)",
                            minimum=0, maximum=10_000)
    partitions: int | None = setting(None, "Spark partitions, i.e. sample blocks (none: one per executor core, "
                                     "Spark's default parallelism, or more when a block would exceed --block-rows)",
                                     minimum=1, maximum=10_000)
    block_rows: int = setting(50_000, "most training rows per block when --partitions is not given: a pass holds a "
                              "block's state in one worker's memory (about 7 KB a row for 784-256-256-10, so about "
                              "0.35 GB at 50,000 rows), whatever the dataset size", minimum=1_000, maximum=1 << 30)
    chunk_rows: int = setting(reduction.DEFAULT_CHUNK_ROWS, "rows per chunk of the summed statistics: the sums, "
                              "hence the weights, depend on this but not on --partitions", minimum=2, maximum=1 << 20)
    seed: int = setting(0, "seed of the weight initialisation", minimum=0)
    train_limit: int | None = setting(None, "use only the first N training samples (none: all)", minimum=1)
    checkpoint_every: int = setting(5, "save a resumable checkpoint every N iterations (0: never)", minimum=0, maximum=10_000)
    init: str = setting("published", "start from the published model's weights (--init-model-uri, when its layers "
                        "match) or from random weights", enum=list(INITS))
    init_model_uri: str | None = setting(None, "model directory to start from with --init published (the DAG's plan "
                                         "task passes the published model; none: random start)")

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", int_tuple(self.hidden_layers))
        validate_fields(self)
        require(self.warmup_epochs <= self.epochs,
                f"--warmup-epochs: {self.warmup_epochs} exceeds --epochs {self.epochs}")

    def hyperparameters(self, input_size: int, classes: int) -> Hyperparameters:
        shared = {f.name for f in dataclasses.fields(Hyperparameters)} & {f.name for f in dataclasses.fields(self)}
        return Hyperparameters(layer_sizes=(input_size, *self.hidden_layers, classes),
                               **{name: getattr(self, name) for name in shared})


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib import metadata

    try:
        version = metadata.version("admm-mnist")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{version}+{commit}"
    except (OSError, subprocess.SubprocessError):
        return version
