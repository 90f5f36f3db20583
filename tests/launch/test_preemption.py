"""Preemption through the real `deepspeed` launcher: SIGTERM to the launcher's PID (whose one-node
runner does not forward it) and SIGINT to one rank both stop every rank at one step boundary with a checkpoint
and a distinct exit status; `resume=auto` then finishes the run, and the three pieces together equal the
uninterrupted run (tests/support/launching.reference) step for step: the same loss at every step, the same weights.
"""
import json
import signal
import subprocess
import time

import psutil

from engine.runtime.faults import EXIT_PREEMPTED
from tests.support import launching as L


def _cmdline(p: psutil.Process) -> list:
    """The process's command line; [] for one that has exited meanwhile (the runner's short-lived helpers can be
    caught between exiting and being reaped)."""
    try:
        return p.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


def _launched(launcher: subprocess.Popen, num_ranks: int, timeout: float = 120) -> list:
    """The processes under a `deepspeed` runner (launch.py and the ranks), once all ranks have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = psutil.Process(launcher.pid).children(recursive=True)
        if sum(len(c) > 2 and c[2].endswith("run.py") for c in map(_cmdline, procs)) == num_ranks:
            return [p for p in procs if _cmdline(p)]
        time.sleep(0.2)
    raise AssertionError("the launcher did not start its ranks")


def test_signals_stop_every_rank_with_a_checkpoint_and_resume_loses_no_step(tmp_path, tmp_path_factory):
    reference = L.reference(tmp_path_factory)
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)

    # 1. SIGTERM to the launcher (the PID a scheduler signals) while the ranks wait after step 2.
    pause = tmp_path / "pause1"
    faults = {"pause_after_step": 2, "pause_file": str(pause)}
    launcher = L.start(L.deepspeed_cmd(config, faults=True), tmp_path / "run1.log", faults)
    procs = _launched(launcher, 2)
    L.wait_for([tmp_path / "pause1.ready0", tmp_path / "pause1.ready1"], [launcher])
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    time.sleep(3)  # the ranks' launcher watch polls every second
    pause.write_text("go")
    gone, alive = psutil.wait_procs(procs, timeout=300)
    log1 = (tmp_path / "run1.log").read_text()
    assert not alive, f"ranks still running after the launcher's SIGTERM:\n{L.excerpt(log1)}"
    stopped_at = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert stopped_at == ["step_00000002", "step_00000003"], f"{stopped_at}\n{L.excerpt(log1)}"
    assert "deepspeed runner" in log1 and "died" in log1 and "stopping at step 3/6" in log1, L.excerpt(log1)
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()

    # 2. resume=auto, then SIGINT to rank 1 alone while the ranks wait after step 4: the launcher exits 3.
    pause = tmp_path / "pause2"
    faults = {"pause_after_step": 4, "pause_file": str(pause)}
    launcher = L.start(L.deepspeed_cmd(config, "engine.checkpoint.resume=auto", faults=True), tmp_path / "run2.log",
                       faults)
    procs = _launched(launcher, 2)
    L.wait_for([tmp_path / "pause2.ready0", tmp_path / "pause2.ready1"], [launcher])
    rank1 = int((tmp_path / "pause2.ready1").read_text())
    psutil.Process(rank1).send_signal(signal.SIGINT)
    time.sleep(1)
    pause.write_text("go")
    code = launcher.wait(timeout=300)
    log2 = (tmp_path / "run2.log").read_text()
    assert code == EXIT_PREEMPTED, f"the launcher exited {code}, not {EXIT_PREEMPTED}:\n{L.excerpt(log2)}"
    assert "received SIGINT" in log2 and "stopping at step 5/6" in log2, L.excerpt(log2)
    assert (out / "checkpoints" / "step_00000005" / "meta.json").is_file()

    # 3. resume=auto to the end.
    code = L.run(L.deepspeed_cmd(config, "engine.checkpoint.resume=auto"), tmp_path / "run3.log")
    assert code == 0, L.excerpt((tmp_path / "run3.log").read_text())
    assert L.losses(out) == L.losses(reference)  # steps 1-3, 4-5 and 6 from three launches, bit for bit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == L.STEPS and summary["num_nonfinite_skipped"] == summary["num_overflow_skipped"] == 0
    L.assert_same_model(L.model(out), L.model(reference))
