"""Ownership of a run's output directory: one run at a time, on storage every node shares, never another run's.

`claim(cfg)` runs on every rank before anything is written (engine.train.build.build_trainer calls it first):

1. Global rank 0 takes an exclusive lock on ``<output_dir>/.arcscale.lock`` (fcntl.flock, non-blocking). A
   second run into a locked directory fails at once with the holder's PID, host, start time and command. The
   kernel releases the lock when its process ends however it ends, so a lock left by a dead process never
   blocks: the file still names that process, and the new run says it is taking over a stale lock.
2. ``resume=auto`` (the default) or a path continues a directory's checkpoints, after engine.state.checkpoint
   checks that they belong to this run (`identity`); so the same command run again, or restarted by a launcher
   (``torchrun --max-restarts``), continues. A fresh run (``engine.checkpoint.resume=null``) into a directory
   that already holds checkpoints is refused: it would overwrite their ``step_N``, ``keep`` would prune by step
   number across the two runs and ``latest`` would point at a mix. ``engine.checkpoint.overwrite=true`` deletes
   the old run's checkpoints, metrics.jsonl, summary.json, train logs, model.pt and model_best.pt first, and the
   run starts over.
3. Rank 0 writes a random token to ``<output_dir>/.arcscale.nodecheck``; every rank reads it back. A rank
   on a node whose output_dir is not the shared one (a local disk, another mount) does not find the token and
   the job stops at start-up naming that rank and host, instead of scattering checkpoint shards over
   several filesystems.

Only global rank 0 writes the shared files (config.json, metrics.jsonl, summary.json, train.log, model.pt,
checkpoint metadata, ``latest``); every other rank writes only its own files: checkpoint shards, and
``train_rank<r>.log`` when it has a warning (engine.runtime.log).
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from engine.runtime import dist
from engine.runtime.fileio import WriteError, atomic_write_text
from engine.runtime.log import RUN_LOG_NAME, get_logger

log = get_logger(__name__)

LOCK_NAME = ".arcscale.lock"
NODE_CHECK_NAME = ".arcscale.nodecheck"

# What makes two configs the same run, for resuming: the architecture and head size the checkpoint's tensors
# have, the data source and the seed (the sampling plan), the optimizer kind (its state's keys). Everything
# else may change on resume, deliberately: run length, logging, evaluation, checkpoint policy, world size,
# ZeRO stage, backend, precision, micro-batch and accumulation, and the hyperparameters one lowers to get
# past a divergence (LR, schedule, weight decay, margins, clipping). Those are logged when they differ.
IDENTITY_KEYS = ("engine.model.name", "engine.model.embedding_size", "engine.head.num_classes",
                 "engine.data.source", "engine.data.synthetic", "engine.optim.name", "engine.train.seed")
# Keys whose change on resume is expected and not worth a note.
_UNNOTED = ("engine.train.output_dir", "engine.checkpoint.resume", "engine.checkpoint.overwrite",
            "engine.train.max_steps", "engine.train.epochs")


def _lookup(tree: Dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def identity(cfg) -> Tuple[str, Dict[str, Any]]:
    """(digest, {key: value}) of the IDENTITY_KEYS of `cfg`: what a checkpoint must share to be resumed."""
    tree = cfg.to_dict()
    keys = {k: _lookup(tree, k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16], keys


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a.b.c": leaf} of a nested mapping."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed_settings(saved: Dict[str, Any], cfg) -> Dict[str, Tuple[Any, Any]]:
    """{key: (saved value, this run's value)} of the config keys that differ, except the ones that always do."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in _UNNOTED}


# ---------------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------------

def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return (f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}, "
                f"command: {' '.join(h.get('argv') or [])}")
    except (ValueError, AttributeError):
        return "an unknown process (the lock file holds no readable owner)"


def _pid_alive_here(text: str) -> Optional[bool]:
    """Whether the holder named in `text` runs on this host (None: another host or unknown)."""
    try:
        h = json.loads(text)
    except ValueError:
        return None
    if h.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(h.get("pid")), 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError):
        return None
    return True


