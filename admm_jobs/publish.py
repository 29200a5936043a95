"""Publish a trained, evaluated model (the challenger) to the registry, behind a quality gate.

The registry's layout, pointer, versions and history are :mod:`admm_jobs.registry.store`'s.

Quality gate (:func:`quality_gate`). The champion is the published model. The challenger is
accepted iff

* its test accuracy is at least ``min_accuracy``, and, when there is a champion,
* test accuracy >= champion's test accuracy - ``max_regression``, and
* accuracy on the dataset's newest batch >= champion's on it - ``max_batch_regression``
  (when the evaluation scored a newest batch), and
* for every class k, recall_k on the test set >= the champion's recall_k - ``max_class_regression``
  (a poison aimed at one class moves its recall, not the overall accuracy; the failed classes are named), and
* the challenger check: in no class does the challenger adopt the given labels of the newest batch's images the
  champion calls wrong beyond the champion's test error rate, at the family-wise false-alarm rate
  ``challenger_false_alarm_rate`` (:mod:`admm_jobs.scoring.challenger_checks`: a trigger memorised from a
  poisoned batch). A challenger failing it is rejected and the newest batch is **quarantined** in the registry
  history (check ``challenger adoption``, ``given`` the class), so that no later run trains on it; the DAG's
  ``request_review_after_publish`` task starts its review.

Publish adds its decision to the run's report (``evaluation/report.html``), which the
registry copies with an accepted version and the history links for a rejected one.

An accepted version is stored with its reference confusion (``reference/confusion.json``,
:func:`admm_jobs.registry.store.reference_confusion`): its confusion matrix on the validation
split, which evaluate computed, and its calibration on the same split (``reference/calibration.json``,
:func:`admm_jobs.registry.store.reference_calibration`: the temperature that turns its scores into
probabilities, the confident-learning thresholds and confident joint, fitted here), so that the
label checks compare a new batch with them without scoring history again; and with its reference pixel
statistics (``reference/pixels.json``, :func:`admm_jobs.registry.store.reference_pixels`): per class, how
many of its training and validation images have ink at each pixel, summed from the profiles of its
dataset's batches (no pixel is read).

The scores come from ``RUN/evaluation/metrics.json``, where evaluate scored both models on the
same test split and newest batch. If the pointer has moved since (another model was published
in between), the gate is run against the new champion: it is scored here on the same data
(an evaluation without batches, written before champion scoring existed, falls back to the
test accuracy the pointer records). A rejection leaves the pointer and the versions alone and
is a normal outcome (exit 0); a missing or corrupt artifact raises.

Every decision is appended to the registry history (:func:`admm_jobs.registry.store.record_decision`)
with the training key and logical date the DAG passes, the dataset version and batch ids, both
models' scores and the reasons.

Concurrent publishes: the read-pointer / gate / switch-pointer sequence runs under
:func:`admm_jobs.registry.store.locked` on local disk; on object stores the pointer switch is a
conditional PUT and the gate is re-run against the new pointer when another publisher got
there first.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import require, setting, validate_fields
from admm_jobs.lake import profiles, storage
from admm_jobs.lake.dataset import MANIFEST_FILE
from admm_jobs.registry import model as model_io
from admm_jobs.registry import store as registry
from admm_jobs.registry.gate import GateSettings
from admm_jobs.scoring import challenger_checks, metrics, report
from admm_jobs.serving.onnx_export import verified_onnx

log = logging.getLogger("admm_jobs.publish")  # not "__main__" under python -m

DEFAULT_MODEL_NAME = registry.DEFAULT_MODEL_NAME
NEWEST_BATCH = metrics.NEWEST_BATCH
# Accuracies are ratios of counts; this keeps a drop of exactly the allowed size from failing by rounding.
TOLERANCE = 1e-12


class PublishError(registry.RegistryError):
    """A run's artifacts are unusable; the message names the URI."""


