"""The engine's one logger: rank-aware console output, and ``train.log`` in the run directory.

Every module logs through a named logger, ``log = get_logger(__name__)``: ``engine.train.hooks`` logs as
``arcscale.train.hooks``, ``heads.partial_fc`` as ``arcscale.heads.partial_fc``. All of them hang under the
``arcscale`` logger, which does not propagate to Python's root logger, so an application's own logging set-up
neither doubles nor swallows these messages.

Who says what, and where:

- **info**: rank 0 only, on stdout, the message as it is (``step 10/100 epoch 0 loss ...``, ``data: ...``).
  Another rank's info would repeat rank 0's, so it is dropped.
- **warning** and **error**: every rank, on stderr, every line prefixed by the rank and the first by the
  level: ``[rank 1] warning: ...``. A warning that every rank would give alike (a job-wide condition, such as
  a part of a checkpoint that cannot be restored) is logged with ``once=True``, and then only rank 0 gives it.
- **train.log** in the run directory holds what rank 0's console shows (its info, warnings and errors, the
  error that ends a job and the step watchdog's stack dumps included), each line behind its local time. Rank
  r > 0 writes its own warnings and errors to ``train_rank<r>.log`` beside it, created at its first one (a
  quiet rank leaves none): only rank 0 writes the run directory's shared files (engine.state.rundir), and
  appends of several nodes to one file on shared storage would not stay whole. Nothing may be written into the
  directory before the run is accepted (its lock taken, its config checked against the checkpoint it resumes),
  so the job lifecycle (engine.train.build.run_job) calls `hold_run_log` when it starts, which keeps the
  messages in memory, and engine.train.build.build_trainer calls `attach_run_log` once the run is accepted,
  which writes the held messages and appends every later one. A refused run leaves no log file. A resumed run
  continues the files; a fresh run with ``engine.checkpoint.overwrite=true`` starts them anew
  (engine.state.rundir deletes the old ones). `detach_run_log` closes them when the job ends.

The rank is read when a message is logged: the process group's rank once it exists, else the launcher's
``RANK``, so messages before distributed start-up are filtered alike.

Not logged but printed: a command-line tool's product (engine.plan's table, engine.export's verdict,
engine.eval_ijb's TAR table, engine.convert_config's report) and a command's one-line error when it exits
before any run starts (``config error: ...``): they are what the command answers, not a run's messages.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, List, MutableMapping, Optional, Tuple

import torch.distributed as tdist

ROOT_NAME = "arcscale"
RUN_LOG_NAME = "train.log"

_ONCE = "arcscale_once"  # record attribute: only rank 0 emits it
_BARE = "arcscale_bare"  # record attribute: the message carries its own words, no "warning: " / "error: "
_RANK = "arcscale_rank"  # record attribute: the rank that logged it, set once by the first handler's filter


def current_rank() -> int:
    """This process's rank: the default process group's, else the launcher's RANK, else 0."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RankFilter(logging.Filter):
    """Info and ``once`` messages pass on rank 0 only; warnings and errors on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = getattr(record, _RANK, None)
        if rank is None:
            rank = current_rank()
            setattr(record, _RANK, rank)
        if rank == 0:
            return True
        return record.levelno >= logging.WARNING and not getattr(record, _ONCE, False)


class RankFormatter(logging.Formatter):
    """Info as it is; a warning or error as ``[rank r] <level>: message`` with every further line prefixed by
    ``[rank r] `` too (a traceback from two ranks stays readable). With `timestamps`, every line starts with
    the local time (train.log)."""

    def __init__(self, timestamps: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.WARNING:
            if not getattr(record, _BARE, False):
                text = f"{record.levelname.lower()}: {text}"
            rank = getattr(record, _RANK, None)
            rank = current_rank() if rank is None else rank
            text = "\n".join(f"[rank {rank}] {line}" for line in text.splitlines() or [""])
        if self.timestamps:
            stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
            text = "\n".join(f"{stamp} {line}" for line in text.splitlines() or [""])
        return text


class ConsoleHandler(logging.Handler):
    """Info to stdout, warnings and errors to stderr: the streams `sys` holds when the message is logged
    (a test or a tool that redirects them gets the messages)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


