"""FSDP2 pieces that need no process group: the backend's loss scale against DeepSpeed's, its builder's checks
(bad settings, HSDP's node size), and the config (a key of the other backend refused by name, what fsdp reads
accepted, each fsdp recipe equal to its DeepSpeed recipe but for the sharding keys).
(FSDP2 on spawned ranks: tests/distributed/test_fsdp_backend.py and test_backend_parity.py.)
"""

import os

import pytest
import torch

NAME, EMB, MICRO, ACC, SEED = "r18", 16, 4, 2, 3
LR, MOMENTUM, WD = 0.02, 0.9, 5e-4


def _sgd(module: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]  # all decayed, as arcface_torch
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def test_loss_scale_follows_deepspeed(monkeypatch):
    """DynamicLossScale against DeepSpeed's own DynamicLossScaler on one overflow pattern: scale after every
    step, hysteresis and window included."""
    from deepspeed.runtime.fp16 import loss_scaler

    from engine.parallel.fsdp_backend import DynamicLossScale

    monkeypatch.setattr(loss_scaler, "dist", type("Comm", (), {"get_rank": staticmethod(lambda: 0)}))
    pattern = [True, False, False, False, True, True, False, False, False, False, False, True, False, False]
    for hysteresis, consecutive in ((1, False), (2, False), (2, True), (3, True)):
        ours = DynamicLossScale(initial_scale_power=8, loss_scale_window=3, hysteresis=hysteresis,
                                min_loss_scale=1.0, consecutive_hysteresis=consecutive)
        theirs = loss_scaler.DynamicLossScaler(init_scale=2.0 ** 8, scale_window=3, min_scale=1.0,
                                               delayed_shift=hysteresis, consecutive_hysteresis=consecutive)
        for overflow in pattern:
            ours.update(overflow)
            theirs.update_scale(overflow)
            assert ours.scale == theirs.cur_scale and ours.cur_hysteresis == theirs.cur_hysteresis
    at_min = DynamicLossScale(initial_scale_power=0, hysteresis=1, min_loss_scale=1.0)
    with pytest.raises(RuntimeError, match="minimum loss scale"):
        at_min.update(True)


@pytest.mark.parametrize("kw, message", [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
    ({"precision": "fp16", "fp16": {"loss_scale": 128}}, r"unknown setting\(s\) \['loss_scale'\]"),
])
def test_builder_rejects_bad_settings(kw, message):
    """Checked before any process group or model is touched (none exists here)."""
    from engine.parallel.fsdp_backend import build_fsdp_backbone

    with pytest.raises(ValueError, match=message):
        build_fsdp_backbone(NAME, embedding_size=EMB, seed=SEED, device=torch.device("cpu"), make_optimizer=_sgd, **kw)


def test_hybrid_needs_the_node_size(monkeypatch):
    from engine.parallel.fsdp_backend import local_world_size_from_env

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        local_world_size_from_env()
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert local_world_size_from_env() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's name wins
    assert local_world_size_from_env() == 8


# ---------------------------------------------------------------------------------------------------------------
# Configuration (no process group)
# ---------------------------------------------------------------------------------------------------------------

def _load_r2060(*overrides: str):
    from engine.config import schema as config

    path = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "r2060.json")
    return config.load(path, list(overrides))


FSDP = ("engine.train.backend=fsdp", "zero_optimization={}", "activation_checkpointing={}")


