"""Tests of the predict command: every input form, model resolution (local, registry, S3), errors."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from admm_jobs import publish
from admm_jobs.lake import dataset, idx, storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.serving import predict

from fitted_model import fitted_model, mnist_test_digits
from idx_files import write_idx
from run_artifacts import make_evaluated_run, random_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path) -> str:
    uri = str(tmp_path / "run" / "model")
    model_io.save_model(fitted_model(), uri)
    return uri


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(directory: Path, images: np.ndarray) -> list[str]:
    """One PNG per image, named so that sorted order is image order; returns the names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"digit-{index:03d}.png" for index in range(len(images))]
    for name, image in zip(names, images):
        (directory / name).write_bytes(png_bytes(image))
    return names


def read_rows(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines()]


def assert_rows_match(rows: list[dict], ids: list[str], model: model_io.Model, pixels: np.ndarray) -> None:
    """Rows carry ``ids`` in order, the numpy model's labels and softmax(logits) to 6 digits."""
    pixels = pixels.reshape(len(pixels), -1)
    assert [row["id"] for row in rows] == ids
    expected_labels = model.predict(pixels)
    assert [row["predicted_label"] for row in rows] == expected_labels.tolist()
    probabilities = np.array([row["probabilities"] for row in rows])
    np.testing.assert_allclose(probabilities, predict.softmax(model.logits(pixels)), rtol=1e-5, atol=1e-300)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_softmax_is_stable_and_normalised():
    logits = np.array([[0.0, 0.0], [1000.0, 1000.0 + np.log(3.0)], [-1000.0, 0.0]])
    np.testing.assert_allclose(predict.softmax(logits), [[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]])


@pytest.mark.parametrize("gzip", [True, False])
def test_idx_images_file(model_dir, tmp_path, gzip):
    images, labels = mnist_test_digits()
    source = write_idx(tmp_path / ("images.gz" if gzip else "images"), images[:300], compress=gzip)
    output = str(tmp_path / "out" / "predictions.jsonl")

    summary = predict.predict(model_dir, str(source), output)

    model = model_io.load_model(model_dir)
    rows = read_rows(output)
    assert_rows_match(rows, [str(i) for i in range(300)], model, images[:300])
    # The fitted model recognises about 80 % of these digits: the images reached it the right way up.
    accuracy = np.mean(np.array([row["predicted_label"] for row in rows]) == labels[:300])
    assert accuracy > 0.7
    assert summary["count"] == 300 and summary["input_format"] == "idx"
    assert summary["output_uri"] == output and summary["model_uri"] == model_dir
    assert summary["model_version"] == registry.model_version(model.metadata["weights_sha256"])
    assert (
        summary["predicted_class_counts"]
        == np.bincount(model.predict(images[:300].reshape(300, -1)), minlength=10).tolist()
    )
    assert summary["light_background"] == 0


def test_png_directory_and_single_png(model_dir, tmp_path):
    images, _ = mnist_test_digits()
    directory = tmp_path / "pngs"
    names = write_pngs(directory, images[:12])
    (directory / "notes.txt").write_text("not an image, and not a .png: ignored")
    write_pngs(directory / ".staging-x", images[:2])  # hidden: ignored
    model = model_io.load_model(model_dir)

    predict.predict(model_dir, str(directory), str(tmp_path / "dir.jsonl"))
    assert_rows_match(read_rows(str(tmp_path / "dir.jsonl")), names, model, images[:12])

    summary = predict.predict(model_dir, str(directory / names[5]), str(tmp_path / "one.jsonl"))
    assert summary["input_format"] == "png" and summary["count"] == 1
    assert_rows_match(read_rows(str(tmp_path / "one.jsonl")), [names[5]], model, images[5:6])


def test_rgb_16_bit_and_larger_pngs_reduce_to_the_same_pixels(model_dir, tmp_path):
    images, _ = mnist_test_digits()
    digit = images[7]
    directory = tmp_path / "variants"
    directory.mkdir()
    # R = G = B = g has luma g exactly; a 2 x 2 block of equal pixels has that value as its mean.
    (directory / "a-rgb.png").write_bytes(png_bytes(np.repeat(digit[:, :, None], 3, axis=2)))
    (directory / "b-large.png").write_bytes(png_bytes(np.kron(digit, np.ones((2, 2), np.uint8))))
    (directory / "c-16bit.png").write_bytes(png_bytes(digit.astype(np.uint16) * 257))
    with Image.open(directory / "c-16bit.png") as image:
        assert image.mode.startswith("I")  # really stored as 16-bit grey

    predict.predict(model_dir, str(directory), str(tmp_path / "out.jsonl"))

    names = ["a-rgb.png", "b-large.png", "c-16bit.png"]
    assert_rows_match(
        read_rows(str(tmp_path / "out.jsonl")), names, model_io.load_model(model_dir), np.stack([digit] * 3)
    )


