"""A cost model of one ADMM iteration on E executors, fitted to measurements; predictions to 512 executors.

    T(E, N, n) = c(n) N / E  +  s(n) N / E  +  rho S(n) (P / R + R)  +  beta B(n) log2(E + 1)  +  d(n)
                 +  p (s0 + (s1 + k) P / E)

* c(n): worker compute seconds per training sample per iteration, network 784-n-n-10. Measured here in one
  single-threaded process (the executors' BLAS is single-threaded) for several n, fitted as
  c(n) = c1 n + c2 n^2 and scaled to the cluster's measured value at n = 256;
* s(n): store I/O seconds per sample per iteration: the cluster's measured value at n = 256, scaled by the
  state bytes per sample 4 (3n + 10);
* S(n): statistics bytes of one partial sum per iteration (Grams and cross terms, float64), P = 2E blocks
  (two per executor); the executors sum them along the chunk tree (``admm_jobs.trainer.reduction``): R
  reducers (R = what a third of the default maxResultSize holds of the largest pass, the initialisation's
  with the 785 x 785 input Gram; at most P) merge P / R partials each in parallel and the driver receives R;
  rho: seconds per byte received and merged: unpickling and adding measured here, plus the transfer at an
  assumed 10 Gbit/s (on one host the cluster's reduction job is within the noise of a no-op job);
* k: the shuffle stage of that reduction, per block and core, fitted on ``bench/reduction_cost.py``'s pass
  seconds against the partition count (local[2]);
* B(n): broadcast bytes per iteration (weights and activation operators); beta = the same assumed 10 Gbit/s,
  Spark's torrent broadcast growing as log2(E + 1) rounds (an assumption: measured at E <= 2 only);
* d(n): the driver's weight solves and activation operators per iteration (LU solves and inverse, O(n^3)),
  measured here for n up to 2048 and fitted as d0 + d3 n^3;
* p = 3 passes per iteration; s0, s1: scheduling of a pass that does nothing, fitted on the cluster runs
  (fixed, and per task in sequence on an executor; the driver's own per-task cost, a few ms in Spark, cannot
  be separated with 1 and 2 executors and is left out, so the scheduling at 512 executors is optimistic).

Strong-scaling efficiency at E executors is T(1, N, n) / (E T(E, N, n)).

    .venv/bin/python bench/scaling_model.py     (after bench/cluster_scaling.py and bench/reduction_cost.py)

Writes bench/results/scaling_model.{json,md,png}.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import statistics
import time

import numpy as np
from scipy.optimize import nnls
from threadpoolctl import threadpool_limits

from admm_jobs.trainer import admm
from admm_jobs.trainer.blocks import block_specs, load_block
from admm_jobs.trainer.config import TrainConfig
from admm_jobs.trainer.loop import AdmmTrainer, LocalBackend, make_block
from admm_jobs.trainer.reduction import add_stats

from common import RESULTS, machine, mnist_dataset_uri

PASSES = 3  # per iteration of a network with two hidden layers
EXECUTORS = (8, 64, 512)
SAMPLES = (60_000, 1_000_000, 10_000_000, 60_000_000)
WIDTHS = (256, 2048)
COMPUTE_WIDTHS = {256: 3000, 512: 2000, 1024: 1000, 2048: 500}  # width: samples measured
SOLVE_WIDTHS = (256, 512, 1024, 1536, 2048)
DEFAULT_MAX_RESULT_BYTES = 2**30  # spark.driver.maxResultSize default (1g)
# Assumed, not measured (one host here): what the driver receives and a broadcast sends per second (10 Gbit/s)
NETWORK_BYTES_PER_SECOND = 1.25e9


def layer_sizes(width: int) -> list[int]:
    return [784, width, width, 10]


def statistics_bytes(width: int) -> dict[str, int]:
    """Bytes of one partial sum: per iteration in total, and of the largest single pass, the initialisation's
    (the first layer's 785 x 785 Gram with every other Gram and the output cross term; run once)."""
    sizes = layer_sizes(width)
    grams = [8 * (sizes[layer - 1] + 1) ** 2 for layer in range(2, len(sizes))]
    crosses = [8 * sizes[layer] * (sizes[layer - 1] + 1) for layer in range(1, len(sizes))]
    forward = sum(grams) + crosses[-1]
    initialisation = 8 * (sizes[0] + 1) ** 2 + sum(grams) + crosses[-1]
    return {"per_iteration": sum(grams) + sum(crosses), "largest_pass": max(initialisation, forward, *crosses[:-1])}


def result_nodes(width: int) -> int:
    """Partial sums the driver receives per split and pass (``train.py``: a third of maxResultSize)."""
    return max(1, DEFAULT_MAX_RESULT_BYTES // 3 // statistics_bytes(width)["largest_pass"])


def broadcast_bytes(width: int) -> int:
    sizes = layer_sizes(width)
    weights = sum(4 * sizes[i + 1] * (sizes[i] + 1) for i in range(len(sizes) - 1))
    first = 4 * sizes[1] * (sizes[0] + 1)
    sweep = sum(4 * sizes[layer + 1] * (sizes[layer] + 1) + 4 * sizes[layer] ** 2 for layer in range(1, len(sizes) - 1))
    return weights + first + sweep


def state_bytes_per_sample(width: int) -> int:
    """u_1, u_2, u_3 and the stored W_1 a_0 product, float32 (3,112 B at n = 256, as bench/scaling.py measured)."""
    return 4 * (3 * width + 10)


def measure_compute(dataset_uri: str) -> dict[int, float]:
    """Single-threaded worker seconds per sample per iteration (the second iteration) for each width."""
    measured = {}
    for width, samples in COMPUTE_WIDTHS.items():
        [spec] = block_specs(dataset_uri, 1, samples)
        block = load_block(spec)
        block = make_block(0, block["pixels"], block["labels"], {})  # training samples only, no scoring splits
        config = TrainConfig(dataset_uri=dataset_uri, output_uri="unused", hidden_layers=(width, width),
                                   epochs=2, patience=0)
        reports = []
        with threadpool_limits(1):
            AdmmTrainer(config.hyperparameters(784, 10), LocalBackend([block]), reports.append).fit()
        measured[width] = reports[-1].timers["worker"] / samples
    return measured


def measure_solves() -> dict[int, float]:
    """Driver seconds per iteration of the weight solves and activation operators, 784-n-n-10 (driver's BLAS threads)."""
    rng = np.random.default_rng(0)
    measured = {}
    for width in SOLVE_WIDTHS:
        sizes = layer_sizes(width)
        grams, crosses, weights = [], [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            a = rng.standard_normal((fan_in + 64, fan_in + 1))
            grams.append(a.T @ a)
            crosses.append(rng.standard_normal((fan_out, fan_in + 1)))
            weights.append(rng.standard_normal((fan_out, fan_in + 1)).astype(np.float32))
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            for cross, gram in zip(crosses, grams):
                admm.solve_weights(cross, gram, 1.0)
            for weight in weights[1:]:
                admm.activation_operator(weight, 1.0, 10.0)
            seconds.append(time.perf_counter() - started)
        measured[width] = statistics.median(seconds)
    return measured


def measure_merge() -> float:
    """Seconds per byte of statistics to unpickle and add (what a reducer or the driver does per partial sum)."""
    sizes = layer_sizes(2048)
    stats = {f"gram{layer}": np.ones((sizes[layer - 1] + 1,) * 2) for layer in range(2, len(sizes))}
    payload = pickle.dumps(stats, protocol=pickle.HIGHEST_PROTOCOL)
    total = dict(stats)
    seconds = []
    for _ in range(5):
        started = time.perf_counter()
        total = add_stats(total, pickle.loads(payload))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) / len(payload)


def fit(cluster: dict, reduction: dict, compute: dict[int, float], solves: dict[int, float], merge: float) -> dict:
    runs = cluster["runs"]
    at_256 = [r for r in runs if r["layer_sizes"][1] == 256]
    # compute: c(n) = c1 n + c2 n^2 (single process), scaled so c(256) matches the cluster's executors
    widths = np.array(sorted(compute), float)
    (c1, c2), _ = nnls(np.column_stack([widths, widths**2]), np.array([compute[int(w)] for w in widths]))
    cluster_c = statistics.median(r["worker_cpu_seconds_per_iteration"] / r["samples"] for r in at_256)
    scale = cluster_c / (c1 * 256 + c2 * 256**2)
    store = statistics.median(r["store_seconds_per_iteration_summed"] / r["samples"] for r in at_256)
    # scheduling of one pass: s0 + s1 P/E (P/E tasks in sequence on each executor); the driver's own
    # per-task cost cannot be told apart from s1 with 1 and 2 executors and is left out
    design = np.array([[1.0, r["blocks"] / r["workers"]] for r in runs])
    (s0, s1), _ = nnls(design, np.array([r["noop_pass_seconds"] for r in runs]))
    solve_widths = np.array(sorted(solves), float)
    (d0, d3), _ = nnls(np.column_stack([np.ones_like(solve_widths), solve_widths**3]),
                       np.array([solves[int(w)] for w in solve_widths]))
    # the reduction's shuffle: pass seconds = a + k' P on local[2], i.e. k = 2 k' per block per core
    passes = reduction["passes"]["rows"]
    (_, per_block), _ = nnls(np.array([[1.0, p["partitions"]] for p in passes]),
                             np.array([p["median_pass_seconds"] for p in passes]))
    return {"c1": c1 * scale, "c2": c2 * scale, "compute_scale_cluster_over_local": scale,
            "shuffle_per_block": 2 * per_block,
            "store_seconds_per_state_byte": store / state_bytes_per_sample(256),
            "rho_seconds_per_byte": merge + 1 / NETWORK_BYTES_PER_SECOND, "rho_merge_seconds_per_byte": merge,
            "beta_seconds_per_byte": 1 / NETWORK_BYTES_PER_SECOND, "s0": s0, "s1": s1, "d0": d0, "d3": d3}


def predict(constants: dict, executors: int, samples: int, width: int) -> dict:
    blocks = 2 * executors
    parts = {
        "compute": (constants["c1"] * width + constants["c2"] * width**2) * samples / executors,
        "store_io": constants["store_seconds_per_state_byte"] * state_bytes_per_sample(width) * samples / executors,
        # reducers (one per tree ancestor, in parallel) merge P / R partials each; the driver receives R
        "reduction": constants["rho_seconds_per_byte"] * statistics_bytes(width)["per_iteration"]
        * (blocks / min(result_nodes(width), blocks) + min(result_nodes(width), blocks)),
        "broadcast": constants["beta_seconds_per_byte"] * broadcast_bytes(width) * math.log2(executors + 1),
        "driver_solve": constants["d0"] + constants["d3"] * width**3,
        "scheduling": PASSES * (constants["s0"] + (constants["s1"] + constants["shuffle_per_block"]) * blocks / executors),
    }
    return {"seconds_per_iteration": sum(parts.values()), "parts": parts,
            "dominant": max(parts, key=parts.get),
            "driver_result_bytes_largest_pass": min(result_nodes(width), blocks) * statistics_bytes(width)["largest_pass"]}


def plot(constants: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    seconds_axis, efficiency_axis = figure.subplots(1, 2)
    grid = np.unique(np.logspace(0, math.log10(1024), 40).round().astype(int))
    for width, style in zip(WIDTHS, ("-", "--")):
        for samples in SAMPLES:
            single = predict(constants, 1, samples, width)["seconds_per_iteration"]
            times = [predict(constants, e, samples, width)["seconds_per_iteration"] for e in grid]
            label = f"n={width}, N={samples:,}"
            seconds_axis.plot(grid, times, style, label=label)
            efficiency_axis.plot(grid, [single / (e * t) for e, t in zip(grid, times)], style, label=label)
    seconds_axis.set(xscale="log", yscale="log", xlabel="executors (1 core each, 2 blocks each)",
                     ylabel="seconds per iteration (model)", title="ADMM iteration, 784-n-n-10")
    efficiency_axis.set(xscale="log", xlabel="executors", ylabel="strong-scaling efficiency", ylim=(0, 1.05),
                        title="T(1) / (E T(E))")
    for axis in (seconds_axis, efficiency_axis):
        for executors in EXECUTORS:
            axis.axvline(executors, color="grey", linewidth=0.5)
        axis.grid(True, which="both", linewidth=0.3)
    efficiency_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    cluster = json.loads((RESULTS / "cluster_scaling.json").read_text())
    reduction = json.loads((RESULTS / "reduction_cost.json").read_text())
    dataset_uri = mnist_dataset_uri()
    load = os.getloadavg()
    compute, solves, merge = measure_compute(dataset_uri), measure_solves(), measure_merge()
    constants = fit(cluster, reduction, compute, solves, merge)
    predictions = []
    for width in WIDTHS:
        for samples in SAMPLES:
            single = predict(constants, 1, samples, width)["seconds_per_iteration"]
            for executors in EXECUTORS:
                row = predict(constants, executors, samples, width)
                predictions.append({
                    "width": width, "samples": samples, "executors": executors,
                    "seconds_per_iteration": round(row["seconds_per_iteration"], 3),
                    "efficiency": round(single / (executors * row["seconds_per_iteration"]), 3),
                    "dominant": row["dominant"], "parts": {k: round(v, 4) for k, v in row["parts"].items()},
                    "driver_result_bytes_largest_pass": row["driver_result_bytes_largest_pass"],
                    "exceeds_default_max_result_size": row["driver_result_bytes_largest_pass"] > DEFAULT_MAX_RESULT_BYTES,
                })
    result = {"command": "bench/scaling_model.py", "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": [round(x, 2) for x in load],
              "measured_compute_seconds_per_sample_single_thread": compute,
              "measured_driver_solve_seconds_per_iteration": solves,
              "constants": constants, "predictions": predictions}
    (RESULTS / "scaling_model.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(constants, RESULTS / "scaling_model.png")
    lines = ["| n | N | executors | s/iteration | efficiency | dominant | compute | store | reduction | broadcast "
             "| solve | scheduling | driver result bytes (largest pass) |", "| --- " * 13 + "|"]
    for p in predictions:
        parts = p["parts"]
        lines.append(f"| {p['width']} | {p['samples']:,} | {p['executors']} | {p['seconds_per_iteration']:.3g} | "
                     f"{p['efficiency']:.2f} | {p['dominant']} | {parts['compute']:.3g} | {parts['store_io']:.3g} | "
                     f"{parts['reduction']:.3g} | {parts['broadcast']:.3g} | {parts['driver_solve']:.3g} | "
                     f"{parts['scheduling']:.3g} | {p['driver_result_bytes_largest_pass'] / 2**20:,.0f} MiB |")
    (RESULTS / "scaling_model.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(constants, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
