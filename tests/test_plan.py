"""The plan stage: the training key, skipping when nothing changed, and the model a warm start begins from."""

from __future__ import annotations

import dataclasses
import json

import pytest

from admm_jobs import plan, registry, storage
from admm_jobs.train import TrainConfig


def train_config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(dataset_uri="lake/mnist/v", output_uri="runs/a"), **changes)


def test_training_key_follows_data_code_and_the_settings_that_shape_the_model():
    key = plan.training_key("v1", "0.1.0+abc", train_config())
    assert key == plan.training_key("v1", "0.1.0+abc", train_config())
    # where it runs, how often it checkpoints and which published model it starts from do not matter
    assert key == plan.training_key("v1", "0.1.0+abc", train_config(output_uri="runs/b", checkpoint_every=1,
                                                                      init_model_uri="registry/x/model"))
    for changed in (plan.training_key("v2", "0.1.0+abc", train_config()),
                    plan.training_key("v1", "0.1.0+def", train_config()),
                    plan.training_key("v1", "0.1.0+abc", train_config(epochs=7)),
                    plan.training_key("v1", "0.1.0+abc", train_config(hidden_layers=(64,))),
                    plan.training_key("v1", "0.1.0+abc", train_config(init="random"))):
        assert changed != key


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
    # other training settings are another model: it trains
    assert plan.plan_run(config, dataclasses.replace(train, epochs=3))["retrain"] is True


def test_airflow_task_pushes_the_plan_and_returns_whether_to_train(planned):
    config, _ = planned

    class TaskInstance:
        pushed = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    ti = TaskInstance()
    argv = ["--dataset-uri", config.dataset_uri, "--run-uri", config.run_uri, "--registry-uri", config.registry_uri,
            "--", "--epochs", "3", "--hidden-layers", "16"]
    assert plan.airflow_task(argv, ti=ti) is True
    assert ti.pushed["plan"]["training_key"] == plan.training_key(
        ti.pushed["plan"]["dataset_version"], plan.training_code_version(),
        TrainConfig(dataset_uri=config.dataset_uri, output_uri=config.run_uri, epochs=3, hidden_layers=(16,)))


def test_training_code_version_follows_the_training_modules_only(monkeypatch, tmp_path):
    import importlib.resources
    from pathlib import Path

    package = Path(importlib.resources.files("admm_jobs"))
    copy = tmp_path / "admm_jobs"
    copy.mkdir()
    for name in plan.TRAINING_CODE + ("publish.py",):
        (copy / name).write_bytes((package / name).read_bytes())
    monkeypatch.setattr(importlib.resources, "files", lambda name: copy)
    original = plan.training_code_version()
    assert original == plan.training_code_version() and len(original) == 12
    (copy / "publish.py").write_text("# pipeline code around training\n")
    assert plan.training_code_version() == original
    (copy / "trainer.py").write_bytes((copy / "trainer.py").read_bytes() + b"\n# changed\n")
    assert plan.training_code_version() != original
