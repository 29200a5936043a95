"""The trained network as an artifact: ``model.npz`` (weights) + ``model.json`` (metadata).

A model with layer sizes ``n_0, ..., n_L`` holds, for l = 1..L, a weight
matrix ``W_l`` of shape (n_l, n_{l-1}) and a bias ``b_l`` of shape (n_l,).
Inference is the plain forward pass

    a_0 = input_scale * x,   a_l = relu(W_l a_{l-1} + b_l)  (l < L),
    logits = W_L a_{L-1} + b_L.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any

import numpy as np

from admm_jobs.lake import storage

MODEL_FORMAT = "admm-mlp/1"
WEIGHTS_FILE = "model.npz"
METADATA_FILE = "model.json"


class ModelError(ValueError):
    """A model artifact is unreadable or does not match what the caller needs."""


@dataclasses.dataclass
class Model:
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    input_scale: float = 1.0 / 255.0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def layer_sizes(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Forward pass on a batch of raw inputs, shape (n, n_0) -> (n, n_L)."""
        if pixels.ndim != 2 or pixels.shape[1] != self.layer_sizes[0]:
            raise ModelError(
                f"input has shape {pixels.shape}, the model expects (n, {self.layer_sizes[0]})"
            )
        activation = pixels.astype(np.float32) * np.float32(self.input_scale)
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            activation = activation @ weight.T + bias
            if index < last:
                np.maximum(activation, 0.0, out=activation)
        return activation

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Predicted class per row."""
        return np.argmax(self.logits(pixels), axis=1)


def weights_bytes(model: Model) -> bytes:
    """The ``model.npz`` payload (deterministic for equal weights)."""
    arrays = {}
    for index, (weight, bias) in enumerate(zip(model.weights, model.biases), start=1):
        arrays[f"W{index}"] = np.ascontiguousarray(weight, dtype=np.float32)
        arrays[f"b{index}"] = np.ascontiguousarray(bias, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_model(model: Model, directory_uri: str) -> dict[str, Any]:
    """Write ``model.npz`` then ``model.json`` (the latter last: it marks the model complete)."""
    payload = weights_bytes(model)
    metadata = dict(model.metadata)
    metadata.update(
        format=MODEL_FORMAT,
        layer_sizes=model.layer_sizes,
        activation="relu",
        input_scale=model.input_scale,
        weights_file=WEIGHTS_FILE,
        weights_sha256=hashlib.sha256(payload).hexdigest(),
    )
    storage.write_bytes(storage.join(directory_uri, WEIGHTS_FILE), payload)
    storage.write_json(storage.join(directory_uri, METADATA_FILE), metadata)
    return metadata


def load_model(directory_uri: str, expected_layer_sizes: list[int] | None = None) -> Model:
    """Load and check a model directory; errors name the file and the problem."""
    meta_uri = storage.join(directory_uri, METADATA_FILE)
    weights_uri = storage.join(directory_uri, WEIGHTS_FILE)
    try:
        metadata = storage.read_json(meta_uri)
    except storage.StorageError as exc:
        raise ModelError(str(exc)) from exc
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        raise ModelError(f"{meta_uri}: not an {MODEL_FORMAT} model description")
    try:
        payload = storage.read_bytes(weights_uri)
    except storage.StorageError as exc:
        raise ModelError(str(exc)) from exc
    if hashlib.sha256(payload).hexdigest() != metadata.get("weights_sha256"):
        raise ModelError(f"{weights_uri}: checksum does not match {meta_uri} (corrupt or replaced)")
    sizes = [int(s) for s in metadata.get("layer_sizes", [])]
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            weights = [arrays[f"W{l}"] for l in range(1, len(sizes))]
            biases = [arrays[f"b{l}"] for l in range(1, len(sizes))]
    except (KeyError, ValueError, OSError) as exc:
        raise ModelError(f"{weights_uri}: unreadable weights: {exc}") from exc
    for l, (weight, bias) in enumerate(zip(weights, biases), start=1):
        if weight.shape != (sizes[l], sizes[l - 1]) or bias.shape != (sizes[l],):
            raise ModelError(
                f"{weights_uri}: layer {l} has shape {weight.shape}, {meta_uri} says "
                f"{(sizes[l], sizes[l - 1])}"
            )
    if expected_layer_sizes is not None and list(expected_layer_sizes) != sizes:
        raise ModelError(
            f"{directory_uri}: architecture {sizes} differs from the expected {list(expected_layer_sizes)}"
        )
    return Model(
        weights=weights,
        biases=biases,
        input_scale=float(metadata["input_scale"]),
        metadata=metadata,
    )

