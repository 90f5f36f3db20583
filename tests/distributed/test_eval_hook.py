"""The verification training hook: split across ranks and gathered, it must give exactly what a single process
computes with engine.verification.verify_bin on the same weights and file, whatever the world size; its
results must land in metrics.jsonl and summary.json. (Bad configuration failing before training:
tests/unit/test_eval_hook.py.)"""
import json

import numpy as np
import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import eval_hook_config


def _train_and_evaluate(bin_path: str, out_dir: str, zero_stage: int) -> dict:
    """Two training steps on synthetic data, evaluated at steps 0 and 2 (batch 7: padded slices).

    Rank-local BatchNorm statistics differ after training; the hook must evaluate with rank 0's.
    """
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.build import build_trainer
    from engine.train.hooks import VerificationHook

    dist.init()
    raw = eval_hook_config()
    raw["zero_optimization"] = {"stage": zero_stage}
    raw["engine"]["eval"]["bins"] = [bin_path]
    raw["engine"]["train"]["output_dir"] = out_dir
    trainer = build_trainer(config.from_dict(raw))
    state0 = trainer.backbone.full_state_dict()
    trainer.train()
    module = trainer.backbone.module
    state = trainer.backbone.full_state_dict()
    hook = trainer.hook(VerificationHook)
    with torch.no_grad():  # the gathered embeddings themselves, to compare element by element
        raw = hook._embed(trainer.backbone, hook.sets[0], trainer.device)
    # An extra evaluation must leave the model in train mode and rank 0's BatchNorm statistics untouched
    # (eval mode: no update), and give the other ranks rank 0's.
    before = {k: v.clone() for k, v in module.named_buffers()}
    extra = hook.run(trainer, 99)
    after = {k: v.clone() for k, v in module.named_buffers()}
    trainer.close()
    return {
        "history": hook.history,
        "extra": extra,
        "training_after_eval": module.training,
        "buffers": (before, after),
        "raw": raw,
        "states": (state0, state) if dist.get_rank() == 0 else None,
    }


def _model(state: dict) -> torch.nn.Module:
    import backbones

    model = backbones.build_backbone("mbf", embedding_size=32)
    model.load_state_dict(state)
    return model.train()


def _reference(state: dict, bin_path: str) -> dict:
    from engine.eval.verification import verify_bin

    return verify_bin(_model(state), bin_path, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """The golden pairs.bin (20 pairs, 40 images) evaluated on 2 ranks and on 1 rank, under ZeRO-3 (where every
    forward call is collective)."""
    bin_path = str(shared_data / "recordio_golden" / "pairs.bin")
    out = tmp_path_factory.mktemp("eval_hook")
    two = run_distributed(_train_and_evaluate, 2, bin_path, str(out / "w2"), 3, timeout_s=600)
    one = run_distributed(_train_and_evaluate, 1, bin_path, str(out / "w1"), 3, timeout_s=600)
    return bin_path, out, one, two


def _same(a: dict, ref: dict) -> None:
    assert a["acc_mean"] == ref["acc_mean"] and a["acc_std"] == ref["acc_std"]
    assert a["threshold"] == ref["threshold"]
    assert a["norm_mean"] == pytest.approx(ref["norm_mean"], rel=1e-5)
    assert a["norm_std"] == pytest.approx(ref["norm_std"], rel=1e-4, abs=1e-5)


def test_two_ranks_equal_single_process_reference(runs):
    """Per-image embeddings, accuracy, threshold and norms equal verify_bin's on rank 0's weights (the saved
    model). Before the hook used rank 0's BatchNorm statistics, rank 1's half was 13% off in norm."""
    from engine.eval.verification import decode_bin, extract_embeddings, load_bin

    bin_path, _, _, two = runs
    state0, state = two[0]["states"]
    ref0, ref = _reference(state0, bin_path), _reference(state, bin_path)
    images = decode_bin(load_bin(bin_path)[0])
    _, ref_raw = extract_embeddings(_model(state), images, 16, "cpu", return_raw=True)
    for rank in two:  # every rank holds the same, gathered result
        assert [h["step"] for h in rank["history"]] == [0, 2, 99]
        _same(rank["history"][0]["eval"]["pairs"], ref0)
        _same(rank["history"][1]["eval"]["pairs"], ref)
        _same(rank["extra"]["pairs"], ref)
        assert rank["raw"].shape == ref_raw.shape == (2, 40, 32)  # (plain, flipped) x images x embedding
        np.testing.assert_allclose(rank["raw"], ref_raw, rtol=1e-4, atol=1e-6 * np.abs(ref_raw).max())
        assert rank["training_after_eval"]
        rank0_before = two[0]["buffers"][0]
        assert all(torch.equal(rank["buffers"][1][k], rank0_before[k]) for k in rank0_before)
    # the untrained model separates these pairs (so accuracy and threshold above were not degenerate there)
    assert ref0["acc_mean"] > 0.8 and ref0["threshold"] > 0


def test_one_rank_equals_two_ranks_on_the_same_weights(runs):
    bin_path, _, one, two = runs
    # step 0: the untrained model, initialised identically whatever the world size and ZeRO stage
    a, b = one[0]["history"][0]["eval"]["pairs"], two[0]["history"][0]["eval"]["pairs"]
    assert one[0]["history"][0]["step"] == 0 and a["acc_mean"] == b["acc_mean"]
    assert a["threshold"] == b["threshold"] and a["norm_mean"] == pytest.approx(b["norm_mean"], rel=1e-5)
    _same(one[0]["history"][1]["eval"]["pairs"], _reference(one[0]["states"][1], bin_path))


def test_metrics_and_summary_entries(runs):
    _, out, _, two = runs
    records = [json.loads(line) for line in (out / "w2" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 99]  # at start, every 2, the extra call; none repeated at end
    assert any("loss" in r for r in records)
    history = two[0]["history"]
    for rec, hist in zip(evals, history):
        e = rec["eval"]["pairs"]
        assert e == pytest.approx(hist["eval"]["pairs"])
        assert set(e) >= {"acc_mean", "acc_std", "threshold", "best_acc", "best_step"}
    best = max(h["eval"]["pairs"]["acc_mean"] for h in history[:2])
    assert history[1]["eval"]["pairs"]["best_acc"] == best
    summary = json.loads((out / "w2" / "summary.json").read_text())
    s = summary["eval"]["pairs"]
    assert s["final"]["step"] == 2 and s["final"]["acc_mean"] == history[1]["eval"]["pairs"]["acc_mean"]
    assert s["best"]["acc_mean"] == best and s["num_pairs"] == 20
    # the untrained baseline (at_start) beside final and best
    assert s["start"] == {"step": 0, **{k: history[0]["eval"]["pairs"][k] for k in ("acc_mean", "acc_std",
                                                                                     "threshold")}}
