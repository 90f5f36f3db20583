"""Trainer.load_state_dict: a trainer restored from another's mid-epoch state continues exactly where that one
would have: the same next batches (loader position from rank 0's state on every rank), the same weights, and,
with a stateless optimizer (SGD without momentum), the same next training step."""
import pytest
import torch

from engine.runtime.spawn import run_distributed


def _cfg(rec_dir: str, out_dir: str, zero_stage: int):
    from engine.config import schema as config

    return config.from_dict({
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": zero_stage},
        "engine": {"model": {"name": "mbf", "embedding_size": 32},
                   "head": {"num_classes": 8, "margin": [1.0, 0.0, 0.2], "scale": 16.0},
                   "data": {"source": "recordio", "path": rec_dir, "num_workers": 0, "dali": "off"},
                   "optim": {"lr": 0.05, "momentum": 0.0},
                   "train": {"max_steps": 20, "log_every": 10, "output_dir": out_dir}}})


def _batches(trainer, n):
    return [tuple(t.clone() for t in next(trainer.data)) for _ in range(n)]


def _resume(rec_dir: str, out_dir: str, zero_stage: int) -> dict:
    from engine.runtime import dist
    from engine.train.build import build_trainer

    dist.init()
    # 40 images, global batch 8: 5 batches per epoch. A does 3 steps (mid-epoch), then is saved.
    a = build_trainer(_cfg(rec_dir, out_dir + "/a", zero_stage))
    for _ in range(3):
        a.train_step()
    state = a.state_dict()
    # B has trained differently (1 step) and read a different position before it is restored.
    b = build_trainer(_cfg(rec_dir, out_dir + "/b", zero_stage))
    b.train_step()
    stale = _batches(b, 1)[0]
    b.load_state_dict(state)
    restored = b.backbone.full_state_dict()
    out = {"step": b.step, "epoch": b.epoch, "position": b.data.state_dict()["position"],
           "weights_equal": all(torch.equal(restored[k], state["backbone"][k]) for k in restored),
           "head_equal": torch.equal(b.head.weight.detach().cpu(), state["head"]["weight"])}
    # the next training step (position 3) and the 4 batches after it (crossing into epoch 1) must match
    out["loss"] = (float(a.train_step()), float(b.train_step()))
    after_a, after_b = a.backbone.full_state_dict(), b.backbone.full_state_dict()
    out["max_weight_diff"] = max(float((after_a[k].float() - after_b[k].float()).abs().max()) for k in after_a)
    out["moved"] = max(float((after_a[k].float() - state["backbone"][k].float()).abs().max()) for k in after_a)
    out["head_diff"] = float((a.head.weight - b.head.weight).abs().max())
    out["batches"] = (_batches(a, 4), _batches(b, 4))
    out["stale"] = stale
    a.close()
    return out


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_restored_trainer_continues_exactly(shared_data, tmp_path, zero_stage):
    results = run_distributed(_resume, 2, str(shared_data / "recordio_golden"), str(tmp_path), zero_stage,
                              timeout_s=600)
    for r in results:
        assert (r["step"], r["epoch"], r["position"]) == (3, 0, 3)
        assert r["weights_equal"] and r["head_equal"]
        loss_a, loss_b = r["loss"]
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        assert r["moved"] > 1e-4  # the step changed the weights ...
        assert r["max_weight_diff"] <= 1e-6 * max(1.0, r["moved"]) and r["head_diff"] <= 1e-6  # ... identically
        batches_a, batches_b = r["batches"]
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        # B's own next batch before the restore was a different one (so the comparison can fail)
        assert not torch.equal(r["stale"][0], batches_a[0][0])
    # the two ranks read disjoint shards
    assert not torch.equal(results[0]["batches"][0][0][1], results[1]["batches"][0][0][1])


# -- one owner of state: in-memory restore restores everything -------------------------------------------------

def _sampled_cfg(out_dir: str, stage: int):
    """Sampled Partial FC (rate 0.1 of 64 classes), SGD momentum, dropout: every piece of state matters."""
    from engine.config import schema as config
    from tests.support.configs import tiny_r18_config

    raw = tiny_r18_config(out_dir, 2, stage, max_steps=10, sample_rate=0.1, dropout=0.3)
    raw["engine"]["head"]["num_classes"] = 64
    raw["engine"]["optim"]["lr"] = 0.02
    return config.from_dict(raw)


