"""The backbone optimizer's state by parameter name under ZeRO 1-2 with several parameter groups
(engine.optim.param_groups), on a spawned rank.

DeepSpeed links each parameter to its optimizer state once, right after the first group's first step, when the
later groups have no state yet: the first checkpoint then failed with "momentum_buffer not found in optimizer
state fragment" (found by the configuration matrix). Reference: the same 2 steps at ZeRO-0, whose torch
optimizer keeps the state per parameter.
"""
import pytest
import torch

from engine.runtime.spawn import run_distributed

GROUPS = [{"match": ["*.bias"], "lr_scale": 2.0, "weight_decay": 0.0}]


def _state(out_dir: str, stage: int, optim: str) -> dict:
    from engine.config import schema as config
    from engine.train.build import build_trainer

    cfg = config.from_dict({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 11, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"source": "synthetic"},
                   "optim": {"name": optim, "lr": 0.01, "param_groups": GROUPS},
                   "train": {"max_steps": 2, "output_dir": f"{out_dir}/z{stage}_{optim}", "seed": 3},
                   "checkpoint": {"export": False}}})
    trainer = build_trainer(cfg)
    trainer.backbone.train()
    trainer.head.train()
    for _ in range(2):
        trainer.train_step()
    state = trainer.backbone.optimizer_state(everywhere=True)
    trainer.close()
    return state


def _all(out_dir: str) -> dict:
    return {(stage, optim): _state(out_dir, stage, optim) for optim in ("sgd", "adamw") for stage in (0, 1, 2)}


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    return run_distributed(_all, 1, str(tmp_path_factory.mktemp("groups")), timeout_s=600)[0]


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("stage", [1, 2])
def test_every_group_s_optimizer_state_is_read_by_name(states, stage, optim):
    ref, got = states[(0, optim)], states[(stage, optim)]
    assert got["keys"] == ref["keys"] and set(got["state"]) == set(ref["state"])
    biases = [name for name in ref["state"] if name.endswith(".bias")]
    assert biases, "the second group (biases) is empty"
    for name, entry in ref["state"].items():
        for key, value in entry.items():
            assert got["state"][name][key] is not None, f"{name}.{key} missing"
            torch.testing.assert_close(got["state"][name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
