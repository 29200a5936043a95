"""Plan stage: does this run train, and from which model does it start?

    python -m admm_jobs.plan --dataset-uri LAKE/mnist/<version> --run-uri RUN --registry-uri REG
        [--logical-date ISO] -- <train options>

Nothing new means no retraining: the *training key* is a hash of the dataset version, the
training code (the content of the modules that determine the weights, so a commit that touches
only docs or the pipeline around training retrains nothing) and every training setting that
shapes the model. When the registry history
already holds a gate decision (accepted or rejected) for that key, the run skips training,
evaluation and publishing, records a ``skipped`` decision and says why. Otherwise it trains,
starting from the published model with ``--init published`` (the train stage falls back to
random weights when that model's layers differ).

Writes ``RUN/plan.json`` (what ``make run`` summarises): retrain, reason, batches,
dataset_version, dataset_uri, training_key, code_version, init, init_model_uri.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
from typing import Any

from admm_jobs import dataset, registry, storage
from admm_jobs.config import configure_logging, parse_config, setting, validate_fields
from admm_jobs.train import TrainConfig, code_version

log = logging.getLogger("admm_jobs.plan")

PLAN_FILE = "plan.json"
# Train settings that do not shape the model: where it runs and how often it checkpoints.
NOT_IN_KEY = ("dataset_uri", "output_uri", "init_model_uri", "checkpoint_every")
# The modules whose code determines the trained weights.
TRAINING_CODE = ("admm.py", "trainer.py", "train.py", "dataset.py", "model.py")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Decide whether RUN trains on DATASET, and from which model."""

    dataset_uri: str = setting(help="validated dataset directory (LAKE/<dataset>/<version>)", minLength=1)
    run_uri: str = setting(help="run directory; plan.json goes here", minLength=1)
    registry_uri: str = setting(help="model registry root (history of gate decisions, published model)", minLength=1)
    logical_date: str | None = setting(None, "logical date of the run (ISO), for the history")

    def __post_init__(self) -> None:
        validate_fields(self)


def training_code_version() -> str:
    """12 hex digits of sha256 over the source of :data:`TRAINING_CODE` (read through the package, so a
    zipped deployment hashes the same bytes)."""
    package = importlib.resources.files("admm_jobs")
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode() + b"\0" + package.joinpath(name).read_bytes())
    return digest.hexdigest()[:12]


def training_key(dataset_version: str, code: str, train_config: TrainConfig) -> str:
    """16 hex digits of sha256 over what determines the trained model: data, code and training settings."""
    settings = {name: value for name, value in dataclasses.asdict(train_config).items() if name not in NOT_IN_KEY}
    identity = {"dataset_version": dataset_version, "code_version": code, "train": settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


def plan_run(config: PlanConfig, train_config: TrainConfig) -> dict[str, Any]:
    """The plan of this run (also written to ``RUN/plan.json``); a skip is recorded in the registry history."""
    manifest = dataset.load_manifest(config.dataset_uri)
    code = training_code_version()
    key = training_key(manifest["version"], code, train_config)
    batches = [batch["id"] for batch in manifest.get("batches", [])]
    previous = registry.find_decision(config.registry_uri, key)
    reason = None
    if previous is not None:
        reason = (f"a model trained on dataset {manifest['version']} with training code {code} and the same settings "
                  f"(key {key}) was already {previous['decision']} on {previous.get('recorded_at')} "
                  f"(run {previous.get('run_uri')})")
    published = registry.published_model_uri(config.registry_uri) if train_config.init == "published" else None
    plan = {
        "retrain": previous is None, "reason": reason, "batches": batches, "dataset_version": manifest["version"],
        "dataset_uri": config.dataset_uri, "training_key": key, "training_code": code,
        "code_version": code_version(), "init": train_config.init,
        "init_model_uri": published, "logical_date": config.logical_date,
    }
    storage.write_json(storage.join(config.run_uri, PLAN_FILE), plan)
    if previous is not None:
        log.info("skipping train, evaluate and publish: %s", reason)
        registry.record_decision(config.registry_uri, {
            "decision": registry.SKIPPED, "logical_date": config.logical_date, "run_uri": config.run_uri,
            "dataset_version": manifest["version"], "batches": batches, "training_key": key, "reasons": [reason],
            "test_accuracy": previous.get("test_accuracy"), "version": previous.get("version"),
            "report_uri": previous.get("report_uri"),
        })
    else:
        start = f"the published model {published}" if published else "random weights"
        log.info("training on dataset %s (batches %s) from %s", manifest["version"], batches, start)
    return plan


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Plan options before ``--``, train options after it."""
    if "--" not in argv:
        return argv, []
    marker = argv.index("--")
    return argv[:marker], argv[marker + 1:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    configure_logging()
    plan_argv, train_argv = split_argv(list(sys.argv[1:] if argv is None else argv))
    config = parse_config(PlanConfig, plan_argv)
    train_config = parse_config(TrainConfig, ["--dataset-uri", config.dataset_uri, "--output-uri", config.run_uri,
                                              *train_argv])
    plan = plan_run(config, train_config)
    print(json.dumps(plan, sort_keys=True))
    return plan


def airflow_task(argv: list[str], ti=None) -> bool:
    """:func:`main` for a ``ShortCircuitOperator``: False (nothing new) skips everything downstream.

    The plan goes to XCom under the key ``plan`` (the train task reads ``init_model_uri``).
    """
    plan = main(argv)
    if ti is not None:
        ti.xcom_push(key="plan", value=plan)
    return plan["retrain"]


if __name__ == "__main__":
    main()
