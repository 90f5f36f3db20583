"""Checkpoints: a run stopped and resumed equals the uninterrupted run, also on another world size and ZeRO stage.

Reference: the same config trained straight through. Same world size and stage -> bitwise equal backbone and
head (weights, optimizer state, LR schedule, data position, Partial FC sampling step all restored). Saved on
2 ranks under ZeRO-1, resumed on 1 rank with gradient accumulation 2 under ZeRO-3 -> equal to 1e-5 relative
(2-norm, as tests/distributed/test_deepspeed_backend.py: summation order differs between the two layouts).
A truncated checkpoint file is named and resume=auto falls back to the previous checkpoint, again equal to the
uninterrupted run. A channels_last run's checkpoint (NHWC weights and momentum at ZeRO-0) is written contiguous and
resumes under ZeRO-1 to the straight run within 1e-5. (Checkpoint config and resume errors, pruning:
tests/unit/test_checkpoint.py.)
"""
import json
import os

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support import launching as L
from tests.support.configs import NUM_CLASSES, tiny_r18_config

STEPS = 4
STOP_AT = 2


class _Stop(Exception):
    pass


def _config(out_dir, world, stage, optim="sgd", sample_rate=1.0, every=0, keep=2, resume=None, dropout=0.0):
    return tiny_r18_config(out_dir, world, stage, max_steps=STEPS, optim=optim, sample_rate=sample_rate,
                           dropout=dropout, checkpoint={"every": every, "keep": keep, "resume": resume})


def _run(raw, stop_at=None):
    from engine.config import schema as config
    from engine.train.build import build_trainer
    from engine.train.hooks import Hook

    class StopAfter(Hook):  # a crash right after the step-`stop_at` checkpoint is written
        def on_step_end(self, trainer, step, loss):
            if step == stop_at:
                raise _Stop()

    trainer = build_trainer(config.from_dict(raw), hooks=[StopAfter()] if stop_at else None)
    resumed = trainer.resumed_from
    try:
        trainer.train()
    except _Stop:
        pass
    state = trainer.state_dict()
    trainer.close()
    return {"backbone": state["backbone"], "head": state["head"], "step": state["meta"]["step"],
            "resumed_from": str(resumed) if resumed else None}


def _two_ranks(out):
    from engine.runtime import dist

    rank = dist.get_rank()
    res = {}
    # ZeRO-1, SGD momentum, full softmax: straight vs stopped at 2 (checkpoint every step, keep 1) + resumed
    res["z1_straight"] = _run(_config(f"{out}/z1_straight", 2, 1))
    res["z1_stopped"] = _run(_config(f"{out}/z1", 2, 1, every=1, keep=1), stop_at=STOP_AT)
    if rank == 0:
        res["z1_listing"] = sorted(os.listdir(f"{out}/z1/checkpoints"))
    res["z1_resumed"] = _run(_config(f"{out}/z1", 2, 1, every=1, keep=1, resume="auto"))
    # ZeRO-3, AdamW, sampled Partial FC, dropout (sampling step, lazy per-row Adam state and each rank's RNG
    # stream must be restored)
    res["z3_straight"] = _run(_config(f"{out}/z3_straight", 2, 3, "adamw", 0.5, dropout=0.3))
    _run(_config(f"{out}/z3", 2, 3, "adamw", 0.5, every=2, dropout=0.3), stop_at=STOP_AT)
    res["z3_resumed"] = _run(_config(f"{out}/z3", 2, 3, "adamw", 0.5, every=2, resume="auto", dropout=0.3))
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt"))
    return out, run_distributed(_two_ranks, 2, out, timeout_s=900)


