"""Restarts that continue: a 2-rank job under `torchrun --max-restarts 1` whose rank 1 is SIGKILLed mid-run is
restarted by torchrun with the same command, and `engine.checkpoint.resume: auto` (the default: the tiny config
does not set it) continues from the newest complete checkpoint. The job ends with the same backbone (model.pt)
and the same Partial FC head (every rank's class rows and their optimizer rows in the final checkpoint), bit for
bit on the CPU, as the same job uninterrupted (tests/support/launching.reference), and loses at most the
checkpoint interval (every 2 steps) of work.
"""
import os
import re
import signal

import torch

from tests.support import launching as L

KILL_RANK, KILL_STEP, EVERY = 1, 3, 2  # tests/support/launching.tiny_config saves every 2 steps


def _head(out, step: int, rank: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / f"head_rank{rank:05d}.pt", map_location="cpu",
                      weights_only=True)


def test_torchrun_restart_after_a_killed_rank_continues_bitwise(tmp_path, tmp_path_factory):
    reference = L.reference(tmp_path_factory)
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)
    torchrun = L.LAUNCHER.parent / "torchrun"
    # torchrun's elastic form on one node: a c10d rendezvous on a free port, a new round for each restart
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "tests/support/fault_run.py", "--config", str(config)]
    faults = {"kill": {"rank": KILL_RANK, "step": KILL_STEP}}
    proc = L.start(cmd, tmp_path / "torchrun.log", faults, start_new_session=True)
    try:
        code = proc.wait(timeout=600)
    finally:  # the launcher and its workers: a worker stuck at start-up would outlive torchrun
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "torchrun.log").read_text()
    assert code == 0, log[-4000:]
    assert f"test fault: killed after step {KILL_STEP}" in log, log[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S*step_(\d{8}): continuing after step", log)]
    assert len(resumed) == 1, log[-4000:]  # one restart, which found a checkpoint
    assert 0 <= KILL_STEP - resumed[0] <= EVERY, (resumed, KILL_STEP)  # work lost: at most the interval

    assert L.losses(out) == L.losses(reference)  # every step's loss; steps after the checkpoint were redone
    L.assert_same_model(L.model(out), L.model(reference))
    for rank in (0, 1):
        mine, theirs = _head(out, L.STEPS, rank), _head(reference, L.STEPS, rank)
        assert (mine["class_start"], mine["num_local"]) == (theirs["class_start"], theirs["num_local"])
        assert torch.equal(mine["weight"], theirs["weight"]), rank
        assert mine["rows"].keys() == theirs["rows"].keys() and mine["rows"], rank  # SGD momentum rows
        for key in mine["rows"]:
            assert torch.equal(mine["rows"][key], theirs["rows"][key]), (rank, key)
