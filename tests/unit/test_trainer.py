"""Trainer pieces that need no process group: LR schedule, and HeadStep's fp16 contract with the backbone
(head gradients unscaled by the backbone's loss scale; the head's step skipped when the backbone's is)."""
import pytest
import torch

import heads
from engine.train.trainer import HeadStep, lr_factor


def arcface_poly(step, base_lr, max_steps, warmup_steps, power=2):
    """arcface_torch's PolyScheduler.get_lr, transcribed (last_epoch == step)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr * (1 - (step - warmup_steps) / (max_steps - warmup_steps)) ** power


@pytest.mark.parametrize("warmup", [0, 5])
def test_poly_schedule_matches_arcface_torch(warmup):
    for step in range(40):
        got = 0.1 * lr_factor(step, max_steps=40, warmup_steps=warmup, schedule="poly")
        assert got == pytest.approx(arcface_poly(step, 0.1, 40, warmup), rel=1e-12, abs=1e-15)


def test_other_schedules():
    assert lr_factor(0, max_steps=10, warmup_steps=0, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(10, max_steps=10, warmup_steps=0, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(5, max_steps=10, warmup_steps=0, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(7, max_steps=10, warmup_steps=0, schedule="step", milestones=[3, 6], gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(9, max_steps=10, warmup_steps=0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor(1, max_steps=10, warmup_steps=0, schedule="linear")


def _head_step(sparse: bool):
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(torch.ones(4, 3))
    grad = torch.full((4, 3), 8.0)
    head.weight.grad = grad.to_sparse(1) if sparse else grad
    optimizer = heads.build_head_optimizer("sgd", [head.weight], lr=1.0, momentum=0.0, weight_decay=0.0)
    return head, HeadStep(head, optimizer)


@pytest.mark.parametrize("sparse", [False, True])
def test_fp16_head_step_unscales_with_backbone_scale(sparse):
    head, step = _head_step(sparse)
    assert step(4.0, backbone_applied=True)
    # grad 8 / scale 4 = 2, lr 1 -> 1 - 2 = -1
    torch.testing.assert_close(head.weight.detach(), torch.full((4, 3), -1.0))
    assert head.weight.grad is None and step.num_skipped == 0


def test_fp16_head_step_skipped_on_overflow():
    head, step = _head_step(sparse=False)
    assert not step(4.0, backbone_applied=False)
    torch.testing.assert_close(head.weight.detach(), torch.ones(4, 3))  # untouched
    assert head.weight.grad is None  # and the overflowed gradient is dropped
    assert step.num_skipped == 1
