"""Trainer.load_state_dict: a trainer restored from another's mid-epoch state continues exactly where that one
would have: the same next batches (loader position from rank 0's state on every rank), the same weights, and,
with a stateless optimizer (SGD without momentum), the same next training step."""
import pytest
import torch

from engine.spawn import run_distributed


def _cfg(rec_dir: str, out_dir: str, zero_stage: int):
    from engine import config

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
    from engine import dist, parallel
    from engine.trainer import Trainer

    dist.init()
    # 40 images, global batch 8: 5 batches per epoch. A does 3 steps (mid-epoch), then is saved.
    a = Trainer(_cfg(rec_dir, out_dir + "/a", zero_stage))
    for _ in range(3):
        a.train_step()
    state = a.state_dict()
    state["data"] = dist.all_gather_object(state["data"])[0]  # rank 0's loader state resumes every rank
    # B has trained differently (1 step) and read a different position before it is restored.
    b = Trainer(_cfg(rec_dir, out_dir + "/b", zero_stage))
    b.train_step()
    stale = _batches(b, 1)[0]
    b.load_state_dict(state)
    restored = parallel.full_state_dict(b.model_engine)
    out = {"step": b.step, "epoch": b.epoch, "position": b.data.state_dict()["position"],
           "weights_equal": all(torch.equal(restored[k], state["backbone"][k]) for k in restored),
           "head_equal": torch.equal(b.head.weight.detach().cpu(), state["head"]["weight"])}
    # the next training step (position 3) and the 4 batches after it (crossing into epoch 1) must match
    out["loss"] = (float(a.train_step()), float(b.train_step()))
    after_a, after_b = parallel.full_state_dict(a.model_engine), parallel.full_state_dict(b.model_engine)
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
