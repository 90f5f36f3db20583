"""The non-finite guard at ZeRO 0-3, the timeout of every process group, and NaN data stopping a run,
on spawned ranks.

Reference for the guard: training that never sees the bad step. The trainer trains step 1, then step 2 with a
NaN injected into one backbone parameter's gradient on rank 1 only (before ZeRO reduces it, so after the
reduction only the ranks owning that parameter's partition hold the NaN: the ranks must agree), then step 3.
The guard must leave it after step 2 exactly as after step 1 (weights, BatchNorm statistics, backbone and head
optimizer state). Then the same trainer is restored to its in-memory state after step 1, passes over step 2's
batches without training and trains step 3 again: bitwise what step 3 gave after the skip (nothing of the
skipped step leaked into the next one). A NaN in the head's gradient on one rank (step 4) is skipped too.

NaN images from the loader (run.main on 2 ranks): each such step is skipped and counted, the third in a row
stops the run, and no checkpoint holds a non-finite value. (A huge LR through the launcher:
tests/launch/test_failures.py.)
"""
import math
import os

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support import launching as L

STAGES = (0, 1, 2, 3)
GROUP_TIMEOUT_S = 41.0


def _cfg(out_dir: str, stage: int):
    from engine.config import schema as config

    return config.from_dict({
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": stage},
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 11, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"source": "synthetic"},
                   "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"},
                   "train": {"max_steps": 10, "log_every": 1, "output_dir": out_dir, "seed": 2},
                   "checkpoint": {"export": False}}})


def _state(trainer) -> dict:
    optim = trainer.backbone.optimizer_state(everywhere=True)
    head_state = trainer.head_optimizer.state.get(trainer.head.weight, {})
    return {"backbone": trainer.backbone.full_state_dict(), "optim": optim.get("state", {}),
            "head": trainer.head.weight.detach().cpu().clone(),
            "head_optim": {k: v.detach().cpu().clone() for k, v in head_state.items() if torch.is_tensor(v)}}


def _differences(a: dict, b: dict) -> list:
    out = []
    for part in ("backbone", "optim", "head_optim"):
        for key in a[part]:
            x, y = a[part][key], b[part].get(key)
            if isinstance(x, dict):
                out += [f"{part}.{key}.{k}" for k in x if not torch.equal(x[k], y[k])]
            elif not torch.equal(x, y):
                out.append(f"{part}.{key}")
    if not torch.equal(a["head"], b["head"]):
        out.append("head")
    return out


def _poison_next_boundary(trainer, what: str) -> None:
    """Make this trainer's next boundary backward leave a NaN in one backbone parameter's gradient (rank 1,
    before reduction) or in the head's gradient (rank 0)."""
    from engine.runtime import dist

    backward = trainer.backbone.backward

    def poisoned(loss, *, boundary):
        handle = None
        if boundary and what == "backbone" and dist.get_rank() == 1:
            param = dict(trainer.backbone.module.named_parameters())["layers.0.layers.0.weight"]
            handle = param.register_hook(lambda g: g * float("nan"))
        backward(loss, boundary=boundary)
        if handle is not None:
            handle.remove()
        if boundary and what == "head" and dist.get_rank() == 0:
            grad = trainer.head.weight.grad
            (grad._values() if grad.is_sparse else grad).view(-1)[0] = float("nan")
        if boundary:
            trainer.backbone.backward = backward

    trainer.backbone.backward = poisoned


def _refused_writes(trainer) -> dict:
    """A checkpoint and a model.pt holding a NaN (rank 1's head rows; rank 0's backbone) are refused on every
    rank, naming the tensor, and leave the previous checkpoint and `latest` as they were."""

    from engine.runtime import dist
    from engine.state import checkpoint

    root = checkpoint.save(trainer).parent  # step 3, finite
    trainer.step += 1
    out = {}
    with torch.no_grad():
        if dist.get_rank() == 1:
            trainer.head.weight[0, 0] = float("nan")
        try:
            checkpoint.save(trainer)
        except checkpoint.CheckpointWriteError as exc:
            out["refused_checkpoint"] = str(exc)
        trainer.head.weight[0, 0] = 0.0
        if dist.get_rank() == 0:
            next(trainer.backbone.module.parameters()).view(-1)[0] = float("inf")
        try:
            checkpoint.export_model(trainer, trainer.output_dir / "model.pt")
        except checkpoint.CheckpointWriteError as exc:
            out["refused_model"] = str(exc)
    out["listing"] = sorted(os.listdir(root))
    out["latest"] = (root / "latest").read_text().strip()
    out["model_written"] = (trainer.output_dir / "model.pt").exists()
    return out


