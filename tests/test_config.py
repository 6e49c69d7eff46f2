"""Job config: the model card's defaults, and errors that name every bad key at once."""

import pytest

from train.config import ConfigError, load_config, validate_config

BASE = {"model": "m", "dataset": {"training": "t.jsonl"}, "output": {"dir": "out"}}


def test_defaults_are_the_model_cards():
    cfg = validate_config(BASE)
    assert cfg.optimizer.learning_rate == 5e-6 and cfg.optimizer.weight_decay == 0.01
    assert cfg.precision == "bf16-mixed" and cfg.loss.temperature == 0.02
    assert cfg.schedule.epochs is None and cfg.schedule.max_steps is None  # 1 epoch when neither is set
    assert cfg.training.finetuning_type == "all_weights" and cfg.training.training_type == "sft"


def test_all_problems_reported_at_once_each_naming_its_key():
    raw = {**BASE, "optimizer": {"learning_rate": -1, "lr_decay": 3}, "schedule": {"epochs": 1, "max_steps": 5},
           "batch": {"global_batch_size": 32, "micro_batch_size": 5}, "trainig": {}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    text = str(err.value)
    assert "optimizer.learning_rate: Input should be greater than or equal to 0" in text
    assert "optimizer.lr_decay: unknown key" in text
    assert "trainig: unknown key" in text
    assert "schedule.epochs and schedule.max_steps are both set; keep one" in text
    assert "batch.micro_batch_size (5) must divide batch.global_batch_size (32)" in text
    assert len(err.value.problems) == 5


def test_unmerged_lora_refused_with_reason():
    raw = {**BASE, "training": {"finetuning_type": "lora_merged", "lora": {"rank": 8, "merge": False}}}
    with pytest.raises(ConfigError, match=r"training\.lora\.merge: must be true: the serving format is one ONNX graph, "
                                          r"which cannot hold a standalone adapter"):
        validate_config(raw)


def test_lora_with_all_weights_is_a_contradiction():
    with pytest.raises(ConfigError, match="training.lora is set but training.finetuning_type is all_weights"):
        validate_config({**BASE, "training": {"lora": {"rank": 4}}})


def test_missing_required_sections_named():
    with pytest.raises(ConfigError) as err:
        validate_config({"model": "m"})
    assert {"dataset: Field required", "output: Field required"} <= set(err.value.problems)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: m\ndataset: {training: t.jsonl}\noutput: {dir: out}\n")
    cfg = load_config(path, ["optimizer.learning_rate=2e-5", "loss.matryoshka_dims=[16, 32]", "training.finetuning_type=lora_merged"])
    assert cfg.optimizer.learning_rate == 2e-5 and cfg.loss.matryoshka_dims == [16, 32]
    assert cfg.training.lora_settings.merge is True
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["optimizer.learning_rate"])
