"""Run a function on N gloo ranks in fresh processes, with a timeout, and collect each rank's result.

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


def _worker(fn: Callable, rank: int, world_size: int, port: int, timeout_s: float, args: tuple, queue) -> None:
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


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list:
    """Call `fn(*args)` on `world_size` gloo ranks; return the per-rank results ordered by rank.

    `fn` must be importable (module level) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, timeout_s, args, queue), daemon=True)
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
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
