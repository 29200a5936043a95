"""Plan stage: does this run train, and from which model does it start?

    python -m admm_jobs.plan --dataset-uri LAKE/mnist/<version> --run-uri RUN --registry-uri REG
        [--logical-date ISO] -- <train options> -- <gate options>

Nothing new means no retraining: the *training key* is a hash of the dataset version, the
training code (the definitions in every project module the Spark job imports, whichever file holds
them: a commit that touches only docs, imports, the pipeline around training or where code lives
retrains nothing), every training setting that shapes the model (the partition count does not:
see :mod:`admm_jobs.trainer.reduction`) and the quality gate's thresholds (after a gate change, the
gate decides again). When the registry history
already holds a gate decision (accepted or rejected) for that key, the run skips training,
evaluation and publishing, records a ``skipped`` decision and says why. Otherwise it trains,
starting from the published model with ``--init published`` (the train stage falls back to
random weights when that model's layers differ).

Writes ``RUN/plan.json`` (what ``make run`` summarises): retrain, reason, batches,
dataset_version, dataset_uri, training_key, code_version, init, init_model_uri.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import logging
import sys
from typing import Any

from admm_jobs.cli.command import run_command
from admm_jobs.cli.config import parse_config, setting, validate_fields
from admm_jobs.lake import dataset, storage
from admm_jobs.registry import store as registry
from admm_jobs.registry.gate import GateSettings
from admm_jobs.trainer.config import TrainConfig, code_version

log = logging.getLogger("admm_jobs.plan")

PLAN_FILE = "plan.json"
# Train settings that do not shape the model: where it runs, how often it checkpoints, and how many
# partitions it cuts the rows into (the sums run along a chunk tree that does not depend on them).
NOT_IN_KEY = ("dataset_uri", "output_uri", "init_model_uri", "checkpoint_every", "partitions", "block_rows")
TRAINING_JOB = "admm_jobs.train"  # the Spark job: its modules' code determines the trained weights
PACKAGE = "admm_jobs"


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Decide whether RUN trains on DATASET, and from which model."""

    dataset_uri: str = setting(help="validated dataset directory (LAKE/<dataset>/<version>)", minLength=1)
    run_uri: str = setting(help="run directory; plan.json goes here", minLength=1)
    registry_uri: str = setting(help="model registry root (history of gate decisions, published model)", minLength=1)
    logical_date: str | None = setting(None, "logical date of the run (ISO), for the history")

    def __post_init__(self) -> None:
        validate_fields(self)


def is_entry_point(statement: ast.stmt) -> bool:
    """``def main`` or the ``if __name__ == "__main__"`` guard: how a module is called, not what it computes."""
    if isinstance(statement, ast.FunctionDef):
        return statement.name == "main"
    return isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test)


def code_units(source: str) -> list[str]:
    """The top-level statements of a module's source, each as written (decorators and inner comments included).

    Left out: imports (they say where code lives), the module docstring and the entry point
    (:func:`is_entry_point`); what remains is the code the module contributes, wherever it is kept.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    docstring = ast.get_docstring(tree, clean=False) is not None
    units = []
    for index, statement in enumerate(tree.body):
        if (index == 0 and docstring) or isinstance(statement, (ast.Import, ast.ImportFrom)) or is_entry_point(statement):
            continue
        first = min([statement.lineno, *(d.lineno for d in getattr(statement, "decorator_list", []))])
        units.append("\n".join(lines[first - 1:statement.end_lineno]))
    return units


def imported_modules(module: str) -> set[str]:
    """The project modules ``module`` imports, at the top or inside functions (``from pkg import name``
    counts ``pkg.name`` when that is a module, else ``pkg``)."""
    found = set()
    for node in ast.walk(ast.parse(module_source(module))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if _is_module(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == PACKAGE or name.startswith(PACKAGE + "."))
    return found


def _is_module(name: str) -> bool:
    """Whether ``name`` is an importable module (not a name defined in one)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def training_modules() -> tuple[str, ...]:
    """Every project module the Spark job imports, directly or through others (the job included)."""
    seen, pending = set(), [TRAINING_JOB]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(imported_modules(module) - seen)
    return tuple(sorted(seen))


def training_code_version() -> str:
    """12 hex digits of sha256 over the sorted sha256 digests of the code units of :func:`training_modules`.

    The sources are read through the import system (a zipped deployment hashes the same text). A
    digest of units, not of files, does not change when code moves between modules or a module is
    renamed: only a change to what the code computes retrains.
    """
    digests = sorted(hashlib.sha256(unit.encode()).hexdigest()
                     for module in training_modules() for unit in code_units(module_source(module)))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:12]


def module_source(module: str) -> str:
    """The source text of an importable module, from a directory or a zip archive alike."""
    spec = importlib.util.find_spec(module)
    return spec.loader.get_source(module)


def training_key(dataset_version: str, code: str, train_config: TrainConfig, gate: GateSettings) -> str:
    """16 hex digits of sha256 over what determines the decision: data, code, training settings and the
    gate's thresholds (after a gate change, the gate decides again)."""
    settings = {name: value for name, value in dataclasses.asdict(train_config).items() if name not in NOT_IN_KEY}
    identity = {"dataset_version": dataset_version, "code_version": code, "train": settings,
                "gate": dataclasses.asdict(gate)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]


def plan_run(config: PlanConfig, train_config: TrainConfig, gate: GateSettings = GateSettings()) -> dict[str, Any]:
    """The plan of this run (also written to ``RUN/plan.json``); a skip is recorded in the registry history."""
    manifest = dataset.load_manifest(config.dataset_uri)
    code = training_code_version()
    key = training_key(manifest["version"], code, train_config, gate)
    batches = [batch["id"] for batch in manifest.get("batches", [])]
    previous = registry.find_decision(config.registry_uri, key)
    reason = None
    if previous is not None:
        reason = (f"a model trained on dataset {manifest['version']} with training code {code} and the same settings "
                  "and gate "
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


def split_argv(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Plan options, then after ``--`` train options, then after a second ``--`` the gate's options."""
    sections = [[]]
    for argument in argv:
        if argument == "--" and len(sections) < 3:
            sections.append([])
        else:
            sections[-1].append(argument)
    plan_argv, train_argv, gate_argv = sections + [[]] * (3 - len(sections))
    return plan_argv, train_argv, gate_argv


def main(argv: list[str] | None = None) -> dict[str, Any]:
    plan_argv, train_argv, gate_argv = split_argv(list(sys.argv[1:] if argv is None else argv))

    def plan_with_train_settings(config: PlanConfig) -> dict[str, Any]:
        train_config = parse_config(TrainConfig, ["--dataset-uri", config.dataset_uri, "--output-uri", config.run_uri,
                                                  *train_argv])
        return plan_run(config, train_config, parse_config(GateSettings, gate_argv))

    return run_command(PlanConfig, plan_with_train_settings, plan_argv)


if __name__ == "__main__":
    main()