class AppendFileHandler(logging.Handler):
    """Appends each message to a file in one write(2) (O_APPEND: a message's lines stay together). With `lazy`,
    the file is created at the first message."""

    def __init__(self, path: Path, lazy: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd: Optional[int] = None
        self._closed = False
        if not lazy:
            self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - a full disk must not turn a warning into a crash
            self.handleError(record)

    def _write(self, text: str) -> None:
        self.acquire()
        try:
            if self._fd is None and not self._closed:
                self._open()
            data = text.encode("utf-8", "replace")
            while data and self._fd is not None:
                data = data[os.write(self._fd, data):]
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            self.release()
            super().close()


class RankLogger(logging.LoggerAdapter):
    """A named logger of the engine. ``warning(msg, once=True)``: rank 0 alone gives a warning every rank would
    give alike. ``bare=True`` (warning/error): no level word after the rank, for a message that carries its own
    (engine.runtime.dist.fail_fast's tracebacks and "stopping: ...")."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> Tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.pop("extra", None) or {})
        if kwargs.pop("once", False):
            extra[_ONCE] = True
        if kwargs.pop("bare", False):
            extra[_BARE] = True
        kwargs["extra"] = extra
        return msg, kwargs


def _root() -> logging.Logger:
    """The ``arcscale`` logger with its console handler (installed on first use; nothing else is configured)."""
    root = logging.getLogger(ROOT_NAME)
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.setLevel(logging.INFO)
        root.propagate = False
        console = ConsoleHandler()
        console.addFilter(RankFilter())
        console.setFormatter(RankFormatter())
        root.addHandler(console)
    return root


def get_logger(name: str) -> RankLogger:
    """The logger of module `name` (pass ``__name__``): ``arcscale.<module>``, without the ``engine.`` prefix."""
    _root()
    short = name[len("engine."):] if name.startswith("engine.") else name
    return RankLogger(logging.getLogger(f"{ROOT_NAME}.{short}"), {})


class HoldingHandler(logging.Handler):
    """Keeps the records of a run that is not accepted yet (at most `capacity`: the oldest are dropped)."""

    def __init__(self, capacity: int = 10000) -> None:
        super().__init__()
        self.records: Deque[logging.LogRecord] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _run_handlers() -> List[logging.Handler]:
    return [h for h in _root().handlers if isinstance(h, (HoldingHandler, AppendFileHandler))]


def hold_run_log() -> None:
    """Keep this job's messages in memory until `attach_run_log` writes them (or `detach_run_log` drops them)."""
    detach_run_log()
    holder = HoldingHandler()
    holder.addFilter(RankFilter())
    _root().addHandler(holder)


def run_log_name(rank: int) -> str:
    """``train.log`` for rank 0, ``train_rank<r>.log`` for the others (see the module docstring)."""
    return RUN_LOG_NAME if rank == 0 else f"train_rank{rank}.log"


def attach_run_log(output_dir: os.PathLike) -> Path:
    """Append this rank's log to its file in `output_dir` from now on (`run_log_name`), after the messages held
    since `hold_run_log` (every rank; call once the run is accepted). Returns the file's path (on rank r > 0 it
    exists once there was something to write). A run log attached earlier in this process (a previous job of a
    test or a script) is closed first."""
    held = [r for h in _run_handlers() if isinstance(h, HoldingHandler) for r in h.records]
    detach_run_log()
    rank = current_rank()
    path = Path(output_dir) / run_log_name(rank)
    handler = AppendFileHandler(path, lazy=rank != 0)
    handler.addFilter(RankFilter())
    handler.setFormatter(RankFormatter(timestamps=True))
    for record in held:
        handler.handle(record)
    _root().addHandler(handler)
    return path


def detach_run_log() -> None:
    """Close this rank's log file and drop held messages (nothing when there are none)."""
    root = _root()
    for handler in _run_handlers():
        root.removeHandler(handler)
        handler.close()


def append_to_run_log(text: str) -> None:
    """Append lines that went to the console by another way (the step watchdog's stack dump, which writes
    stderr itself) to this rank's log file, each behind the time; nothing when none is attached."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = "".join(f"{stamp} {line}\n" for line in text.splitlines())
    for handler in _run_handlers():
        if isinstance(handler, AppendFileHandler):
            try:
                handler._write(lines)
            except OSError:
                pass  # a diagnostic on its way to a full disk: stderr has it


def run_log_path() -> Optional[Path]:
    """This rank's log file while one is attached (see `attach_run_log`), or None."""
    return next((h.path for h in _run_handlers() if isinstance(h, AppendFileHandler)), None)
