"""The saving hooks on 2 gloo ranks (engine/train/saving.py), against what a run must leave:

- a checkpoint on a time interval is taken at the same step on every rank although only one rank's clock says
  it is due (the trainer's per-step all-reduce carries the request, `Hook.save_due`): a complete checkpoint,
  every rank's head shard in it, and then one at the end of the run (checkpointing is on);
- model_best.pt follows the mean verification accuracy: it equals model.pt of the step whose evaluation scored
  best, and a resumed run replaces it only when it beats the best recorded before the restart.

The run is built from ready parts (engine.train.build's builders and a Trainer) so each hook gets a clock or
a verification stand-in the test controls; the unit tests (tests/unit/test_saving.py) cover the rules alone.
"""
import json
import os

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config

STEPS = 4


def _trainer(cfg, hooks):
    from engine.runtime import dist
    from engine.train import build
    from engine.train.trainer import Trainer

    device = dist.get_device()
    data = build.build_data(cfg, device)
    cfg = build.with_data_classes(cfg, data)
    backbone, head = build.build_backbone(cfg, device), build.build_head(cfg, device)
    return Trainer(cfg, backbone=backbone, head=head, head_optimizer=build.build_head_optimizer(cfg, head),
                   data=data, hooks=hooks)


def _timed(out: str) -> dict:
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.hooks import Hook
    from engine.train.saving import CheckpointHook

    cfg = config.from_dict(tiny_r18_config(out, 2, 1, max_steps=STEPS, checkpoint={
        "every": 0, "every_minutes": 0, "keep": 0, "resume": None, "export": False}))
    now = [0.0]

    class Advance(Hook):  # rank 1's clock passes the 1-minute interval after step 1; rank 0's never moves
        def on_step_end(self, trainer, step, loss):
            if step == 1 and dist.get_rank() == 1:
                now[0] = 61.0

    saver = CheckpointHook(every=0, keep=0, export=False, every_minutes=1.0, clock=lambda: now[0])
    trainer = _trainer(cfg, [saver, Advance()])
    trainer.train()
    trainer.close()
    listing = sorted(os.listdir(f"{out}/checkpoints")) if dist.get_rank() == 0 else None
    return {"num_saved": saver.num_saved, "listing": listing}


# the mean over the two sets: 0.55 at step 1, 0.75 at step 2 (the best), 0.70 at step 3
FIRST = {"1": {"lfw": 0.5, "agedb_30": 0.6}, "2": {"lfw": 0.8, "agedb_30": 0.7}, "3": {"lfw": 0.9, "agedb_30": 0.5}}


def _both(out: str) -> dict:
    return {"timed": _timed(f"{out}/timed"), "best": _best(f"{out}/best", FIRST, False)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn for both runs (a process start with its imports is most of such a run's time)."""
    out = tmp_path_factory.mktemp("saving")
    return out, run_distributed(_both, 2, str(out), timeout_s=900)


def test_a_time_interval_seen_by_one_rank_saves_on_every_rank_at_the_same_step(runs):
    root, both = runs
    out, results = root / "timed", [r["timed"] for r in both]
    assert [r["num_saved"] for r in results] == [2, 2]  # step 2 (rank 1's clock) and the end
    assert results[0]["listing"] == ["latest", "step_00000002", "step_00000004"]
    meta = json.loads((out / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["step"] == 2 and len(meta["head_shards"]) == 2
    for entry in meta["head_shards"]:
        assert (out / "checkpoints" / "step_00000002" / entry["file"]).is_file()


class _Scores:
    """A verification hook's stand-in: `history` records as VerificationHook writes them, scores chosen by the test."""

    def __init__(self, scores):
        self.scores, self.history = scores, []


def _best(out: str, scores: dict, resume: bool) -> dict:
    """Train STEPS steps, a checkpoint after each (resumed from the newest when `resume`); after each step the
    stand-in records that step's scores, and the backbone is exported so the test can compare model_best.pt."""
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.state import checkpoint
    from engine.train.hooks import Hook
    from engine.train.saving import BestModelHook, CheckpointHook

    cfg = config.from_dict(tiny_r18_config(out, 2, 1, max_steps=STEPS, checkpoint={
        "every": 1, "every_minutes": 0, "keep": 0, "resume": "auto" if resume else None, "export": False}))
    verification = _Scores(scores)

    class Evaluate(Hook):  # stands where the verification hook runs, before the best-model hook
        def on_step_end(self, trainer, step, loss):
            if str(step) in verification.scores:
                verification.history.append({"step": step, "epoch": 0, "eval": {
                    name: {"acc_mean": acc} for name, acc in verification.scores[str(step)].items()}})

    class Export(Hook):
        def on_step_end(self, trainer, step, loss):
            checkpoint.export_model(trainer, f"{out}/model_step{step}.pt")

    best = BestModelHook(verification, out)
    trainer = _trainer(cfg, [Evaluate(), best, Export(), CheckpointHook(every=1, keep=0, export=False)])
    if resume:
        checkpoint.resume(trainer)
    trainer.train()
    trainer.close()
    return {"best": best.best, "rank": dist.get_rank()}


def test_model_best_follows_the_mean_accuracy_and_survives_a_restart(runs):
    root, both = runs
    out, results = root / "best", [r["best"] for r in both]
    assert results[0]["best"] == results[1]["best"]
    record = json.loads((out / "model_best.json").read_text())
    assert record["step"] == 2 and abs(record["score"] - 0.75) < 1e-12 and record["sets"] == FIRST["2"]
    best = torch.load(out / "model_best.pt", weights_only=True)
    step2 = torch.load(out / "model_step2.pt", weights_only=True)
    assert all(torch.equal(best[k], step2[k]) for k in best)

    # a restart from step 3's checkpoint: 0.70 at step 4 does not replace the best of before the restart
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000004")  # the restart continues from step 3
    again = {"4": {"lfw": 0.7, "agedb_30": 0.7}}
    run_distributed(_best, 2, str(out), again, True, timeout_s=600)
    assert json.loads((out / "model_best.json").read_text()) == record
    assert all(torch.equal(torch.load(out / "model_best.pt", weights_only=True)[k], step2[k]) for k in step2)
