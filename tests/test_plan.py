"""The plan stage: the training key, skipping when nothing changed, and the model a warm start begins from."""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest

from admm_jobs import plan
from admm_jobs.lake import storage
from admm_jobs.orchestration import tasks
from admm_jobs.registry import store as registry
from admm_jobs.registry.gate import GateSettings
from admm_jobs.trainer.config import TrainConfig


def train_config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(dataset_uri="lake/mnist/v", output_uri="runs/a"), **changes)


def test_training_key_follows_data_code_the_settings_that_shape_the_model_and_the_gate():
    gate = GateSettings()
    key = plan.training_key("v1", "0.1.0+abc", train_config(), gate)
    assert key == plan.training_key("v1", "0.1.0+abc", train_config(), GateSettings())
    # where it runs, how often it checkpoints, which published model it starts from and how many partitions
    # it cuts the rows into (the sums do not depend on them: test_train) do not matter
    assert key == plan.training_key("v1", "0.1.0+abc", train_config(output_uri="runs/b", checkpoint_every=1,
                                                                      init_model_uri="registry/x/model",
                                                                      partitions=512, block_rows=1000), gate)
    for changed in (plan.training_key("v2", "0.1.0+abc", train_config(), gate),
                    plan.training_key("v1", "0.1.0+def", train_config(), gate),
                    plan.training_key("v1", "0.1.0+abc", train_config(epochs=7), gate),
                    plan.training_key("v1", "0.1.0+abc", train_config(hidden_layers=(64,)), gate),
                    plan.training_key("v1", "0.1.0+abc", train_config(init="random"), gate),
                    plan.training_key("v1", "0.1.0+abc", train_config(chunk_rows=512), gate),
                    plan.training_key("v1", "0.1.0+abc", train_config(), GateSettings(min_accuracy=0.9)),
                    plan.training_key("v1", "0.1.0+abc", train_config(), GateSettings(max_batch_regression=0.01)),
                    plan.training_key("v1", "0.1.0+abc", train_config(), GateSettings(max_class_regression=0.05))):
        assert changed != key


def test_the_training_code_is_every_project_module_the_spark_job_imports():
    modules = set(plan.training_modules())
    assert {"admm_jobs.train", "admm_jobs.trainer.spark_backend", "admm_jobs.trainer.block_store",
            "admm_jobs.trainer.checkpoint", "admm_jobs.trainer.reduction", "admm_jobs.trainer.loop",
            "admm_jobs.lake.storage", "admm_jobs.lake.dataset", "admm_jobs.registry.model"} <= modules
    assert not modules & {"admm_jobs.plan", "admm_jobs.publish", "admm_jobs.evaluate", "admm_jobs.scoring.metrics"}


@pytest.fixture
def planned(small_dataset, tmp_path):
    config = plan.PlanConfig(dataset_uri=small_dataset["dataset_uri"], run_uri=str(tmp_path / "run"),
                             registry_uri=str(tmp_path / "registry"), logical_date="2026-03-01T00:00:00+00:00")
    return config, TrainConfig(dataset_uri=config.dataset_uri, output_uri=config.run_uri)


def test_a_new_dataset_trains_and_starts_from_the_published_model(planned, small_dataset):
    config, train = planned
    first = plan.plan_run(config, train)
    assert first["retrain"] is True and first["reason"] is None and first["init_model_uri"] is None
    assert first["batches"] == small_dataset["batches"]
    assert json.loads(storage.read_bytes(storage.join(config.run_uri, plan.PLAN_FILE))) == first
    assert registry.switch_pointer(config.registry_uri, {"version": "0123456789abcdef", "test_accuracy": 0.9}, None)
    warm = plan.plan_run(config, train)
    assert warm["init_model_uri"] == registry.published_model_uri(config.registry_uri)
    assert plan.plan_run(config, dataclasses.replace(train, init="random"))["init_model_uri"] is None
    assert registry.read_history(config.registry_uri) == []  # planning to train records nothing


