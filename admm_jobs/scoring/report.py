"""Plots (PNG) and the self-contained HTML report of an evaluation.

Figures are drawn with matplotlib's object API (``Figure`` renders through
the Agg canvas), so nothing touches pyplot's global state or needs a display.
The report embeds every image as a ``data:`` URI: the one file can be opened
anywhere, attached to a ticket or served by the Airflow UI. All text that comes
from artifacts is HTML-escaped.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import html
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

SPLITS = ("train", "validation", "test")
CURVE_PLOTS = ("accuracy.png", "loss.png")
COMPARISON_PLOT = "champion_vs_challenger.png"
CLASS_SCORES = ("precision", "recall", "f1")
SET_TITLES = {"test": "test set", "newest_batch": "newest batch"}
CHAMPION_COLOUR, CHALLENGER_COLOUR = "0.6", "tab:blue"
HISTORY_STYLES = {
    "accepted": {"marker": "o", "color": "tab:green"},
    "rejected": {"marker": "x", "color": "tab:red", "markersize": 8},
    "quarantined": {"marker": "v", "color": "tab:orange"},
    "skipped": {"marker": "|", "color": "0.5", "markersize": 10},
}
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


def comparison_png(evaluation: dict[str, Any]) -> bytes:
    """Per evaluation set (test, newest batch): per-class F1 of champion and challenger, and the deltas
    of precision, recall and F1 (challenger minus champion)."""
    champion, comparison = evaluation["champion"], evaluation["comparison"]
    challenger = _challenger_sets(evaluation)
    names = [name for name in SET_TITLES if champion.get(name) and challenger[name]]
    figure = Figure(figsize=(11, 3.6 * len(names)))
    grid = figure.subplots(len(names), 2, squeeze=False)
    for (scores_axes, delta_axes), name in zip(grid, names):
        classes = np.array([entry["class"] for entry in challenger[name]["per_class"]])
        width = 0.4
        for offset, (label, scores, colour) in enumerate(
            [("champion", champion[name], CHAMPION_COLOUR), ("challenger", challenger[name], CHALLENGER_COLOUR)]
        ):
            f1 = [entry["f1"] for entry in scores["per_class"]]
            scores_axes.bar(classes + (offset - 0.5) * width, f1, width, color=colour,
                            label=f"{label} (accuracy {scores['accuracy']:.4f})")
        low = min(entry["f1"] for scores in (champion[name], challenger[name]) for entry in scores["per_class"])
        scores_axes.set_ylim(max(0.0, low - 0.05), 1.0)
        scores_axes.set_title(f"F1 per class, {SET_TITLES[name]}")
        scores_axes.legend(loc="best", fontsize="small")
        width = 0.27
        for offset, key in enumerate(CLASS_SCORES):
            deltas = [entry[key] for entry in comparison[name]["per_class"]]
            delta_axes.bar(classes + (offset - 1) * width, deltas, width, label=f"\u0394 {key}")
        delta_axes.axhline(0.0, color="black", linewidth=0.8)
        delta_axes.set_title(f"challenger \u2212 champion, {SET_TITLES[name]}")
        delta_axes.legend(loc="best", fontsize="small")
        for axes in (scores_axes, delta_axes):
            axes.set_xticks(classes)
            axes.set_xlabel("class")
            axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def _entry_date(entry: dict[str, Any]) -> datetime.datetime | None:
    """When a history entry happened: its logical date, else when it was recorded."""
    for key in ("logical_date", "recorded_at"):
        value = entry.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                moment = datetime.datetime.fromisoformat(value)
                return moment.replace(tzinfo=None)
    return None


def history_png(entries: Sequence[dict[str, Any]]) -> bytes | None:
    """Test accuracy of every gated model by logical date (accepted vs rejected), the published model's
    accuracy as a step line, and ticks at the bottom for skipped runs and quarantined batches.

    None when no entry has a date.
    """
    dated = [(when, entry) for entry in entries if (when := _entry_date(entry)) is not None]
    if not dated:
        return None
    figure = Figure(figsize=(9, 4))
    axes = figure.subplots()
    for decision, style in HISTORY_STYLES.items():
        points = [(when, entry) for when, entry in dated if entry["decision"] == decision]
        if not points:
            continue
        if decision in ("accepted", "rejected"):
            scored = [(when, entry["test_accuracy"]) for when, entry in points if entry["test_accuracy"] is not None]
            if scored:
                axes.plot(*zip(*scored), linestyle="none", label=decision, **style)
        else:
            # x in data coordinates, y in axes coordinates: a row of ticks along the bottom edge.
            axes.plot([when for when, _ in points], [0.03] * len(points), linestyle="none", label=decision,
                      transform=axes.get_xaxis_transform(), clip_on=False, **style)
    published = sorted((when, entry["test_accuracy"]) for when, entry in dated
                       if entry["decision"] == "accepted" and entry["test_accuracy"] is not None)
    if published:
        latest = max(when for when, _ in dated)
        published.append((latest, published[-1][1]))  # the last published model stays current until now
        axes.step(*zip(*published), where="post", color="tab:green", alpha=0.4, label="published model")
    axes.set_xlabel("logical date")
    axes.set_ylabel("test accuracy")
    axes.set_title("Model decisions by logical date")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.autofmt_xdate()
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


def _delta(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _cell_class(value: float | None) -> str:
    return "" if not value else ("good" if value > 0 else "bad")


def _delta_table(champion: dict[str, Any], challenger: dict[str, Any], deltas: dict[str, Any]) -> str:
    """Per class: support, champion and challenger precision/recall/F1, and the challenger's deltas."""
    header = ["class", "support", *(f"champion {key}" for key in CLASS_SCORES),
              *(f"challenger {key}" for key in CLASS_SCORES), *(f"\u0394 {key}" for key in CLASS_SCORES)]
    rows = []
    for theirs, mine, delta in zip(champion["per_class"], challenger["per_class"], deltas["per_class"]):
        cells = [_text(mine["class"]), _text(mine["support"])]
        cells += [_score(theirs[key]) for key in CLASS_SCORES] + [_score(mine[key]) for key in CLASS_SCORES]
        cells = [f"<td>{cell}</td>" for cell in cells]
        cells += [f'<td class="{_cell_class(delta[key])}">{_delta(delta[key])}</td>' for key in CLASS_SCORES]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_text(name)}</th>" for name in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _challenger_sets(evaluation: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The challenger's scores per evaluation set, in the champion's shape (``accuracy``, ``per_class``...)."""
    test = {**evaluation, "accuracy": evaluation["test_accuracy"], "examples": evaluation["test_examples"]}
    return {"test": test, "newest_batch": evaluation.get("newest_batch")}


