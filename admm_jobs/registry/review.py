"""Human decisions in the registry history: the review of a quarantined batch, and the approval before publish.

Quarantine review (the DAG ``mnist_quarantine_review``): a reviewer sees each failed check of the batch with its
observed value and bound, and a contact sheet of its images (:func:`contact_sheet_png`; a pixel drift failure's
pixels outlined in red on images of its class that carry ink there), then releases the batch
or keeps it quarantined; no answer in time keeps it quarantined. :func:`record_review` writes the answer into the
history (``released``, ``confirmed`` or ``timed_out``, with the reviewer and when they answered), where
:func:`admm_jobs.registry.store.quarantined_batches` reads it: the history, not a file, says which batches later
runs leave out.

Publish approval (the weekly DAG's ``approval`` param, one of :data:`APPROVAL_MODES`): ``never`` publishes without
asking, ``always`` asks a person before every publish, ``when-flagged`` asks only when :func:`approval_flags`
finds a reason in what evaluate computed. :func:`record_approval` writes the answer (``approved`` or ``declined``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from admm_jobs.lake import profiles, storage
from admm_jobs.lake.dataset import load_manifest, read_batch
from admm_jobs.registry import store

KEEP, RELEASE = "Keep quarantined", "Release batch"  # the reviewer's options; KEEP is also the timeout's answer
APPROVAL_MODES = ("never", "when-flagged", "always")
CONTACT_SHEET_FILE = "contact-sheet.png"
SHEET_COLUMNS, SHEET_ROWS = 10, 6
TILE_SCALE = 3  # a 28-pixel digit drawn 84 pixels wide: a stamped pattern of a few pixels stays visible
CAPTION_HEIGHT = 12
MARK_COLOUR = (230, 0, 0)  # the outline of drifted pixels: red stands out on grey digits
TITLE_HEIGHT = 16


# --- the evidence -----------------------------------------------------------------------------


def flagged_classes(failures: Sequence[Mapping[str, Any]]) -> list[int]:
    """The labels of the class pairs that failed checks name (``given`` label and ``predicted`` class, as a risen
    confusion cell of ``admm_jobs.scoring.label_checks`` does)."""
    return sorted({int(failure[key]) for failure in failures for key in ("given", "predicted")
                   if failure.get(key) is not None})


def marked_pixels(failures: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[int, int]]]:
    """The (row, column) pixels that failed pixel drift checks name (``pixels``), by the class they drifted in."""
    marks: dict[int, list[tuple[int, int]]] = {}
    for failure in failures:
        if failure.get("pixels") and failure.get("given") is not None:
            marks.setdefault(int(failure["given"]), []).extend((int(row), int(column))
                                                               for row, column in failure["pixels"])
    return marks


def carrying_marks(pixels: np.ndarray, labels: np.ndarray, marks: Mapping[int, Sequence[tuple[int, int]]],
                   image_width: int) -> np.ndarray:
    """Which images (rows of grey levels) have ink on a marked pixel of their own class: those that show a
    stamped pattern."""
    carrying = np.zeros(len(labels), dtype=bool)
    for given, cells in marks.items():
        flat = [row * image_width + column for row, column in cells]
        carrying |= (labels == given) & (pixels[:, flat] > profiles.INK_GREY).any(axis=1)
    return carrying


def outline(cells: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """The border of a set of (row, column) pixels: each pixel side that no other pixel of the set shares, as
    (x0, y0, x1, y1) in pixel-corner coordinates (x the column)."""
    inside = set(cells)
    edges = []
    for row, column in inside:
        if (row - 1, column) not in inside:
            edges.append((column, row, column + 1, row))
        if (row + 1, column) not in inside:
            edges.append((column, row + 1, column + 1, row + 1))
        if (row, column - 1) not in inside:
            edges.append((column, row, column, row + 1))
        if (row, column + 1) not in inside:
            edges.append((column + 1, row, column + 1, row + 1))
    return sorted(edges)


def sample_indices(labels: np.ndarray, classes: Sequence[int], count: int) -> np.ndarray:
    """Up to ``count`` image indices spread evenly over the batch, only images labelled ``classes`` if any.

    Deterministic: the same batch and classes always give the same images.
    """
    candidates = np.flatnonzero(np.isin(labels, classes)) if classes else np.arange(len(labels))
    if len(candidates) == 0:
        return candidates
    return candidates[np.unique(np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int))]


def contact_sheet_png(pixels: np.ndarray, labels: np.ndarray, image_shape: Sequence[int], title: str,
                      marks: Mapping[int, Sequence[tuple[int, int]]] | None = None) -> bytes:
    """A grid of the given images (rows of grey levels), each enlarged and captioned with its label, as PNG;
    ``marks`` (class -> pixels, :func:`marked_pixels`) outlined in :data:`MARK_COLOUR` on the images of the class."""
    height, width = (int(size) * TILE_SCALE for size in image_shape)
    rows = max(1, -(-len(pixels) // SHEET_COLUMNS))
    sheet = Image.new("RGB", (SHEET_COLUMNS * (width + 2), TITLE_HEIGHT + rows * (height + CAPTION_HEIGHT + 2)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 2), title, fill=(0, 0, 0))
    for index, (image, label) in enumerate(zip(pixels, labels)):
        row, column = divmod(index, SHEET_COLUMNS)
        left, top = column * (width + 2) + 1, TITLE_HEIGHT + row * (height + CAPTION_HEIGHT + 2)
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8).reshape(image_shape)).resize((width, height),
                                                                                              Image.NEAREST)
        sheet.paste(tile, (left, top + CAPTION_HEIGHT))
        draw.text((left + 1, top), f"label {int(label)}", fill=(0, 0, 0))
        for x0, y0, x1, y1 in outline((marks or {}).get(int(label), [])):
            draw.line([(left + x0 * TILE_SCALE, top + CAPTION_HEIGHT + y0 * TILE_SCALE),
                       (left + x1 * TILE_SCALE, top + CAPTION_HEIGHT + y1 * TILE_SCALE)], fill=MARK_COLOUR)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def contact_sheet_uri(run_uri: str, batch: str) -> str:
    """Where the contact sheet of a batch goes: next to the outputs of the run that quarantined it."""
    return storage.join(run_uri, "quarantine", batch, CONTACT_SHEET_FILE)


def write_contact_sheet(quarantine: Mapping[str, Any]) -> str:
    """Draw the contact sheet of a quarantined batch from the lake, store it (:func:`contact_sheet_uri`) and return
    its URI. It shows the batch's images of the flagged classes (else a sample of all); when pixel drift checks
    failed, those of them that carry ink on the drifted pixels, which are outlined."""
    batch, dataset_uri = quarantine["batch"], quarantine["dataset_uri"]
    pixels, labels = read_batch(dataset_uri, batch)
    image_shape = load_manifest(dataset_uri)["image_shape"]
    classes, marks = flagged_classes(quarantine["failures"]), marked_pixels(quarantine["failures"])
    shown = np.flatnonzero(carrying_marks(pixels, labels, marks, int(image_shape[1])))
    if not len(shown):
        shown = np.arange(len(labels))
    chosen = shown[sample_indices(labels[shown], classes, SHEET_COLUMNS * SHEET_ROWS)]
    which = f"labels {', '.join(map(str, classes))}" if classes else "spread over the batch"
    title = f"batch {batch}: {len(chosen)} of {len(labels)} images ({which}" + (
        ", drifted pixels outlined)" if marks else ")")
    uri = contact_sheet_uri(quarantine["run_uri"], batch)
    storage.write_bytes(uri, contact_sheet_png(pixels[chosen], labels[chosen], image_shape, title, marks))
    return uri


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    return str(value)


def review_body(quarantine: Mapping[str, Any], sheet_link: str, timeout_text: str) -> str:
    """The Markdown a reviewer reads next to the question: the batch, each failed check (observed value and
    bound), the contact sheet (``sheet_link``), and what each answer does."""
    rows = "\n".join(f"| {failure['check']} | {_shown(failure['observed'])} | "
                     f"{failure['bound']} {_shown(failure['threshold'])} |" for failure in quarantine["failures"])
    return (
        f"Batch **{quarantine['batch']}** was quarantined by the weekly run of {quarantine['logical_date']} "
        f"(dataset {quarantine['dataset_version']}). Later runs leave it out until it is released.\n\n"
        f"| failed check | observed | bound |\n|---|---|---|\n{rows}\n\n"
        f"Contact sheet of its images ([open]({sheet_link})):\n\n![contact sheet of batch "
        f"{quarantine['batch']}]({sheet_link})\n\n"
        f"**{RELEASE}**: the next weekly run includes the batch without checking it again. "
        f"**{KEEP}**: it stays out. No answer within {timeout_text}: it stays out.\n\n"
        f"Validation results: `{quarantine['result_uri']}`"
    )


# --- the decisions ----------------------------------------------------------------------------


def review_decision(chosen_options: Sequence[str], timed_out: bool) -> str:
    """The history's decision for a review's answer: released, confirmed, or timed_out (no answer in time)."""
    if timed_out:
        return store.TIMED_OUT
    return store.RELEASED if list(chosen_options) == [RELEASE] else store.CONFIRMED


def responder(user: Mapping[str, Any] | None) -> dict[str, Any]:
    """The history's ``reviewer`` and ``reviewer_id`` from the HITL response's user (None: nobody answered)."""
    return {"reviewer": user.get("name") if user else None, "reviewer_id": user.get("id") if user else None}


def record_review(quarantine: Mapping[str, Any], decision: str, user: Mapping[str, Any] | None,
                  responded_at: str) -> dict[str, Any]:
    """Record a reviewer's decision about a quarantined batch in the registry history; returns the entry."""
    reasons = {store.RELEASED: f"batch {quarantine['batch']} released by its reviewer",
               store.CONFIRMED: f"batch {quarantine['batch']} kept in quarantine by its reviewer",
               store.TIMED_OUT: f"batch {quarantine['batch']} kept in quarantine: no answer in time"}
    return store.record_decision(quarantine["registry_uri"], {
        "decision": decision, "logical_date": quarantine["logical_date"], "run_uri": quarantine["run_uri"],
        "dataset_version": quarantine["dataset_version"], "batch": quarantine["batch"],
        "reasons": [reasons[decision]], "contact_sheet_uri": quarantine.get("contact_sheet_uri"),
        "responded_at": responded_at, **responder(user),
    })


