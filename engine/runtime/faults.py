"""Process-level faults a long run must survive: stop requests (signals, a dead launcher) and hung steps.

Stop requests. SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) to any rank sets this process's stop
flag; nothing else happens in the handler. The trainer all-reduces the flag with its per-step non-finite
check (one collective), so every rank sees a stop at the same step boundary, writes the checkpoint of that
step and leaves with EXIT_PREEMPTED; `engine.checkpoint.resume=auto` then continues at the next step. A rank
whose current step is hung (past the watchdog's threshold) cannot reach a boundary: a signal ends it at once.
A signal also reaches ranks when DeepSpeed's launch.py ends a job because one rank failed; the others then
stop on their next collective's error (at once under gloo), or are killed by launch.py after its 30 s grace.

The `deepspeed` launcher is two processes: its runner (the PID a user or scheduler signals) starts
`deepspeed.launcher.launch`, which starts the ranks. For a single-node run the runner installs no signal
handlers, so SIGTERM kills it in 0.1 s and the ranks train on, orphaned. `LauncherWatch` closes that gap
without patching DeepSpeed: each rank whose parent is DeepSpeed's launch.py polls that parent and the
runner above it, and treats the death of either as a stop request.

Hung steps. `StepWatchdog` times every optimizer step in a thread. A step that runs longer than
`factor` x the median of the recent steps (and at least `min_s`) prints this rank's Python stack, all
threads (faulthandler), once per step, so a rank frozen in a collective or a data loader shows where it is.
If the step is still running at twice that threshold, the watchdog ends the rank (EXIT_HUNG) and the launcher
stops the job. Without it a rank blocked in a collective waits for the collective timeout
(engine.train.dist_timeout_s, 30 minutes by default): under gloo a dead peer's closed sockets fail the
collective at once, but under NCCL a peer that hangs (or dies without its connection failing) leaves the others
waiting on the GPU until NCCL's own watchdog aborts the communicator at that timeout (docs/architecture.md,
"Failures").
"""
from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional

from engine.runtime.log import append_to_run_log, get_logger

log = get_logger(__name__)

# Exit status of a run stopped by SIGTERM/SIGINT (or a dead launcher) after writing its checkpoint. Distinct
# from 0 (finished), 1 (error) and 2 (config error); resume with engine.checkpoint.resume=auto.
EXIT_PREEMPTED = 3
# Exit status of a rank the step watchdog ended: its step ran past twice the watchdog's threshold (hung, e.g.
# blocked in a collective whose peer will never join). No checkpoint: the step in flight cannot finish.
EXIT_HUNG = 4


