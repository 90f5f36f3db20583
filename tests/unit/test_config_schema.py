"""Config loading (engine.config), overrides and the promised error messages (unknown key, bad type, bad value).
(The checks from the command line and under the launcher: tests/launch/test_config_cli.py.)
"""
import json
from pathlib import Path

import pytest

from engine.config import schema as config
from engine.config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]
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
    ("engine.head.num_classes=1", "engine.head.num_classes: expected >= 2 \\(with one class"),
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


# -- every mistake checkable from the config stops `load`, before dist.init and any model ----------

def _load(tmp_path, *overrides, base=None):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base or _base()))
    return config.load(path, list(overrides))


@pytest.mark.parametrize("overrides, message", [
    # backbone name, with the closest registered one
    (["engine.model.name=r5O"], r"engine\.model\.name: expected one of \[.*'r50'.*\], got 'r5O'; did you mean 'r50'\?"),
    # activation-checkpoint stages are the backbone's checkpoint_units() keys
    (["engine.model.checkpoint={\"layr2\": 2}"],
     r"engine\.model\.checkpoint\.layr2: unknown stage 'layr2' of backbone 'r18'; did you mean 'layer2'\?"),
    (["engine.model.name=mbf", "engine.model.checkpoint={\"layer2\": 2}"],
     r"engine\.model\.checkpoint\.layer2: unknown stage 'layer2' of backbone 'mbf'; did you mean 'layers'\?"),
    # augment names go through dali_pipes.augment.parse_augment
    (["engine.data.augment=[\"flip\", \"blurr\"]"], r"engine\.data\.augment: unknown augmentation 'blurr'"),
    # optimizer betas and eps
    (["engine.optim.betas=[0.9]"], r"engine\.optim\.betas: expected \[beta1, beta2\], each in \[0, 1\)"),
    (["engine.optim.betas=[0.9, 0.999, 0.5]"], r"engine\.optim\.betas: expected \[beta1, beta2\]"),
    (["engine.optim.betas=[0.9, 1.0]"], r"engine\.optim\.betas: .*got \[0\.9, 1\.0\]"),
    (["engine.optim.eps=0"], r"engine\.optim\.eps: expected > 0, got 0"),
    # micro-batch 1 cannot train a BatchNorm1d feature layer (every registered family has one)
    (["train_micro_batch_size_per_gpu=1"],
     r"train_micro_batch_size_per_gpu: expected >= 2 for backbone 'r18', whose feature layer is a BatchNorm1d"),
    (["train_micro_batch_size_per_gpu=1", "engine.model.name=mbf"], r"expected >= 2 for backbone 'mbf'"),
    (["train_micro_batch_size_per_gpu=1", "engine.model.name=vit_t"], r"expected >= 2 for backbone 'vit_t'"),
    # torch_autocast.dtype: 16-bit DeepSpeed spellings only; float32 is not silently bf16 any more
    (["torch_autocast={\"enabled\": true, \"dtype\": \"float32\"}"],
     r"torch_autocast\.dtype: 'float32' is not a 16-bit dtype \(for fp32 training set torch_autocast\.enabled=false\)"),
    (["torch_autocast={\"enabled\": true, \"dtype\": \"fp32\"}"], r"torch_autocast\.dtype: 'fp32' is not a 16-bit"),
    (["torch_autocast={\"enabled\": true, \"dtype\": \"bfloat61\"}"],
     r"torch_autocast\.dtype: unknown dtype 'bfloat61'; did you mean 'bfloat16'\?"),
    (["torch_autocast={\"enabled\": true, \"dtype\": \"int8\"}"], r"torch_autocast\.dtype: 'int8' is not a 16-bit dtype;"),
    (["torch_autocast={\"enabled\": true}"], r"torch_autocast\.dtype: required when torch_autocast\.enabled is true"),
    # a bool stage: true == 1 used to pass as ZeRO-1
    (["zero_optimization.stage=true"], r"zero_optimization\.stage: expected 0, 1, 2 or 3, got True \(a bool"),
    (["engine.train.backend=ddp"], r"engine\.train\.backend: expected one of \['deepspeed', 'fsdp'\], got 'ddp'"),
    # removed from DeepSpeed 0.19 (deepspeed.initialize would refuse it after start-up)
    (["amp={\"enabled\": true}"], r"unknown key 'amp'"),
])
def test_engine_checks_before_start_up(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, *overrides)


