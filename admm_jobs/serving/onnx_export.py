"""Export a trained model to ONNX, for serving outside this code base.

    python -m admm_jobs.serving.onnx_export --model-uri URI --output-uri FILE.onnx
        [--input-type uint8|float32] [--model-name mnist-admm]

``--model-uri`` takes every form :func:`admm_jobs.serving.predict.resolve_model_uri`
accepts (model, run or registry version directory, registry entry or root).

The graph (opset :data:`OPSET`, IR version :data:`IR_VERSION`, so that any
onnxruntime >= 1.13 loads it; batch dimension ``N`` symbolic) is the forward
pass of :mod:`admm_jobs.registry.model`, input scaling included::

    pixels   [N, 784]  uint8 grey levels (or float32 holding the same 0..255 values)
    a_0    = Cast<float>(pixels) * input_scale
    a_l    = Relu(MatMul(a_{l-1}, W_l^T) + b_l)          l = 1 .. L-1
    logits = MatMul(a_{L-1}, W_L^T) + b_L                 output "logits"        [N, 10]
    probabilities = Softmax(logits, axis=1)               output "probabilities" [N, 10]

The model's format, version, weights sha256, layer sizes and input scale are
stored as ONNX metadata properties. Before the file is written the export is
checked with ``onnx.checker`` and run with onnxruntime on a fixed batch of
pseudo-random images; the logits must agree with the numpy forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import setting, validate_fields
from admm_jobs.lake import dataset, storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.serving.predict import load_image_model

OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17 (onnx 1.12)
INPUT_TYPES = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}
INPUT_NAME = "pixels"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
BATCH_DIMENSION = "N"
# |onnx logits - numpy logits| may reach this fraction of max(1, max |logit|): float32 sums in another order.
RELATIVE_LOGIT_TOLERANCE = 1e-4
CHECK_ROWS = 256
CHECK_SEED = 0


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with the numpy forward pass."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export a trained model to an ONNX file."""

    model_uri: str = setting(
        help="model directory, run or registry version directory, registry entry or root", minLength=1
    )
    output_uri: str = setting(help="the .onnx file to write", minLength=1)
    input_type: str = setting(
        "uint8", f"element type of the graph input, one of {', '.join(INPUT_TYPES)}", enum=list(INPUT_TYPES)
    )
    model_name: str = setting(registry.DEFAULT_MODEL_NAME, "registry entry name when --model-uri is a root")

    def __post_init__(self) -> None:
        validate_fields(self)


def model_metadata(model: model_io.Model) -> dict[str, str]:
    """ONNX metadata properties identifying the exported weights (values must be strings)."""
    sha256 = model.metadata.get("weights_sha256") or hashlib.sha256(model_io.weights_bytes(model)).hexdigest()
    return {
        "format": model_io.MODEL_FORMAT,
        "model_version": registry.model_version(sha256),
        "weights_sha256": sha256,
        "layer_sizes": json.dumps(model.layer_sizes),
        "input_scale": repr(model.input_scale),
    }


def build_graph(model: model_io.Model, input_type: str = "uint8") -> onnx.ModelProto:
    """The ONNX model of ``model``'s forward pass (see the module docstring)."""
    if input_type not in INPUT_TYPES:
        raise ExportError(f"input type {input_type!r} is not one of {tuple(INPUT_TYPES)}")
    sizes = model.layer_sizes
    initializers = [numpy_helper.from_array(np.array(model.input_scale, np.float32), "input_scale")]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels_float", "input_scale"], ["a0"]),
    ]
    last = len(model.weights)
    for layer, (weight, bias) in enumerate(zip(model.weights, model.biases), start=1):
        # MatMul computes a @ B, so the (n_out, n_in) weight goes in transposed.
        initializers += [
            numpy_helper.from_array(np.ascontiguousarray(weight.T, np.float32), f"W{layer}_T"),
            numpy_helper.from_array(np.asarray(bias, np.float32), f"b{layer}"),
        ]
        affine = LOGITS_NAME if layer == last else f"z{layer}"
        nodes += [
            helper.make_node("MatMul", [f"a{layer - 1}", f"W{layer}_T"], [f"m{layer}"]),
            helper.make_node("Add", [f"m{layer}", f"b{layer}"], [affine]),
        ]
        if layer < last:
            nodes.append(helper.make_node("Relu", [affine], [f"a{layer}"]))
    nodes.append(helper.make_node("Softmax", [LOGITS_NAME], [PROBABILITIES_NAME], axis=1))
    input_info = helper.make_tensor_value_info(
        INPUT_NAME, INPUT_TYPES[input_type], [BATCH_DIMENSION, sizes[0]]
    )
    graph = helper.make_graph(
        nodes,
        "admm_mlp",
        inputs=[input_info],
        outputs=[
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIMENSION, sizes[-1]])
            for name in (LOGITS_NAME, PROBABILITIES_NAME)
        ],
        initializer=initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="admm_jobs.serving.onnx_export",
        doc_string=f"ReLU MLP {sizes} trained with ADMM; input: raw grey levels 0..255, row-major 28 x 28",
    )
    helper.set_model_props(proto, model_metadata(model))
    return proto


