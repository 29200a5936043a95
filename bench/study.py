"""Accuracy study of the ADMM recipe on the single-process reference (numpy ``LocalBackend``).

    .venv/bin/python bench/study.py [--data mnist|distorted] [--train-limit 20000] [--epochs 30]
                                    [--hidden 256,256] [--set beta_output=0.3 --set gamma=10 ...] [--test]

Reads the vendored IDX files directly (no Spark): train = the first 55,000 training images (or
``--train-limit`` of them), validation = the last 5,000, as the pipeline's ingest splits them.
``--data distorted`` is a harder MNIST-format proxy built offline from the same digits: every
image (train, validation and test alike) gets a random affine distortion (rotation within
+-20 degrees, scale 0.85-1.15, shear within +-0.2, shift within +-3 pixels) and additive
Gaussian pixel noise (sigma 25 grey levels), with a fixed seed. Hyperparameters are chosen on
the validation split; the test split is scored only with ``--test`` (final defaults only).
``--trainer adam`` trains the gradient reference (scikit-learn's Adam) on the same splits instead.
Prints one line per iteration and, with ``--out FILE``, appends one JSON record per run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

from admm_jobs.trainer import admm
from admm_jobs.trainer.loop import AdmmTrainer, Hyperparameters, LocalBackend, cut_blocks

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "data" / "mnist"
CACHE = ROOT / "bench" / ".work"
VALIDATION = 5000


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def distort(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random affine distortion plus Gaussian pixel noise, image by image (28x28 uint8)."""
    from scipy import ndimage

    out = np.empty_like(images)
    centre = np.array([13.5, 13.5])
    for index, image in enumerate(images):
        angle = np.deg2rad(rng.uniform(-20, 20))
        scale = rng.uniform(0.85, 1.15)
        shear = rng.uniform(-0.2, 0.2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) / scale
        shift = rng.uniform(-3, 3, size=2)
        offset = centre - matrix @ (centre + shift)
        warped = ndimage.affine_transform(image.astype(np.float32), matrix, offset=offset, order=1)
        noisy = warped + rng.normal(0.0, 25.0, size=warped.shape)
        out[index] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def load(data: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "validation", "test"}: (pixels uint8 (n, 784), labels int64)."""
    images = {"train": read_idx(MNIST / "train-images-idx3-ubyte.gz"),
              "test": read_idx(MNIST / "t10k-images-idx3-ubyte.gz")}
    labels = {"train": read_idx(MNIST / "train-labels-idx1-ubyte.gz"),
              "test": read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")}
    if data == "distorted":
        cache = CACHE / "distorted_mnist.npz"
        if not cache.exists():
            rng = np.random.default_rng(2026)
            CACHE.mkdir(parents=True, exist_ok=True)
            np.savez(cache, train=distort(images["train"], rng), test=distort(images["test"], rng))
        with np.load(cache) as arrays:
            images = {"train": arrays["train"], "test": arrays["test"]}
    flat = {k: v.reshape(len(v), -1) for k, v in images.items()}
    cut = len(flat["train"]) - VALIDATION
    return {"train": (flat["train"][:cut], labels["train"][:cut].astype(np.int64)),
            "validation": (flat["train"][cut:], labels["train"][cut:].astype(np.int64)),
            "test": (flat["test"], labels["test"].astype(np.int64))}


def blocks(splits, train_limit: int | None, partitions: int, with_test: bool):
    pixels, labels = splits["train"]
    if train_limit:
        pixels, labels = pixels[:train_limit], labels[:train_limit]
    scored = ["validation", "test"] if with_test else ["validation"]
    return cut_blocks(pixels, labels, {split: splits[split] for split in scored}, partitions)


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def nesterov_with_restart(trainer: AdmmTrainer, cap: float):
    """theta_k = (k - 1) / (k + 2) (capped), k counted since the last restart; a restart (theta 0, k = 1)
    whenever the network's training loss went up from one iteration to the next."""
    restarts = {"since": 0}
    chosen: dict[int, float] = {}  # the trainer asks again for the theta it used, one pass later

    def extrapolation_at(epoch: int) -> float:
        if epoch not in chosen:
            chosen[epoch] = choose(epoch)
        return chosen[epoch]

    def choose(epoch: int) -> float:
        history = trainer.history
        if len(history) >= 2 and history[-1].metrics["train_loss"] > history[-2].metrics["train_loss"]:
            if restarts["since"] != len(history):
                restarts["since"] = len(history)
                return 0.0
        k = epoch - restarts["since"]
        return min(cap, (k - 1) / (k + 2)) if k > 0 else 0.0

    return extrapolation_at