@pytest.mark.parametrize("overrides, message", [
    (("engine.train.backend=fsdp",), r"zero_optimization\.stage: 3 is DeepSpeed ZeRO.*"
                                     r"engine\.fsdp\.reshard_after_forward=true behaves as ZeRO-3"),
    (("engine.train.backend=fsdp", "zero_optimization={}"),
     r"activation_checkpointing: has no effect under engine\.train\.backend='fsdp'; engine\.model\.checkpoint"),
    (FSDP + ('zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}',),
     r"zero_optimization\.offload_optimizer: .*engine\.fsdp\.cpu_offload=true"),
    (FSDP + ('zero_optimization={"stage": 0, "offload_param": {"device": "cpu"}}',),
     r"zero_optimization\.offload_param: .*engine\.fsdp\.cpu_offload=true"),
    (FSDP + ('zero_optimization={"stage": 0, "overlap_comm": true}',), r"zero_optimization\.overlap_comm: has no "),
    (FSDP + ("steps_per_print=10",), r"steps_per_print: has no effect .*engine\.train\.log_every"),
    (FSDP + ('flops_profiler={"enabled": true}',), r"flops_profiler: .*engine\.profile"),
    (FSDP + ('torch_autocast.lower_precision_safe_modules=["torch.nn.Linear"]',),
     r"torch_autocast\.lower_precision_safe_modules: has no effect"),
    (FSDP + ("torch_autocast.enabled=false", 'fp16={"enabled": true, "loss_scale": 128}'),
     r"fp16\.loss_scale: 128 is a static loss scale"),
    (FSDP + ("torch_autocast.enabled=false", 'bf16={"enabled": true, "immediate_grad_update": true}'),
     r"bf16\.immediate_grad_update: has no effect"),
    (("engine.fsdp.reshard_after_forward=true",), r"engine\.fsdp\.reshard_after_forward: has no effect under "
                                                  r"engine\.train\.backend='deepspeed'.*zero_optimization\.stage"),
    (("engine.fsdp.cpu_offload=false",), r"engine\.fsdp\.cpu_offload: .*offload_optimizer"),
    (("engine.fsdp.hybrid=true",), r"engine\.fsdp\.hybrid: "),
    (FSDP + ("engine.fsdp.hybrid=1",), r"engine\.fsdp\.hybrid: expected true or false, got 1"),
])
def test_config_names_the_other_backends_setting(overrides, message):
    """A key of one backend set under the other is refused before start-up, naming the key and what does its
    job under the chosen backend."""
    from engine.config import schema as config

    with pytest.raises(config.ConfigError, match=message):
        _load_r2060(*overrides)


def test_config_accepts_what_fsdp_reads():
    """Precision blocks (each switched on, or off with settings kept), stage 0, an empty activation_checkpointing
    section, and the fp16 dynamic loss-scale keys pass; unset engine.fsdp keys take their defaults."""
    cfg = _load_r2060(*FSDP)
    assert cfg.precision == "bf16" and cfg.engine.fsdp.resolved() == {
        "reshard_after_forward": True, "hybrid": False, "cpu_offload": False}
    cfg = _load_r2060(*FSDP, "torch_autocast.enabled=false", "engine.fsdp.cpu_offload=true",
                      'fp16={"enabled": true, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1}',
                      'zero_optimization={"stage": 0, "offload_param": {"device": "none"}}')
    assert cfg.precision == "fp16" and cfg.engine.fsdp.resolved()["cpu_offload"] is True
    assert _load_r2060(*FSDP, "torch_autocast.enabled=false", 'bf16={"enabled": true}').precision == "bf16"
    assert _load_r2060(*FSDP, 'torch_autocast={"enabled": false, "lower_precision_safe_modules": []}').precision \
        == "fp32"
    assert _load_r2060("engine.fsdp={}").engine.train.backend == "deepspeed"  # nothing set: nothing refused


@pytest.mark.parametrize("recipe, zero_recipe", [("r2060_fsdp.json", "r2060.json"), ("r50_fsdp.json", "r50.json")])
def test_fsdp_recipes_match_their_deepspeed_recipe(recipe, zero_recipe):
    """The fsdp recipes are their DeepSpeed recipe with only the sharding keys changed."""
    import json

    root = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs")
    with open(os.path.join(root, recipe)) as f:
        fsdp = json.load(f)
    with open(os.path.join(root, zero_recipe)) as f:
        zero = json.load(f)
    for raw in (fsdp, zero):
        raw.pop("zero_optimization", None)
        raw.pop("activation_checkpointing", None)
        raw["engine"]["train"].pop("output_dir")
    assert fsdp["engine"].pop("fsdp")["reshard_after_forward"] is (recipe == "r2060_fsdp.json")
    assert fsdp["engine"]["train"].pop("backend") == "fsdp"
    assert fsdp == zero