GATE_FIELDS = {field.name: setting(field.default, field.metadata["help"], **field.metadata["schema"])
               for field in dataclasses.fields(GateSettings)}


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    """Publish RUN's model to the registry if it passes the quality gate."""

    run_uri: str = setting(help="run directory holding model/, evaluation/ and metrics.jsonl", minLength=1)
    registry_uri: str = setting(help="root of the model registry", minLength=1)
    min_accuracy: float = GATE_FIELDS["min_accuracy"]
    max_regression: float = GATE_FIELDS["max_regression"]
    max_batch_regression: float = GATE_FIELDS["max_batch_regression"]
    max_class_regression: float = GATE_FIELDS["max_class_regression"]
    challenger_false_alarm_rate: float = GATE_FIELDS["challenger_false_alarm_rate"]
    model_name: str = setting(DEFAULT_MODEL_NAME, "registry entry name")
    training_key: str | None = setting(
        None, "identity of what was trained (dataset version, code version, training params), for the history"
    )
    logical_date: str | None = setting(None, "logical date of the run (ISO), for the history")

    def __post_init__(self) -> None:
        validate_fields(self)
        require(
            bool(self.model_name) and "/" not in self.model_name and not self.model_name.startswith("."),
            f"--model-name must be a plain directory name, got {self.model_name!r}",
        )
        require(
            self.logical_date is None or _is_iso_date(self.logical_date),
            f"--logical-date must be an ISO date or timestamp, got {self.logical_date!r}",
        )


def _is_iso_date(text: str) -> bool:
    try:
        datetime.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Scores:
    """A model's accuracy on the test split and on the newest batch, and its recall of each class on the test
    split (None: not scored there); a champion's also the challenger check's per-class statistics against the
    challenger (:func:`admm_jobs.scoring.challenger_checks.adoption_statistics`; None: not computed)."""

    test_accuracy: float
    batch_accuracy: float | None = None
    class_recalls: list[float] | None = None
    adoption: list[dict[str, Any]] | None = dataclasses.field(default=None, repr=False)


def class_recalls(scores: dict[str, Any]) -> list[float] | None:
    """Recall per class from scores with ``per_class`` (``metrics.json``'s form); None when they have none."""
    per_class = scores.get("per_class")
    return [float(entry["recall"]) for entry in per_class] if per_class else None


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What the gate and the history need to know about a run's model (the challenger)."""

    run_uri: str
    version: str
    scores: Scores
    dataset_uri: str | None
    dataset_version: str | None
    batches: list[str]
    newest_batch: str | None
    evaluation: dict[str, Any]
    # A reviewer released the newest batch after a quarantine: the challenger check does not judge it again.
    newest_batch_released: bool = False


@dataclasses.dataclass(frozen=True)
class Decision:
    outcome: str  # "accepted" (switch the pointer), "rejected", or "unchanged" (already current)
    reasons: list[str]
    # Classes whose test recall fell too far: {"class", "recall", "champion_recall", "allowed"} each.
    failed_classes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Classes of the newest batch whose labels the challenger adopted beyond the champion's errors (the
    # statistics of challenger_checks.adoption_statistics, with the ``level`` tested at): the batch is quarantined.
    adopted_classes: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def load_candidate(run_uri: str) -> Candidate:
    """Check a run's model, evaluation and epoch log, and summarise them for the gate."""
    model_uri = storage.join(run_uri, registry.MODEL_DIR)
    weights_sha256 = model_io.load_model(model_uri).metadata["weights_sha256"]
    metrics_uri = storage.join(run_uri, registry.EVALUATION_DIR, registry.EVALUATION_METRICS_FILE)
    evaluation = storage.read_json(metrics_uri)
    if not isinstance(evaluation, dict) or not registry.is_accuracy(evaluation.get("test_accuracy")):
        raise PublishError(f"{metrics_uri}: no valid 'test_accuracy' (expected a number in [0, 1])")
    evaluated_sha256 = (evaluation.get("model") or {}).get("weights_sha256")
    if evaluated_sha256 != weights_sha256:
        raise PublishError(
            f"{metrics_uri}: evaluates model weights {evaluated_sha256!r}, "
            f"but {model_uri} holds {weights_sha256!r}"
        )
    epoch_metrics_uri = storage.join(run_uri, registry.EPOCH_METRICS_FILE)
    if not storage.exists(epoch_metrics_uri):
        raise PublishError(
            f"{epoch_metrics_uri}: no such file (the training log is published with the model)"
        )
    newest = evaluation.get(NEWEST_BATCH)
    if newest is not None and not registry.is_accuracy(newest.get("accuracy")):
        raise PublishError(f"{metrics_uri}: '{NEWEST_BATCH}' has no valid 'accuracy'")
    evaluated_dataset = evaluation.get("dataset") or {}
    return Candidate(
        run_uri=run_uri,
        version=registry.model_version(weights_sha256),
        scores=Scores(float(evaluation["test_accuracy"]), float(newest["accuracy"]) if newest else None,
                      class_recalls(evaluation)),
        dataset_uri=evaluated_dataset.get("uri"),
        dataset_version=evaluated_dataset.get("version"),
        batches=list(evaluated_dataset.get("batches") or []),
        newest_batch=newest["id"] if newest else None,
        evaluation=evaluation,
    )


