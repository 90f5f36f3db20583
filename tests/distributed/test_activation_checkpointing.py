"""Activation checkpointing under autocast (issue 8): the recompute in backward runs in the forward's autocast
state, for DeepSpeed's checkpointing and for torch's, under ZeRO 0 and 3, on 2 CPU ranks.

DeepSpeed's CheckpointFunction restores only RNG state when it recomputes a segment; before the fix a bf16
forward's saved bf16 activation met fp32 weights there and the first backward failed ("Input type
(CPUBFloat16Type) and weight type (torch.FloatTensor) should be the same"), which broke the r2060 recipe.

Matrix: precision {fp32, bf16 autocast} x checkpointing {off, deepspeed, torch} x ZeRO {0, 3}, tiny r18 with
BatchNorm, 2 steps. Each run records both steps' losses, the full backbone gradient of step 2 (before the
optimizer consumes it) and the weights after step 2. A checkpointed run must equal the non-checkpointed run
of the same precision and stage.

Tolerance. A recompute repeats the same kernels on the same inputs under the same autocast dtype, so its
activations equal the forward's bit for bit, and the backward then runs the same ops in the same order: in
both precisions the gradients are expected to be identical. What may legitimately differ is summation order
outside the segments (DeepSpeed's gradient buckets are filled in the order gradients become ready, which
checkpointing changes), so gradients are compared to 1e-5 relative in the 2-norm (as the engine equivalence
tests do) and losses to 1e-6. A recompute that ran in fp32 instead of bf16 would differ by bf16's rounding,
about 4e-3 relative, far outside this; the test asserts that bf16 and fp32 runs do differ by more than
that margin, so the comparison cannot pass vacuously.
"""
import pytest
import torch

from tests.configs import tiny_r18_config
from engine.runtime.spawn import run_distributed

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("off", "deepspeed", "torch")
STAGES = (0, 3)
TOL = 1e-5


def _raw(out_dir: str, precision: str, ckpt: str, stage: int) -> dict:
    raw = tiny_r18_config(out_dir, 2, stage, max_steps=2)
    raw["train_micro_batch_size_per_gpu"] = 2  # the smallest a BatchNorm1d feature layer trains on
    raw["gradient_accumulation_steps"] = 1
    if precision == "bf16":
        raw["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ckpt != "off":
        raw["engine"]["model"]["checkpoint"] = {"layer2": 2, "layer3": 2}
    if ckpt == "deepspeed":  # DeepSpeed's implementation is used when the config has this section
        raw["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False}
    raw["engine"]["checkpoint"] = {"export": False}
    return raw


def _matrix(out_dir: str) -> dict:
    """On each of 2 ranks: every cell of the matrix, 2 steps each; rank 0 returns the records."""
    import os

    from engine.train import build
    from engine.runtime import dist

    dist.init()
    results = {}
    for stage in STAGES:
        for precision in PRECISIONS:
            for ckpt in CHECKPOINTING:
                from engine.config import schema as config

                cell = f"z{stage}_{precision}_{ckpt}"
                cfg = config.from_dict(_raw(os.path.join(out_dir, cell), precision, ckpt, stage))
                trainer = build.build_trainer(cfg)
                backbone = trainer.backbone
                grads = []
                step = backbone.step

                def step_recording_grads(_step=step, _backbone=backbone, _grads=grads):
                    _grads.append(_backbone.full_grads())
                    return _step()

                backbone.step = step_recording_grads
                losses = [float(trainer.train_step()) for _ in range(2)]
                weights = backbone.full_state_dict(everywhere=False)
                bn = dict(backbone.module.named_buffers())["layer2.0.bn1.num_batches_tracked"]
                results[cell] = {"losses": losses, "grads": grads[-1], "weights": weights,
                                 "bn_updates": int(bn)}
                trainer.close()
                del trainer, backbone
    return results if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("autocast_ckpt"))
    return run_distributed(_matrix, 2, out, timeout_s=1200)[0]


def _flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.double().flatten() for _, t in sorted(tensors.items()) if t.is_floating_point()])


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    x, y = _flat(a), _flat(b)
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("ckpt", ["deepspeed", "torch"])
def test_checkpointed_equals_plain(matrix, stage, precision, ckpt):
    ref = matrix[f"z{stage}_{precision}_off"]
    got = matrix[f"z{stage}_{precision}_{ckpt}"]
    for a, b in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=1e-6), (got["losses"], ref["losses"])
    err = _rel(got["grads"], ref["grads"])
    assert err <= TOL, f"step-2 gradients differ by {err:.2e} relative"
    params = {k: v for k, v in ref["weights"].items() if "running" not in k and "num_batches" not in k}
    err = _rel({k: got["weights"][k] for k in params}, params)
    assert err <= TOL, f"weights after 2 steps differ by {err:.2e} relative"
    # BatchNorm running statistics: updated once per real forward, never by the recompute.
    assert got["bn_updates"] == ref["bn_updates"] == 2
    err = _rel({k: v for k, v in got["weights"].items() if "running" in k},
               {k: v for k, v in ref["weights"].items() if "running" in k})
    assert err <= TOL, f"BatchNorm running statistics differ by {err:.2e} relative"


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_really_ran_in_bf16(matrix, stage):
    """Guard against a vacuous pass: the bf16 runs differ from the fp32 runs by bf16 rounding (>> TOL)."""
    err = _rel(matrix[f"z{stage}_bf16_off"]["grads"], matrix[f"z{stage}_fp32_off"]["grads"])
    assert err > 100 * TOL, err
