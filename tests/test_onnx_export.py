"""Tests of the ONNX export: a valid graph whose onnxruntime results equal the numpy forward pass."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime
import pytest

from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.serving import onnx_export, predict

from fitted_model import fitted_model, mnist_test_digits
from run_artifacts import random_model


def mnist_pixels(rows: int = 500) -> np.ndarray:
    images, _ = mnist_test_digits()
    return images[:rows].reshape(rows, -1)


def test_graph_passes_the_checker_and_declares_its_interface():
    model = fitted_model()
    proto = onnx.load_from_string(onnx_export.export_onnx(model))

    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", onnx_export.OPSET)]
    assert proto.ir_version == onnx_export.IR_VERSION
    (graph_input,) = proto.graph.input
    assert graph_input.name == "pixels"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["N", 784]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    assert {node.op_type for node in proto.graph.node} == {"Cast", "Mul", "MatMul", "Add", "Relu", "Softmax"}
    properties = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(properties["layer_sizes"]) == [784, 256, 10]
    sha256 = hashlib.sha256(model_io.weights_bytes(model)).hexdigest()
    assert properties["weights_sha256"] == sha256 and properties["model_version"] == registry.model_version(
        sha256
    )


@pytest.mark.parametrize("input_type", ["uint8", "float32"])
@pytest.mark.parametrize(
    "make_model",
    [fitted_model, lambda: random_model(5, layer_sizes=(784, 64, 32, 10))],
    ids=["fitted-784-256-10", "random-784-64-32-10"],
)
def test_onnxruntime_equals_the_numpy_forward_pass_on_mnist(make_model, input_type):
    model = make_model()
    pixels = mnist_pixels()
    onnx_bytes = onnx_export.export_onnx(model, input_type)

    logits, probabilities = onnx_export.run_onnx(onnx_bytes, pixels)

    expected = model.logits(pixels)
    assert logits.shape == (500, 10) and logits.dtype == np.float32
    assert np.max(np.abs(logits - expected)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))
    assert np.array_equal(np.argmax(logits, axis=1), model.predict(pixels))
    np.testing.assert_allclose(probabilities, predict.softmax(expected), atol=1e-6)
    agreement = onnx_export.compare_with_numpy(model, onnx_bytes, pixels)
    assert agreement["argmax_mismatches"] == 0


def test_uint8_graph_takes_raw_grey_levels_and_scales_inside():
    """Feeding the raw uint8 image gives the logits of W (x / 255) + b, not of W x + b."""
    model = random_model(6, layer_sizes=(784, 10))
    pixels = mnist_pixels(20)
    session = onnxruntime.InferenceSession(onnx_export.export_onnx(model), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    (logits,) = session.run(["logits"], {"pixels": pixels})
    by_hand = (pixels / 255.0) @ model.weights[0].T.astype(np.float64) + model.biases[0]
    np.testing.assert_allclose(logits, by_hand, rtol=1e-4, atol=1e-5)


def test_disagreeing_graph_is_detected():
    pixels = mnist_pixels(50)
    other_onnx = onnx_export.export_onnx(random_model(8))
    with pytest.raises(onnx_export.ExportError, match="differ from the numpy forward pass"):
        onnx_export.compare_with_numpy(random_model(7), other_onnx, pixels)


def test_main_writes_the_checked_file(tmp_path, capsys):
    model_dir = str(tmp_path / "run" / "model")
    metadata = model_io.save_model(fitted_model(), model_dir)
    output = tmp_path / "export" / "model.onnx"

    result = onnx_export.main(["--model-uri", str(tmp_path / "run"), "--output-uri", str(output)])

    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    data = output.read_bytes()
    assert result["sha256"] == hashlib.sha256(data).hexdigest() and result["bytes"] == len(data)
    assert result["model_uri"] == model_dir
    assert result["model_version"] == registry.model_version(metadata["weights_sha256"])
    assert result["max_abs_logit_diff"] < 1e-4
    logits, _ = onnx_export.run_onnx(data, mnist_pixels())
    assert np.array_equal(np.argmax(logits, axis=1), fitted_model().predict(mnist_pixels()))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--input-type", "int8"], "--input-type"),
        (["--output-uri", ""], "--output-uri"),
        (["--model-uri", ""], "--model-uri"),
    ],
)
def test_bad_settings_are_usage_errors_naming_the_option(tmp_path, capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        onnx_export.main(["--model-uri", str(tmp_path), "--output-uri", str(tmp_path / "m.onnx"), *argv])
    assert exit_info.value.code == 2
    assert f"error: {option}: " in capsys.readouterr().err