def _comparison(evaluation: dict[str, Any], images: dict[str, bytes]) -> str:
    """Champion (the published model at evaluation time) and challenger (this model) side by side."""
    champion = evaluation.get("champion")
    if champion is None:
        return '<p class="note">No published model to compare with.</p>'
    pointer = champion.get("pointer") or {}
    comparison = evaluation["comparison"]
    challenger = _challenger_sets(evaluation)
    newest = evaluation.get("newest_batch")
    rows = [
        ["version", champion["version"], evaluation["model"]["version"], ""],
        ["trained on dataset", pointer.get("dataset_version"),
         (evaluation["model"].get("training_dataset") or {}).get("version"), ""],
        ["published at", pointer.get("published_at"), "", ""],
    ]
    sections = []
    for name, title in SET_TITLES.items():
        if champion.get(name) is None or challenger[name] is None:
            continue
        theirs, mine, delta = champion[name], challenger[name], comparison[name]
        label = title if name == "test" else f"{title} {newest['id']}"
        rows += [
            [f"{label}: accuracy", _score(theirs["accuracy"]), _score(mine["accuracy"]), _delta(delta["accuracy"])],
            [f"{label}: macro F1", _score(theirs["macro_f1"]), _score(mine["macro_f1"]), _delta(delta["macro_f1"])],
            [f"{label}: right only by this model / only by the champion", "", "",
             f"{delta['challenger_only_correct']} / {delta['champion_only_correct']}"],
        ]
        sections += [
            f"<h3>Per-class scores and deltas: {html.escape(label)} ({mine['examples']} examples)</h3>",
            _delta_table(theirs, mine, delta),
        ]
    notes = []
    if champion["version"] == evaluation["model"]["version"]:
        notes.append("This model is the published one.")
    note_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    verdict = "good" if comparison["test"]["accuracy"] >= 0 else "bad"
    plot = _image(COMPARISON_PLOT, images[COMPARISON_PLOT]) if COMPARISON_PLOT in images else ""
    return (
        _table(["", "champion (published)", "challenger (this model)", "\u0394"], rows)
        + f'<p>Test accuracy delta: <strong class="{verdict}">{_delta(comparison["test"]["accuracy"])}</strong></p>'
        + note_html
        + plot
        + "".join(sections)
    )


