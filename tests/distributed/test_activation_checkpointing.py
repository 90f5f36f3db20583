"""Activation checkpointing on spawned ranks: DeepSpeed's implementation (it needs a process group)
equals the plain module on one rank, in fp32 and under bf16/fp16 autocast; and through the whole engine the
recompute in backward runs in the forward's autocast state, for DeepSpeed's checkpointing and for torch's, under
ZeRO 0 and 3, on 2 CPU ranks. (Torch's checkpointing on the plain module: tests/unit/test_activation_checkpointing.py.)

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
import copy

import pytest
import torch

import backbones
from engine.parallel import common as parallel
from engine.runtime.spawn import run_distributed
from tests.support.activation_checkpointing import assert_same_step
from tests.support.configs import tiny_r18_config

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("off", "deepspeed", "torch")
STAGES = (0, 3)
TOL = 1e-5


# -- through the engine: precision x checkpointing x ZeRO stage on 2 ranks -------------------------------------


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

    from engine.runtime import dist
    from engine.train import build

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


# -- DeepSpeed's checkpointing on one rank, against the plain module ------------------------------------------


def _deepspeed_checkpointing(cpu_checkpointing: bool):
    """DeepSpeed's implementation (used when the config has an activation_checkpointing section)."""
    from engine.runtime import dist

    device = dist.init()
    from engine.parallel.deepspeed_backend import configure_deepspeed_checkpointing

    configure_deepspeed_checkpointing({
        "train_micro_batch_size_per_gpu": 1,
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": cpu_checkpointing}},
        device)
    torch.manual_seed(0)
    plain = backbones.build_backbone("r18", embedding_size=32)
    ckpt = copy.deepcopy(plain)
    parallel.apply_activation_checkpointing(ckpt, {"layer2": 2, "layer3": 2}, use_deepspeed=True)
    assert_same_step(plain, ckpt, torch.randn(2, 3, 112, 112))
    return True


@pytest.mark.parametrize("cpu_checkpointing", [False, True])
def test_deepspeed_checkpointing(cpu_checkpointing):
    """On the CPU, cpu_checkpointing is switched off (a no-op there); on a GPU it offloads (gpu test below)."""
    from engine.runtime.spawn import run_distributed

    assert run_distributed(_deepspeed_checkpointing, 1, cpu_checkpointing, timeout_s=300) == [True]


def _autocast_recompute(dtype_name: str) -> dict:
    """Under `dtype` autocast: checkpointed (DeepSpeed's and torch's) == plain, outputs and gradients."""
    from engine.parallel.deepspeed_backend import configure_deepspeed_checkpointing
    from engine.runtime import dist

    device = dist.init()
    configure_deepspeed_checkpointing({"train_micro_batch_size_per_gpu": 1, "activation_checkpointing": {}}, device)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    plain = backbones.build_backbone("r18", embedding_size=16)
    x = torch.randn(2, 3, 112, 112)
    out = {}
    for name, use_ds in (("plain", None), ("deepspeed", True), ("torch", False)):
        model = copy.deepcopy(plain)
        if use_ds is not None:
            parallel.apply_activation_checkpointing(model, {"layer2": 2, "layer3": 1}, use_deepspeed=use_ds)
        model.train()
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
        (y.float() * torch.linspace(-1, 1, y.shape[1])).sum().backward()
        out[name] = (y.dtype, y.detach().float(),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_recompute_runs_in_the_forwards_autocast_state(dtype):
    """Issue 8: DeepSpeed's CheckpointFunction recomputed without the forward's autocast (bf16 activations met
    fp32 weights). The recompute repeats the forward's kernels on the same inputs in the same dtype, so
    outputs and gradients equal the plain run's (to fp32 accumulation-order noise)."""
    from engine.runtime.spawn import run_distributed

    (out,) = run_distributed(_autocast_recompute, 1, dtype, timeout_s=600)
    ref_dtype, ref_y, ref_grads = out["plain"]
    assert ref_dtype == getattr(torch, dtype)
    for name in ("deepspeed", "torch"):
        y_dtype, y, grads = out[name]
        assert y_dtype == ref_dtype and grads.keys() == ref_grads.keys() and len(grads) > 50
        torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
        for key, g in grads.items():
            torch.testing.assert_close(g, ref_grads[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
