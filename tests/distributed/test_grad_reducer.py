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


def _reduce_channels_last() -> dict:
    """A channels_last convolution (as engine.model.channels_last makes every one) beside a plain linear layer:
    two steps, the second accumulating into the gradients kept from the first (zeroed in place)."""
    import copy

    import torch.distributed as tdist

    from engine.parallel.reducer import GradReducer

    rank = tdist.get_rank()
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 6 * 6, 2)
    conv.to(memory_format=torch.channels_last)
    ref_conv, ref_fc = copy.deepcopy(conv), copy.deepcopy(fc)  # the same layers without the reducer's hooks
    params = list(conv.parameters()) + list(fc.parameters())
    reducer = GradReducer(params)
    out = []
    for step in range(2):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step + 10 * rank))
        x = x.contiguous(memory_format=torch.channels_last)
        # this rank's own gradients (the bucket's are being all-reduced in place while the backward runs)
        local = list(torch.autograd.grad(ref_fc(ref_conv(x).flatten(1)).square().sum(),
                                         list(ref_conv.parameters()) + list(ref_fc.parameters())))
        reducer.start()
        fc(conv(x).flatten(1)).square().sum().backward()
        reducer.finish()
        expected = []
        for g in local:
            tdist.all_reduce(g)
            expected.append(g.mul_(1.0 / tdist.get_world_size()))
        out.append({"got": [p.grad.clone() for p in params], "expected": expected,
                    "strides": [(p.grad.stride(), p.stride()) for p in params],
                    "in_bucket": [any(p.grad.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                                      for b in reducer.buckets) for p in params]})
        for p in params:
            p.grad.zero_()  # kept, as zero_grad(set_to_none=False): the next backward accumulates into the bucket
    reducer.close()
    return out


def test_channels_last_gradients_keep_their_layout_in_the_bucket():
    for steps in run_distributed(_reduce_channels_last, 2, timeout_s=120):
        for s in steps:
            for got, expected in zip(s["got"], s["expected"]):
                assert torch.equal(got, expected)
            assert all(g == p for g, p in s["strides"]), s["strides"]  # the conv weight's grad is channels_last
            assert all(s["in_bucket"])


def test_dense_layouts():
    from engine.parallel.reducer import _dense

    w = torch.empty(4, 3, 5, 5)
    assert _dense(w) and _dense(w.to(memory_format=torch.channels_last)) and _dense(w.t() if w.dim() == 2 else w)
    assert not _dense(w[:, :, ::2])  # a strided slice leaves holes
    assert _dense(torch.empty(6, 1, 3).transpose(0, 2))