def test_resizing_averages_the_covered_area(tmp_path):
    """BOX resampling: each of the 28 x 28 pixels is the mean of its 2 x 2 block of a 56 x 56 image."""
    large = np.random.default_rng(3).integers(0, 256, (56, 56), dtype=np.uint8)
    block_means = large.reshape(28, 2, 28, 2).astype(np.float64).mean(axis=(1, 3))
    pixels = predict.png_pixels("large.png", png_bytes(large)).reshape(28, 28)
    # Pillow's fixed-point arithmetic may round a mean up rather than to nearest.
    assert np.max(np.abs(pixels - block_means)) <= 1.0


def test_dark_on_light_images_are_flagged_and_inverted_only_on_request(model_dir, tmp_path, caplog):
    images, _ = mnist_test_digits()
    paper = 255 - images[:6]
    directory = tmp_path / "paper"
    names = write_pngs(directory, paper)
    model = model_io.load_model(model_dir)

    with caplog.at_level(logging.WARNING, logger="admm_jobs.predict"):
        plain = predict.predict(model_dir, str(directory), str(tmp_path / "plain.jsonl"))
    assert plain["light_background"] == 6 and not plain["inverted"]
    assert "--invert" in caplog.text and str(directory) in caplog.text
    assert_rows_match(read_rows(str(tmp_path / "plain.jsonl")), names, model, paper)  # as given, not inverted

    inverted = predict.predict(model_dir, str(directory), str(tmp_path / "inverted.jsonl"), invert=True)
    assert inverted["light_background"] == 0 and inverted["inverted"]
    assert_rows_match(read_rows(str(tmp_path / "inverted.jsonl")), names, model, images[:6])


def test_parquet_dataset_split_directory_and_part_file(model_dir, small_dataset, tmp_path):
    dataset_uri = small_dataset["dataset_uri"]
    model = model_io.load_model(model_dir)
    for split in ("test", "validation"):
        pixels, _ = dataset.read_split(dataset_uri, split)
        part_files = dataset.split_file_uris(dataset_uri, split)
        ids = [
            i for uri in part_files for i in pq.read_table(uri, columns=["image_id"]).column(0).to_pylist()
        ]
        output = str(tmp_path / f"{split}.jsonl")

        summary = predict.predict(model_dir, dataset_uri, output, split=split)

        assert summary["count"] == len(pixels) and summary["input_format"] == "parquet"
        assert_rows_match(read_rows(output), ids, model, pixels)

    part_file = dataset.split_file_uris(dataset_uri, "test")[0]
    # The directory holding the test split's part files (shared by dataset versions, outside this one's).
    split_directory = str(Path(part_file).parent)
    assert Path(split_directory).name == dataset.split_directory("test")
    predict.predict(model_dir, split_directory, str(tmp_path / "dir.jsonl"))
    predict.predict(model_dir, part_file, str(tmp_path / "file.jsonl"), input_format="parquet")
    rows_from_directory = read_rows(str(tmp_path / "dir.jsonl"))
    assert rows_from_directory == read_rows(str(tmp_path / "test.jsonl"))
    part_rows = read_rows(str(tmp_path / "file.jsonl"))
    assert part_rows == rows_from_directory[: len(part_rows)]


def publish_two_runs(tmp_path: Path, registry_uri: str) -> tuple[str, str, str]:
    """Publish run-a then a better run-b; returns (run-a, version a, version b)."""
    first = make_evaluated_run(str(tmp_path / "run-a"), seed=1, test_accuracy=0.9)
    second = make_evaluated_run(str(tmp_path / "run-b"), seed=2, test_accuracy=0.95)
    for run in ("run-a", "run-b"):
        assert publish.publish_run(str(tmp_path / run), registry_uri)["published"]
    return str(tmp_path / "run-a"), first, second