def _flat(state):
    return torch.cat([v.double().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_stop_and_resume_is_bitwise_the_uninterrupted_run(runs):
    _, two = runs
    for rank in (0, 1):
        for name in ("z1", "z3"):
            straight, resumed = two[rank][f"{name}_straight"], two[rank][f"{name}_resumed"]
            assert resumed["resumed_from"] and resumed["resumed_from"].endswith(f"step_{STOP_AT:08d}"), name
            assert resumed["step"] == straight["step"] == STEPS
            for key, value in straight["backbone"].items():
                if rank == 1 and ("running_" in key or "num_batches" in key):
                    continue  # BN statistics are per rank; a checkpoint carries rank 0's (see engine.checkpoint)
                assert torch.equal(resumed["backbone"][key], value), f"{name} rank {rank}: backbone {key}"
            assert torch.equal(resumed["head"]["weight"], straight["head"]["weight"]), f"{name} rank {rank}: head"


def test_keep_prunes_and_latest_points_at_newest(runs):
    out, two = runs
    # stopped run: checkpoints at steps 1 and 2 with keep=1 -> only step 2 was left before the resume
    assert two[0]["z1_listing"] == ["latest", f"step_{STOP_AT:08d}"]
    # after the resumed run (steps 3, 4): only step 4, and `latest` names it
    root = os.path.join(out, "z1", "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", f"step_{STEPS:08d}"]
    assert open(os.path.join(root, "latest")).read().strip() == f"step_{STEPS:08d}"
    meta = json.load(open(os.path.join(root, f"step_{STEPS:08d}", "meta.json")))
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["num_classes"] == NUM_CLASSES
    assert [s["num_local"] for s in meta["head_shards"]] == [6, 5]


def test_resume_on_another_world_size_and_zero_stage(runs, tmp_path):
    """Saved at step 2 on 2 ranks (ZeRO-1), resumed on 1 rank (ZeRO-3, accumulation 2): equals 2 ranks
    straight through, head rows re-sliced from the two shards."""
    _, two = runs
    # A fresh step-2 checkpoint (the fixture's resumed run pruned its own): stop a 2-rank run at step 2.
    fresh = str(tmp_path)
    run_distributed(_stop_two_ranks, 2, fresh, timeout_s=600)
    (one,) = run_distributed(_resume_one_rank, 1, fresh, timeout_s=600)
    ref = two[0]["z1_straight"]
    got = one["resumed"]
    assert got["step"] == STEPS
    names = [k for k in ref["backbone"] if ref["backbone"][k].is_floating_point() and "running" not in k]
    err = _rel(torch.cat([got["backbone"][k].double().flatten() for k in names]),
               torch.cat([ref["backbone"][k].double().flatten() for k in names]))
    assert err <= 1e-5, f"backbone differs by {err:.2e}"
    head_ref = torch.cat([two[0]["z1_straight"]["head"]["weight"], two[1]["z1_straight"]["head"]["weight"]])
    err = _rel(got["head"]["weight"].double(), head_ref.double())
    assert err <= 1e-5, f"head differs by {err:.2e}"


def _stop_two_ranks(out):
    _run(_config(f"{out}/z1", 2, 1, every=2), stop_at=STOP_AT)
    return True


def _resume_one_rank(out):
    """The 2-rank ZeRO-1 run's step-2 checkpoint, resumed on 1 rank (accumulation 2) under ZeRO-3."""
    ckpt = f"{out}/z1/checkpoints/step_{STOP_AT:08d}"
    return {"resumed": _run(_config(f"{out}/w1", 1, 3, resume=ckpt))}


def test_export_loads_strictly_into_the_backbone(runs):
    import backbones

    out, two = runs
    state = torch.load(os.path.join(out, "z3_straight", "model.pt"), weights_only=True)
    model = backbones.build_backbone("r18", embedding_size=16)
    model.load_state_dict(state, strict=True)
    for key, value in two[0]["z3_straight"]["backbone"].items():
        assert torch.equal(state[key], value), key


# -- a truncated checkpoint (run.main on 2 ranks, tests/support/launching.py's tiny run) -------------------------


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tmp_path_factory):
    """2 ranks (run.main): stopped at step 4 (checkpoints 2 and 4), step 4's backbone.pt truncated: resume=auto
    names the file, falls back to step 2 and finishes equal to the uninterrupted run."""
    reference = L.reference(tmp_path_factory)
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)
    codes = run_distributed(L.main_in_process, 2, ["--config", str(config)], {"stop_after_step": 3}, timeout_s=600)
    assert codes == [3, 3]  # the stop requested after step 3 takes effect at the next boundary, step 4
    broken = out / "checkpoints" / "step_00000004" / "backbone.pt"
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 2)
    codes = run_distributed(L.main_in_process, 2, ["--config", str(config), "--set", "engine.checkpoint.resume=auto"],
                            None, str(tmp_path / "err"), timeout_s=600)
    assert codes == [0, 0]
    text = (tmp_path / "err.0").read_text()
    assert f"{broken}: unreadable" in text and "falling back to" in text and "step_00000002" in text, text
    run_log = (out / "train.log").read_text()  # both jobs, appended: the stop, then the fallback and the end
    assert run_log.index("stopping at step 4/") < run_log.index("[rank 0] warning: checkpoint "), run_log
    assert "falling back to" in run_log and "summary: " in run_log.splitlines()[-1], run_log
    assert L.losses(out) == L.losses(reference)  # steps 3 and 4 trained again, as the uninterrupted run did
    L.assert_same_model(L.model(out), L.model(reference))


def _channels_last_runs(out):
    """ZeRO-0 with channels_last (NHWC weights and momentum) straight through; the same stopped at step 2 and
    resumed under ZeRO-1 (contiguous parameters in DeepSpeed's flat buffers, its full-state setters)."""
    def cfg(sub, stage, **kw):
        raw = _config(f"{out}/{sub}", 2, stage, **kw)
        raw["engine"]["model"]["channels_last"] = True
        return raw

    res = {"straight": _run(cfg("cl_straight", 0))}
    _run(cfg("cl", 0, every=2), stop_at=STOP_AT)
    ckpt = f"{out}/cl/checkpoints/step_{STOP_AT:08d}"
    saved = {}
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".pt"):
            obj = torch.load(os.path.join(ckpt, name), weights_only=False)
            stack = [obj]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    stack += list(item.values())
                elif isinstance(item, (list, tuple)):
                    stack += list(item)
                elif torch.is_tensor(item) and item.dim() == 4:
                    saved[name] = saved.get(name, True) and item.is_contiguous()
    res["files_contiguous"] = saved
    res["resumed"] = _run(cfg("cl_z1", 1, resume=ckpt))
    return res


def test_channels_last_checkpoint_resumes_under_another_zero_stage(tmp_path):
    for r in run_distributed(_channels_last_runs, 2, str(tmp_path), timeout_s=600):
        assert r["files_contiguous"] and all(r["files_contiguous"].values()), r["files_contiguous"]
        ref, got = r["straight"], r["resumed"]
        assert got["step"] == STEPS
        names = [k for k in ref["backbone"] if ref["backbone"][k].is_floating_point() and "running" not in k]
        err = _rel(_flat({k: got["backbone"][k] for k in names}), _flat({k: ref["backbone"][k] for k in names}))
        assert err <= 1e-5, f"backbone differs by {err:.2e}"
