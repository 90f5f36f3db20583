"""A rank's signal and crash handling at the process level (engine.runtime.faults), each case in its own Python
process: a stop request while training, a signal during the teardown after the work is saved, the handlers put
back afterwards, and the Python stacks a crashed rank prints."""
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_signal_while_training_asks_for_a_checkpoint_and_during_teardown_ends_the_process_with_the_jobs_status():
    proc = _python("""
        import os, signal, sys
        from engine.runtime import faults
        previous = faults.install_stop_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert faults.STOP.is_set() and faults.STOP.reason == "received SIGTERM", faults.STOP.reason
        print("still running after the stop request", flush=True)
        faults.exit_on_signal(3)   # the checkpoint is written; only the teardown is left
        print("teardown", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        print("not reached", flush=True)
        sys.exit(0)
    """)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "still running after the stop request" in proc.stdout and "teardown" in proc.stdout, proc.stdout
    assert "not reached" not in proc.stdout, proc.stdout
    assert proc.stderr.count("received SIGTERM: stopping after this step with a checkpoint") == 1, proc.stderr
    assert "SIGINT" not in proc.stderr, proc.stderr  # the teardown's signal prints no "stopping" line


def test_restore_handlers_puts_back_the_callers_own_handlers():
    proc = _python("""
        import signal
        from engine.runtime import faults
        mine = lambda signum, frame: None
        signal.signal(signal.SIGTERM, mine)
        previous = faults.install_stop_handlers()
        assert signal.getsignal(signal.SIGTERM) is not mine
        faults.exit_on_signal(0)
        faults.restore_handlers(previous)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_a_crashed_process_prints_every_threads_python_stack():
    proc = _python("""
        import os, threading, time
        from engine.runtime import faults
        faults.enable_crash_stacks()
        def background_loop():
            time.sleep(60)
        threading.Thread(target=background_loop, daemon=True).start()
        def the_frame_that_crashed():
            os.abort()   # what a C++ std::terminate in a collective library ends in
        time.sleep(0.2)
        the_frame_that_crashed()
    """)
    assert proc.returncode == -signal.SIGABRT, proc.stdout + proc.stderr
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr
    assert "the_frame_that_crashed" in proc.stderr and "background_loop" in proc.stderr, proc.stderr
