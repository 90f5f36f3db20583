"""Trainer pieces that need no process group: LR schedule, HeadStep's fp16 contract with the backbone (head
gradients unscaled by the backbone's loss scale; the head's step skipped when the backbone's is), and the hook
lifecycle (engine.train.hooks.Hook: the order of the calls, on_stop instead of on_train_end, close always)."""
import pytest
import torch

import heads
from engine.train.hooks import Hook
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


# -- the hook lifecycle (engine.train.hooks.Hook): a Trainer over tiny ready-made parts, no process group --------

class _Backbone:
    """The least of a ParallelBackbone a Trainer steps: a linear layer and plain SGD, in one process."""

    name = "plain"

    def __init__(self):
        self.module = torch.nn.Linear(4, 3)
        self.device = torch.device("cpu")
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)

    def __call__(self, images):
        return self.module(images)

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def backward(self, loss, *, boundary):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def skip_step(self):
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def loss_scale(self):
        return 1.0

    def local_grads_finite(self):
        return True

    def close(self):
        pass


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(5, 3))

    def forward(self, embeddings, labels):
        return (embeddings @ self.weight.t()).pow(2).mean()


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(2, 4, generator=g), torch.zeros(2, dtype=torch.long)


def _trainer(tmp_path, hooks, stop=None):
    from engine.config import schema as config
    from engine.train.trainer import Trainer

    cfg = config.from_dict({"train_micro_batch_size_per_gpu": 2, "engine": {
        "model": {"name": "mbf", "embedding_size": 3}, "head": {"num_classes": 5},
        "train": {"max_steps": 3, "output_dir": str(tmp_path)}}})
    head = _Head()
    return Trainer(cfg, backbone=_Backbone(), head=head, head_optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
                   data=_batches(), hooks=hooks, stop=stop)


class _Recorder(Hook):
    """Records the calls it gets; `fail_at`: raises in on_step_end at that step; `fail_close`: raises in close."""

    def __init__(self, events, name, fail_at=None, fail_close=False):
        self.events, self.name, self.fail_at, self.fail_close = events, name, fail_at, fail_close

    def on_train_start(self, trainer):
        self.events.append(f"{self.name}.start@{trainer.step}")

    def on_step_end(self, trainer, step, loss):
        self.events.append(f"{self.name}.step{step}")
        if step == self.fail_at:
            raise RuntimeError(f"{self.name} failed at step {step}")

    def on_stop(self, trainer):
        self.events.append(f"{self.name}.stop@{trainer.step}")

    def on_train_end(self, trainer):
        self.events.append(f"{self.name}.end@{trainer.step}")

    def close(self):
        self.events.append(f"{self.name}.close")
        if self.fail_close:
            raise OSError(f"{self.name} could not close")


def test_hooks_run_in_order_and_close_after_the_end(tmp_path):
    events = []
    trainer = _trainer(tmp_path, [_Recorder(events, "a"), _Recorder(events, "b")])
    trainer.train()
    trainer.close()
    assert events == ["a.start@0", "b.start@0", "a.step1", "b.step1", "a.step2", "b.step2", "a.step3", "b.step3",
                      "a.end@3", "b.end@3", "a.close", "b.close"]


def test_a_stop_request_calls_on_stop_not_on_train_end(tmp_path):
    from engine.runtime.faults import StopFlag

    events, stop = [], StopFlag()
    stop.set("test")
    trainer = _trainer(tmp_path, [_Recorder(events, "a")], stop=stop)
    trainer.train()
    trainer.close()
    assert trainer.stopped_early and trainer.step == 1
    assert events == ["a.start@0", "a.step1", "a.stop@1", "a.close"]


def test_hooks_close_after_an_exception_which_a_failing_close_does_not_hide(tmp_path):
    events = []
    trainer = _trainer(tmp_path, [_Recorder(events, "a", fail_close=True), _Recorder(events, "b", fail_at=2)])
    with pytest.raises(RuntimeError, match="b failed at step 2"):
        trainer.train()
    trainer.close()
    assert events == ["a.start@0", "b.start@0", "a.step1", "b.step1", "a.step2", "b.step2", "a.close", "b.close"]

    events.clear()  # training completed: a failing close is an error of its own
    trainer = _trainer(tmp_path, [_Recorder(events, "a", fail_close=True), _Recorder(events, "b")])
    with pytest.raises(OSError, match="a could not close"):
        trainer.train()
    trainer.close()
    assert events[-2:] == ["a.close", "b.close"]