def anderson_one(hp: Hyperparameters, cap: float):
    """theta_t of type-II Anderson acceleration with memory 1 on the weights (a safeguarded, adaptive theta).

    With the fixed-point map G (one iteration: W_ext(t-1) -> W_new(t)) and residuals
    f_t = W_new(t) - W_ext(t-1), the mix W_ext(t) = (1 + theta) W_new(t) - theta W_new(t-1)
    has the combined residual f_t + theta (f_t - f_{t-1}); its minimiser
    theta = -<f_t, f_t - f_{t-1}> / ||f_t - f_{t-1}||^2 is clipped to [0, cap] (the safeguard).
    Replaces admm.extrapolate in this process; returns the matching extrapolation_at.
    """
    memory = {"previous_residual": None, "previous_ext": None, "epoch": 0}
    chosen: dict[int, float] = {}
    plain = admm.extrapolate

    def extrapolate(new, previous, theta):
        memory["epoch"] += 1
        residual = None if memory["previous_ext"] is None else [n - e for n, e in zip(new, memory["previous_ext"])]
        theta = 0.0
        if previous is not None and residual is not None and memory["previous_residual"] is not None:
            diff = [r - p for r, p in zip(residual, memory["previous_residual"])]
            denominator = sum(float((d.astype(np.float64) ** 2).sum()) for d in diff)
            numerator = -sum(float((r.astype(np.float64) * d).sum()) for r, d in zip(residual, diff))
            theta = float(np.clip(numerator / denominator, 0.0, cap)) if denominator > 0 else 0.0
        elif previous is not None:
            theta = hp.extrapolation
        chosen[memory["epoch"]] = theta
        result = plain(new, previous, theta)
        memory["previous_residual"], memory["previous_ext"] = residual, result
        return result

    admm.extrapolate = extrapolate
    return lambda epoch: chosen.get(epoch, 0.0)


def run(args, splits) -> dict:
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    hidden = tuple(int(w) for w in args.hidden.split(","))
    hp = Hyperparameters(layer_sizes=(784, *hidden, 10), epochs=args.epochs, patience=0, **overrides)
    curve = []
    started = time.perf_counter()

    def record(report):
        m = report.metrics
        curve.append({"epoch": report.epoch, "seconds": round(time.perf_counter() - started, 2),
                      **{k: round(v, 5) for k, v in m.items() if k.endswith("accuracy") or k.endswith("loss")}})
        print(f"  it {report.epoch:3d} {curve[-1]['seconds']:7.1f}s train {m['train_accuracy']:.4f} "
              f"val {m['validation_accuracy']:.4f}" + (f" test {m['test_accuracy']:.4f}" if "test_accuracy" in m else ""),
              flush=True)

    trainer = AdmmTrainer(hp, LocalBackend(blocks(splits, args.train_limit, args.partitions, args.test)), record)
    if args.variant.startswith("nesterov"):
        cap = float(args.variant.split(":")[1]) if ":" in args.variant else 0.95
        object.__setattr__(hp, "extrapolation_at", nesterov_with_restart(trainer, cap))
    if args.variant.startswith("anderson"):
        cap = float(args.variant.split(":")[1]) if ":" in args.variant else 0.95
        object.__setattr__(hp, "extrapolation_at", anderson_one(hp, cap))
    trainer.fit()
    best = max(curve, key=lambda p: p["validation_accuracy"])
    first97 = next((p["epoch"] for p in curve if p["validation_accuracy"] >= 0.97), None)
    return {"data": args.data, "train_limit": args.train_limit, "hidden": hidden, "overrides": overrides, "variant": args.variant,
            "epochs": args.epochs, "best_validation": best["validation_accuracy"], "best_epoch": best["epoch"],
            "final_validation": curve[-1]["validation_accuracy"], "final_train": curve[-1]["train_accuracy"],
            "first_epoch_val_97": first97, "seconds": curve[-1]["seconds"], "label": args.label,
            "curve": curve}


def run_adam(args, splits) -> dict:
    """The gradient reference on the same splits: scikit-learn's MLPClassifier, Adam, batch 128, one epoch a step."""
    from sklearn.neural_network import MLPClassifier

    hidden = tuple(int(w) for w in args.hidden.split(","))
    x, y = splits["train"]
    if args.train_limit:
        x, y = x[:args.train_limit], y[:args.train_limit]
    x = x.astype(np.float32) / 255.0
    scored = ["validation", "test"] if args.test else ["validation"]
    model = MLPClassifier(hidden_layer_sizes=hidden, solver="adam", batch_size=128, random_state=0)
    curve, seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.partial_fit(x, y, classes=np.arange(10))
        seconds += time.perf_counter() - started
        point = {"epoch": epoch, "seconds": round(seconds, 2), "train_accuracy": float((model.predict(x) == y).mean())}
        for split in scored:
            pixels, labels = splits[split]
            point[f"{split}_accuracy"] = float((model.predict(pixels.astype(np.float32) / 255.0) == labels).mean())
        curve.append(point)
        print(f"  epoch {epoch:3d} {seconds:7.1f}s " + " ".join(f"{k} {v:.4f}" for k, v in point.items()
                                                              if k.endswith("accuracy")), flush=True)
    best = max(curve, key=lambda p: p["validation_accuracy"])
    return {"data": args.data, "train_limit": args.train_limit, "hidden": hidden, "trainer": "adam",
            "epochs": args.epochs, "best_validation": best["validation_accuracy"], "best_epoch": best["epoch"],
            "final_validation": curve[-1]["validation_accuracy"], "final_train": curve[-1]["train_accuracy"],
            "first_epoch_val_97": next((p["epoch"] for p in curve if p["validation_accuracy"] >= 0.97), None),
            "seconds": curve[-1]["seconds"], "label": args.label, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["mnist", "distorted"], default="mnist")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="Hyperparameters field=value")
    parser.add_argument("--test", action="store_true", help="also score the test split (final defaults only)")
    parser.add_argument("--trainer", choices=["admm", "adam"], default="admm")
    parser.add_argument("--variant", default="", help="nesterov[:cap]: theta (k-1)/(k+2), restart when the loss rises")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None, help="append the run's JSON record to this file")
    args = parser.parse_args()
    splits = load(args.data)
    result = run_adam(args, splits) if args.trainer == "adam" else run(args, splits)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
