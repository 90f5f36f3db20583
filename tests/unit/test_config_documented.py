"""The self-documenting schema (engine.config.files.setting, engine.config.sections, deepspeed_keys.DOCUMENTED):
every key has its doc, every enumerated key is checked against the choices it declares (one generic check), and
the precision combinations that cannot train are refused in one line naming the keys and what to use instead.
"""
import dataclasses
import json

import pytest

from engine.config import schema as config
from engine.config.files import ConfigError
from engine.config.sections import EngineConfig


def _base():
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
            "engine": {"model": {"name": "r18"}, "head": {"num_classes": 10}}}


def test_every_engine_key_and_documented_deepspeed_key_has_a_one_line_doc():
    settings = config.documented_settings()
    keys = [s.key for s in settings]
    assert len(keys) == len(set(keys))
    engine_keys = {k for k in keys if k.startswith("engine.")}
    def leaves(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}.{f.name}"
            yield from leaves(value, key) if dataclasses.is_dataclass(value) else [key]

    assert engine_keys == set(leaves(EngineConfig(), "engine"))
    for s in settings:
        assert s.doc.strip() and "\n" not in s.doc, s.key
    assert {"zero_optimization.stage", "precision", "gradient_accumulation_steps", "gradient_clipping",
            "activation_checkpointing"} <= set(keys)


ENUMERATED = [s for s in config.documented_settings() if s.choices and s.key.startswith("engine.")]


@pytest.mark.parametrize("setting", ENUMERATED, ids=[s.key for s in ENUMERATED])
def test_every_enumerated_key_is_checked_against_its_declared_choices(setting):
    """No second list: the value outside the declared choices is refused naming the key and the choices; each
    declared choice passes that check (whatever else it needs, the message is not about its choices)."""
    *sections, key = setting.key.split(".")[1:]
    raw = _base()
    node = raw["engine"]
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = "no-such-choice"
    with pytest.raises(ConfigError, match=rf"^{setting.key}: expected one of .*got 'no-such-choice'"):
        config.from_dict(raw)
    for choice in setting.choices:
        node[key] = choice
        try:
            config.from_dict(raw)
        except ConfigError as exc:
            assert "expected one of" not in str(exc) or not str(exc).startswith(setting.key), str(exc)


def test_precision_routes_are_the_blocks_they_name():
    from engine.config.deepspeed_keys import PRECISION_ROUTES

    expected = {"fp32": "fp32", "autocast_bf16": "bf16", "autocast_fp16": "fp16", "bf16": "bf16", "fp16": "fp16"}
    for route, blocks in PRECISION_ROUTES.items():
        raw = {**_base(), **json.loads(json.dumps(blocks))}
        assert config.from_dict(raw).precision == expected[route], route


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_autocast_fp16_gradscaler_refused_at_zero_1_to_3(stage):
    """DeepSpeed's ZeRO optimizers keep their torch_autocast GradScaler at its first scale after an overflow
    (every later step skipped) and clip the still-scaled gradients: refused before start-up, in one line naming
    the keys and what trains instead. ZeRO-0 (the engine's GradScaler) is accepted."""
    raw = {**_base(), "torch_autocast": {"enabled": True, "dtype": "float16"}, "zero_optimization": {"stage": stage}}
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("torch_autocast.dtype: float16") and f"zero_optimization.stage {stage}" in message
    assert "zero_optimization.stage 0" in message and "bfloat16" in message
    raw["zero_optimization"] = {"stage": 0}
    assert config.from_dict(raw).precision == "fp16"
    raw["engine"]["train"] = {"backend": "fsdp"}  # FSDP2's own loss scaler: no such limit
    assert config.from_dict(raw).precision == "fp16"


def test_deepspeed_fp16_block_refused_on_cpu_in_one_line():
    """DeepSpeed refuses fp16 on the CPU inside deepspeed.initialize, after the process group started: checked
    against the device first (engine.train.build.run_job), naming the key and the CPU's alternatives."""
    cfg = config.from_dict({**_base(), "fp16": {"enabled": True}})
    with pytest.raises(ConfigError) as info:
        config.check_device(cfg, "cpu")
    message = str(info.value)
    assert "\n" not in message and message.startswith("fp16.enabled:")
    assert "bf16.enabled=true" in message and "bfloat16" in message
    config.check_device(cfg, "cuda")
    config.check_device(config.from_dict({**_base(), "bf16": {"enabled": True}}), "cpu")
    fsdp = {**_base(), "fp16": {"enabled": True}, "engine": {**_base()["engine"], "train": {"backend": "fsdp"}}}
    config.check_device(config.from_dict(fsdp), "cpu")  # FSDP2 mixed precision computes fp16 on the CPU


def test_dropout_refused_for_a_backbone_without_a_dropout_layer():
    """MobileFaceNet (as arcface_torch's) has no dropout layer: dropout > 0 failed in the model's constructor on
    every rank after start-up; refused before it, naming the key and the backbone (IResNet and ViT accept it)."""
    raw = _base()
    raw["engine"]["model"] = {"name": "mbf", "dropout": 0.1}
    with pytest.raises(ConfigError, match=r"^engine\.model\.dropout: backbone 'mbf' has no dropout layer.*got 0\.1"):
        config.from_dict(raw)
    for name in ("r18", "vit_t"):
        raw["engine"]["model"] = {"name": name, "dropout": 0.1}
        assert config.from_dict(raw).engine.model.dropout == 0.1


def test_absent_gradient_clipping_is_deepspeeds_default_under_both_backends():
    """DeepSpeed clips at its default (1.0) when gradient_clipping is absent; the fsdp backend reads the same value
    (it clipped nothing), so one config trains alike under both (the runs: tests/distributed/test_precision.py)."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    raw = _base()
    assert config.from_dict(raw).gradient_clipping == GRADIENT_CLIPPING_DEFAULT == 1.0
    raw["engine"]["train"] = {"backend": "fsdp"}
    assert config.from_dict(raw).gradient_clipping == 1.0
    raw["gradient_clipping"] = 0.0
    assert config.from_dict(raw).gradient_clipping == 0.0