def champion_scores(candidate: Candidate, pointer: dict[str, Any], registry_uri: str, model_name: str) -> Scores:
    """The published model's scores on the data the challenger was evaluated on.

    Taken from the evaluation when it scored this very champion; otherwise the champion is
    scored now (an evaluation written before champion scoring existed has no dataset to
    score on: the pointer's recorded test accuracy stands in, and the batch check is skipped).
    """
    evaluated = candidate.evaluation.get("champion")
    if evaluated and evaluated.get("version") == pointer["version"]:
        batch = evaluated.get(NEWEST_BATCH)
        check = candidate.evaluation.get("challenger_check")
        return Scores(float(evaluated["test"]["accuracy"]), batch["accuracy"] if batch else None,
                      class_recalls(evaluated["test"]), check["classes"] if check else None)
    if candidate.evaluation.get("format") != metrics.EVALUATION_FORMAT or not candidate.dataset_uri:
        return Scores(float(pointer["test_accuracy"]))
    log.info(
        "the published model is %s, not the %s the evaluation compared with: scoring it on %s",
        pointer["version"],
        evaluated.get("version") if evaluated else "none",
        candidate.dataset_uri,
    )
    model_uri = storage.join(registry.version_uri(registry_uri, pointer["version"], model_name), registry.MODEL_DIR)
    scored = metrics.score_champion(model_uri, candidate.dataset_uri,
                                    storage.join(candidate.run_uri, registry.MODEL_DIR))
    batch = scored[NEWEST_BATCH]
    return Scores(scored["test"]["accuracy"], batch["accuracy"] if batch else None, class_recalls(scored["test"]),
                  scored["challenger_check"])


def within(mine: float, theirs: float, allowed: float) -> bool:
    """Whether ``mine >= theirs - allowed``, a drop of exactly ``allowed`` included despite rounding."""
    return mine - theirs + TOLERANCE >= -allowed


def _comparison(what: str, mine: float, theirs: float, allowed: float, champion_version: str) -> tuple[bool, str]:
    """Whether ``mine >= theirs - allowed``, and the sentence saying so."""
    delta = mine - theirs
    passed = within(mine, theirs, allowed)
    verdict = f"a drop of up to {allowed:.4f} is allowed" if passed else f"more than the allowed drop of {allowed:.4f}"
    return passed, (
        f"{what} {mine:.4f} vs {theirs:.4f} for the published version {champion_version} ({delta:+.4f}; {verdict})"
    )


