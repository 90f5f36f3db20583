"""engine.runtime.faults.StepWatchdog's two deadlines: the stack dump at its threshold, the end of the rank
(EXIT_HUNG) at twice that, and never an end with abort_factor 0. The process exit is replaced by a recorder;
the real exit of a rank blocked in a collective: tests/distributed/test_watchdog.py."""
import time

from engine.runtime import faults


def test_deadlines_follow_the_threshold():
    wd = faults.StepWatchdog(factor=3.0, min_s=5.0, max_s=30.0)
    assert wd.threshold_s() == 15.0 and wd.abort_s() == 30.0  # no step finished yet: factor x min_s
    wd.durations.extend([1.0, 1.0, 1.0])
    assert wd.threshold_s() == 5.0 and wd.abort_s() == 10.0
    wd.durations.extend([100.0] * 10)
    assert wd.threshold_s() == 30.0 and wd.abort_s() == 60.0  # capped: the trainer's max_s is timeout / 2
    assert faults.StepWatchdog(3.0, 5.0, abort_factor=0).abort_s() is None


def _hang(abort_factor: float, seconds: float):
    exits, dumps = [], []
    wd = faults.StepWatchdog(factor=2.0, min_s=0.2, abort_factor=abort_factor)
    wd._exit = exits.append
    wd.dump = lambda step, elapsed: dumps.append((step, elapsed))
    wd.durations.append(0.01)  # threshold max(2 x 0.01, 0.2) = 0.2 s
    wd.step_started(7)
    time.sleep(seconds)
    wd.close()
    return dumps, exits


def test_a_hung_step_is_dumped_then_ended(capsys):
    dumps, exits = _hang(2.0, 1.5)
    assert [s for s, _ in dumps] == [7] and dumps[0][1] >= 0.2
    assert exits == [faults.EXIT_HUNG]
    assert "watchdog: step 7 has run" in capsys.readouterr().err


def test_abort_factor_0_only_dumps():
    dumps, exits = _hang(0.0, 1.2)
    assert [s for s, _ in dumps] == [7] and exits == []
