"""Process-group initialisation and rank/world/device helpers.

Every helper answers for a single process (rank 0, world 1) when no process group exists, so code that
runs under one process needs no special case. Nothing here runs at import time: `init()` is called from
inside `main` by the entry point or by a test.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from engine.runtime.log import get_logger

# The rank/world helpers live in a leaf module the heads use too (heads must not import engine); re-exported
# here so engine code and users keep calling engine.runtime.dist.get_rank() etc.
from heads.comm import get_rank, get_world_size, is_initialized  # noqa: F401

log = get_logger(__name__)


def get_local_rank() -> int:
    """Rank on this node, as set by the launcher (LOCAL_RANK); 0 when not launched."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_backend() -> str:
    """nccl when CUDA is usable, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def get_device() -> torch.device:
    """The device this process trains on: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init(timeout_s: float = 1800.0, backend: Optional[str] = None) -> torch.device:
    """Initialise the default process group through DeepSpeed and return this process's device.

    A job started without a launcher (no RANK/WORLD_SIZE in the environment) becomes a world of one on a
    free local port, so `python run.py` works as well as `deepspeed run.py`. Collectives time out after
    `timeout_s` so a dead peer brings the job down instead of hanging it: on the default group and on every
    group created later without an explicit timeout (DeepSpeed's data-parallel groups, FSDP's mesh groups).
    """
    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU node split its cores instead of oversubscribing them.
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))
    if "RANK" not in os.environ and not is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    import deepspeed  # heavy; imported where used

    prepare_deepspeed(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed creates its own groups (data parallel, ...) without a timeout: they take this one too.
    from engine.runtime import compat

    compat.set_default_group_timeout(timeout)
    # Also when torch.distributed is already up (tests, embedding scripts): DeepSpeed's comm layer wraps it.
    deepspeed.init_distributed(
        dist_backend=backend or default_backend(),
        timeout=timeout,
        dist_init_required=not is_initialized(),
    )
    return device


def prepare_deepspeed(device: Optional[torch.device] = None) -> None:
    """Call before anything that may start DeepSpeed's comm layer (init_distributed, zero.Init, initialize).

    On the CPU, DeepSpeed builds its shared-memory all-reduce op when its comm layer starts: a JIT C++ compile
    (minutes on a fresh machine; concurrent ranks serialise on a file lock and rebuild when they disagree,
    which made a fresh CI machine time out) whose kernels need AVX2/AVX-512 and otherwise fault and hang their
    peers. It only serves inference all-reduce, so training on the CPU uses plain gloo collectives instead.
    """
    device = device or get_device()
    if device.type == "cpu":
        from engine.runtime import compat

        compat.disable_deepspeed_op("deepspeed_shm_comm")


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of a Python float over all ranks (for peak memory and similar per-rank figures)."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_flags(flags, device: torch.device) -> list:
    """Element-wise logical OR over all ranks of booleans (Python or 0-d device tensors): one all-reduce and
    one device sync. Without a process group: the flags as given."""
    t = torch.stack([f.detach().reshape(()).to(device=device, dtype=torch.float32) if torch.is_tensor(f)
                     else torch.tensor(1.0 if f else 0.0, device=device) for f in flags])
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_gather_object(obj):
    """List of `obj` from every rank (a list of one without a process group)."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


class JobError(RuntimeError):
    """A failure of the run (not of the code) whose message says what happened, where and what to do:
    a diverged run, a checkpoint that cannot be written. Printed in one line per rank, without a traceback."""


# Exceptions that are the user's to fix (a bad file, value or path): one line names the problem; a traceback
# per rank would bury it. ARCSCALE_TRACEBACK=1 prints the traceback anyway.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, JobError)


def _peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is this rank's collective failing because another rank died (not this rank's fault)."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    return (isinstance(exc, backend_error) if backend_error else False) or (
        isinstance(exc, RuntimeError) and ("Connection closed by peer" in text or "Connection reset by peer" in text
                                           or "connection reset" in text.lower()))


# Cleanups fail_fast runs before it exits (no collectives, nothing slow): e.g. emptying the output_dir lock's
# owner record, so the next run does not report a lock left by a dead process. See `on_fail_fast`.
_FAIL_FAST_CLEANUPS: list = []


def on_fail_fast(cleanup) -> None:
    """Register a local, quick `cleanup()` for fail_fast to run before the process exits."""
    _FAIL_FAST_CLEANUPS.append(cleanup)


def fail_fast(exc: BaseException, exit_code: int = 1) -> NoReturn:
    """Report `exc` for this rank and end the process now, without any collective.

    A barrier or a destroy on the error path would wait for the ranks still blocked in this step's
    collective: the job would hang until the collective timeout with nothing printed. Instead this rank logs
    its error (stderr and train.log, every line prefixed by its rank) and exits at once; its peers' pending
    collectives then fail (the connection to this process is gone), they report that in one line and exit
    too, and the launchers (deepspeed, torchrun) stop the rest. User errors are one line; other exceptions
    give their traceback.
    """
    try:
        if _peer_failure(exc):
            log.error(f"stopping: a collective failed because another rank stopped ({str(exc).splitlines()[0]})",
                      bare=True)
        elif isinstance(exc, _USER_ERRORS) and os.environ.get("ARCSCALE_TRACEBACK") != "1":
            log.error(f"{type(exc).__name__}: {exc}")
        else:
            log.error("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n"),
                      bare=True)
        sys.stdout.flush()
        for cleanup in _FAIL_FAST_CLEANUPS:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
    finally:
        os._exit(exit_code)