def class_regressions(
    mine: list[float], theirs: list[float], allowed: float, champion_version: str
) -> tuple[list[tuple[bool, str]], list[dict[str, Any]]]:
    """The per-class gate: a failed check for every class whose test recall is more than ``allowed`` below the
    champion's (or one passed check naming the largest drop), and those classes with their recalls."""
    failed = [
        {"class": k, "recall": recall, "champion_recall": champion_recall, "allowed": allowed}
        for k, (recall, champion_recall) in enumerate(zip(mine, theirs))
        if not within(recall, champion_recall, allowed)
    ]
    if failed:
        return [_comparison(f"recall of class {entry['class']} on the test set", entry["recall"],
                            entry["champion_recall"], allowed, champion_version) for entry in failed], failed
    worst = min(range(len(mine)), key=lambda k: mine[k] - theirs[k])
    reason = (f"no class's test recall is more than {allowed:.4f} below the published version {champion_version}'s "
              f"(largest change: class {worst}, {mine[worst] - theirs[worst]:+.4f})")
    return [(True, reason)], []


def adoption_reason(entry: dict[str, Any], batch: str | None, champion_version: str) -> str:
    """Why the challenger check failed in one class (an entry of :func:`challenger_checks.adopted_classes`)."""
    return (f"the challenger adopted the label {entry['class']} of {entry['adopted']} of the {entry['batch_images']} "
            f"images so labelled in the newest batch {batch} (share {entry['adopted_share']:.4f}) where the published "
            f"version {champion_version} predicts another class, beyond its test error rate "
            f"{entry['champion_error_rate']:.4f} in that class (p = {entry['p_value']:.2g}; p at most "
            f"{entry['level']:.2g} with a share more than {challenger_checks.MIN_EXCESS} above fails): a poison "
            "memorised from the batch")


def adoption_checks(candidate: Candidate, champion: Scores, false_alarm_rate: float,
                    champion_version: str) -> tuple[list[tuple[bool, str]], list[dict[str, Any]]]:
    """The challenger check: a failed check for every class whose adopted share of the newest batch exceeds the
    champion's test error rate beyond sampling (or one passed check naming the smallest p-value), and those
    classes. It does not apply to a batch a reviewer released, nor without statistics or with a rate of 0."""
    batch, statistics = candidate.newest_batch, champion.adoption
    if candidate.newest_batch_released:
        return [(True, f"the challenger check does not apply: a reviewer released the newest batch {batch}")], []
    if not statistics or false_alarm_rate == 0:
        return [(True, ("the challenger check does not apply (no newest batch scored by both models, or "
                        "challenger_false_alarm_rate is 0)"))], []
    adopted = challenger_checks.adopted_classes(statistics, false_alarm_rate)
    if adopted:
        return [(False, adoption_reason(entry, batch, champion_version)) for entry in adopted], adopted
    # The class nearest to failing by its share: its p-value may be below the level when the margin held it.
    nearest = max(statistics, key=lambda entry: entry["adopted_share"] - entry["champion_error_rate"])
    level = challenger_checks.class_test_level(false_alarm_rate, len(statistics))
    reason = (f"the challenger adopts no class's labels of the newest batch {batch} beyond the published version "
              f"{champion_version}'s test error rate (largest excess in class {nearest['class']}: share "
              f"{nearest['adopted_share']:.4f} against {nearest['champion_error_rate']:.4f}, p = "
              f"{nearest['p_value']:.2g}; p at most {level:.2g} with a share more than {challenger_checks.MIN_EXCESS} "
              "above fails)")
    return [(True, reason)], []


