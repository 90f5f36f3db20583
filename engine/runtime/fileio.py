"""Files a run must never half-write or misreport: atomic, fsynced writes that name the file and errno on
failure, and tensor-file reads that name the file they could not read.

torch.save reports a failed write (disk full, quota, I/O error) only as ``unexpected pos ...`` from its zip
writer, and torch.load reports a truncated file as ``PytorchStreamReader failed ...``; neither says which file.
Checkpoints (engine.checkpoint) and the exported model go through here instead.
"""
from __future__ import annotations

import errno as errno_mod
import io
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from engine.runtime import dist


class WriteError(dist.JobError):
    """A file could not be written; the message names the file and the errno."""


class ReadError(ValueError):
    """A file that cannot be read (missing, truncated, corrupt); the message names it."""


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
    atomic_write(path, lambda f: f.write(text.encode()))


def load_tensors(path: os.PathLike) -> Any:
    """torch.load(path) memory-mapped, weights only; ReadError naming `path` when it cannot be read."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise ReadError(f"{path}: missing") from None
    except Exception as exc:  # zip, pickle and unpickling errors of every kind: name the file
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise ReadError(f"{path}: unreadable ({type(exc).__name__}: {first})") from None


def first_nonfinite(tensors: Dict[str, Any], what: str) -> Optional[str]:
    """'<what> <name>' of the first floating-point tensor in `tensors` (nested dicts) holding inf or NaN."""
    for name, value in tensors.items():
        if isinstance(value, dict):
            found = first_nonfinite(value, f"{what} {name}")
            if found:
                return found
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{what} {name!r}"
    return None
