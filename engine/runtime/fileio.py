"""Files a run must never half-write or misreport: atomic, fsynced writes that name the file and the errno on
failure, and the error types that name a file that cannot be written or read.

Every file the engine writes whole goes through `atomic_write` (readers see the old file or the whole new one,
never a part): checkpoints and the exported model (engine.state.checkpoint), the resolved config.json
(engine.config.schema), summary.json (engine.train.hooks), profile.json (engine.perf.report), the run
directory's node check (engine.state.rundir). torch.save reports a failed write (disk full, quota, I/O error)
only as ``unexpected pos ...`` from its zip writer, without the file; `atomic_save` names it and the errno.
Reading tensor files is engine.state.weights.load_weights_only, which raises `ReadError`.

In the runtime layer, the lowest, so that every layer (the config's own dump included) writes through it.
"""
from __future__ import annotations

import errno as errno_mod
import io
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from engine.runtime import dist


class WriteError(dist.JobError):
    """A file could not be written; the message names the file and the errno."""


class ReadError(ValueError):
    """A file that cannot be read (missing, truncated, corrupt); the message names it, `detail` says why."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class _RecordingWriter(io.RawIOBase):
    """The file object torch.save writes through, keeping the OSError of a failed write (the errno that
    torch's "unexpected pos" hides)."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as exc:
            self.error = exc
            raise


def write_error(path: os.PathLike, exc: OSError) -> WriteError:
    """WriteError("cannot write <path>: [ENOSPC] No space left on device") for an OSError."""
    code = errno_mod.errorcode.get(exc.errno, "?") if exc.errno is not None else "no errno"
    return WriteError(f"cannot write {path}: [{code}] {exc.strerror or exc}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write(path: os.PathLike, write: Callable[[Any], Any]) -> None:
    """`write(f)` into ``<path>.part``, flushed and fsynced, then renamed to `path` (readers see the old file
    or the whole new one). A failure removes the part and raises WriteError naming `path` and the errno."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                write(writer)
            except RuntimeError:  # torch's writer: the real cause is the recorded OSError
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """torch.save `obj` to `path` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: os.PathLike) -> None:
    """`text` (UTF-8) to `path` through `atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()))