def _in_memory_stop_and_restore(out_dir: str, stage: int) -> dict:
    """A: 2 steps, snapshot in memory, 2 more. B: a different history (1 step), restored from A's snapshot, 2
    steps. B's last two steps must be A's, bit for bit."""
    from engine.runtime import dist
    from engine.train.build import build_trainer

    dist.init()
    a = build_trainer(_sampled_cfg(out_dir + "/a", stage))
    for _ in range(2):
        a.train_step()
    snapshot = a.state_dict()
    losses_a = [float(a.train_step()) for _ in range(2)]
    b = build_trainer(_sampled_cfg(out_dir + "/b", stage))
    b.train_step()
    b.load_state_dict(snapshot)
    losses_b = [float(b.train_step()) for _ in range(2)]
    wa, wb = a.backbone.full_state_dict(), b.backbone.full_state_dict()
    oa, ob = a.backbone.optimizer_state(everywhere=True), b.backbone.optimizer_state(everywhere=True)
    head_rows = {k: (v, b.head_optimizer.state[b.head.weight][k])
                 for k, v in a.head_optimizer.state[a.head.weight].items() if torch.is_tensor(v)}
    out = {
        "losses": (losses_a, losses_b),
        "weights_equal": [k for k in wa if not torch.equal(wa[k], wb[k]) and "running" not in k
                          and "num_batches" not in k],
        "momentum_equal": [k for k in oa["state"] if not torch.equal(oa["state"][k]["momentum_buffer"],
                                                                     ob["state"][k]["momentum_buffer"])],
        "head_equal": torch.equal(a.head.weight.detach(), b.head.weight.detach()),
        "head_rows_equal": all(torch.equal(x, y) for x, y in head_rows.values()) and bool(head_rows),
        "head_step": (a.head.step, b.head.step),
        "moved": float(max((wa[k] - snapshot["backbone"][k]).abs().max() for k in wa if "running" not in k
                           and "num_batches" not in k)),
    }
    a.close(), b.close()
    return out


@pytest.mark.parametrize("stage", [0, 3])
def test_in_memory_restore_is_bitwise(tmp_path, stage):
    for r in run_distributed(_in_memory_stop_and_restore, 2, str(tmp_path), stage, timeout_s=600):
        assert r["losses"][0] == r["losses"][1]
        assert r["weights_equal"] == [] and r["momentum_equal"] == []
        assert r["head_equal"] and r["head_rows_equal"] and r["head_step"][0] == r["head_step"][1] == 4
        assert r["moved"] > 1e-4  # the two steps after the restore did change the weights


def _resume_with_missing_parts(out_dir: str, capsys_path: str) -> list:
    """Save a checkpoint, delete its RNG files and data position, resume: the warning names both."""
    import json
    import os
    import sys

    from engine.runtime import dist
    from engine.state import checkpoint
    from engine.train.build import build_trainer

    dist.init()
    a = build_trainer(_sampled_cfg(out_dir, 0))
    a.train_step()
    path = checkpoint.save(a)
    a.close()
    dist.barrier()
    if dist.get_rank() == 0:
        for name in os.listdir(path):
            if name.startswith("rng_rank"):
                os.remove(path / name)
        meta = json.loads((path / "meta.json").read_text())
        meta["data"] = None
        (path / "meta.json").write_text(json.dumps(meta))
    dist.barrier()
    b = build_trainer(_sampled_cfg(out_dir + "/b", 0))
    stderr, sys.stderr = sys.stderr, open(capsys_path + f".{dist.get_rank()}", "w")
    try:
        checkpoint.load(b, path)
    finally:
        sys.stderr.close()
        sys.stderr = stderr
    b.close()
    return [b.step]


def test_resume_names_what_it_could_not_restore(tmp_path):
    steps = run_distributed(_resume_with_missing_parts, 2, str(tmp_path), str(tmp_path / "err"), timeout_s=600)
    assert steps == [[1], [1]]
    warning = (tmp_path / "err.0").read_text()
    assert "without restoring" in warning and "RNG state" in warning and "data position" in warning, warning
    assert (tmp_path / "err.1").read_text() == ""  # one warning for the job, from rank 0