def quality_gate(
    candidate: Candidate, current: dict[str, Any] | None, champion: Scores | None, settings: GateSettings
) -> Decision:
    """Accept iff the challenger reaches ``min_accuracy`` and, against a champion, regresses by no more
    than ``max_regression`` on the test set, ``max_batch_regression`` on the newest batch and
    ``max_class_regression`` in any class's recall on the test set, and it passes the challenger check
    (:func:`adoption_checks`, at ``challenger_false_alarm_rate``).

    ``current`` is the registry pointer (None: nothing published), ``champion`` its scores.
    Every check's outcome is a reason; a rejection lists the failed checks first.
    """
    scores = candidate.scores
    if current is not None and current["version"] == candidate.version:
        return Decision("unchanged", [f"version {candidate.version} is already the published model"])
    failed_classes: list[dict[str, Any]] = []
    adopted: list[dict[str, Any]] = []
    floor_passed = scores.test_accuracy + TOLERANCE >= settings.min_accuracy
    checks = [
        (
            floor_passed,
            f"test accuracy {scores.test_accuracy:.4f} "
            f"{'>=' if floor_passed else 'is below'} the minimum {settings.min_accuracy:.4f}",
        )
    ]
    if current is None:
        checks.append((True, "no published model to compare with"))
    else:
        checks.append(
            _comparison("test accuracy", scores.test_accuracy, champion.test_accuracy, settings.max_regression,
                        current["version"])
        )
        if scores.batch_accuracy is not None and champion.batch_accuracy is not None:
            checks.append(
                _comparison(f"accuracy on the newest batch {candidate.newest_batch}", scores.batch_accuracy,
                            champion.batch_accuracy, settings.max_batch_regression, current["version"])
            )
        else:
            checks.append((True, "no newest batch scored for both models: the batch check does not apply"))
        if scores.class_recalls is not None and champion.class_recalls is not None:
            class_checks, failed_classes = class_regressions(
                scores.class_recalls, champion.class_recalls, settings.max_class_regression, current["version"])
            checks += class_checks
        else:
            checks.append((True, "no per-class test recall for both models: the per-class check does not apply"))
        adoption, adopted = adoption_checks(candidate, champion, settings.challenger_false_alarm_rate,
                                            current["version"])
        checks += adoption
    failed = [reason for passed, reason in checks if not passed]
    if failed:
        return Decision("rejected", failed + [reason for passed, reason in checks if passed], failed_classes,
                        adopted)
    return Decision("accepted", [reason for _, reason in checks])


def version_extras(candidate: Candidate) -> dict[str, bytes]:
    """What a version keeps besides the run's files: the verified ONNX export and what the batch checks compare
    new batches with: the reference pixel statistics of its dataset (when that is in the lake; else validate sums
    them from the profiles itself) and, when evaluate scored held-out rows, the confusion evaluate counted and the
    calibration fitted here on the same rows (read again, chunk by chunk)."""
    model = model_io.load_model(storage.join(candidate.run_uri, registry.MODEL_DIR))
    onnx_bytes, _ = verified_onnx(model)
    extras = {f"{registry.MODEL_DIR}/{registry.ONNX_FILE}": onnx_bytes}
    if candidate.dataset_uri and storage.exists(storage.join(candidate.dataset_uri, MANIFEST_FILE)):
        extras[registry.REFERENCE_PIXELS_PATH] = registry.reference_pixels_bytes(
            profiles.dataset_class_ink(candidate.dataset_uri, model.layer_sizes[-1]), candidate.dataset_version)
    held_out = candidate.evaluation.get(metrics.VALIDATION)
    if held_out:
        extras[registry.REFERENCE_CONFUSION_PATH] = registry.reference_confusion_bytes(
            held_out["confusion_matrix"], metrics.VALIDATION, candidate.dataset_version)
        calibration, joint = metrics.held_out_calibration(model, metrics.validation_set(candidate.dataset_uri))
        extras[registry.REFERENCE_CALIBRATION_PATH] = registry.reference_calibration_bytes(
            calibration.temperature, calibration.thresholds.tolist(), joint.tolist(), metrics.VALIDATION,
            candidate.dataset_version)
    return extras


def add_decision_to_report(candidate: Candidate, decision: Decision, settings: GateSettings) -> None:
    """Render the run's report again with the gate's decision in it: the registry copies that report with an
    accepted version, and the history links it for a rejected one. An evaluation that lists no plots (written
    by hand or by an older evaluate) keeps its report."""
    plots = (candidate.evaluation.get("files") or {}).get("plots")
    if plots is None:
        return
    directory = storage.join(candidate.run_uri, registry.EVALUATION_DIR)
    images = {name: storage.read_bytes(storage.join(directory, name)) for name in plots}
    gate = {"decision": decision.outcome, "reasons": decision.reasons, "failed_classes": decision.failed_classes,
            "settings": dataclasses.asdict(settings)}
    page = report.render_report({**candidate.evaluation, "gate": gate}, images)
    storage.write_bytes(storage.join(directory, registry.REPORT_FILE), page.encode())


