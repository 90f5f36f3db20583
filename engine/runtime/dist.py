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


def _backend_uses_cuda(backend: str) -> bool:
    """Whether a process-group backend ("nccl", "gloo", "cpu:gloo,cuda:nccl", ...) moves CUDA tensors."""
    return "nccl" in backend.lower()


def get_device(backend: Optional[str] = None) -> torch.device:
    """The device this process trains on: GPU number LOCAL_RANK under a CUDA backend, else the CPU.

    The device follows the process group's backend (`backend`, else the initialised group's, else the one `init`
    would choose): gloo moves CPU tensors only, so a gloo group means the CPU even on a machine with GPUs (the
    test suite's ranks, a CPU run on a GPU node). Under CUDA the GPU is the LOCAL_RANK-th visible one, unwrapped,
    as DeepSpeed and FSDP2 pick it too: LOCAL_RANK past the visible devices is an error that names the variables
    (wrapping it modulo the device count made two ranks share a GPU, or disagreed with DeepSpeed's own choice).

    Raises:
        ValueError: LOCAL_RANK is not below the number of visible CUDA devices.
    """
    if backend is None and is_initialized():
        backend = dist.get_backend()
    if backend is None:
        backend = default_backend()
    if not _backend_uses_cuda(backend) or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = get_local_rank(), torch.cuda.device_count()
    if not 0 <= local_rank < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(
            f"LOCAL_RANK={local_rank} but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}); LOCAL_RANK must be "
            f"below {count}: start at most {count} process(es) per node with every GPU visible to each, or, "
            f"where CUDA_VISIBLE_DEVICES gives each process its own GPU, set LOCAL_RANK=0 in each")
    return torch.device("cuda", local_rank)


