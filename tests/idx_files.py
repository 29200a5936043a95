"""Test helpers for MNIST-format IDX files (see data/mnist/README.md for the format)."""

from __future__ import annotations

import gzip as gzip_module
import struct
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
VENDORED_MNIST = REPO_ROOT / "data" / "mnist"
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, gzip: bool = True) -> Path:
    """Write ``array`` as an IDX file at ``path`` (gzip-compressed unless ``gzip=False``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(array)
    # mtime=0 keeps the .gz bytes reproducible.
    path.write_bytes(gzip_module.compress(payload, mtime=0) if gzip else payload)
    return path


def read_vendored(name: str) -> np.ndarray:
    """One vendored MNIST file as an array: images (n, 28, 28) or labels (n,), uint8."""
    raw = gzip_module.decompress((VENDORED_MNIST / f"{name}.gz").read_bytes())
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