def publish_run(
    run_uri: str,
    registry_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    min_accuracy: float = GateSettings.min_accuracy,
    max_regression: float = GateSettings.max_regression,
    max_batch_regression: float = GateSettings.max_batch_regression,
    max_class_regression: float = GateSettings.max_class_regression,
    challenger_false_alarm_rate: float = GateSettings.challenger_false_alarm_rate,
    training_key: str | None = None,
    logical_date: str | None = None,
) -> dict[str, Any]:
    """Gate the run's model against the published one and, if accepted, make it current; quarantine the newest
    batch when the challenger check finds a poison adopted from it (``quarantined``: batch id -> its record)."""
    settings = GateSettings(min_accuracy, max_regression, max_batch_regression, max_class_regression,
                            challenger_false_alarm_rate)
    candidate = load_candidate(run_uri)
    candidate = dataclasses.replace(candidate, newest_batch_released=candidate.newest_batch in
                                    registry.released_batches(registry_uri, model_name))
    version_uri = registry.version_uri(registry_uri, candidate.version, model_name)
    created_version = False
    for _ in range(registry.MAX_ATTEMPTS):
        with registry.locked(registry_uri, model_name):
            current, token = registry.read_pointer_versioned(registry_uri, model_name)
            champion = champion_scores(candidate, current, registry_uri, model_name) if current else None
            decision = quality_gate(candidate, current, champion, settings)
            add_decision_to_report(candidate, decision, settings)
            if decision.outcome == "accepted":
                if not registry.version_exists(registry_uri, candidate.version, model_name):
                    created_version |= registry.store_version(
                        run_uri, registry_uri, candidate.version, version_extras(candidate), model_name
                    )
                new_pointer = {
                    "version": candidate.version,
                    "test_accuracy": candidate.scores.test_accuracy,
                    "dataset_version": candidate.dataset_version,
                    "published_at": registry.utc_now(),
                    "run": run_uri,
                }
                if not registry.switch_pointer(registry_uri, new_pointer, token, model_name):
                    log.info("the pointer changed while publishing %s; re-running the gate", candidate.version)
                    continue
                current_after = new_pointer
            else:
                current_after = current
                if decision.outcome == "rejected" and created_version:
                    # Copied on an attempt that lost the pointer race: a rejected model leaves no trace.
                    registry.delete_version(registry_uri, candidate.version, model_name)
            published = decision.outcome != "rejected"
            report_uri = (
                registry.version_report_uri(registry_uri, candidate.version, model_name)
                if published
                else storage.join(run_uri, registry.EVALUATION_DIR, registry.REPORT_FILE)
            )
            entry = registry.record_decision(
                registry_uri,
                history_entry(candidate, decision, current, champion, settings, report_uri,
                              training_key=training_key, logical_date=logical_date),
                model_name,
            )
            quarantined = ({candidate.newest_batch: quarantine_newest_batch(
                candidate, decision, current["version"], registry_uri, model_name, report_uri, training_key,
                logical_date)}
                if decision.adopted_classes else {})
        log_decision(candidate, decision)
        return {
            "published": published,
            "decision": decision.outcome,
            "reason": decision.reason,
            "reasons": decision.reasons,
            "failed_classes": decision.failed_classes,
            "quarantined": quarantined,
            "model_version": candidate.version,
            "test_accuracy": candidate.scores.test_accuracy,
            "batch_accuracy": candidate.scores.batch_accuracy,
            "model_name": model_name,
            "dataset_uri": candidate.dataset_uri,
            "model_uri": storage.join(version_uri, registry.MODEL_DIR) if published else None,
            # The registry's copy once published, else the run's own (the UI links it).
            "report_uri": report_uri,
            "current": current_after,
            "history_entry": entry,
        }
    raise registry.TransientRegistryError(
        f"{registry.pointer_uri(registry_uri, model_name)}: gave up after {registry.MAX_ATTEMPTS} "
        "concurrent pointer changes"
    )