def configure_device(device: torch.device) -> None:
    """Per-process device settings, once the device is known (init calls it).

    CUDA: the current device (collectives and default allocations go to this rank's GPU) and cudnn.benchmark:
    training shapes are fixed (the micro-batch and the 112x112 crop never change; the loaders drop the last,
    short batch), so cuDNN's per-shape autotuning runs once, in the first step, and picks the fastest
    convolution algorithms for the rest. CPU: ranks sharing a node split its cores (OMP_NUM_THREADS wins).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU node split its cores instead of oversubscribing them.
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))


# Launchers that start every process themselves but set no RANK: (launcher, rank, size, local rank) variables.
# srun's step size is SLURM_STEP_NUM_TASKS (SLURM_NTASKS is the allocation's, also set in the batch script).
LAUNCHER_RANK_VARS = (
    ("srun", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "SLURM_LOCALID"),
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun (MPICH / Intel MPI)", "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID"),
)


def resolve_launch_env(env: Optional[dict] = None) -> str:
    """Make `env` (default os.environ) say this process's RANK / WORLD_SIZE / LOCAL_RANK; returns how.

    - RANK set (deepspeed, torchrun, the spawn helper): left as it is -> "launcher".
    - No RANK, but srun or mpirun started this process among several (SLURM_PROCID, OMPI_COMM_WORLD_RANK or
      PMI_RANK with a size above 1): their variables are mapped onto RANK, WORLD_SIZE, LOCAL_RANK and
      LOCAL_SIZE when MASTER_ADDR and MASTER_PORT say where rank 0 listens -> "srun" / "mpirun (...)".
      Without MASTER_ADDR/MASTER_PORT a ValueError names what to set: such a process must never silently
      become a world of one (N processes would each train alone and overwrite each other's output).
    - Otherwise (plain `python run.py`, a one-task srun): a world of one on a free local port -> "single".
    """
    env = os.environ if env is None else env
    if "RANK" in env:
        return "launcher"
    for launcher, rank_var, size_vars, local_var in LAUNCHER_RANK_VARS:
        if rank_var not in env:
            continue
        size_var = next((v for v in size_vars if v in env), None)
        if size_var is None or int(env[size_var]) <= 1:
            continue  # one process: a world of one is right
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise ValueError(
                f"{rank_var}={env[rank_var]} and {size_var}={env[size_var]}: this process was started by "
                f"{launcher} as one of {env[size_var]}, but RANK is not set and neither is {' / '.join(missing)}; "
                f"export MASTER_ADDR (the first node's address) and MASTER_PORT (a free port) for every task, "
                f"or start the job with torchrun or deepspeed")
        size = int(env[size_var])
        local = env.get(local_var, "0")
        env.update(RANK=str(int(env[rank_var])), WORLD_SIZE=str(size), LOCAL_RANK=str(int(local)))
        env.setdefault("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", str(_local_size(launcher, env, size))))
        return launcher
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(find_free_port()))
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    return "single"


def _local_size(launcher: str, env, world_size: int) -> int:
    """Processes on this node as the launcher says (srun: SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE's first
    count; Open MPI: OMPI_COMM_WORLD_LOCAL_SIZE; MPICH: MPI_LOCALNRANKS); the world size when it says nothing."""
    if launcher == "srun":
        value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    elif launcher.startswith("mpirun (Open"):
        value = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        value = env.get("MPI_LOCALNRANKS")
    return int(value) if value and value.isdigit() else world_size


def init(timeout_s: float = 1800.0, backend: Optional[str] = None) -> torch.device:
    """Initialise the default process group through DeepSpeed and return this process's device.

    A job started without a launcher (no RANK/WORLD_SIZE in the environment) becomes a world of one on a
    free local port, so `python run.py` works as well as `deepspeed run.py`; under srun or mpirun without RANK
    their own variables give the ranks (`resolve_launch_env`). The device follows the backend (`get_device`).
    Collectives time out after `timeout_s` so a dead peer brings the job down instead of hanging it: on the
    default group and on every group created later without an explicit timeout (DeepSpeed's data-parallel
    groups, FSDP's mesh groups).
    """
    if is_initialized():
        backend = dist.get_backend()  # an existing group (tests, embedding scripts) decides
    else:
        resolve_launch_env()
    backend = backend or default_backend()
    device = get_device(backend)
    configure_device(device)
    import deepspeed  # heavy; imported where used

    prepare_deepspeed(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed creates its own groups (data parallel, ...) without a timeout: they take this one too.
    from engine.runtime import compat

    compat.set_default_group_timeout(timeout)
    store = elastic_store(timeout) if not is_initialized() else None
    if store is not None:  # under torchrun: this attempt's keys apart from those of the attempts before it
        kwargs = {"device_id": device} if device.type == "cuda" and int(os.environ["WORLD_SIZE"]) > 1 else {}
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout, **kwargs)
    # Also when torch.distributed is already up (tests, embedding scripts): DeepSpeed's comm layer wraps it.
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timeout,
        dist_init_required=not is_initialized(),
    )
    return device


def elastic_store(timeout: datetime.timedelta) -> Optional["dist.Store"]:
    """torchrun's agent store for this attempt of the job, or None when torchrun did not start this process.

    torchrun hosts one store for the whole job and restarts the workers with the same endpoint
    (`--max-restarts`): keys the previous attempt's ranks wrote (gloo's and NCCL's connection addresses under
    ``default_pg/``) are still there, and the new ranks would read them and connect to dead processes ("Connection
    refused"). Each attempt's keys go under their own prefix (TORCHELASTIC_RESTART_COUNT), as a fresh store would
    hold them.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"arcscale/attempt_{attempt}", store)


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


def join_launcher_group() -> bool:
    """For a command-line tool that runs under a launcher: join its process group (WORLD_SIZE > 1, 30-minute
    timeout, this rank's device); True when this call created the group (the caller then destroys it), False
    when one exists already or there is no launcher."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(default_backend(), timeout=datetime.timedelta(minutes=30))
    return True