@pytest.mark.parametrize("overrides, message", [
    # keys inside DeepSpeed's sections: the key and the closest valid one, from DeepSpeed's own declarations
    (["torch_autocast={\"enabeld\": true, \"dtype\": \"bfloat16\"}"],
     r"unknown key 'torch_autocast\.enabeld'; did you mean 'enabled'\?"),
    (["zero_optimization.stagee=3"], r"unknown key 'zero_optimization\.stagee'; did you mean 'stage'\? "
                                     r"\(checked against DeepSpeed's DeepSpeedZeroConfig\)"),
    (["zero_optimization.stage3_max_live_parameter=10"],
     r"unknown key 'zero_optimization\.stage3_max_live_parameter'; did you mean 'stage3_max_live_parameters'\?"),
    (["zero_optimization.offload_optimizer={\"devcie\": \"cpu\"}"],
     r"unknown key 'zero_optimization\.offload_optimizer\.devcie'; did you mean 'device'\?"),
    (["fp16={\"enabled\": true, \"loss_scal\": 0}"], r"unknown key 'fp16\.loss_scal'; did you mean 'loss_scale'\?"),
    (["bf16={\"enabled\": false, \"immediate_grad_updat\": true}"],
     r"unknown key 'bf16\.immediate_grad_updat'; did you mean 'immediate_grad_update'\?"),
    (["engine.model.checkpoint=\"all\"", "activation_checkpointing={\"partition_activation\": false}"],
     r"unknown key 'activation_checkpointing\.partition_activation'; did you mean 'partition_activations'\?"),
    (["flops_profiler={\"enabeld\": true}"], r"unknown key 'flops_profiler\.enabeld'; did you mean 'enabled'\?"),
    # values, judged by DeepSpeed's models (or the type of DeepSpeed's declared default)
    (["zero_optimization.reduce_bucket_size=0"], r"zero_optimization\.reduce_bucket_size: .*greater than 0"),
    (["zero_optimization.offload_optimizer={\"device\": \"gpu\"}"],
     r"zero_optimization\.offload_optimizer\.device: .*'none', 'cpu' or 'nvme', got 'gpu'"),
    (["fp16={\"enabled\": true, \"loss_scale\": -1}"], r"fp16\.loss_scale: .*>= 0"),
    (["fp16={\"enabled\": \"yes\"}"], r"fp16\.enabled: expected true or false, got 'yes'"),
    (["torch_autocast={\"enabled\": 1, \"dtype\": \"bf16\"}"], r"torch_autocast\.enabled: expected true or false"),
    (["engine.model.checkpoint=\"all\"", "activation_checkpointing={\"cpu_checkpointing\": \"false\"}"],
     r"activation_checkpointing\.cpu_checkpointing: expected bool \(DeepSpeed's default is False\), got 'false'"),
    (["torch_autocast={\"enabled\": true, \"dtype\": \"bf16\", \"lower_precision_safe_modules\": \"torch.nn.Linear\"}"],
     r"torch_autocast\.lower_precision_safe_modules: expected a list of class paths"),
    (["zero_optimization=1"], r"zero_optimization: expected a mapping, got 1"),
])
def test_deepspeed_sections_checked_against_deepspeed(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, *overrides)


@pytest.mark.parametrize("overrides, message", [
    # a precision block with settings but no `enabled` is off (DeepSpeed's default) yet reads as on
    (["fp16={\"loss_scale\": 0}"], r"fp16\.loss_scale: has no effect: 'fp16' is off because it does not set enabled"),
    (["torch_autocast={\"dtype\": \"bfloat16\"}"], r"torch_autocast\.dtype: has no effect: 'torch_autocast' is off"),
    # DeepSpeed's activation_checkpointing section only configures the stages engine.model.checkpoint names
    (["activation_checkpointing={\"partition_activations\": false}"],
     r"activation_checkpointing: has no effect without engine\.model\.checkpoint"),
    (["zero_optimization.offload_param={\"device\": \"cpu\"}"],
     r"zero_optimization\.offload_param: has no effect at ZeRO stage 1 \(needs stage >= 3\)"),
    (["zero_optimization={\"stage\": 0, \"offload_optimizer\": {\"device\": \"cpu\"}}"],
     r"zero_optimization\.offload_optimizer: has no effect at ZeRO stage 0 \(needs stage >= 1\)"),
])
def test_keys_without_effect_are_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, *overrides)


@pytest.mark.parametrize("overrides", [
    ["fp16={\"enabled\": false, \"loss_scale\": 0, \"initial_scale_power\": 12}"],  # switched off on purpose
    ["torch_autocast={\"enabled\": false, \"dtype\": \"float32\"}"],  # an off block's dtype is never read
    ["torch_autocast={}", "bf16={}"],
    ["activation_checkpointing={}"],
    ["engine.model.checkpoint=\"all\"", "activation_checkpointing={\"partition_activations\": false}"],
    ["zero_optimization={\"stage\": 3, \"offload_param\": {\"device\": \"cpu\"}}"],
    ["zero_optimization.offload_param={\"device\": \"none\"}"],
    ["zero_optimization.offload_optimizer={\"device\": \"cpu\"}"],
    ["zero_optimization.stage3_max_live_parameters=10", "zero_optimization.overlap_comm=true"],
    ["train_micro_batch_size_per_gpu=2", "engine.data.augment=[\"arcface\"]", "engine.optim.name=adamw",
     "engine.optim.betas=[0.0, 0.99]"],
])
def test_valid_settings_still_load(overrides, tmp_path):
    assert _load(tmp_path, *overrides).engine.model.name == "r18"