def test_model_uri_forms_resolve_to_the_right_model(tmp_path):
    registry_uri = str(tmp_path / "registry")
    run_a, version_a, version_b = publish_two_runs(tmp_path, registry_uri)
    entry = storage.join(registry_uri, registry.DEFAULT_MODEL_NAME)
    current_model = storage.join(entry, version_b, registry.MODEL_DIR)

    assert predict.resolve_model_uri(registry_uri) == current_model
    assert predict.resolve_model_uri(entry) == current_model
    assert predict.resolve_model_uri(storage.join(entry, version_a)) == storage.join(
        entry, version_a, "model"
    )
    assert predict.resolve_model_uri(run_a) == storage.join(run_a, "model")
    assert predict.resolve_model_uri(storage.join(run_a, "model")) == storage.join(run_a, "model")

    images, _ = mnist_test_digits()
    source = write_idx(tmp_path / "images.gz", images[:50])
    summary = predict.predict(registry_uri, str(source), str(tmp_path / "out.jsonl"))
    assert summary["model_version"] == version_b
    assert_rows_match(
        read_rows(str(tmp_path / "out.jsonl")),
        [str(i) for i in range(50)],
        model_io.load_model(str(tmp_path / "run-b" / "model")),
        images[:50],
    )


def test_s3_registry_inputs_and_output(s3_env, tmp_path):
    bucket = f"s3://{s3_env}"
    registry_uri = f"{bucket}/registry"
    run = str(tmp_path / "run")
    version = make_evaluated_run(run, seed=4, test_accuracy=0.9)
    publish.publish_run(run, registry_uri)
    images, _ = mnist_test_digits()
    model = model_io.load_model(storage.join(run, "model"))

    # boto3, not storage.write_bytes: pyarrow's output streams gzip objects named *.gz a second time.
    boto3.client("s3").put_object(
        Bucket=s3_env,
        Key="inputs/images.gz",
        Body=write_idx(tmp_path / "images.gz", images[:40]).read_bytes(),
    )
    summary = predict.predict(registry_uri, f"{bucket}/inputs/images.gz", f"{bucket}/out/idx.jsonl")
    assert summary["model_version"] == version
    assert summary["model_uri"] == f"{registry_uri}/{registry.DEFAULT_MODEL_NAME}/{version}/model"
    assert_rows_match(read_rows(f"{bucket}/out/idx.jsonl"), [str(i) for i in range(40)], model, images[:40])

    for index in range(3):
        storage.write_bytes(f"{bucket}/inputs/pngs/d{index}.png", png_bytes(images[index]))
    predict.predict(registry_uri, f"{bucket}/inputs/pngs", f"{bucket}/out/png.jsonl")
    assert_rows_match(read_rows(f"{bucket}/out/png.jsonl"), ["d0.png", "d1.png", "d2.png"], model, images[:3])


def test_main_without_output_prints_rows_then_the_summary(model_dir, tmp_path, capsys):
    images, _ = mnist_test_digits()
    source = write_idx(tmp_path / "images.gz", images[:5])

    result = predict.main(["--model-uri", model_dir, "--input", str(source)])

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert json.loads(lines[-1]) == result and result["output_uri"] is None
    assert_rows_match(
        [json.loads(line) for line in lines[:5]],
        [str(i) for i in range(5)],
        model_io.load_model(model_dir),
        images[:5],
    )


def test_command_line(model_dir, tmp_path):
    images, _ = mnist_test_digits()
    write_pngs(tmp_path / "pngs", 255 - images[:3])
    output = tmp_path / "out.jsonl"

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "admm_jobs.serving.predict", "--model-uri", model_dir, *args]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    done = run("--input", str(tmp_path / "pngs"), "--output", str(output), "--invert", "true")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["count"] == 3 and summary["inverted"] and summary["output_uri"] == str(output)
    assert len(read_rows(str(output))) == 3

    missing = tmp_path / "missing.gz"
    failed = run("--input", str(missing))
    assert failed.returncode != 0 and f"{missing}: no such file or directory" in failed.stderr

    bad_option = run("--input", str(output), "--format", "jpeg")
    assert bad_option.returncode == 2 and "--format" in bad_option.stderr


# --- errors -----------------------------------------------------------------------------------