def history_entry(
    candidate: Candidate,
    decision: Decision,
    current: dict[str, Any] | None,
    champion: Scores | None,
    settings: GateSettings,
    report_uri: str,
    training_key: str | None,
    logical_date: str | None,
) -> dict[str, Any]:
    """The registry history line of a gate decision (see :func:`admm_jobs.registry.store.record_decision`)."""
    return {
        # "unchanged" is an acceptance that leaves the pointer where it is.
        "decision": registry.REJECTED if decision.outcome == "rejected" else registry.ACCEPTED,
        "pointer_changed": decision.outcome == "accepted",
        "logical_date": logical_date,
        "run_uri": candidate.run_uri,
        "dataset_version": candidate.dataset_version,
        "batches": candidate.batches,
        "newest_batch": candidate.newest_batch,
        "training_key": training_key,
        "reasons": decision.reasons,
        "failed_classes": decision.failed_classes,
        "test_accuracy": candidate.scores.test_accuracy,
        "batch_accuracy": candidate.scores.batch_accuracy,
        "version": candidate.version,
        "report_uri": report_uri,
        "previous_version": current["version"] if current else None,
        "champion": (
            # the challenger check's statistics stay in the run's evaluation; a quarantine names what failed
            {"version": current["version"], **{key: value for key, value in dataclasses.asdict(champion).items()
                                              if key != "adoption"}}
            if current and champion else None
        ),
        "gate": dataclasses.asdict(settings),
    }


def quarantine_newest_batch(candidate: Candidate, decision: Decision, champion_version: str, registry_uri: str,
                            model_name: str, report_uri: str, training_key: str | None,
                            logical_date: str | None) -> dict[str, Any]:
    """Record the newest batch as quarantined in the registry history (the challenger adopted a poison from it:
    ingest leaves it out until a reviewer releases it) and return its quarantine record, in the form of
    validate's (``failures``: each adopted class as ``given``, its p-value, the level and the shares), for the
    review DAG's event."""
    failures = [{"check": challenger_checks.CHECK, "given": entry["class"], "predicted": None,
                 "observed": entry["p_value"], "threshold": entry["level"], "bound": "p-value above",
                 "adopted_share": entry["adopted_share"], "champion_error_rate": entry["champion_error_rate"]}
                for entry in decision.adopted_classes]
    first = failures[0]
    registry.record_decision(registry_uri, {
        "decision": registry.QUARANTINED, "logical_date": logical_date, "run_uri": candidate.run_uri,
        "dataset_version": candidate.dataset_version, "batches": candidate.batches, "training_key": training_key,
        "reasons": [adoption_reason(entry, candidate.newest_batch, champion_version)
                    for entry in decision.adopted_classes],
        "test_accuracy": candidate.scores.test_accuracy, "version": candidate.version, "report_uri": report_uri,
        "batch": candidate.newest_batch, "check": first["check"], "observed": first["observed"],
        "threshold": first["threshold"], "given": first["given"], "predicted": None,
    }, model_name)
    return {"batch": candidate.newest_batch, "dataset_version": candidate.dataset_version,
            "logical_date": logical_date, "failures": failures, "result_uri": report_uri,
            "recorded_at": registry.utc_now()}


def log_decision(candidate: Candidate, decision: Decision) -> None:
    if decision.outcome == "rejected":
        log.warning("REJECTED model %s from %s: %s", candidate.version, candidate.run_uri, decision.reason)
    else:
        log.info(
            "%s model %s from %s: %s", decision.outcome.upper(), candidate.version, candidate.run_uri, decision.reason
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(PublishConfig, lambda config: publish_run(**dataclasses.asdict(config)), argv)


if __name__ == "__main__":
    main()
