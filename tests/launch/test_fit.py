"""engine.plan --fit as a command on this machine (the time model calibrated here, on spawned ranks), and the
settings it chooses trained through the real `deepspeed` launcher on 2 CPU ranks: the measured peak RSS
against the budget the search was given. (The search as planning: tests/unit/test_fit.py.)
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import launching as L

ROOT = Path(__file__).resolve().parents[2]
GiB = 2 ** 30
# The recipes' step on synthetic data (their datasets are not here), without checkpoints, exports or evaluation:
# the measured peak is the training step's.
NO_DATASET_NO_SAVES = ["engine.data.source=synthetic", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
                       "engine.checkpoint.export=false", "engine.eval.targets=[]"]


def _fit(config: str, budget_gb: float, out: Path, *overrides: str) -> str:
    """`python -m engine.plan --fit --device cpu --world-size 2 --write out`; the printed answer."""
    cmd = [sys.executable, "-m", "engine.plan", "--config", config, "--world-size", "2", "--gpu-mem-gb",
           str(budget_gb), "--device", "cpu", "--fit", "--write", str(out)] + L.sets(*overrides)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "time model: measured on 2 rank(s)" in proc.stdout
    return proc.stdout


def _precision_sets():
    """bf16 as the recipes ship where this CPU has native bf16, else fp32 (bf16 would be 30-130x slower)."""
    from engine.perf import hardware

    return [] if hardware.cpu_has_native_bf16() else ["torch_autocast.enabled=false"]


def test_r50_with_a_generous_budget_trains_unsharded_and_uncheckpointed(tmp_path):
    """From a config that shards and checkpoints everything (ZeRO-3, every block): at 16 GiB per rank the
    search picks ZeRO-0 without checkpointing (the time model measured here), and that config trains 2 steps
    under the budget."""
    written = tmp_path / "r50_fit.json"
    sets = ["engine.data.source=synthetic", "engine.head.num_classes=93431", "zero_optimization.stage=3",
            'engine.model.checkpoint="all"', "train_micro_batch_size_per_gpu=4",
            "engine.train.max_steps=2", "engine.train.log_every=1", *NO_DATASET_NO_SAVES, *_precision_sets()]
    text = _fit("ds_configs/r50.json", 16, written, *sets)
    raw = json.loads(written.read_text())
    assert raw["zero_optimization"]["stage"] == 0 and raw["engine"]["model"]["checkpoint"] == {}, text
    assert raw["train_micro_batch_size_per_gpu"] * raw["gradient_accumulation_steps"] == 4
    out = tmp_path / "run"
    L.run_deepspeed(str(written), out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["zero_stage"] == 0 and math.isfinite(summary["final_loss"])
    assert max(summary["peak_memory_bytes_per_rank"]) < 16 * GiB


@pytest.mark.slow
def test_r2060_at_6_gib_per_rank_fits_and_trains(tmp_path):
    """r2060 on 2 CPU ranks with 6 GiB each: the recipe as shipped (ZeRO-3) plans ~9.9 GiB and ZeRO 0-3 cannot
    fit at all (DeepSpeed keeps a second fp32 copy of the partition), so the search must find an FSDP2 setting;
    that written config trains 2 steps with a measured peak RSS under 6 GiB, and the plan of it is within 20% of
    the measurement. SGD without momentum and micro-batch 2 as the other r2060 tests (the fp32 shards, their
    gradients and momentum would be 3 x 2.1 GiB per rank: more than 6 GiB before any activation). This is also the
    suite's run of the real r2060 under FSDP2 with activation checkpointing (ZeRO-3's is tests/launch/test_r2060.py),
    bf16 as shipped where the CPU has native bf16, else fp32."""
    from engine.config import schema as config
    from engine.perf import planner

    written = tmp_path / "r2060_fit.json"
    sets = ["engine.data.source=synthetic", "train_micro_batch_size_per_gpu=2", "engine.optim.momentum=0.0",
            "engine.head.num_classes=1000",
            "engine.train.max_steps=2", "engine.train.log_every=1", *NO_DATASET_NO_SAVES, *_precision_sets()]
    as_shipped = planner.plan(config.load("ds_configs/r2060.json", sets), 2, device="cpu")
    assert as_shipped.total_bytes > 6 * GiB
    text = _fit("ds_configs/r2060.json", 6, written, *sets)
    chosen = config.load(written)
    assert chosen.engine.train.backend == "fsdp" and chosen.engine.model.checkpoint, text
    assert chosen.global_batch_size(2) == 4
    out = tmp_path / "run"
    L.run_deepspeed(str(written), out, timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["backbone"] == "r2060" and math.isfinite(summary["final_loss"])
    peaks = summary["peak_memory_bytes_per_rank"]
    assert summary["peak_memory_kind"] == "rss" and len(peaks) == 2
    assert max(peaks) < 6 * GiB, [p / GiB for p in peaks]
    predicted = planner.plan(chosen, 2, device="cpu").total_bytes
    assert abs(predicted / max(peaks) - 1) <= 0.20, (predicted / GiB, max(peaks) / GiB)


@pytest.mark.slow
def test_10m_classes_at_6_gib_per_rank_stores_the_head_in_16_bits_and_trains(tmp_path):
    """The 10M-class recipe on 2 CPU ranks with 6 GiB each: its fp32 class centres and their momentum alone are
    4.8 GiB per rank, so no setting with fp32 centres fits (tests/unit/test_fit.py asserts it) and the search
    stores the centres in 16 bits (on a CPU the host is the device: offloading them changes nothing). The written
    config trains 2 steps with a measured peak RSS under the budget."""
    from engine.config import schema as config

    written = tmp_path / "10m_fit.json"
    sets = ["engine.train.max_steps=2", "engine.train.log_every=1", "engine.checkpoint.every=0",
            "engine.checkpoint.every_minutes=0", "engine.checkpoint.export=false", "engine.eval.bins=[]"]
    text = _fit("ds_configs/10m_classes.json", 6, written, *sets)
    chosen = config.load(written)
    assert chosen.engine.head.storage_dtype in ("bf16", "fp16"), text
    assert chosen.global_batch_size(2) == config.load("ds_configs/10m_classes.json", sets).global_batch_size(2)
    out = tmp_path / "run"
    L.run_deepspeed(str(written), out, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    peaks = summary["peak_memory_bytes_per_rank"]
    assert summary["peak_memory_kind"] == "rss" and len(peaks) == 2
    assert max(peaks) < 6 * GiB, [p / GiB for p in peaks]
