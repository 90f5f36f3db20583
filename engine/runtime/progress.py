"""Progress bars for the long command-line tools (pack, make_bin, embed, eval_ijb, export's check): tqdm on
stderr, shown only when stderr is a terminal (a log file, a pipe or a test sees nothing of them), and under a
launcher only on rank 0 (its own share of the work stands for every rank's).

Training itself has none: its progress is the logger's step lines (engine.train.hooks.LoggerHook).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional

__all__ = ["progress"]


def progress(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", enabled: bool = True):
    """A tqdm bar over `iterable` (or updated by hand with `.update(n)`), or a silent stand-in with the same
    methods when stderr is not a terminal, `enabled` is false or this is not rank 0."""
    from tqdm import tqdm

    from engine.runtime.log import current_rank

    show = enabled and current_rank() == 0 and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show, dynamic_ncols=True)