def test_model_of_another_architecture_is_refused(tmp_path):
    uri = str(tmp_path / "model")
    model_io.save_model(random_model(0, layer_sizes=(100, 16, 10)), uri)
    source = write_idx(tmp_path / "images.gz", mnist_test_digits()[0][:2])
    with pytest.raises(predict.PredictError, match=r"model: the model takes 100 inputs .* 784 pixels"):
        predict.predict(uri, str(source), str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_model_uri_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(predict.PredictError, match=r"empty: no model found .*current\.json"):
        predict.resolve_model_uri(str(tmp_path / "empty"))
    entry = tmp_path / "registry" / registry.DEFAULT_MODEL_NAME
    entry.mkdir(parents=True)
    (entry / registry.POINTER_FILE).write_text("{not json")
    with pytest.raises(registry.RegistryError, match=r"current\.json: registry pointer is not valid JSON"):
        predict.resolve_model_uri(str(tmp_path / "registry"))


def write_file(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def truncated_png() -> bytes:
    """The first half of a PNG whose pixel data spans many bytes (noise does not compress)."""
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    return data[: len(data) // 2]


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make_input", "options", "error", "message"),
    [
        (
            lambda d: str(d / "absent.png"),
            {},
            predict.PredictError,
            r"absent\.png: no such file or directory",
        ),
        (
            lambda d: str(write_idx(d / "labels.gz", mnist_test_digits()[1][:5])),
            {},
            idx.IngestError,
            r"labels\.gz: magic 0x00000801 declares 1 dimension",
        ),
        (
            lambda d: str(write_idx(d / "small.gz", np.zeros((3, 20, 20), np.uint8))),
            {},
            predict.PredictError,
            r"small\.gz: images are 20 x 20 pixels, expected 28 x 28",
        ),
        (
            lambda d: str(write_idx(d / "truncated", np.zeros((3, 28, 28), np.uint8), compress=False)),
            {"truncate": True},
            idx.IngestError,
            r"truncated: truncated data",
        ),
        (
            lambda d: write_file(d / "notes.txt", b"hello"),
            {},
            predict.PredictError,
            r"notes\.txt: not an IDX, PNG or Parquet file",
        ),
        (
            lambda d: write_file(d / "pngs" / "b.png", truncated_png()),
            {},
            predict.PredictError,
            r"b\.png: not a readable PNG image",
        ),
        (
            lambda d: write_file(d / "pngs" / "photo.png", jpeg_bytes(np.zeros((28, 28), np.uint8))),
            {"directory": True},
            predict.PredictError,
            r"photo\.png: a JPEG image, expected PNG",
        ),
        (
            lambda d: str(write_idx(d / "images.gz", np.zeros((2, 28, 28), np.uint8))),
            {"input_format": "png"},
            predict.PredictError,
            r"images\.gz: --format png, but the file is idx",
        ),
        (
            lambda d: write_file(d / "empty" / "readme.md", b"# nothing"),
            {"directory": True},
            predict.PredictError,
            r"empty: directory holds no \.png or \.parquet files",
        ),
        (
            lambda d: write_file(d / "pngs" / "a.png", png_bytes(np.zeros((28, 28), np.uint8))),
            {"directory": True, "input_format": "idx"},
            predict.PredictError,
            r"pngs: is a directory; give the IDX images file itself",
        ),
    ],
    ids=[
        "missing",
        "labels-file",
        "wrong-image-size",
        "truncated-idx",
        "not-an-image",
        "corrupt-png",
        "jpeg-named-png",
        "format-mismatch",
        "no-images",
        "directory-as-idx",
    ],
)
def test_bad_inputs_name_the_file_and_the_problem(model_dir, tmp_path, make_input, options, error, message):
    uri = make_input(tmp_path)
    if options.get("truncate"):
        Path(uri).write_bytes(Path(uri).read_bytes()[:-10])
    if options.get("directory"):
        uri = str(Path(uri).parent)
    with pytest.raises(error, match=message):
        predict.predict(
            model_dir, uri, str(tmp_path / "out.jsonl"), input_format=options.get("input_format", "auto")
        )
    assert not (tmp_path / "out.jsonl").exists()


def test_parquet_file_of_another_schema(model_dir, tmp_path):
    uri = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "pixels": [[0] * 784]}), uri)
    with pytest.raises(
        dataset.DatasetError, match=r"other\.parquet: wrong Parquet schema: column 'label' missing"
    ):
        predict.predict(model_dir, uri, str(tmp_path / "out.jsonl"))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--format", "jpeg"], "--format"),
        (["--split", "holdout"], "--split"),
        (["--input", ""], "--input"),
        (["--model-name", "a/b"], "--model-name"),
    ],
)
def test_bad_settings_are_usage_errors_naming_the_option(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model-uri", "m", "--input", "i.png", *argv])
    assert exit_info.value.code == 2
    assert f"error: {option}" in capsys.readouterr().err