@pytest.mark.parametrize("decision", ["accepted", "rejected"])
def test_nothing_new_skips_and_records_why(planned, decision):
    config, train = planned
    key = plan.plan_run(config, train)["training_key"]
    registry.record_decision(config.registry_uri, {"decision": decision, "training_key": key, "run_uri": "runs/old",
                                                   "test_accuracy": 0.91, "version": "0123456789abcdef"})
    skipped = plan.plan_run(config, train)
    assert skipped["retrain"] is False and f"already {decision}" in skipped["reason"] and "runs/old" in skipped["reason"]
    last = registry.read_history(config.registry_uri)[-1]
    assert last["decision"] == "skipped" and last["training_key"] == key and last["reasons"] == [skipped["reason"]]
    assert last["logical_date"] == config.logical_date and last["test_accuracy"] == 0.91
    # other training settings, another gate or other code in any module the Spark job imports: it trains
    assert plan.plan_run(config, dataclasses.replace(train, epochs=3))["retrain"] is True
    assert plan.plan_run(config, train, GateSettings(max_regression=0.01))["retrain"] is True
    assert plan.plan_run(config, dataclasses.replace(train, partitions=64))["retrain"] is False
    original_source = plan.module_source
    for module in ("admm_jobs.trainer.spark_backend", "admm_jobs.trainer.block_store", "admm_jobs.trainer.checkpoint"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(plan, "module_source", lambda name, edited=module: original_source(name) + (
                "\n\nFIXED_IN = 'a fix'\n" if name == edited else ""))
            assert plan.plan_run(config, train)["retrain"] is True, module


def test_airflow_task_pushes_the_plan_and_returns_whether_to_train(planned):
    config, _ = planned

    class TaskInstance:
        pushed = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    ti = TaskInstance()
    argv = ["--dataset-uri", config.dataset_uri, "--run-uri", config.run_uri, "--registry-uri", config.registry_uri,
            "--", "--epochs", "3", "--hidden-layers", "16"]
    assert tasks.plan_task(argv, ti=ti) is True
    assert ti.pushed["plan"]["training_key"] == plan.training_key(
        ti.pushed["plan"]["dataset_version"], plan.training_code_version(),
        TrainConfig(dataset_uri=config.dataset_uri, output_uri=config.run_uri, epochs=3, hidden_layers=(16,)),
        GateSettings())
    gate_argv = argv + ["--", "--min-accuracy", "0.9"]
    assert tasks.plan_task(gate_argv, ti=ti) is True
    assert ti.pushed["plan"]["training_key"] == plan.training_key(
        ti.pushed["plan"]["dataset_version"], plan.training_code_version(),
        TrainConfig(dataset_uri=config.dataset_uri, output_uri=config.run_uri, epochs=3, hidden_layers=(16,)),
        GateSettings(min_accuracy=0.9))


def test_training_code_version_follows_the_code_not_where_it_lives(monkeypatch):
    modules = plan.training_modules()
    sources = {module: plan.module_source(module) for module in modules}
    monkeypatch.setattr(plan, "module_source", lambda module: sources[module])
    monkeypatch.setattr(plan, "training_modules", lambda: modules)
    original = plan.training_code_version()
    assert len(original) == 12 and original == plan.training_code_version()
    train, blocks, loop = "admm_jobs.train", "admm_jobs.trainer.blocks", "admm_jobs.trainer.loop"

    def edit(module: str, old: str, new: str) -> None:
        assert old in sources[module], f"{module} no longer holds {old!r}: pick another edit"
        sources[module] = sources[module].replace(old, new)

    # A module docstring, imports, comments between definitions and the entry point are not the code's content.
    edit(blocks, ast.get_docstring(ast.parse(sources[blocks]), clean=False), "Reworded.")
    edit(blocks, "\nimport numpy", "\nimport os  # a note\nimport numpy")
    edit(train, "log_stream=sys.stdout", "log_stream=None")
    assert plan.training_code_version() == original

    # A definition moved to another module, or a module renamed, keeps the version.
    moved = next(unit for unit in plan.code_units(sources[blocks]) if unit.startswith("def read_slices("))
    edit(blocks, moved, "")
    sources[loop] += "\n\n" + moved + "\n"
    assert plan.training_code_version() == original
    renamed = "admm_jobs.trainer.renamed_loop"
    sources[renamed] = sources.pop(loop)
    modules = tuple(renamed if module == loop else module for module in modules)
    assert plan.training_code_version() == original

    # What the code computes does change it.
    edit(renamed, "file_pixels[start:end]", "file_pixels[start:end + 1]")
    assert plan.training_code_version() != original