def _gate(gate: dict[str, Any] | None) -> str:
    """The quality gate's decision (publish adds it): the outcome, the classes whose test recall fell more than
    allowed below the champion's, and every reason."""
    if gate is None:
        return '<p class="note">Not gated yet: publish adds its decision here.</p>'
    verdict = "bad" if gate["decision"] == "rejected" else "good"
    parts = [f'<p>Decision: <strong class="{verdict}">{_text(gate["decision"])}</strong></p>']
    if gate["failed_classes"]:
        rows = [[entry["class"], _score(entry["recall"]), _score(entry["champion_recall"]),
                 _delta(entry["recall"] - entry["champion_recall"]), _score(entry["allowed"])]
                for entry in gate["failed_classes"]]
        parts += ["<p>Classes whose recall on the test set fell more than allowed below the champion's:</p>",
                  _table(["class", "recall", "champion's recall", "\u0394", "allowed drop"], rows)]
    parts.append("<ul>" + "".join(f"<li>{_text(reason)}</li>" for reason in gate["reasons"]) + "</ul>")
    return "".join(parts)


def _training_dataset_note(training_dataset: dict[str, Any] | None, evaluated_version: str) -> str:
    trained_on = (training_dataset or {}).get("version")
    if trained_on in (None, evaluated_version):
        return ""
    message = (
        f"The model was trained on dataset version {trained_on}, not on the evaluated {evaluated_version}."
    )
    return f'<p class="bad">{html.escape(message)}</p>'


def _newest_batch_summary(evaluation: dict[str, Any]) -> list[str]:
    newest = evaluation.get("newest_batch")
    if not newest:
        return []
    return [
        f"<p>Newest batch {_text(newest['id'])}: accuracy {_score(newest['accuracy'])} "
        f"({newest['correct']} of {newest['examples']} images; the model was trained on this batch's "
        "training rows).</p>"
    ]


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
        ["as of", dataset.get("as_of")],
        ["batches", ", ".join(dataset.get("batches") or [])],
        ["test examples", evaluation["test_examples"]],
    ]
    title = f"MNIST ADMM model {model['version']}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Evaluated at {_text(evaluation.get("evaluated_at"))}</p>',
        f"<h2>Test accuracy: {_score(evaluation['test_accuracy'])}</h2>",
        f"<p>{evaluation['correct']} of {evaluation['test_examples']} test images right; "
        f"macro-averaged F1 {_score(evaluation['macro_f1'])}.</p>",
        *_newest_batch_summary(evaluation),
        "<h2>Champion (published model) vs challenger (this model)</h2>",
        _comparison(evaluation, images),
        "<h2>Quality gate</h2>",
        _gate(evaluation.get("gate")),
        "<h2>Training curves</h2>",
        '<p class="note">Shaded: warm-up epochs. Dashed: the epoch whose weights were kept.</p>',
        *(_image(name, images[name]) for name in CURVE_PLOTS if name in images),
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