class StopFlag:
    """A process-wide "stop at the next step boundary" request, with the reason that set it first.

    `overdue`, when set (the trainer sets its StepWatchdog's), tells whether the step now running is hung:
    then no step boundary will come, and a signal ends the process at once instead (see
    `install_stop_handlers`).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None
        self.overdue: Optional[Callable[[], Optional[str]]] = None

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()
        self.reason = None


# The flag signal handlers and the launcher watch set; the trainer reads it (tests may set it directly).
STOP = StopFlag()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_handlers(flag: StopFlag = STOP) -> dict:
    """SIGTERM and SIGINT set `flag` (a warning, once) instead of killing the process. Main thread only.
    Returns the handlers they replace, for `restore_handlers`.

    A repeated signal while stopping is ignored: DeepSpeed's launch.py answers Ctrl-C by sending each rank
    SIGTERM too, and a second signal must not cut the checkpoint short. But when the step now running is hung
    (`flag.overdue()`: longer than the watchdog's threshold, e.g. stuck in a collective with a dead peer, or
    frozen), the boundary will never come: the rank exits at once with status 1, without a checkpoint, rather
    than making the launcher wait out its grace period. SIGKILL still ends a rank at once.
    """

    def handler(signum, frame) -> None:
        name = signal.Signals(signum).name
        first = not flag.is_set()
        flag.set(f"received {name}")
        hung = flag.overdue() if flag.overdue is not None else None
        if hung:
            log.warning(f"received {name} while {hung}: exiting now, without a checkpoint")
            os._exit(1)
        if first:
            log.warning(f"received {name}: stopping after this step with a checkpoint")

    return {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}


def exit_on_signal(status: int) -> None:
    """From now on SIGTERM and SIGINT end this process at once with `status`. For a job whose work is done (its last
    checkpoint or model written) and whose teardown remains (closing the process group, the interpreter's exit):
    nothing is left to save, so a signal skips the rest of the teardown instead of asking for a checkpoint nobody
    will write. DeepSpeed's launch.py, which stops the other ranks as soon as one has exited with a non-zero status
    (3 after a preemption), then finds them ending with the job's status, not a signal's, and without a misleading
    "stopping after this step" line. Main thread only."""

    def handler(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
        os._exit(status)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler)


def restore_handlers(previous: dict) -> None:
    """Put back the signal handlers `install_stop_handlers` replaced (a caller that runs a job in its own process,
    e.g. a test or a notebook, keeps its own Ctrl-C). Main thread only."""
    for sig, old in previous.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)


def enable_crash_stacks() -> None:
    """A fatal signal (SIGSEGV, SIGABRT as from a C++ std::terminate in a collective library, SIGBUS, SIGILL, SIGFPE)
    prints every thread's Python stack of this process to stderr before it dies, so a rank that crashes says where
    (as `python -X faulthandler` does). Left as it is when already enabled (pytest, PYTHONFAULTHANDLER=1)."""
    if not faulthandler.is_enabled():
        faulthandler.enable(file=_stderr_fd(), all_threads=True)


def _parent_of(pid: int) -> Optional[int]:
    """The parent PID of `pid` from /proc (Linux), or None when `pid` is gone or /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[1])  # the comm field may contain spaces and parentheses
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class LauncherWatch:
    """Sets the stop flag when this rank's DeepSpeed launcher dies (see the module docstring).

    Active only when the parent process is DeepSpeed's `deepspeed.launcher.launch` (other launchers, e.g.
    torchrun, forward signals themselves; a rank started by hand has nobody to watch). Watched: the parent
    (launch.py) and the parent's parent (the `deepspeed` runner); a PID whose parent changed has died
    (its children are re-parented), which is robust to PID reuse.
    """

    def __init__(self, flag: StopFlag = STOP, interval_s: float = 1.0) -> None:
        self.flag = flag
        self.interval_s = interval_s
        self.parent = os.getppid()
        self.runner = _parent_of(self.parent)
        self.active = any("deepspeed.launcher.launch" in a for a in _cmdline(self.parent))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LauncherWatch":
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arcscale-launcher-watch", daemon=True)
            self._thread.start()
        return self

    def _lost(self) -> Optional[str]:
        if os.getppid() != self.parent:
            return f"the launcher (deepspeed.launcher.launch, pid {self.parent}) died"
        if self.runner not in (None, 0, 1) and _parent_of(self.parent) != self.runner:
            return f"the deepspeed runner (pid {self.runner}) died (it does not forward signals on one node)"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            reason = self._lost()
            if reason:
                first = not self.flag.is_set()
                self.flag.set(reason)
                if first:
                    log.warning(f"{reason}: stopping after this step with a checkpoint")
                return

    def stop(self) -> None:
        self._stop.set()


