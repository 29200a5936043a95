"""Test helpers for MNIST-format IDX files (see data/mnist/README.md for the format)."""

from __future__ import annotations

import gzip as gzip_module
import struct
from pathlib import Path

import numpy as np

from admm_jobs.lake.idx import idx_bytes, write_idx  # noqa: F401 (the tests' IDX writer is the project's)

REPO_ROOT = Path(__file__).resolve().parents[1]
VENDORED_MNIST = REPO_ROOT / "data" / "mnist"
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def read_vendored(name: str) -> np.ndarray:
    """One vendored MNIST file as an array: images (n, 28, 28) or labels (n,), uint8."""
    raw = gzip_module.decompress((VENDORED_MNIST / f"{name}.gz").read_bytes())
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
