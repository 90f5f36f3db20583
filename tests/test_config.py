"""Config loading, overrides and the promised error messages (unknown key, bad type, bad value)."""
import json
from pathlib import Path

import pytest

from engine import config
from engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def _base():
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
            "engine": {"model": {"name": "r18"}, "head": {"num_classes": 10}}}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.stem for p in ALL_CONFIGS])
def test_shipped_configs_load(path):
    cfg = config.load(path)
    assert cfg.engine.model.name
    assert cfg.micro_batch_size >= 1


def test_required_recipes_exist():
    names = {p.stem for p in ALL_CONFIGS}
    assert {"r18", "r50", "r100", "r200", "r2060", "mbf", "vit_t", "quickstart"} <= names


def test_r2060_recipe_matches_arcface_torch():
    cfg = config.load(ROOT / "ds_configs" / "r2060.json")
    assert cfg.zero_stage == 3
    assert cfg.precision == "bf16"
    assert cfg.engine.model.checkpoint  # activation checkpointing on
    assert "activation_checkpointing" in cfg.deepspeed
    assert cfg.engine.optim.name == "sgd" and cfg.engine.optim.lr == 0.1
    assert cfg.global_batch_size(8) == 512
    assert cfg.engine.head.margin == [1.0, 0.5, 0.0] and cfg.engine.head.scale == 64.0


def test_defaults_filled_and_dump_roundtrip(tmp_path):
    cfg = config.from_dict(_base())
    assert cfg.engine.optim.name == "sgd"
    cfg.dump(tmp_path / "config.json")
    again = config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again.to_dict() == cfg.to_dict()
    assert again.digest() == cfg.digest()


def test_yaml_and_overrides(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base()))
    cfg = config.load(path, ["engine.head.sample_rate=0.5", "zero_optimization.stage=3",
                             "engine.model.checkpoint={\"layer2\": 2}", "engine.train.output_dir=/tmp/x",
                             "engine.head.margin=[1.0,0.0,0.35]"])
    assert cfg.engine.head.sample_rate == 0.5
    assert cfg.zero_stage == 3
    assert cfg.engine.model.checkpoint == {"layer2": 2}
    assert cfg.engine.train.output_dir == "/tmp/x"
    assert cfg.engine.head.margin == [1.0, 0.0, 0.35]


@pytest.mark.parametrize("data, message", [
    ({"train_micro_batch_size_per_gpu": 4, "zero_optimisation": {"stage": 1}},
     "unknown key 'zero_optimisation'; did you mean 'zero_optimization'"),
    ({"engine": {"head": {"num_clases": 10}}}, "unknown key 'engine.head.num_clases'; did you mean 'num_classes'"),
    ({"engine": {"modle": {}}}, "unknown key 'engine.modle'; did you mean 'model'"),
    ({"engine": {"optim": {"lr": 0.1, "warmup_step": 3}}}, "did you mean 'warmup_steps'"),
])
def test_unknown_keys_name_key_and_closest(data, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(data)


@pytest.mark.parametrize("override, message", [
    ("engine.head.num_classes=ten", "engine.head.num_classes: expected an integer, got 'ten'"),
    ("engine.model.channels_last=1", "engine.model.channels_last: expected true or false, got 1"),
    ("engine.head.margin=0.5", "engine.head.margin: expected a list"),
    ("engine.optim.lr=\"fast\"", "engine.optim.lr: expected a number"),
    ("train_micro_batch_size_per_gpu=2.5", "train_micro_batch_size_per_gpu: expected an integer >= 1"),
])
def test_bad_types_name_field(override, message, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_base()))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(path, [override])


@pytest.mark.parametrize("override, message", [
    ("engine.head.sample_rate=0", r"engine.head.sample_rate: expected in \(0, 1\], got 0"),
    ("engine.head.sample_rate=1.5", r"engine.head.sample_rate: expected in \(0, 1\], got 1.5"),
    ("engine.head.margin=[1.0,0.5,0.35]", "m2 \\(ArcFace\\) and m3 \\(CosFace\\) cannot both be > 0"),
    ("engine.head.margin=[0.9,0.5,0.0]", "m1 \\(multiplicative, SphereFace\\) must be 1.0"),
    ("engine.head.margin=[1.0,-0.1,0.0]", "margins must be >= 0"),
    ("engine.head.num_classes=0", "engine.head.num_classes: expected >= 1, got 0"),
    ("zero_optimization.stage=4", "zero_optimization.stage: expected 0, 1, 2 or 3, got 4"),
    ("engine.optim.name=lamb", "engine.optim.name: expected one of \\['adamw', 'sgd'\\], got 'lamb'"),
    ("engine.data.source=s3", "engine.data.source: expected one of"),
    ("engine.model.checkpoint=some", "engine.model.checkpoint: expected 'all' or a mapping"),
    ("train_micro_batch_size_per_gpu=0", "train_micro_batch_size_per_gpu: expected an integer >= 1, got 0"),
    ("engine.optim.warmup_steps=500", "engine.optim.warmup_steps: expected < engine.train.max_steps"),
    ("optimizer={\"type\": \"Adam\"}", "'optimizer' is not used by ArcScale: set engine.optim"),
])
def test_bad_values_name_field(override, message, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_base()))
    with pytest.raises(ConfigError, match=message):
        config.load(path, [override])


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.json"):
        config.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"engine": {,}}')
    with pytest.raises(ConfigError, match="bad.json: invalid JSON at line 1"):
        config.load(bad)


def test_derived_values_not_written_back():
    cfg = config.from_dict({**_base(), "gradient_accumulation_steps": 3})
    assert cfg.global_batch_size(2) == 24
    assert "train_batch_size" not in cfg.to_dict()


def test_run_py_reports_config_error(tmp_path, capsys):
    import run

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"engine": {"traim": {}}}))
    assert run.main(["--config", str(path)]) == 2
    assert "unknown key 'engine.traim'; did you mean 'train'" in capsys.readouterr().err
