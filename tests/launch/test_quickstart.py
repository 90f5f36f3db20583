"""The quick start as the README runs it: `deepspeed --num_gpus 2 run.py --config ds_configs/quickstart.json`
(2 CPU ranks under gloo; GPUs under nccl), all its steps and its verification pass.
"""
import json
from pathlib import Path

from tests.support import launching as L

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_through_launcher(tmp_path):
    """The default job: mbf on the embedded demo identities (generated on first use), verification on the
    demo's held-out pairs. Loss must fall and held-out accuracy must rise from near chance to above 0.9."""
    out = tmp_path / "quickstart"
    proc = L.run_deepspeed("ds_configs/quickstart.json", out, timeout=1800)  # ~4 min alone; much longer on a busy box
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["engine"]["data"]["source"] == "demo" and summary["global_batch_size"] == 32
    assert summary["steps"] == resolved["engine"]["train"]["max_steps"] >= 80
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["samples_per_sec"] > 0 and len(summary["peak_memory_bytes_per_rank"]) == 2
    assert "samples/s" in proc.stdout and "loss" in proc.stdout
    evals = [(r["step"], r["eval"]["val"]["acc_mean"]) for r in records if "eval" in r]
    assert evals[0][0] == 0 and evals[-1][0] == summary["steps"], evals
    assert evals[0][1] < 0.8 and evals[-1][1] > 0.9, evals  # untrained about 0.7 (see make_demo), trained > 0.9
    final = summary["eval"]["val"]["final"]
    assert final["step"] == summary["steps"] and final["acc_mean"] == evals[-1][1] > 0.9
    assert summary["eval"]["val"]["best"]["acc_mean"] == max(acc for _, acc in evals)
    assert f"eval step {summary['steps']} val: acc" in proc.stdout
