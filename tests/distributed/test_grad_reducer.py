"""engine.parallel.reducer.GradReducer: ZeRO-0's gradient all-reduce started during the backward, in place of
DeepSpeed's after it. Reference: DeepSpeed's own all-reduce (engine.parallel.deepspeed_backend.USE_GRAD_REDUCER
off) on the same 2 ranks, the same config and data: the weights after training must be bitwise equal (the same
sum and the same 1 / world scaling, element by element), with gradient accumulation, activation checkpointing
and gradient clipping. The reducer alone against a hand-written average: several buckets launched in order
whatever order the gradients arrive in, a parameter without a gradient, accumulation over no-sync micro-steps.
"""
import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config


def _train(out_dir: str, accum: int, checkpoint, clip: float) -> dict:
    import os

    from engine.config import schema as config
    from engine.parallel import deepspeed_backend
    from engine.train.build import build_trainer

    out = {}
    for use in (True, False):
        deepspeed_backend.USE_GRAD_REDUCER = use
        raw = tiny_r18_config(os.path.join(out_dir, f"reducer_{use}"), 2, 0, max_steps=3)
        raw["gradient_accumulation_steps"] = accum
        raw["gradient_clipping"] = clip
        if checkpoint:
            raw["engine"]["model"]["checkpoint"] = checkpoint
        trainer = build_trainer(config.from_dict(raw))
        used = trainer.backbone.reducer is not None
        trainer.train()
        out[use] = {"state": trainer.backbone.full_state_dict(),
                    "losses": [h["loss"] for h in trainer.hooks[0].history], "reducer": used,
                    "allreduce": trainer.backbone.engine.enable_backward_allreduce}
        trainer.close()
    deepspeed_backend.USE_GRAD_REDUCER = True
    return out


@pytest.mark.parametrize("accum,checkpoint,clip", [(1, None, 0.0), (2, {"layer2": 1}, 5.0)])
def test_reducer_equals_deepspeeds_allreduce_bitwise(tmp_path, accum, checkpoint, clip):
    ranks = run_distributed(_train, 2, str(tmp_path), accum, checkpoint, clip, timeout_s=600)
    for r in ranks:
        assert r[True]["reducer"] and not r[True]["allreduce"]
        assert not r[False]["reducer"] and r[False]["allreduce"]
        assert r[True]["losses"] == r[False]["losses"]
        ours, theirs = r[True]["state"], r[False]["state"]
        assert ours.keys() == theirs.keys()
        for key in ours:
            if "running_" in key or "num_batches" in key:
                continue
            assert torch.equal(ours[key], theirs[key]), key


def _reduce_by_hand(bucket_bytes: int) -> dict:
    """Three linear layers, the middle one unused; 2 micro-steps, the first without reduction."""
    import torch.distributed as tdist

    from engine.parallel.reducer import GradReducer

    rank = tdist.get_rank()
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)])
    reducer = GradReducer(layers.parameters(), bucket_bytes=bucket_bytes)

    def backward(seed: int) -> None:
        g = torch.Generator().manual_seed(seed + 100 * rank)
        x = torch.randn(5, 8, generator=g)
        layers[2](torch.relu(layers[0](x))).pow(2).sum().backward()

    backward(1)  # no-sync micro-step: gradients accumulate locally
    local = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in layers.named_parameters()}
    reducer.start()
    backward(2)
    for n, p in layers.named_parameters():
        if p.grad is not None:
            local[n] = p.grad.clone()
    reducer.finish()
    expected = {}
    for n, g in local.items():
        t = g.clone()
        tdist.all_reduce(t)
        expected[n] = t.mul_(1.0 / tdist.get_world_size())
    got = {n: p.grad.clone() for n, p in layers.named_parameters()}
    reducer.close()
    return {"got": got, "expected": expected, "buckets": len(reducer.buckets)}


@pytest.mark.parametrize("bucket_bytes", [64, 2 ** 20])
def test_reducer_by_hand(bucket_bytes):
    for r in run_distributed(_reduce_by_hand, 2, bucket_bytes, timeout_s=120):
        assert r["buckets"] == (6 if bucket_bytes == 64 else 1)
        for n in r["expected"]:
            assert torch.equal(r["got"][n], r["expected"][n]), n
        assert torch.equal(r["got"]["1.weight"], torch.zeros(8, 8))  # unused: the zeros' average
