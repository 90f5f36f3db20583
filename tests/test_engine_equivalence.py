"""Test 4: 2 ranks x micro-batch B == 1 rank with gradient_accumulation_steps=2, for ZeRO stages 0-3 (fp32).

The 1-rank job reads rank 0's micro-batch then rank 1's (the synthetic source is addressed by global
micro-batch slot), so after N optimizer steps every backbone parameter and every head row must agree. This
proves the head is not averaged by data parallelism, the embedding gradient is scaled right for DeepSpeed's
gradient averaging, and accumulation steps the optimizer and the LR schedule once per optimizer step.
"""
import pytest
import torch

from tests.distributed import run_distributed

STAGES = (0, 1, 2, 3)
NUM_STEPS = 2
MICRO_BATCH = 2
NUM_CLASSES = 11  # not divisible by 2: uneven shards


def _config(stage: int, world_size: int, out_dir: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 2 // world_size,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "engine": {
            "model": {"name": "r18", "embedding_size": 16},
            "head": {"num_classes": NUM_CLASSES, "sample_rate": 1.0, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
            "data": {"source": "synthetic", "synthetic": "prototypes"},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly"},
            "train": {"max_steps": NUM_STEPS, "output_dir": out_dir, "log_every": 1, "seed": 3},
        },
    }


def _train(out_dir: str) -> dict:
    """On each rank: train every ZeRO stage; save full backbone (rank 0) and this rank's head shard."""
    import os

    from engine import config, dist
    from engine.trainer import Trainer

    world = dist.get_world_size()
    rank = dist.get_rank()
    paths = {}
    for stage in STAGES:
        cfg = config.from_dict(_config(stage, world, os.path.join(out_dir, f"w{world}_z{stage}")))
        trainer = Trainer(cfg)
        trainer.train()
        state = trainer.state_dict()
        path = os.path.join(out_dir, f"w{world}_z{stage}_r{rank}.pt")
        torch.save({"backbone": state["backbone"] if rank == 0 else None, "head": state["head"],
                    "loss": trainer.hooks[0].history[-1]["loss"]}, path)
        paths[stage] = path
        trainer.close()
        del trainer
    return paths


def _assert_close(name, got, ref):
    got, ref = got.double(), ref.double()
    err = (got - ref).abs().max().item()
    bound = 1e-5 * max(ref.abs().max().item(), 1e-3)
    assert err <= bound, f"{name}: max abs diff {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("equiv"))
    two = run_distributed(_train, 2, out, timeout_s=900)
    one = run_distributed(_train, 1, out, timeout_s=900)
    return one, two


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_one_rank_with_accumulation(runs, stage):
    one, two = runs
    ref = torch.load(one[0][stage])
    r0, r1 = torch.load(two[0][stage]), torch.load(two[1][stage])
    # Backbone: every parameter and buffer (BN running stats included).
    assert ref["backbone"].keys() == r0["backbone"].keys()
    moved = 0
    init = None
    for key, value in ref["backbone"].items():
        if value.is_floating_point():
            _assert_close(f"stage {stage} backbone {key}", r0["backbone"][key], value)
        else:
            assert torch.equal(r0["backbone"][key], value), key
    # Head: rank shards concatenate to the single rank's rows; class ranges are contiguous.
    assert r0["head"]["class_start"] == 0 and r1["head"]["class_start"] == r0["head"]["num_local"]
    assert r0["head"]["num_local"] + r1["head"]["num_local"] == NUM_CLASSES == ref["head"]["num_local"]
    _assert_close(f"stage {stage} head", torch.cat([r0["head"]["weight"], r1["head"]["weight"]]),
                  ref["head"]["weight"])
    assert abs(r0["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])


def test_training_moved_the_weights(runs):
    """Guard against a vacuous pass: the runs must have changed the weights from their initial values."""
    from engine import parallel  # noqa: F401  (import check)
    import backbones

    one, _ = runs
    ref = torch.load(one[0][0])
    torch.manual_seed(3)
    fresh = backbones.build_backbone("r18", embedding_size=16).state_dict()
    diffs = [(ref["backbone"][k] - v).abs().max().item() for k, v in fresh.items() if v.is_floating_point()]
    assert max(diffs) > 1e-3
