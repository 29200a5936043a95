"""Classify digit images with a trained model.

    python -m admm_jobs.serving.predict --model-uri URI --input URI [--output URI]
        [--format auto|idx|png|parquet] [--split test] [--invert true|false]
        [--model-name mnist-admm]

``--model-uri`` (local, ``file://``, ``s3://``; ``https://`` for a model
directory only) may name

* a model directory (``model.json`` + ``model.npz``, e.g. ``RUN/model``),
* a run directory or a registry version directory (holding ``model/``),
* a registry entry ``REG/NAME`` or a registry root ``REG`` (``NAME`` =
  ``--model-name``): the published version named by ``current.json`` is used.

``--input`` is one of

* an MNIST-format IDX images file (magic ``0x00000803``, 28 x 28 images, raw
  or gzip); row ids are the record indices ``"0"``, ``"1"``, ...;
* a PNG file, or a directory of ``*.png`` files (ids: the path relative to the
  directory, files in sorted order);
* a Parquet part file of the lake, a directory of part files (``split=test``),
  or a dataset directory (with ``manifest.json``; ``--split`` picks the
  split); ids are the ``image_id`` column.

The format is recognised by content (directories by their file names);
``--format`` insists on one and fails on anything else.

PNG conversion, in this order: 16-bit grey levels are scaled by 255/65535;
other modes go through Pillow's ``convert("L")`` (colour to luma
``L = 0.299 R + 0.587 G + 0.114 B``; an alpha channel is dropped, not
composited); an image that is not 28 x 28 is resized to 28 x 28 with Pillow's
BOX filter (each output pixel is the mean of the input area it covers; the
aspect ratio is not kept, nothing is cropped or centred). MNIST digits are
white on black: a dark digit on a light background must be passed with
``--invert true`` (grey level ``g`` becomes ``255 - g``). Inputs are never
inverted automatically; images whose mean grey level exceeds 127.5 after any
inversion are counted and logged as "light background".

Output: JSON lines, one object per input image in input order::

    {"id": "3", "predicted_label": 7, "probabilities": [p_0, ..., p_9]}

with ``p = softmax(logits)`` (6 significant digits), written atomically to
``--output``; without ``--output`` the rows go to stdout. Either way the last
stdout line is the JSON summary (count, output_uri, model_uri, model_version,
predicted class counts, ...).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
import sys
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import require, setting, validate_fields
from admm_jobs.lake import dataset, idx, storage
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry

log = logging.getLogger("admm_jobs.predict")  # not "__main__" under python -m

INPUT_FORMATS = ("auto", "idx", "png", "parquet")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARQUET_MAGIC = b"PAR1"
FILE_SUFFIXES = {"png": ".png", "parquet": ".parquet"}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# A digit covers a minority of an MNIST image, so the mean of a white-on-black digit is far below this.
LIGHT_BACKGROUND_MEAN = 127.5
BATCH_ROWS = 4096
SIGNIFICANT_DIGITS = 6


class PredictError(ValueError):
    """An input or the model cannot be used for prediction; the message names the URI."""


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Predict the digit in every input image with a trained model."""

    model_uri: str = setting(
        help="model directory, run or registry version directory, registry entry or root", minLength=1
    )
    input: str = setting(
        help="IDX images file, PNG file or directory, Parquet file, split or dataset directory", minLength=1
    )
    output: str | None = setting(None, "JSON-lines file to write the predictions to (default: stdout)")
    format: str = setting("auto", f"input format, one of {', '.join(INPUT_FORMATS)}", enum=list(INPUT_FORMATS))
    split: str = setting("test", "split to read when --input is a dataset directory", enum=list(dataset.SPLITS))
    invert: bool = setting(False, "use 255 - g for every grey level g (dark digits on light paper)")
    model_name: str = setting(registry.DEFAULT_MODEL_NAME, "registry entry name when --model-uri is a root")

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            bool(self.model_name) and "/" not in self.model_name,
            f"--model-name must be a plain directory name, got {self.model_name!r}",
        )


@dataclasses.dataclass(frozen=True)
class Images:
    """Input images as model rows: ``pixels[i]`` (784 grey levels, row-major) has id ``ids[i]``."""

    ids: list[str]
    pixels: np.ndarray
    format: str


# --- the model --------------------------------------------------------------------------------


def resolve_model_uri(uri: str, model_name: str = registry.DEFAULT_MODEL_NAME) -> str:
    """The model directory that ``uri`` designates (see the module docstring for the forms)."""
    if storage.scheme(uri) in storage.HTTP_SCHEMES:
        return uri  # no listing over HTTP: only a model directory can be named
    if storage.exists(storage.join(uri, model_io.METADATA_FILE)):
        return uri
    if storage.exists(storage.join(uri, registry.MODEL_DIR, model_io.METADATA_FILE)):
        return storage.join(uri, registry.MODEL_DIR)
    for entry in (uri, storage.join(uri, model_name)):
        pointer_uri = storage.join(entry, registry.POINTER_FILE)
        if storage.exists(pointer_uri):
            pointer = registry.parse_pointer(storage.read_bytes(pointer_uri), pointer_uri)
            return storage.join(entry, pointer["version"], registry.MODEL_DIR)
    looked_for = [
        model_io.METADATA_FILE,
        f"{registry.MODEL_DIR}/{model_io.METADATA_FILE}",
        registry.POINTER_FILE,
        f"{model_name}/{registry.POINTER_FILE}",
    ]
    raise PredictError(f"{uri}: no model found (looked for {', '.join(looked_for)})")


