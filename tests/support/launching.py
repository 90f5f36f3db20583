"""Helpers of the launched tests (tests/launch): one tiny run config, the real launchers (`deepspeed`,
`python run.py`) as subprocesses, fault injection through tests/support/fault_run.py, what a run left in its
output folder (losses, model, checkpoint steps, non-finite tensors), and the uninterrupted reference run that
resumed, preempted and multi-node runs are compared with.

The reference is `run.main` on 2 gloo ranks in fresh processes (engine.runtime.spawn): the same code, process group
and thread count (1 per rank) as a 2-rank `deepspeed` launch, so a run that was preempted and resumed, or
launched as 2 nodes x 1 rank, must give the same losses and weights bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from engine.runtime.dist import find_free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(sys.executable).parent / "deepspeed"
STEPS = 6


def tiny_config(path: Path, out_dir: Path, **train) -> Path:
    """mbf (embedding 16), 11 classes, micro-batch 2 per rank, ZeRO-1, fp32, SGD with momentum, 6 steps,
    a checkpoint every 2 steps (3 kept), model.pt at the end. Written to `path` as JSON."""
    raw = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "engine": {
            "model": {"name": "mbf", "embedding_size": 16},
            "head": {"num_classes": 11, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
            "data": {"source": "synthetic", "synthetic": "prototypes"},
            "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly"},
            "train": {"max_steps": STEPS, "output_dir": str(out_dir), "log_every": 1, "seed": 5, **train},
            "checkpoint": {"every": 2, "keep": 3, "export": True},
        },
    }
    path.write_text(json.dumps(raw, indent=1))
    return path


def env(faults: Optional[dict] = None) -> Dict[str, str]:
    out = {**os.environ, "PATH": f"{LAUNCHER.parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    out.pop("ARCSCALE_TEST_FAULTS", None)
    if faults:
        out["ARCSCALE_TEST_FAULTS"] = json.dumps(faults)
    return out


def sets(*overrides: str) -> List[str]:
    return [a for o in overrides for a in ("--set", o)]


def deepspeed_cmd(config: Path, *overrides: str, num_ranks: int = 2, port: Optional[int] = None,
                  faults: bool = False, hostfile: Optional[Path] = None, node_rank: Optional[int] = None) -> List[str]:
    """The `deepspeed` command line of a run (tests/support/fault_run.py as the script when `faults`)."""
    cmd = [str(LAUNCHER)]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--master_addr", "127.0.0.1"]
    else:
        cmd += ["--num_gpus", str(num_ranks)]
    cmd += ["--master_port", str(port or find_free_port()), "tests/support/fault_run.py" if faults else "run.py",
            "--config", str(config)]
    return cmd + sets(*overrides)


def start(cmd: List[str], log: Path, faults: Optional[dict] = None, **kw) -> subprocess.Popen:
    """Start `cmd` in the repository root with stdout and stderr to `log`."""
    f = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(faults), stdout=f, stderr=subprocess.STDOUT, **kw)


def run(cmd: List[str], log: Path, faults: Optional[dict] = None, timeout: float = 600) -> int:
    proc = start(cmd, log, faults)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def python_cmd(config: Path, *overrides: str, faults: bool = False) -> List[str]:
    """`python run.py` (a world of one, no launcher)."""
    script = "tests/support/fault_run.py" if faults else "run.py"
    return [sys.executable, script, "--config", str(config)] + sets(*overrides)


def run_deepspeed(config: str, out: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 run.py --config CONFIG` with output_dir `out`, the environment as it is (threads
    per rank as the launcher sets them); fails the test with the output's tail unless it exits 0."""
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(find_free_port()), "run.py",
           "--config", config] + sets(f"engine.train.output_dir={out}", *overrides)
    env = {**os.environ, "PATH": f"{LAUNCHER.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def losses(out_dir: Path) -> Dict[int, float]:
    """step -> loss of every metrics.jsonl line (a resumed run appends to the same file)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def model(out_dir: Path) -> Dict[str, torch.Tensor]:
    return torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_same_model(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if "running_" in key or "num_batches" in key:
            continue  # BatchNorm statistics are rank 0's own (engine.checkpoint); they do not steer training
        assert torch.equal(a[key], b[key]), key


def checkpoint_steps(out_dir: Path) -> List[int]:
    """The steps of the checkpoints under out_dir/checkpoints (step_<N> folders), ascending."""
    return sorted(int(p.name[5:]) for p in (out_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def non_finite_files(directory: Path) -> List[str]:
    """Names of the tensor files (*.pt) under `directory` holding a non-finite value (empty: all finite)."""
    bad = []
    for path in sorted(directory.rglob("*.pt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = obj.values() if isinstance(obj, dict) else [obj]
        stack = list(tensors)
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif torch.is_tensor(item) and item.is_floating_point() and not torch.isfinite(item).all():
                bad.append(str(path))
                break
    return bad


_NOISE = re.compile(r"\] \[(INFO|WARNING)\] \[(?!launch\.py:\d+:sigkill)|FutureWarning|^\s*return func\(")


def excerpt(log: str, limit: int = 2500) -> str:
    """What explains a launched run's failure, for an assertion message: the log without DeepSpeed's INFO and
    WARNING lines (its report of which rank ended how is kept) and deprecation warnings: the ranks' own lines,
    tracebacks and crash stacks, the last `limit` characters of them, one line per line."""
    lines = [line for line in log.splitlines() if line.strip() and not _NOISE.search(line)]
    text = "\n".join(lines)
    return text if len(text) <= limit else "...\n" + text[-limit:]


def wait_for(paths: List[Path], procs: List[subprocess.Popen], timeout: float = 300) -> None:
    """Wait until every path exists; fail early (with the exit codes) when a process ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        ended = [(p.args[:3], p.returncode) for p in procs if p.poll() is not None]
        assert not ended, f"a run ended before {[str(p) for p in paths]} appeared: {ended}"
        assert time.monotonic() < deadline, f"{[str(p) for p in paths]} did not appear within {timeout} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
# The uninterrupted reference
# ---------------------------------------------------------------------------------------------------------------

def main_in_process(argv: List[str], faults: Optional[dict] = None, stderr_to: Optional[str] = None) -> int:
    """`run.main(argv)` on this rank (for engine.runtime.spawn.run_distributed), with tests/support/fault_run.py's
    faults, and this rank's stderr written to ``<stderr_to>.<rank>`` when given (a rank that fails exits at once, so its
    message is only there)."""
    if faults:
        from tests.support import fault_run

        fault_run.install(faults)
    if stderr_to:
        sys.stderr = open(f"{stderr_to}.{os.environ['RANK']}", "w", buffering=1)
    import run

    try:
        return run.main(argv)
    finally:
        from engine.runtime import faults as engine_faults

        engine_faults.STOP.clear()
        if stderr_to:
            sys.stderr.close()
            sys.stderr = sys.__stderr__


_REFERENCE: Dict[str, Path] = {}


def reference(tmp_path_factory) -> Path:
    """The output_dir of the tiny config trained straight through on 2 ranks (made once per test session)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _REFERENCE:
        from engine.runtime.spawn import run_distributed

        root = tmp_path_factory.mktemp("reference")
        config = tiny_config(root / "tiny.json", root / "out")
        codes = run_distributed(main_in_process, 2, ["--config", str(config)], timeout_s=600)
        assert codes == [0, 0], codes
        _REFERENCE[key] = root / "out"
    return _REFERENCE[key]
