"""The step watchdog ends a rank blocked in a collective past its threshold (engine.runtime.faults.StepWatchdog),
on gloo ranks: rank 1 never joins step 4's all-reduce, and rank 0, blocked in it, is ended by its watchdog
(EXIT_HUNG) at twice its threshold, long before the group's collective timeout would end it (the run's
timeout here is 120 s). This is the path that matters under NCCL, where a hung peer leaves the others blocked
until the timeout."""
import time

import pytest
import torch

from engine.runtime.spawn import run_distributed


def _rank_blocked_in_a_collective(hang_s: float):
    import torch.distributed as tdist

    from engine.runtime import faults

    rank = tdist.get_rank()
    tdist.barrier()  # both ranks here: the first step's timing does not include the other's start-up
    watchdog = faults.StepWatchdog(factor=2.0, min_s=1.0, max_s=30.0, rank=rank)
    for step in (1, 2, 3):  # quick steps: threshold max(2 x median, 1 s) = 1 s, ended at 2 s
        watchdog.step_started(step)
        tdist.all_reduce(torch.ones(1))
        watchdog.step_finished()
    if rank == 1:  # hangs outside any step (its own watchdog is quiet), never joining step 4's collective
        time.sleep(hang_s)
        return "rank 1 woke up"
    watchdog.step_started(4)
    tdist.all_reduce(torch.ones(1))  # blocks: rank 1 never joins
    return "rank 0's collective returned"


def test_watchdog_ends_a_rank_blocked_in_a_collective(capfd):
    with pytest.raises(RuntimeError, match=r"exited without a result \(rank, exit code\): \[\(0, 4\)\]"):
        run_distributed(_rank_blocked_in_a_collective, 2, 30.0, timeout_s=120)
    err = capfd.readouterr().err
    assert "[rank 0] watchdog: step 4 has run" in err  # the stack dump at the threshold came first
    assert "in _rank_blocked_in_a_collective" in err
    assert "[rank 0] error: watchdog: step 4 has run" in err and "ending it (exit 4)" in err, err[-3000:]
    assert "[rank 1]" not in err  # the hung rank was not in a step: only the blocked one was ended