def load_image_model(uri: str, model_name: str = registry.DEFAULT_MODEL_NAME) -> tuple[model_io.Model, str]:
    """The model ``uri`` designates, checked to take 28 x 28 images, and its directory."""
    model_uri = resolve_model_uri(uri, model_name)
    model = model_io.load_model(model_uri)
    if model.layer_sizes[0] != dataset.PIXELS_PER_IMAGE:
        raise PredictError(
            f"{model_uri}: the model takes {model.layer_sizes[0]} inputs (layers {model.layer_sizes}), "
            f"but an image has {dataset.PIXELS_PER_IMAGE} pixels (28 x 28)"
        )
    return model, model_uri


# --- inputs -----------------------------------------------------------------------------------


def sniff_format(head: bytes) -> str | None:
    """The input format that a file's first bytes announce, None if none of ours."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(idx.GZIP_MAGIC) or head.startswith(idx.IDX_UBYTE_PREFIX):
        return "idx"
    return None


def is_directory(uri: str) -> bool:
    """Whether ``uri`` is a directory (an S3 prefix with objects below it counts as one)."""
    if storage.scheme(uri) in storage.HTTP_SCHEMES:
        return False
    fs, path = storage.filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise PredictError(f"{uri}: no such file or directory")
    return kind == pafs.FileType.Directory


def relative_name(file_uri: str, directory_uri: str) -> str:
    return posixpath.relpath(storage.filesystem(file_uri)[1], storage.filesystem(directory_uri)[1])


def read_idx_images(uri: str) -> Images:
    """The images of an IDX file (raw or gzip), checked to be 28 x 28."""
    array = idx.read_idx(uri, expected_ndim=3)
    if array.shape[1:] != dataset.IMAGE_SHAPE:
        raise PredictError(
            f"{uri}: images are {array.shape[1]} x {array.shape[2]} pixels, expected "
            f"{dataset.IMAGE_SHAPE[0]} x {dataset.IMAGE_SHAPE[1]}"
        )
    return Images([str(index) for index in range(len(array))], array.reshape(len(array), -1), "idx")


def parquet_image_ids(uri: str) -> list[str]:
    """The ``image_id`` column of a lake part file (only that column is read)."""
    with storage.open_binary(uri) as handle:
        return pq.read_table(handle, columns=["image_id"]).column("image_id").to_pylist()


def read_parquet_images(uris: list[str]) -> Images:
    """The rows of lake part files, in order; the schema check names a file that does not fit."""
    ids, parts = [], []
    for uri in uris:
        pixels, _ = dataset.read_parquet_file(uri)
        ids += parquet_image_ids(uri)
        parts.append(pixels)
    pixels = np.concatenate(parts) if parts else np.zeros((0, dataset.PIXELS_PER_IMAGE), np.uint8)
    return Images(ids, pixels, "parquet")


def grey_image(image: Image.Image) -> Image.Image:
    """An 8-bit grey ("L") copy: 16-bit levels scaled by 255/65535, other modes via ``convert("L")``."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    return image.convert("L")


