"""FLOPs of one ADMM iteration and the GFLOP/s it achieves, next to numpy's float32 GEMM on the same shapes.

    .venv/bin/python bench/flops.py [--epochs 6] [--partitions 4] [--hidden 256,256] [--train-limit N]

Counts the floating-point operations of one iteration of the trainer (every matrix product of
the forward pass, the sweep passes and the scoring of the evaluation splits, plus the driver's
solves), runs the single-process reference (``LocalBackend``, all of numpy's BLAS threads) on the
vendored MNIST, and times, in the same process, exactly the same matrix products with random
float32 operands of the blocks' shapes: the time the iteration would take if it did nothing but
its GEMMs at numpy's speed. A large square float32 GEMM gives the machine's peak for reference.
Writes bench/results/flops.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from study import blocks, load

from admm_jobs.trainer.loop import AdmmTrainer, Hyperparameters, LocalBackend

from common import RESULTS, machine, uptime


def iteration_products(hp: Hyperparameters, rows: int, evaluation_rows: int) -> list[dict]:
    """Every matrix product one block makes in one iteration: (name, m, k, n, symmetric).

    Each hidden layer l places its targets in ``hp.rounds_of(l)`` a/z alternations.

    ``symmetric`` marks X^T X (numpy hands it to BLAS syrk, which computes one triangle: half the FLOPs).
    """
    sizes, layers = hp.layer_sizes, hp.layers
    products = []

    def add(name, m, k, n, symmetric=False):
        products.append({"name": name, "m": m, "k": k, "n": n, "symmetric": symmetric})

    # forward pass: W_1 [a_0, 1] once (the extrapolated z_1 follows by linearity), then layers 2..L
    for layer in range(1, layers + 1):
        add(f"forward z{layer} = a{layer - 1} W{layer}^T", rows, sizes[layer - 1], sizes[layer])
    for layer in range(2, layers + 1):
        add(f"forward gram{layer} = a{layer - 1}^T a{layer - 1}", sizes[layer - 1], rows, sizes[layer - 1], True)
    add(f"forward cross{layers} = (z{layers}+u{layers})^T a{layers - 1}", sizes[layers], rows, sizes[layers - 1])
    for layer in range(1, layers + 1):
        add(f"score evaluation z{layer}", evaluation_rows, sizes[layer - 1], sizes[layer])
    # sweep pass of hidden layer l: the next layer's product with W new (output prox or u step),
    # the z-free part of the activation update once, one product per a/z round, the cross term of the W_l solve
    for layer in range(layers - 1, 0, -1):
        add(f"pass{layer} a{layer} W{layer + 1}^T (new)", rows, sizes[layer], sizes[layer + 1])
        add(f"pass{layer} beta (z{layer + 1}+u{layer + 1}-b) (W{layer + 1} M)", rows, sizes[layer + 1], sizes[layer])
        for round_ in range(1, hp.rounds_of(layer) + 1):
            if 2 * sizes[layer + 1] < sizes[layer]:  # Woodbury's low-rank form of gamma M (admm.ActivationOperator)
                add(f"pass{layer} round {round_}: relu(z{layer}) W{layer + 1}^T", rows, sizes[layer], sizes[layer + 1])
                add(f"pass{layer} round {round_}: (relu(z{layer}) W{layer + 1}^T) (K W{layer + 1})", rows,
                    sizes[layer + 1], sizes[layer])
            else:
                add(f"pass{layer} round {round_}: relu(z{layer}) (gamma M)", rows, sizes[layer], sizes[layer])
        add(f"pass{layer} cross{layer} = (z{layer}+u{layer})^T a{layer - 1}", sizes[layer], rows, sizes[layer - 1])
    return products


def product_flops(product: dict) -> float:
    m, k, n = product["m"], product["k"], product["n"]
    return m * k * (n + 1) if product["symmetric"] else 2.0 * m * k * n


def driver_flops(sizes: list[int]) -> float:
    """LU solve of every W_l (factor + triangular solves) and the activation operators (dense inverse,
    or Woodbury's small solve for a narrow next layer)."""
    total = 0.0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        width = fan_in + 1
        total += 2.0 * width**3 / 3 + 2.0 * 2 * width**2 * fan_out
    for width, next_width in zip(sizes[1:-1], sizes[2:]):
        if 2 * next_width < width:  # W W^T, K W, W W^T (K W)
            total += 2.0 * next_width * width * next_width + 2.0 * next_width**3 / 3 + 2.0 * 2 * next_width**2 * width
        else:  # W^T W, inverse, W M
            total += 2.0 * width * next_width * width + 2.0 * width**3 + 2.0 * next_width * width**2
    return total


def time_products(products: list[dict], repeats: int, rng: np.random.Generator) -> float:
    """Median seconds of running every product once, with float32 operands of the same shapes and layout."""
    operands = []
    for product in products:
        m, k, n = product["m"], product["k"], product["n"]
        if product["symmetric"]:
            x = rng.random((k, m), dtype=np.float32)
            operands.append((x.T, x))
        elif product["name"].startswith(("forward cross", "pass")) and "cross" in product["name"]:
            operands.append((rng.random((k, m), dtype=np.float32).T, rng.random((k, n), dtype=np.float32)))
        else:
            operands.append((rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for left, right in operands:
            left @ right
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def square_peak(size: int, repeats: int, rng: np.random.Generator) -> float:
    a, b = rng.random((size, size), dtype=np.float32), rng.random((size, size), dtype=np.float32)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--train-limit", type=int, default=None)
    args = parser.parse_args()

    sizes = [784, *(int(w) for w in args.hidden.split(",")), 10]
    splits = load("mnist")
    data = blocks(splits, args.train_limit, args.partitions, with_test=True)
    train_rows = [len(b["labels"]) for b in data]
    evaluation_rows = [sum(len(labels) for _, labels in b["evaluation"].values()) for b in data]

    reports = []
    hp = Hyperparameters(layer_sizes=tuple(sizes), epochs=args.epochs, patience=0)
    AdmmTrainer(hp, LocalBackend(data), reports.append).fit()
    steady = reports[1:] or reports  # the first iteration carries no extrapolation and warm-up effects
    iteration_seconds = statistics.median(r.seconds for r in steady)
    worker_seconds = statistics.median(r.timers["worker"] for r in steady)

    products = [p for rows, evaluation in zip(train_rows, evaluation_rows)
                for p in iteration_products(hp, rows, evaluation)]
    gemm_flops = sum(product_flops(p) for p in products)
    total_flops = gemm_flops + driver_flops(sizes)
    rng = np.random.default_rng(0)
    gemm_seconds = time_products(products, 5, rng)
    peak = square_peak(2048, 5, rng)
    per_product = {}
    for product in iteration_products(hp, sum(train_rows), sum(evaluation_rows)):
        per_product[product["name"]] = round(product_flops(product) / 1e9, 3)

    load_average = os.getloadavg()
    result = {
        "command": "bench/flops.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                if v is not None),
        "machine": machine(), "load_average_1_5_15": [round(v, 2) for v in load_average],
        "uptime": uptime(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default (all cores)"),
        "layer_sizes": sizes, "target_rounds": hp.target_rounds,
        "inner_target_rounds": hp.inner_target_rounds, "train_samples": sum(train_rows), "evaluation_samples": sum(evaluation_rows),
        "gflop_per_iteration": round(total_flops / 1e9, 2),
        "gflop_per_iteration_products": per_product,
        "gflop_driver": round(driver_flops(sizes) / 1e9, 3),
        "iteration_seconds_median": round(iteration_seconds, 3),
        "worker_seconds_median": round(worker_seconds, 3),
        "achieved_gflops": round(total_flops / iteration_seconds / 1e9, 1),
        "same_shapes_gemm_seconds": round(gemm_seconds, 3),
        "same_shapes_gemm_gflops": round(gemm_flops / gemm_seconds / 1e9, 1),
        "square_gemm_2048_gflops": round(peak, 1),
        "iterations": [{"epoch": r.epoch, "seconds": round(r.seconds, 3), **{k: round(v, 3) for k, v in r.timers.items()}}
                       for r in reports],
    }
    result["fraction_of_same_shapes_gemm"] = round(result["achieved_gflops"] / result["same_shapes_gemm_gflops"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flops.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Command: `{result['command']}` on {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"`uptime`: {result['uptime']}.\n",
        "| layers | samples (train + scored) | GFLOP / iteration | s / iteration (numpy) | achieved GFLOP/s | "
        "same-shape float32 GEMMs: s, GFLOP/s | achieved / GEMM | square 2048 GEMM GFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {'-'.join(map(str, sizes))} | {result['train_samples']} + {result['evaluation_samples']} | "
        f"{result['gflop_per_iteration']} | {iteration_seconds:.2f} | {result['achieved_gflops']} | "
        f"{gemm_seconds:.2f} s, {result['same_shapes_gemm_gflops']} | {result['fraction_of_same_shapes_gemm']} | "
        f"{result['square_gemm_2048_gflops']} |",
    ]
    (RESULTS / "flops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(per_product, indent=1))


if __name__ == "__main__":
    main()
