"""The data options' allowed values and their one check, shared by dali_pipes.loader.build_loader and
engine.config (which runs it before start-up). No heavy imports: the config check must stay fast."""
from __future__ import annotations

from typing import Optional

FILE_SOURCES = ("recordio", "folder", "demo")  # what build_loader reads
SOURCES = ("synthetic",) + FILE_SOURCES  # what engine.data.source accepts (synthetic: engine.train.build's own)
DALI_MODES = ("auto", "on", "off")
ON_CORRUPT = ("error", "skip")


def check_data_options(source: str, dali: str, on_corrupt: str, num_workers: int, path: Optional[str],
                       sources=SOURCES) -> None:
    """Raise ValueError naming the engine.data key and the expected values for the first bad option."""
    if source not in sources:
        raise ValueError(f"engine.data.source: expected one of {list(sources)}, got {source!r}")
    if dali not in DALI_MODES:
        raise ValueError(f"engine.data.dali: expected one of {list(DALI_MODES)}, got {dali!r}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"engine.data.on_corrupt: expected one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
    if num_workers < 0:
        raise ValueError(f"engine.data.num_workers: expected >= 0, got {num_workers}")
    if source in ("recordio", "folder") and not path:
        raise ValueError(f"engine.data.path: required for source {source!r}")