def export_onnx(model: model_io.Model, input_type: str = "uint8") -> bytes:
    """The serialised ONNX model of ``model``, checked by ``onnx.checker`` (with shape inference)."""
    proto = build_graph(model, input_type)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {exc}") from exc
    return proto.SerializeToString()


def run_onnx(onnx_bytes: bytes, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and probabilities of an exported model, computed by onnxruntime on the CPU."""
    import onnxruntime  # heavy; only the checks need it

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    input_type = session.get_inputs()[0].type  # "tensor(uint8)" or "tensor(float)"
    feed = pixels.astype(np.uint8 if "uint8" in input_type else np.float32)
    logits, probabilities = session.run([LOGITS_NAME, PROBABILITIES_NAME], {INPUT_NAME: feed})
    return logits, probabilities


def compare_with_numpy(model: model_io.Model, onnx_bytes: bytes, pixels: np.ndarray) -> dict[str, Any]:
    """Run both forward passes on ``pixels``; raise :class:`ExportError` if the logits disagree.

    Agreement: ``max |z_onnx - z_numpy| <= RELATIVE_LOGIT_TOLERANCE * max(1, max |z_numpy|)``.
    Returns the largest difference and the number of rows whose argmax differs.
    """
    expected = model.logits(pixels)
    actual, _ = run_onnx(onnx_bytes, pixels)
    difference = float(np.max(np.abs(actual - expected))) if len(pixels) else 0.0
    allowed = RELATIVE_LOGIT_TOLERANCE * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    if difference > allowed:
        raise ExportError(
            f"ONNX logits differ from the numpy forward pass by {difference:.3g} (allowed {allowed:.3g})"
        )
    return {
        "max_abs_logit_diff": difference,
        "argmax_mismatches": int(np.sum(np.argmax(actual, axis=1) != np.argmax(expected, axis=1))),
    }


def verified_onnx(model: model_io.Model, input_type: str = "uint8") -> tuple[bytes, dict[str, Any]]:
    """Export ``model`` and check onnxruntime against the numpy forward pass on seeded random images."""
    onnx_bytes = export_onnx(model, input_type)
    check_pixels = np.random.default_rng(CHECK_SEED).integers(
        0, 256, (CHECK_ROWS, dataset.PIXELS_PER_IMAGE), dtype=np.uint8
    )
    return onnx_bytes, compare_with_numpy(model, onnx_bytes, check_pixels)


def export_model(
    model_uri: str, output_uri: str, input_type: str = "uint8", model_name: str = registry.DEFAULT_MODEL_NAME
) -> dict[str, Any]:
    """Export the model ``model_uri`` designates to ``output_uri`` after checking it; returns a summary."""
    model, resolved_model_uri = load_image_model(model_uri, model_name)
    onnx_bytes, agreement = verified_onnx(model, input_type)
    storage.write_bytes(output_uri, onnx_bytes)
    return {
        "output_uri": output_uri,
        "model_uri": resolved_model_uri,
        "model_version": model_metadata(model)["model_version"],
        "input_type": input_type,
        "opset": OPSET,
        "bytes": len(onnx_bytes),
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        **agreement,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(ExportConfig, lambda config: export_model(config.model_uri, config.output_uri,
                                                                 config.input_type, config.model_name), argv)


if __name__ == "__main__":
    main()