def approval_flags(evaluation: Mapping[str, Any]) -> list[str]:
    """Why a person should look before publish, from evaluate's result: the challenger scores below the champion
    on the fixed test set or on the newest batch (the gate may still accept a regression within its tolerance)."""
    flags = []
    for key, where in (("delta_vs_published", "the fixed test set"), ("batch_delta_vs_published", "the newest batch")):
        delta = evaluation.get(key)
        if delta is not None and delta < 0:
            flags.append(f"accuracy on {where} {-delta:.4f} below the published model's")
    return flags


def approval_required(mode: str, flags: Sequence[str]) -> bool:
    """Whether the ``approval`` mode (:data:`APPROVAL_MODES`) asks a person before publish."""
    if mode not in APPROVAL_MODES:
        raise ValueError(f"approval {mode!r}: expected one of {APPROVAL_MODES}")
    return mode == "always" or (mode == "when-flagged" and bool(flags))


def approval_body(evaluation: Mapping[str, Any], flags: Sequence[str], mode: str) -> str:
    """The Markdown a person reads before approving a publish."""
    champion = evaluation.get("published_version")
    lines = [f"The challenger **{evaluation['model_version']}** (dataset {evaluation['dataset_version']}) reaches "
             f"test accuracy {evaluation['test_accuracy']:.4f}"
             + (f"; the published model is {champion}." if champion else "; no model is published yet."),
             "", f"Asked because approval is `{mode}`" + (": " if flags else "."),
             *[f"* {flag}" for flag in flags], "",
             ("**Approve**: publish runs its quality gate and publishes if it passes. **Reject**: nothing is "
              f"published. Evaluation report: `{evaluation['report_uri']}`")]
    return "\n".join(lines)


def record_approval(registry_uri: str, approved: bool, evaluation: Mapping[str, Any], flags: Sequence[str],
                    run: Mapping[str, Any], user: Mapping[str, Any] | None, responded_at: str) -> dict[str, Any]:
    """Record a person's answer before publish (approved or declined) in the registry history; ``run`` holds
    the run's ``logical_date``, ``run_uri`` and ``training_key``."""
    return store.record_decision(registry_uri, {
        "decision": store.APPROVED if approved else store.DECLINED, "logical_date": run["logical_date"],
        "run_uri": run["run_uri"], "training_key": run["training_key"],
        "dataset_version": evaluation["dataset_version"], "version": evaluation["model_version"],
        "test_accuracy": evaluation["test_accuracy"], "report_uri": evaluation["report_uri"],
        "reasons": list(flags), "responded_at": responded_at, **responder(user),
    })
