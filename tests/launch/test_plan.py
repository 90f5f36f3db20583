"""engine.plan as a command (`python -m engine.plan`), and its predictions against launched runs: the 10M-class
recipe (ds_configs/10m_classes.json) at 1M classes, and FSDP2's peak RSS of a 2-rank run within 20%.
(The planner's arithmetic against hand-computed cases and published numbers: tests/unit/test_plan.py.)
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import schema as config
from engine.perf import planner as plan
from tests.support import launching as L
from tests.support.planning import fsdp_config

ROOT = Path(__file__).resolve().parents[2]
GiB = 2 ** 30


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_prints_the_table():
    proc = _cli("--config", "ds_configs/10m_classes.json", "--world-size", "2", "--device", "cpu",
                "--gpu-mem-gb", "11", "--peak-tflops", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("head weights", "head optimizer state", "head logits", "activations", "workspace", "runtime",
                 "total on device", "largest class count that fits", "largest micro-batch that fits",
                 "FLOPs per image", "best-case throughput", "10,000,000 classes"):
        assert text in out, out
    weights = next(line for line in out.splitlines() if line.startswith("head weights"))
    assert float(weights.split()[2]) == pytest.approx(5_000_000 * 128 * 4 / GiB, abs=1e-3)


def test_cli_config_errors():
    proc = _cli("--config", "ds_configs/10m_classes.json", "--world-size", "2", "--set", "engine.head.smaple_rate=0.1")
    assert proc.returncode == 2
    assert "unknown key 'engine.head.smaple_rate'; did you mean 'sample_rate'" in proc.stderr
    proc = _cli("--config", "ds_configs/10m_classes.json", "--world-size", "0")
    assert proc.returncode == 2 and "world_size: expected an integer >= 1, got 0" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# The 10M-class recipe, at 1M classes through the launcher: the planner's measured CPU reference
# ---------------------------------------------------------------------------------------------------------------

RECIPE_10M = "ds_configs/10m_classes.json"
OVERRIDES_1M = ("engine.head.num_classes=1000000", "train_micro_batch_size_per_gpu=8", "engine.train.max_steps=12",
                "engine.train.log_every=2")


def test_one_million_classes_through_launcher(tmp_path):
    """The full 10M run takes ~15 minutes and ~7.5 GiB per rank here, so it lives in bench/run_10m.py
    (BENCHMARKS.md). This runs the same recipe at 1,000,000 classes, micro-batch 8 and 12 steps (CI: 2 cores,
    3 minutes) and checks what the issue asks of the 10M run -- finite falling loss, each rank's peak RSS in
    summary.json -- and that engine.plan predicts that peak within 20%."""
    out = tmp_path / "pfc1m"
    L.run_deepspeed(RECIPE_10M, out, *OVERRIDES_1M, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12 and summary["num_classes"] == 1_000_000
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    # falling: the last two logged losses both well below the first (the demo identities are being learned)
    assert max(losses[-2:]) < losses[0] - 0.5, losses
    peaks = summary["peak_memory_bytes_per_rank"]
    assert summary["peak_memory_kind"] == "rss" and len(peaks) == 2 and min(peaks) > 0

    cfg = config.load(RECIPE_10M, list(OVERRIDES_1M))
    predicted = plan.plan(cfg, 2, device="cpu").total_bytes
    measured = max(peaks)
    assert abs(predicted / measured - 1) <= 0.20, (predicted / GiB, measured / GiB)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (engine.train.backend: fsdp)
# ---------------------------------------------------------------------------------------------------------------

def test_fsdp_cli_and_unknown_backend():
    proc = _cli("--config", "ds_configs/r2060_fsdp.json", "--world-size", "16", "--ranks-per-node", "8",
                "--set", "engine.fsdp.hybrid=true")
    assert proc.returncode == 0, proc.stderr
    assert "FSDP2 (reshard_after_forward, hybrid)" in proc.stdout
    assert "/ 8 (hybrid: 8 per node, replicated x 2)" in proc.stdout
    cfg = fsdp_config()
    cfg.engine.train.backend = "ddp"
    with pytest.raises(ValueError, match=r"engine.train.backend: the planner knows \['deepspeed', 'fsdp'\], got 'ddp'"):
        plan.plan(cfg, 2)


FSDP_MEASURED = ("engine.train.backend=fsdp", "engine.fsdp.reshard_after_forward=false", "engine.optim.name=adamw",
                 "engine.optim.lr=0.001", "torch_autocast.enabled=false", "train_micro_batch_size_per_gpu=2",
                 "engine.train.max_steps=3", "engine.train.log_every=1", "engine.head.num_classes=1000",
                 "engine.data.source=synthetic", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
                 "engine.checkpoint.export=false", "engine.eval.targets=[]")


def test_fsdp_prediction_within_20_percent_of_a_2_rank_run(tmp_path):
    """r100 under FSDP2 through the launcher and the trainer (2 CPU ranks, fp32, AdamW, parameters kept gathered
    from forward to backward, 3 steps, ~75 s here): the FSDP rows (fp32 shards, gradient shards, AdamW moments,
    the whole model gathered) are ~0.7 of the ~1.7 GiB planned, so a wrong formula shows. Peak RSS per rank from
    summary.json, as for the DeepSpeed run above."""
    out = tmp_path / "r100_fsdp"
    L.run_deepspeed("ds_configs/r100.json", out, *FSDP_MEASURED, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    resolved = json.loads((out / "config.json").read_text())["engine"]
    assert resolved["train"]["backend"] == "fsdp" and resolved["fsdp"]["reshard_after_forward"] is False
    peaks = summary["peak_memory_bytes_per_rank"]
    assert summary["peak_memory_kind"] == "rss" and len(peaks) == 2 and min(peaks) > 0
    cfg = config.load("ds_configs/r100.json", list(FSDP_MEASURED))
    p = plan.plan(cfg, 2, device="cpu")
    fsdp_rows = sum(p.row(n).bytes for n in ("backbone parameters", "backbone gradients",
                                               "backbone optimizer state", "gathered parameters"))
    assert fsdp_rows > 0.35 * p.total_bytes
    measured = max(peaks)
    assert abs(p.total_bytes / measured - 1) <= 0.20, (p.total_bytes / GiB, measured / GiB)
