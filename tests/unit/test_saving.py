"""The saving hooks' rules alone (engine/train/saving.py), on a stand-in trainer whose saves and exports are
recorded: when a checkpoint is due (step interval, time interval, a stop, the end), when model.pt is written
(each epoch's end, the end), what the summary announces. The same hooks on 2 real ranks:
tests/distributed/test_saving.py; through every recipe: tests/distributed/test_recipes.py.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.train import saving


@pytest.fixture
def calls(monkeypatch):
    """('save', step) / ('export', file name, step) in the order the hooks ask for them."""
    made = []
    monkeypatch.setattr(saving.checkpoint, "save", lambda trainer, keep: made.append(("save", trainer.step)))
    monkeypatch.setattr(saving.checkpoint, "export_model",
                        lambda trainer, path: made.append(("export", Path(path).name, trainer.step)))
    return made


def _trainer(max_steps=6, steps_per_epoch=None, resumed_from=None, step=0):
    return SimpleNamespace(step=step, max_steps=max_steps, steps_per_epoch=steps_per_epoch, save_due=False,
                           output_dir=Path("/nowhere"), resumed_from=resumed_from)


def _run(hook, trainer, due_at=(), stop_at=None):
    """The trainer's calls: on_train_start, each step's agreement (save_due) and on_step_end, then on_stop or
    on_train_end."""
    hook.on_train_start(trainer)
    while trainer.step < trainer.max_steps:
        trainer.step += 1
        trainer.save_due = trainer.step in due_at  # as the trainer's all-reduce would set it
        hook.on_step_end(trainer, trainer.step, torch.zeros(()))
        if trainer.step == stop_at:
            hook.on_stop(trainer)
            return
    hook.on_train_end(trainer)


def test_step_interval_and_the_end(calls):
    _run(saving.CheckpointHook(every=4, keep=2, export=False), _trainer(max_steps=6))
    assert calls == [("save", 4), ("save", 6)]


def test_no_interval_writes_no_checkpoint_but_model_pt_every_epoch(calls):
    hook = saving.CheckpointHook(every=0, keep=2, export=True)
    _run(hook, _trainer(max_steps=6, steps_per_epoch=2))
    # epochs end at steps 2, 4, 6; the last one's model.pt is the end's
    assert calls == [("export", "model.pt", 2), ("export", "model.pt", 4), ("export", "model.pt", 6)]
    assert hook.summary() == {"model": {"path": "model.pt", "epoch_exports": [{"epoch": 1, "step": 2},
                                                                             {"epoch": 2, "step": 4}]}}


def test_a_time_interval_saves_when_due_and_then_at_the_end(calls):
    now = [0.0]
    hook = saving.CheckpointHook(every=0, keep=2, export=False, every_minutes=1.0, clock=lambda: now[0])
    trainer = _trainer(max_steps=5)
    assert not hook.save_due(trainer)
    now[0] = 59.9
    assert not hook.save_due(trainer)
    now[0] = 60.0
    assert hook.save_due(trainer)  # this rank's clock: the trainer agrees it with the other ranks
    _run(hook, _trainer(max_steps=5), due_at={3})  # on_train_start restarts the clock; the agreement says step 3
    assert calls == [("save", 3), ("save", 5)]
    assert not hook.save_due(trainer)  # the save restarted the clock


def test_a_stop_saves_and_a_resumed_run_ends_with_a_checkpoint(calls):
    _run(saving.CheckpointHook(every=0, keep=2, export=False), _trainer(max_steps=6), stop_at=3)
    assert calls == [("save", 3)]
    calls.clear()
    # the same command again: resumed at 3 (that checkpoint is this step's), a checkpoint at the end
    _run(saving.CheckpointHook(every=0, keep=2, export=False), _trainer(max_steps=6, resumed_from="ckpt", step=3))
    assert calls == [("save", 6)]
    calls.clear()
    # resumed at the end (a finished run run again): nothing to train, nothing saved twice
    _run(saving.CheckpointHook(every=5, keep=2, export=False), _trainer(max_steps=6, resumed_from="ckpt", step=6))
    assert calls == []


def test_best_model_exports_on_improvement_only(calls, tmp_path):
    verification = SimpleNamespace(history=[])
    hook = saving.BestModelHook(verification, tmp_path)
    trainer = _trainer(max_steps=3)
    trainer.output_dir = tmp_path
    hook.on_train_start(trainer)
    for step, accs in ((1, (0.5, 0.7)), (2, (0.9, 0.1)), (3, (0.7, 0.8))):  # means 0.6, 0.5, 0.75
        trainer.step = step
        verification.history.append({"step": step, "epoch": 0,
                                     "eval": {"lfw": {"acc_mean": accs[0]}, "cfp_fp": {"acc_mean": accs[1]}}})
        hook.on_step_end(trainer, step, torch.zeros(()))
    assert calls == [("export", "model_best.pt", 1), ("export", "model_best.pt", 3)]
    assert hook.summary()["model_best"]["step"] == 3
    assert hook.summary()["model_best"]["score"] == pytest.approx(0.75)
    assert (tmp_path / "model_best.json").is_file()