class OutputDirLock:
    """The exclusive lock of one output_dir, held by global rank 0 for the whole run."""

    def __init__(self, output_dir: os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: Optional[int] = None
        self.stale_holder: Optional[str] = None

    def acquire(self) -> None:
        """Take the lock or raise ValueError naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            os.close(fd)
            alive = _pid_alive_here(text)
            hint = (" (that process has exited; a child it left behind, e.g. a data loader worker, still holds "
                    "the lock)" if alive is False else "")
            raise ValueError(f"engine.train.output_dir {self.path.parent} is in use by another run: "
                             f"{_describe_holder(text)}{hint}; lock file {self.path}. Use another output_dir, "
                             f"or stop that run first") from None
        previous = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        if previous:
            self.stale_holder = _describe_holder(previous)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        dist.on_fail_fast(self.release)  # a run that fails leaves no owner record (the kernel drops the lock)

    def release(self) -> None:
        """Empty the owner record and unlock (the file stays: deleting it would race a waiting run)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None


class RunDir:
    """What `claim` returns: the output directory and, on rank 0, its lock. `release()` when the run ends."""

    def __init__(self, path: Path, lock: Optional[OutputDirLock]) -> None:
        self.path = path
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ---------------------------------------------------------------------------------------------------------------
# Claiming
# ---------------------------------------------------------------------------------------------------------------

_PREVIOUS_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "model.pt", "model_best.pt", "model_best.json",
                     RUN_LOG_NAME)
RUN_LOG_OF_RANK_GLOB = "train_rank*.log"  # engine.runtime.log.run_log_name of ranks > 0


def _used_by_checkpoints(output_dir: Path) -> list:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") or p.name == "latest")


def _check_fresh_start(cfg, output_dir: Path) -> None:
    """Rank 0: refuse (or, with overwrite, clear) another run's checkpoints under a fresh run's output_dir."""
    c = cfg.engine.checkpoint
    if c.resume is not None and not c.overwrite:  # continued (engine.state.checkpoint checks they are this run's)
        return
    found = _used_by_checkpoints(output_dir)
    if not found:
        return
    if not c.overwrite:
        shown = ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(f"engine.train.output_dir {output_dir} already holds checkpoints of a run ({shown} in "
                         f"{output_dir / 'checkpoints'}); a fresh run there would overwrite and prune them. Set "
                         f"engine.checkpoint.resume=auto (the default) to continue that run, "
                         f"engine.checkpoint.overwrite=true "
                         f"to delete its outputs and start over, or use another output_dir")
    removed = []
    other_rank_logs = sorted(p.name for p in output_dir.glob(RUN_LOG_OF_RANK_GLOB))
    for name in _PREVIOUS_OUTPUTS + tuple(other_rank_logs):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(name + "/")
        elif path.exists():
            path.unlink()
            removed.append(name)
    log.info(f"engine.checkpoint.overwrite: deleted the previous run's {', '.join(removed)} in {output_dir}")


def _read_token(path: Path, expected: str, wait_s: float) -> Optional[str]:
    """The token in `path`, waiting up to `wait_s` for `expected` to appear (network filesystems cache)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found: Optional[str] = path.read_text().strip()
        except OSError:
            found = None
        if found == expected or time.monotonic() >= deadline:
            return found
        time.sleep(0.25)


def claim(cfg, node_check_wait_s: float = 5.0) -> RunDir:
    """Lock, check and prepare `cfg.engine.train.output_dir` for this run (all ranks call; see module doc).

    Raises:
        ValueError: on every rank, with one message: the directory is locked by another run, holds another
            run's checkpoints, or is not the same directory on every node.
    """
    output_dir = Path(cfg.engine.train.output_dir)
    rank = dist.get_rank()
    lock: Optional[OutputDirLock] = None
    error, token = None, None
    if rank == 0:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = OutputDirLock(output_dir)
            lock.acquire()
            if lock.stale_holder:
                log.info(f"{output_dir} was locked by {lock.stale_holder}, which has ended; taking the lock over")
            _check_fresh_start(cfg, output_dir)
            token = f"{secrets.token_hex(16)} {socket.gethostname()} {output_dir.resolve()}"
            atomic_write_text(token + "\n", output_dir / NODE_CHECK_NAME)
        except (ValueError, OSError, WriteError) as exc:
            error = str(exc) if isinstance(exc, ValueError) else f"engine.train.output_dir {output_dir}: {exc}"
            if lock is not None:
                lock.release()
                lock = None
    error, token = dist.all_gather_object((error, token))[0]
    if error:
        raise ValueError(error)
    mine = None
    if rank != 0:
        found = _read_token(output_dir / NODE_CHECK_NAME, token, node_check_wait_s)
        if found != token:
            what = "is missing" if found is None else "holds another token"
            _, host0, dir0 = token.split(" ", 2)
            mine = (f"engine.train.output_dir {output_dir} on host {socket.gethostname()} (rank {rank}) is not the "
                    f"directory rank 0 uses ({dir0} on host {host0}): the file rank 0 just wrote there "
                    f"({NODE_CHECK_NAME}) {what}. Every node must see output_dir on shared storage (checkpoint "
                    f"shards and metadata are written by different ranks)")
    errors = [e for e in dist.all_gather_object(mine) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise ValueError(errors[0])
    return RunDir(output_dir, lock)