def _stages(out_dir: str) -> dict:
    from engine.runtime import compat, dist
    from engine.train.build import build_trainer

    dist.init(timeout_s=GROUP_TIMEOUT_S)
    results = {}
    for stage in STAGES:
        g = build_trainer(_cfg(f"{out_dir}/g{stage}", stage))
        seen = []
        local = g.backbone.local_grads_finite
        g.backbone.local_grads_finite = lambda: seen.append(local()) or seen[-1]
        g.train_step()
        after_1, snapshot_1 = _state(g), g.state_dict()
        _poison_next_boundary(g, "backbone")
        loss_2 = float(g.train_step())
        after_2 = _state(g)
        g.train_step()
        after_3 = _state(g)
        _poison_next_boundary(g, "head")
        g.train_step()
        after_4 = _state(g)
        res = {"skip_kept_state": _differences(after_1, after_2),
               "head_skip_kept_state": _differences(after_3, after_4),
               "local_flags": seen, "skipped": g.num_nonfinite_skipped, "consecutive": g.consecutive_nonfinite,
               "loss_2": loss_2, "step": g.step, "moved": _differences(after_2, after_3) != []}
        if stage == 1:  # DeepSpeed's own groups exist now
            import torch.distributed.distributed_c10d as c10d

            default = c10d._get_default_group()
            res["group_timeouts"] = [compat.group_timeout(pg).total_seconds() for pg in c10d._world.pg_map
                                     if pg is not default]
            res["dp_group_timeout"] = compat.group_timeout(g.backbone.engine.data_parallel_group).total_seconds()
        g.load_state_dict(snapshot_1)  # the reference: step 3 right after step 1, step 2's batches unused
        for _ in range(g.cfg.gradient_accumulation_steps):
            g._next_batch()
            g.head.step += 1
        g.step += 1
        g.train_step()
        res["equal_to_reference"] = _differences(after_3, _state(g))
        if stage == 0:
            res.update(_refused_writes(g))
        g.close()
        results[stage] = res
    return results


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return run_distributed(_stages, 2, str(tmp_path_factory.mktemp("nonfinite")), timeout_s=900)


@pytest.mark.parametrize("stage", STAGES)
def test_guard_skips_a_step_exactly_at_every_zero_stage(stages, stage):
    for rank, res in enumerate(s[stage] for s in stages):
        assert res["step"] == 4 and res["skipped"] == 2 and res["consecutive"] == 1, (rank, res)
        assert math.isfinite(res["loss_2"])  # only the gradient was poisoned
        assert res["skip_kept_state"] == [], (rank, res["skip_kept_state"])
        assert res["head_skip_kept_state"] == [], (rank, res["head_skip_kept_state"])
        assert res["moved"]  # step 3 did train
        assert res["equal_to_reference"] == [], (rank, res["equal_to_reference"])
    # compat.zero_local_grads found the NaN: in the reduced gradient of every rank (ZeRO-0: all-reduce) or of
    # the rank(s) owning that parameter's partition (ZeRO 1-3), and not in the clean steps
    flags = [s[stage]["local_flags"] for s in stages]
    assert all(f[0] and f[2] for f in flags), flags
    assert not all(f[1] for f in flags), flags
    if stage == 0:
        assert not any(f[1] for f in flags), flags


def test_no_checkpoint_or_model_with_a_non_finite_value_is_written(stages):
    for s in stages:
        res = s[0]
        refused = res["refused_checkpoint"]
        assert "[rank 1] refusing to write" in refused and "step_00000004" in refused, refused
        assert "head shard 'weight' holds inf or NaN values" in refused, refused
        assert "[rank 0] refusing to write" in res["refused_model"] and "backbone weight" in res["refused_model"]
        assert res["listing"] == ["latest", "step_00000003"] and res["latest"] == "step_00000003", res
        assert not res["model_written"]


def test_every_process_group_has_the_run_timeout(stages):
    """DeepSpeed's data-parallel group (created by deepspeed.comm.new_group without a timeout) and every other
    group take engine.train.dist_timeout_s, not torch's 30-minute default."""
    for s in stages:
        res = s[1]
        assert res["dp_group_timeout"] == GROUP_TIMEOUT_S
        assert res["group_timeouts"] and all(t == GROUP_TIMEOUT_S for t in res["group_timeouts"]), res


# -- NaN data through run.main ---------------------------------------------------------------------------------


def test_nan_pixels_are_skipped_counted_and_stop_the_run(tmp_path):
    """A loader that yields NaN images in steps 2, 4, 5 and 6 (run.main on 2 ranks, at most 3 in a row): each is
    skipped (weights and BatchNorm statistics untouched), step 3 trains and resets the count, the third in a
    row (step 6) stops the run; the checkpoints (every 2 steps) stay finite."""
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out, max_nonfinite_steps=3, max_steps=10)
    with pytest.raises(RuntimeError, match="exited without a result"):
        run_distributed(L.main_in_process, 2, ["--config", str(config)], {"nan_pixels_steps": [2, 4, 5, 6]},
                        str(tmp_path / "err"), timeout_s=600)
    for rank in (0, 1):
        text = (tmp_path / f"err.{rank}").read_text()
        assert f"[rank {rank}] error: NonFiniteError: steps 4..6: 3 consecutive optimizer steps had a non-finite " \
               f"loss" in text and "the weights are those after step 3" in text, text
    text = (tmp_path / "err.0").read_text()
    assert "step 2: non-finite loss" in text and "(1 in a row, 1 in all;" in text, text
    assert "step 6: non-finite loss" in text and "(3 in a row, 4 in all;" in text, text
    assert L.checkpoint_steps(out) == [2, 4]  # the run stopped inside step 6, before its checkpoint
    assert L.non_finite_files(out / "checkpoints") == []  # step 2's forward made NaN BatchNorm statistics: restored
    assert not (out / "model.pt").exists()
