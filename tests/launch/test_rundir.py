"""Output-directory ownership through the CLI (`python run.py`): a second run into a directory a live run holds
fails at once naming the holder; after the holder is SIGKILLed its lock is stale and is taken over; a fresh run
into a directory holding checkpoints (`engine.checkpoint.resume=null`) is refused, and so is resuming another
run's checkpoints (naming both runs); `engine.checkpoint.overwrite=true` starts over cleanly; the lock is released
on exit. train.log: the accepted run's messages; a refused run adds nothing to it; overwrite starts it anew.
"""
import json
import os
import signal

from engine.state.rundir import LOCK_NAME
from tests.support import launching as L


def test_one_run_per_output_dir(tmp_path):
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)
    every_step = "engine.checkpoint.every=1"

    # A holds the directory: paused after step 2 (step_1 written), until killed.
    pause = tmp_path / "pause"
    faults = {"pause_after_step": 2, "pause_file": str(pause)}
    holder = L.start(L.python_cmd(config, every_step, faults=True), tmp_path / "a.log", faults)
    try:
        L.wait_for([tmp_path / "pause.ready0"], [holder])
        # B, at the same time: refused at once, naming A.
        code = L.run(L.python_cmd(config, "engine.checkpoint.resume=auto"), tmp_path / "b.log")
        log = (tmp_path / "b.log").read_text()
        assert code == 1 and "is in use by another run" in log and f"pid {holder.pid} on host" in log, log[-2000:]
        assert "fault_run.py" in log  # the holder's command
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # the stale owner record
    run_log = (out / "train.log").read_text()  # A's, up to where it was killed
    assert "job: " in run_log and "step 1/6" in run_log and "step 3/6" not in run_log, run_log

    # C: a fresh run (resume=null; the default, auto, would continue them) into A's checkpoints is refused; A's dead
    # lock is noticed and taken over on the way.
    code = L.run(L.python_cmd(config, "engine.checkpoint.resume=null"), tmp_path / "c.log")
    log = (tmp_path / "c.log").read_text()
    assert code == 1, log[-2000:]
    assert f"was locked by pid {holder.pid}" in log and "which has ended" in log, log[-2000:]
    assert "already holds checkpoints" in log and "step_00000001" in log and "resume=auto" in log, log[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001"]

    # D: resume=auto of A's checkpoints by another run (another seed) is refused, naming both runs.
    code = L.run(L.python_cmd(config, "engine.checkpoint.resume=auto", "engine.train.seed=6"), tmp_path / "d.log")
    log = (tmp_path / "d.log").read_text()
    assert code == 1 and "belongs to another run" in log, log[-2000:]
    assert "engine.train.seed: 5 there, 6 here" in log and str(out) in log, log[-2000:]
    assert (out / "train.log").read_text() == run_log  # B, C and D were refused: they wrote nothing there

    # E: overwrite starts over (resume stays at its default, auto, which then finds nothing): A's outputs are gone,
    # E's are complete, the lock is released.
    code = L.run(L.python_cmd(config, "engine.checkpoint.overwrite=true", "engine.train.max_steps=2"),
                 tmp_path / "e.log")
    log = (tmp_path / "e.log").read_text()
    assert code == 0, log[-2000:]
    assert "deleted the previous run's checkpoints/, metrics.jsonl" in log, log[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002"]
    assert sorted(L.losses(out)) == [1, 2] and (out / "model.pt").is_file()
    assert (out / LOCK_NAME).read_text() == ""  # released: no owner recorded
    run_log = (out / "train.log").read_text()  # E's alone, from its start (held until it was accepted)
    assert "step 1/6" not in run_log and "deleted the previous run's" in run_log, run_log
    assert "step 1/2" in run_log and "step 2/2" in run_log and "summary: " in run_log, run_log
