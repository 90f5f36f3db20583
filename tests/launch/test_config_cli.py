"""Config errors from the command line: `python run.py` checks a whole config quickly without a process group, and
under the `deepspeed` launcher a config error stops every rank with the one-line message.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.runtime.dist import find_free_port

ROOT = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_whole_check_is_fast_without_process_group():
    """Every recipe through the whole check in a fresh interpreter, imports included: under 5 s, and no process
    group exists afterwards (a functional bound; generous: ~2 s of CPU, nearly all of it importing torch
    and deepspeed). Measured as the process's CPU time, so it bounds the work done, not how busy a shared
    machine is (wall time on a 2-core host at load 4 was ~3.3 s)."""
    import subprocess
    import sys

    code = (
        "import glob, json, time\n"
        "t0, c0 = time.perf_counter(), time.process_time()\n"
        "from engine import config\n"
        f"paths = sorted(glob.glob({str(ROOT / 'ds_configs' / '*.json')!r}))\n"
        "for p in paths:\n"
        "    config.load(p)\n"
        "cpu, wall = time.process_time() - c0, time.perf_counter() - t0\n"
        "import torch.distributed as dist\n"
        "print(json.dumps({'cpu': cpu, 'wall': wall, 'n': len(paths), 'pg': dist.is_initialized()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == len(ALL_CONFIGS) >= 8
    assert result["pg"] is False
    assert result["cpu"] < 5.0, result


def test_config_error_stops_every_rank(tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(find_free_port()), "run.py",
           "--config", "ds_configs/quickstart.json", "--set", "engine.head.smaple_rate=0.5"]
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown key 'engine.head.smaple_rate'; did you mean 'sample_rate'" in proc.stdout + proc.stderr
