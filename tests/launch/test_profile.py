"""engine.profile as a command: a sweep through the real `deepspeed` launcher writes one profile per setting.
(The profile's contents on spawned ranks, against hand counts: tests/distributed/test_profile.py.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.profiling import tiny_profile_config

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_through_the_launcher(tmp_path):
    """--world-sizes 1,2 launches both sizes through the deepspeed launcher and reports both."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_profile_config(str(tmp_path / "run"))))
    cmd = [sys.executable, "-m", "engine.profile", "--config", str(cfg), "--steps", "1", "--warmup", "1",
           "--world-sizes", "1,2", "--peak-tflops", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())
    assert sweep["kind"] == "sweep" and sweep["world_sizes"] == [1, 2]
    one, two = sweep["runs"]
    assert one["efficiency"] == pytest.approx(1.0) and two["efficiency"] == pytest.approx(
        two["samples_per_s"] / (2 * one["samples_per_s"]))
    for run in sweep["runs"]:
        sub = json.loads(Path(run["profile"]).read_text())
        assert sub["run"]["world_size"] == run["world_size"]
    assert "world 2:" in proc.stdout and "efficiency" in proc.stdout