def png_pixels(uri: str, data: bytes) -> np.ndarray:
    """The 784 grey levels of a PNG image, converted and resized as the module docstring says."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise PredictError(f"{uri}: a {image.format} image, expected PNG")
            image.load()
            grey = grey_image(image)
    except (OSError, Image.DecompressionBombError) as exc:
        raise PredictError(f"{uri}: not a readable PNG image: {exc}") from exc
    if grey.size != dataset.IMAGE_SHAPE[::-1]:
        log.info("%s: resizing %d x %d to %d x %d (BOX filter)", uri, *grey.size, *dataset.IMAGE_SHAPE[::-1])
        grey = grey.resize(dataset.IMAGE_SHAPE[::-1], Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8).reshape(dataset.PIXELS_PER_IMAGE)


def read_png_images(uris: list[str], ids: list[str]) -> Images:
    return Images(ids, np.stack([png_pixels(uri, storage.read_bytes(uri)) for uri in uris]), "png")


def read_directory(uri: str, input_format: str, split: str) -> Images:
    """A dataset directory (``manifest.json``), or a directory of ``*.png`` or ``*.parquet`` files."""
    if input_format == "idx":
        raise PredictError(f"{uri}: is a directory; give the IDX images file itself")
    if storage.exists(storage.join(uri, dataset.MANIFEST_FILE)) and input_format in ("auto", "parquet"):
        return read_parquet_images(dataset.split_file_uris(uri, split))
    # Hidden names (staging directories, editor files) are not inputs.
    files = [
        f
        for f in storage.list_files(uri)
        if not any(part.startswith(".") for part in relative_name(f, uri).split("/"))
    ]
    found = {kind: [f for f in files if f.lower().endswith(suffix)] for kind, suffix in FILE_SUFFIXES.items()}
    if input_format == "auto":
        present = [kind for kind, uris in found.items() if uris]
        if len(present) != 1:
            if not present:
                raise PredictError(f"{uri}: directory holds no .png or .parquet files")
            raise PredictError(f"{uri}: directory holds both .png and .parquet files; pass --format")
        input_format = present[0]
    uris = found[input_format]
    if not uris:
        raise PredictError(f"{uri}: directory holds no {FILE_SUFFIXES[input_format]} files")
    if input_format == "png":
        return read_png_images(uris, [relative_name(f, uri) for f in uris])
    return read_parquet_images(uris)


def read_images(uri: str, input_format: str = "auto", split: str = "test") -> Images:
    """Read ``uri`` as the module docstring describes; ``input_format`` "auto" detects it."""
    if is_directory(uri):
        return read_directory(uri, input_format, split)
    with storage.open_binary(uri) as handle:
        head = handle.read(len(PNG_SIGNATURE))
    detected = sniff_format(head)
    if detected is None:
        raise PredictError(f"{uri}: not an IDX, PNG or Parquet file (first bytes: {head.hex() or 'none'})")
    if input_format not in ("auto", detected):
        raise PredictError(f"{uri}: --format {input_format}, but the file is {detected}")
    if detected == "idx":
        return read_idx_images(uri)
    if detected == "png":
        return read_png_images([uri], [posixpath.basename(storage.filesystem(uri)[1])])
    return read_parquet_images([uri])


# --- prediction -------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``p_k = exp(z_k - max_j z_j) / sum_i exp(z_i - max_j z_j)`` (shift for stability)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def classify(model: model_io.Model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the label ``argmax_k z_k`` and ``softmax(z)``, for logits z; BATCH_ROWS rows at a time."""
    logits = np.concatenate(
        [model.logits(pixels[start : start + BATCH_ROWS]) for start in range(0, len(pixels), BATCH_ROWS)]
    )
    return np.argmax(logits, axis=1), softmax(logits)


def prediction_lines(ids: list[str], labels: np.ndarray, probabilities: np.ndarray) -> bytes:
    """The JSON-lines output (see the module docstring)."""
    lines = [
        json.dumps(
            {
                "id": row_id,
                "predicted_label": int(label),
                "probabilities": [float(f"{p:.{SIGNIFICANT_DIGITS}g}") for p in row],
            }
        )
        for row_id, label, row in zip(ids, labels, probabilities)
    ]
    return ("\n".join(lines) + "\n").encode()


def predict(
    model_uri: str,
    input_uri: str,
    output_uri: str | None = None,
    input_format: str = "auto",
    split: str = "test",
    invert: bool = False,
    model_name: str = registry.DEFAULT_MODEL_NAME,
) -> dict[str, Any]:
    """Classify every image of ``input_uri``; write the rows to ``output_uri`` (None: stdout); summarise."""
    model, resolved_model_uri = load_image_model(model_uri, model_name)
    images = read_images(input_uri, input_format, split)
    if not images.ids:
        raise PredictError(f"{input_uri}: no images")
    pixels = 255 - images.pixels if invert else images.pixels
    light = pixels.mean(axis=1) > LIGHT_BACKGROUND_MEAN
    if light.any():
        log.warning(
            "%s: %d of %d images look like a dark digit on a light background (first: %s); "
            "MNIST digits are white on black%s",
            input_uri,
            int(light.sum()),
            len(light),
            images.ids[int(np.argmax(light))],
            "" if invert else "; pass --invert true if that is what they are",
        )
    labels, probabilities = classify(model, pixels)
    payload = prediction_lines(images.ids, labels, probabilities)
    if output_uri:
        storage.write_bytes(output_uri, payload)
    else:
        sys.stdout.write(payload.decode())
    return {
        "count": len(images.ids),
        "input_uri": input_uri,
        "input_format": images.format,
        "inverted": invert,
        "light_background": int(light.sum()),
        "output_uri": output_uri,
        "model_uri": resolved_model_uri,
        "model_version": registry.model_version(model.metadata["weights_sha256"]),
        "predicted_class_counts": np.bincount(labels, minlength=model.layer_sizes[-1]).tolist(),
    }


def run(config: PredictConfig) -> dict[str, Any]:
    return predict(config.model_uri, config.input, output_uri=config.output, input_format=config.format,
                   split=config.split, invert=config.invert, model_name=config.model_name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(PredictConfig, run, argv)


if __name__ == "__main__":
    main()
