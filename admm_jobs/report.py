"""Plots (PNG) and the self-contained HTML report of an evaluation.

Figures are drawn with matplotlib's object API (``Figure`` renders through
the Agg canvas), so nothing touches pyplot's global state or needs a display.
The report embeds every image as a ``data:`` URI: the one file can be opened
anywhere, attached to a ticket or served by the Airflow UI. All text that comes
from artifacts is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

SPLITS = ("train", "validation", "test")
SPLIT_COLOURS = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
WARMUP_PHASE = "warmup"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """One metric per epoch as floats, NaN where an epoch did not record it."""
    values = [record.get(key) for record in records]
    return np.array([np.nan if value is None else float(value) for value in values], dtype=float)


def curve_png(records: Sequence[dict[str, Any]], metric: str, best_epoch: int | None = None) -> bytes:
    """``<split>_<metric>`` per epoch for train/validation/test; warm-up epochs shaded."""
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    epochs = _series(records, "epoch")
    warmup_epochs = [record["epoch"] for record in records if record.get("phase") == WARMUP_PHASE]
    for index, epoch in enumerate(warmup_epochs):
        axes.axvspan(epoch - 0.5, epoch + 0.5, color="0.85", lw=0, label="warm-up" if index == 0 else None)
    plotted = []
    for split in SPLITS:
        values = _series(records, f"{split}_{metric}")
        if np.isfinite(values).any():
            axes.plot(epochs, values, marker="o", markersize=3, color=SPLIT_COLOURS[split], label=split)
            plotted.append(values[np.isfinite(values)])
    if best_epoch is not None:
        axes.axvline(
            best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})"
        )
    finite = np.concatenate(plotted) if plotted else np.array([])
    if metric == "loss" and finite.size and (finite > 0).all() and finite.max() / finite.min() > 100:
        axes.set_yscale("log")  # ADMM losses fall by orders of magnitude in the first epochs
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric.capitalize()} per epoch")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return _png(figure)


def confusion_matrix_png(confusion: np.ndarray) -> bytes:
    """Heat map of the confusion matrix (rows: true class, columns: predicted), counts written in."""
    confusion = np.asarray(confusion)
    classes = confusion.shape[0]
    figure = Figure(figsize=(6.4, 5.6))
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    threshold = confusion.max() / 2 if confusion.size else 0
    for true_class in range(classes):
        for predicted in range(classes):
            count = int(confusion[true_class, predicted])
            axes.text(
                predicted,
                true_class,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    axes.set_xticks(range(classes))
    axes.set_yticks(range(classes))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix (test split)")
    return _png(figure)


# --- HTML -------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td.key, th.key { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.good { color: #17692a; } .bad { color: #a11; }
.note { color: #666; font-size: 0.9em; }
"""


def _score(value: float) -> str:
    return f"{value:.4f}"


def _text(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return html.escape(json.dumps(value, sort_keys=True))
    return html.escape("" if value is None else str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], key_columns: int = 1) -> str:
    def cell(tag: str, index: int, value: Any) -> str:
        css = ' class="key"' if index < key_columns else ""
        return f"<{tag}{css}>{_text(value)}</{tag}>"

    head = "".join(cell("th", i, name) for i, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(title: str, png: bytes) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}"></figure>'


def _comparison(evaluation: dict[str, Any]) -> str:
    published = evaluation.get("published_model")
    if published is None:
        return '<p class="note">No published model to compare with.</p>'
    delta = published["delta"]
    verdict = "good" if delta >= 0 else "bad"
    rows = [
        ["version", published["version"], evaluation["model"]["version"]],
        ["test accuracy", _score(published["test_accuracy"]), _score(evaluation["test_accuracy"])],
        ["dataset version", published.get("dataset_version"), evaluation["dataset"]["version"]],
        ["run", published.get("run"), ""],
        ["published at", published.get("published_at"), ""],
    ]
    notes = []
    if published["version"] == evaluation["model"]["version"]:
        notes.append("This model is the published one.")
    if published.get("dataset_version") != evaluation["dataset"]["version"]:
        notes.append(
            "The published model was evaluated on another dataset version; accuracies may not be comparable."
        )
    note_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    return (
        _table(["", "published", "this model"], rows)
        + f'<p>Test accuracy delta: <strong class="{verdict}">{delta:+.4f}</strong></p>'
        + note_html
    )


def _training_dataset_note(training_dataset: dict[str, Any] | None, evaluated_version: str) -> str:
    trained_on = (training_dataset or {}).get("version")
    if trained_on in (None, evaluated_version):
        return ""
    message = (
        f"The model was trained on dataset version {trained_on}, not on the evaluated {evaluated_version}."
    )
    return f'<p class="bad">{html.escape(message)}</p>'


def render_report(evaluation: dict[str, Any], images: dict[str, bytes]) -> str:
    """The HTML report for an evaluation (the ``metrics.json`` dict) and its PNGs by file name."""
    model = evaluation["model"]
    dataset = evaluation["dataset"]
    confusion = evaluation["confusion_matrix"]
    classes = len(confusion)
    per_class_rows = [
        [entry["class"], entry["support"], *(_score(entry[key]) for key in ("precision", "recall", "f1"))]
        for entry in evaluation["per_class"]
    ]
    confusion_rows = [[f"true {true_class}", *row, sum(row)] for true_class, row in enumerate(confusion)]
    hyperparameters = sorted((model.get("hyperparameters") or {}).items())
    model_rows = [
        ["version", model["version"]],
        ["uri", model["uri"]],
        ["layer sizes", model.get("layer_sizes")],
        ["weights sha256", model.get("weights_sha256")],
        ["best epoch", model.get("best_epoch")],
        ["code version", model.get("code_version")],
        ["trained on dataset", model.get("training_dataset")],
    ]
    dataset_rows = [
        ["version", dataset["version"]],
        ["uri", dataset["uri"]],
        ["test examples", evaluation["test_examples"]],
    ]
    title = f"MNIST ADMM model {model['version']}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Evaluated at {_text(evaluation.get("evaluated_at"))}</p>',
        f"<h2>Test accuracy: {_score(evaluation['test_accuracy'])}</h2>",
        f"<p>{evaluation['correct']} of {evaluation['test_examples']} test images right; "
        f"macro-averaged F1 {_score(evaluation['macro_f1'])}.</p>",
        "<h2>Comparison with the published model</h2>",
        _comparison(evaluation),
        "<h2>Training curves</h2>",
        '<p class="note">Shaded: warm-up epochs. Dashed: the epoch whose weights were kept.</p>',
        *(_image(name, png) for name, png in images.items() if name != "confusion_matrix.png"),
        "<h2>Confusion matrix</h2>",
        '<p class="note">Rows: true class; columns: predicted class.</p>',
        _image("confusion_matrix.png", images["confusion_matrix.png"])
        if "confusion_matrix.png" in images
        else "",
        _table(["", *[f"pred {c}" for c in range(classes)], "total"], confusion_rows),
        "<h2>Per-class scores</h2>",
        _table(["class", "support", "precision", "recall", "F1"], per_class_rows),
        "<h2>Hyper-parameters</h2>",
        _table(["name", "value"], hyperparameters)
        if hyperparameters
        else '<p class="note">None recorded.</p>',
        "<h2>Model</h2>",
        _table(["", ""], model_rows),
        "<h2>Dataset</h2>",
        _table(["", ""], dataset_rows),
        _training_dataset_note(model.get("training_dataset"), dataset["version"]),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