def _stderr_fd() -> int:
    """A file descriptor for faulthandler (it writes with write(2); sys.stderr may be a wrapper without one)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            return stream.fileno()
        except (AttributeError, ValueError, OSError):
            continue
    return 2


class StepWatchdog:
    """Dump all Python stacks of this process when an optimizer step runs much longer than usual, and end the
    process when it runs on past `abort_factor` x that threshold.

    Threshold: max(`factor` x median of the last `window` step durations, `min_s`), at most `max_s`. Before
    any step has finished there is no median; the first step is given `factor` x `min_s` (at most `max_s`).
    Each step dumps at most once. A step still running at `abort_factor` x the threshold is hung: the rank
    logs one line and exits with EXIT_HUNG (no collective, no checkpoint), so the launcher stops the job now
    instead of when the collective timeout fires (under NCCL, a rank blocked by a hung peer learns nothing
    sooner).

    Args:
        factor: multiple of the median step that counts as hung; 0 disables the watchdog.
        min_s: the threshold never goes below this (short steps vary a lot).
        max_s: ... nor above this: the trainer passes half the collective timeout, so a rank stuck in a
            collective shows its stack, and is ended, by the time the collective timeout would end it.
        rank: printed in the header of the dump.
        abort_factor: the rank is ended at this multiple of the threshold; 0: never (dump only).
    """

    def __init__(self, factor: float, min_s: float, max_s: float = float("inf"), rank: int = 0,
                 window: int = 50, abort_factor: float = 2.0) -> None:
        self.factor = float(factor)
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self.rank = rank
        self.abort_factor = float(abort_factor)
        self._exit: Callable[[int], None] = os._exit  # tests replace it
        self.durations: Deque[float] = deque(maxlen=window)
        self.num_dumps = 0
        self._lock = threading.Lock()
        self._step: Optional[int] = None
        self._t0 = 0.0
        self._dumped = False
        self._wake = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def threshold_s(self) -> float:
        if not self.durations:
            return min(self.factor * max(self.min_s, 1.0), self.max_s)
        return min(max(self.factor * statistics.median(self.durations), self.min_s), self.max_s)

    def step_started(self, step: int) -> None:
        """Step `step` (1-based, the one about to run) starts now."""
        if not self.enabled:
            return
        with self._lock:
            self._step, self._t0, self._dumped = step, time.monotonic(), False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arcscale-step-watchdog", daemon=True)
            self._thread.start()
        self._wake.set()

    def overdue(self) -> Optional[str]:
        """'step N has run X s (threshold T s)' when the step now running is past the threshold, else None."""
        with self._lock:
            step, t0 = self._step, self._t0
        if not self.enabled or step is None:
            return None
        elapsed, limit = time.monotonic() - t0, self.threshold_s()
        return f"step {step} has run {elapsed:.0f} s (threshold {limit:.0f} s)" if elapsed > limit else None

    def step_finished(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._step is not None:
                self.durations.append(time.monotonic() - self._t0)
            self._step = None

    def abort_s(self) -> Optional[float]:
        """When the step now running is ended (seconds into it), or None when the watchdog never ends one."""
        return self.abort_factor * self.threshold_s() if self.abort_factor > 0 else None

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                step, t0, dumped = self._step, self._t0, self._dumped
            limit = self.abort_s() if dumped else self.threshold_s()
            if step is None or limit is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            elapsed = time.monotonic() - t0
            if elapsed < limit:
                time.sleep(min(1.0, limit - elapsed))
                continue
            with self._lock:
                if self._step != step or self._dumped != dumped:
                    continue
                self._dumped = True
            if dumped:
                self.abort(step, elapsed)
                return
            self.dump(step, elapsed)

    def abort(self, step: int, elapsed: float) -> None:
        """End this process (EXIT_HUNG): step `step` has run `elapsed` s, past `abort_s()`."""
        message = (f"watchdog: step {step} has run {elapsed:.1f} s, {self.abort_factor:g} x its threshold of "
                   f"{self.threshold_s():.1f} s: this rank is hung (a collective whose peer never joins, a frozen "
                   f"loader); ending it (exit {EXIT_HUNG}) so the job stops now instead of at the collective "
                   f"timeout")
        log.error(message)  # stderr and train.log
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(EXIT_HUNG)

    def dump(self, step: int, elapsed: float) -> None:
        """Write the header and every thread's Python stack of this process to stderr (and train.log)."""
        median = statistics.median(self.durations) if self.durations else None
        usual = f"median step {median:.2f} s" if median is not None else "no step finished yet"
        self.num_dumps += 1
        header = (f"[rank {self.rank}] watchdog: step {step} has run {elapsed:.1f} s ({usual}; threshold "
                  f"{self.threshold_s():.1f} s: {self.factor:g} x median, >= {self.min_s:g} s, <= "
                  f"{self.max_s:g} s); Python stacks of all threads of this rank follow\n")
        # faulthandler writes a stack in many small write(2) calls; the ranks of a job share the launcher's
        # stderr and usually cross the threshold together, so their stacks would interleave mid-line. Dump to
        # a file, prefix every line with the rank and write the whole block at once.
        with tempfile.TemporaryFile() as scratch:
            faulthandler.dump_traceback(file=scratch, all_threads=True)
            scratch.seek(0)
            stacks = scratch.read().decode("utf-8", "replace")
        block = header + "".join(f"[rank {self.rank}] {line}\n" for line in stacks.splitlines())
        sys.stderr.flush()
        data, fd = block.encode(), _stderr_fd()
        while data:
            data = data[os.write(fd, data):]
        append_to_run_log(block)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
