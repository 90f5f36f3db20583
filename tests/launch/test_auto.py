"""`engine.auto: true` through the real `deepspeed` launcher on 2 CPU ranks: the job chooses its own settings at
start-up (engine/train/auto.py), records them in config.json and summary.json, and trains with the same losses
as the same settings written by hand (the reference: a run of the config with the recorded keys set and
engine.auto off). A job whose memory nothing fits is refused before the process group, in one line.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.support import launching as L

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["engine.train.max_steps=3", "engine.train.log_every=1", "engine.checkpoint.export=false",
         "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0"]


def _auto_then_by_hand(tmp_path: Path, config: str, *sets: str) -> dict:
    """Run `config` with engine.auto on, then with the keys it chose set by hand (auto off); the same losses at
    every step. Returns the auto run's record from summary.json."""
    auto_out, hand_out = tmp_path / "auto", tmp_path / "by_hand"
    L.run_deepspeed(config, auto_out, *sets, "engine.auto=true", *SHORT)
    summary = json.loads((auto_out / "summary.json").read_text())
    record = summary["auto"]
    resolved = json.loads((auto_out / "config.json").read_text())
    assert resolved["engine"]["auto"] is True
    written = [o for o in sets if not o.startswith("engine.auto_mem_gb")]
    L.run_deepspeed(config, hand_out, *written, *record["overrides"], *SHORT)
    by_hand = json.loads((hand_out / "config.json").read_text())
    for doc in (resolved, by_hand):  # the same settings, but for the auto keys themselves
        doc["engine"].pop("auto"), doc["engine"].pop("auto_mem_gb")
        doc["engine"]["train"].pop("output_dir")
    assert resolved == by_hand
    auto_losses, hand_losses = L.losses(auto_out), L.losses(hand_out)
    assert sorted(auto_losses) == [1, 2, 3] and all(math.isfinite(v) for v in auto_losses.values())
    assert auto_losses == hand_losses
    return record


def test_auto_on_the_quickstart_trains_as_its_choice_written_by_hand(tmp_path):
    """The quickstart (mbf, ZeRO-0) on this host's memory: the choice is recorded with its prediction."""
    record = _auto_then_by_hand(tmp_path, "ds_configs/quickstart.json", "engine.eval.bins=[]")
    assert record["predicted_gib_per_rank"] <= record["budget_gib_per_rank"]
    assert record["time_model"].startswith("measured at start-up on 2 rank(s)")


def test_auto_on_the_r2060_recipe_with_a_stand_in_backbone(tmp_path):
    """ds_configs/r2060.json (ZeRO-3, layer2/20 + layer3/100 checkpointed segments, clipping) with r50 in place of
    r2060 (the same code path in a few seconds per step; fp32: deterministic on every CPU) and a budget of
    1.45 GiB per rank, where ZeRO-0 without checkpointing does not fit even at micro-batch 2: the job changes
    the recipe's settings and trains as the changed config does when written by hand."""
    record = _auto_then_by_hand(tmp_path, "ds_configs/r2060.json", "engine.data.source=synthetic",
                                "engine.eval.targets=[]", "engine.model.name=r50",
                                "train_micro_batch_size_per_gpu=4", "engine.head.num_classes=1000",
                                "torch_autocast.enabled=false", "engine.auto_mem_gb=1.45")
    assert record["overrides"], record
    assert record["setting"]["micro_batch"] * record["setting"]["gradient_accumulation_steps"] == 4


def test_auto_refuses_in_one_line_when_nothing_fits(tmp_path):
    out = tmp_path / "refused"
    proc = subprocess.run([sys.executable, "run.py", "--config", "ds_configs/quickstart.json",
                           *L.sets("engine.auto=true", "engine.auto_mem_gb=0.3", f"engine.train.output_dir={out}")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1 and "engine.auto: nothing fits 0.3 GiB per rank" in errors[0], proc.stderr
    assert "it would fit with" in errors[0] and "engine.auto_mem_gb" in errors[0]
    assert not out.exists()