@pytest.mark.parametrize("dtype, precision", [
    ("bfloat16", "bf16"), ("bf16", "bf16"), ("torch.bfloat16", "bf16"),
    ("float16", "fp16"), ("fp16", "fp16"), ("half", "fp16"), ("torch.float16", "fp16"),
])
def test_autocast_dtype_spellings_are_deepspeeds(dtype, precision, tmp_path):
    """Every spelling DeepSpeed's DtypeEnum maps to a 16-bit dtype is accepted, and RunConfig.precision (the one
    parse) agrees with the dtype DeepSpeed itself resolves."""
    from deepspeed.runtime.config import get_torch_autocast_dtype

    cfg = _load(tmp_path, f"torch_autocast={json.dumps({'enabled': True, 'dtype': dtype})}",
                "zero_optimization.stage=0")  # float16 autocast trains at ZeRO-0 only (see test_precision_rules)
    assert cfg.precision == precision
    resolved = get_torch_autocast_dtype(cfg.deepspeed)  # what deepspeed.initialize will use
    assert str(resolved) == {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]


def test_constant_section_keys_are_deepspeeds():
    """Key sets derived from DeepSpeed's constants, against the keys its docs and parsers use."""
    from engine.config import deepspeed_keys as ds_schema

    assert set(ds_schema.constant_keys("torch_autocast")) == {"enabled", "dtype", "lower_precision_safe_modules"}
    assert set(ds_schema.constant_keys("activation_checkpointing")) == {
        "partition_activations", "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
        "profile", "synchronize_checkpoint_boundary"}
    assert {"enabled", "profile_step", "module_depth", "top_modules", "detailed", "output_file"} <= set(
        ds_schema.constant_keys("flops_profiler"))


def test_registry_facts_match_the_models():
    """The registry's static CHECKPOINT_STAGES / FEATURE_BATCHNORM1D (what the config is checked against) agree
    with every registered model, built on the meta device (no weights)."""
    import torch

    import backbones

    for name in backbones.list_backbones():
        spec = backbones.get_backbone_spec(name)
        model = backbones.build_backbone(name, embedding_size=8, device="meta")
        assert tuple(model.checkpoint_units()) == spec.checkpoint_stages, name
        has_bn1d = any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
        assert has_bn1d == spec.feature_batchnorm1d, name


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_feature_batchnorm1d_fails_on_one_sample(name):
    """The reason for the micro-batch >= 2 check, one backbone per family: one sample per rank does not train.
    Two do (shown on mbf, the cheapest forward; the engine tests train every family at micro-batch 2)."""
    import torch

    import backbones

    # Uninitialised weights (meta, then empty storage, then small values): BatchNorm's batch-size check does not
    # depend on them, and skipping arcface's initialisation keeps the test fast.
    model = backbones.build_backbone(name, embedding_size=8, device="meta").to_empty(device="cpu").train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.01)
    assert backbones.get_backbone_spec(name).feature_batchnorm1d
    with torch.no_grad(), pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 3, 112, 112))
    if name == "mbf":
        with torch.no_grad():
            assert model(torch.randn(2, 3, 112, 112)).shape == (2, 8)


def test_registration_requires_the_facts():
    """A new backbone must state its stages and BatchNorm1d fact, or the config could not be checked."""
    import torch

    import backbones

    class NoFacts(torch.nn.Module):
        def __init__(self, *, embedding_size: int = 8) -> None:
            super().__init__()

    with pytest.raises(ValueError, match="needs CHECKPOINT_STAGES"):
        backbones.register_backbone("no_facts_test")(NoFacts)
    NoFacts.CHECKPOINT_STAGES = ("body",)
    with pytest.raises(ValueError, match="needs FEATURE_BATCHNORM1D"):
        backbones.register_backbone("no_facts_test")(NoFacts)
    assert "no_facts_test" not in backbones.list_backbones()


def test_config_builds_no_model(monkeypatch):
    """The checks read the registry's table: no backbone is built (r2060 on meta alone takes ~1 s)."""
    import backbones

    def refuse(*args, **kwargs):
        raise AssertionError("config.load built a backbone")

    monkeypatch.setattr(backbones, "build_backbone", refuse)
    monkeypatch.setattr(backbones.registry, "build_backbone", refuse)
    for path in ALL_CONFIGS:
        config.load(path)
