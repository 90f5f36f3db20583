"""The run configuration: one file per run (JSON or YAML), ``--set`` overrides, typed sections under ``engine``,
DeepSpeed's own keys at the top level, every check that can be made before distributed start-up.

    schema          RunConfig, validation, combinations (``load``), the device check, ``documented_settings``
    sections        the typed ``engine`` sections, every key with its doc and choices (or matrix values)
    files           reading files, applying ``--set``, building dataclasses, ``setting``, ConfigError
    deepspeed_keys  the DeepSpeed keys we accept at the top level, and those we document (precision routes)
    fsdp            the ``engine.fsdp`` section and the DeepSpeed-only keys refused under it
    length          the run's length in optimizer steps (``max_steps`` or ``epochs``) and its warm-up
    dataset         the data folder's presence (checked before start-up), its verification sets (``targets``)
    arcface_torch   converting an arcface_torch config (``python -m engine.convert_config``)

May import engine.runtime only.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.config.files import ConfigError
from engine.config.schema import RunConfig, load

__all__ = ["CONFIG_ERROR_EXIT", "ConfigError", "RunConfig", "load", "load_or_report"]

# Exit status of a command whose config was refused (run.py, engine.profile, engine.plan).
CONFIG_ERROR_EXIT = 2


def load_or_report(path: str, overrides: Sequence[str] = ()) -> Optional[RunConfig]:
    """`load(path, overrides)` for a command's entry point: the config, or None after the one-line
    ``config error: ...`` on stderr, and the command then exits with CONFIG_ERROR_EXIT.

    Printed, not logged: the command ends before any run exists (every rank of a launched job says it).
    """
    try:
        return load(path, list(overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return None
