"""Run a function on N gloo ranks in fresh processes, with a timeout, and collect each rank's result.

The ranks are forked from multiprocessing's fork server, which imports torch and deepspeed once (`PRELOAD`), so a
call costs milliseconds instead of each rank's interpreter start-up; their output reaches this process's stdout
and stderr as it is written (`_OutputRelay`). With a GPU visible they are spawned as fresh interpreters.

Multi-process tests compare these results with a single-process reference, and benchmarks (bench/pfc_scale.py)
time work on several ranks; both use this runner, which is why it is part of the package and not of tests/. A
rank that raises brings the whole call down with its traceback; a rank that dies without a result is reported
at once; a rank that hangs is killed when `timeout_s` passes, so no run can hang silently.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

from engine.runtime.dist import find_free_port

__all__ = ["run_distributed"]


def _worker(fn: Callable, rank: int, world_size: int, port: int, timeout_s: float, args: tuple, queue,
            output=None) -> None:
    if output is not None:  # forked from the fork server: its descriptors are the server's, not the caller's now
        for fd, path in zip((1, 2), output):
            f = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(f, fd)
            os.close(f)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(*args)
        finally:
            dist.destroy_process_group()
        # Pickled here: tensors sent as-is travel as shared-memory handles that die with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including SystemExit from a library
        queue.put((rank, "error", traceback.format_exc()))


class _OutputRelay:
    """The ranks' stdout and stderr, as a spawned rank's would be: each rank appends to two files, which a thread
    copies to this process's descriptors 1 and 2 as they grow (so output appears live, and where this process's
    output goes now: a test's capture, a terminal, a log)."""

    def __init__(self):
        import tempfile
        import threading

        self.dir = tempfile.mkdtemp(prefix="arcscale_ranks_")
        self.paths = (os.path.join(self.dir, "stdout"), os.path.join(self.dir, "stderr"))
        for path in self.paths:
            open(path, "wb").close()
        self._files = [open(path, "rb") for path in self.paths]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arcscale-rank-output", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for fd, f in zip((1, 2), self._files):
            data = f.read()
            while data:
                data = data[os.write(fd, data):]

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._copy()

    def close(self) -> None:
        import shutil

        self._stop.set()
        self._thread.join()
        self._copy()
        for f in self._files:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# Imported once by the fork server (not by this process) and inherited by every rank forked from it.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "engine.train.build", "engine.parallel.deepspeed_backend",
           "engine.parallel.fsdp_backend", "heads", "backbones"]
_CTX = None


def _context():
    """multiprocessing's "forkserver" start method with the heavy imports preloaded: a rank starts as a fork of a
    server process that has imported torch and deepspeed once and run nothing else (so the fork is safe: no
    threads, no device context), instead of a fresh interpreter importing them again (about 1 s per rank, per
    call). The function and its arguments still travel pickled, as with "spawn". Where a GPU is visible, or the
    platform has no fork server, ranks start as fresh interpreters ("spawn")."""
    global _CTX
    if _CTX is None:
        import torch

        if "forkserver" in mp.get_all_start_methods() and not torch.cuda.is_available():
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(PRELOAD)
        else:
            _CTX = mp.get_context("spawn")
    return _CTX


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list:
    """Call `fn(*args)` on `world_size` gloo ranks; return the per-rank results ordered by rank.

    `fn` must be importable (module level) and its result picklable.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = find_free_port()
    relay = _OutputRelay() if ctx.get_start_method() == "forkserver" else None
    output = relay.paths if relay is not None else None
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, timeout_s, args, queue, output), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead:
                    try:  # a rank that just exited may still have a result in flight
                        rank, status, payload = queue.get(timeout=5.0)
                    except queue_mod.Empty:
                        raise RuntimeError(f"rank(s) exited without a result (rank, exit code): {dead}") from None
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run did not finish within {timeout_s:.0f} s; "
                                       f"ranks done: {sorted(results)}") from None
                else:
                    continue
            if status == "error":
                errors.append(f"rank {rank} failed:\n{payload}")
            else:
                results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=1 if errors else 10)
            if p.is_alive():
                p.kill()
        if relay is not None:
            relay.close()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
