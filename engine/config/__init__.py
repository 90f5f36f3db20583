"""The run configuration: one file per run (JSON or YAML), ``--set`` overrides, typed sections under ``engine``,
DeepSpeed's own keys at the top level, every check that can be made before distributed start-up.

    schema          RunConfig and its sections, defaults, validation, combinations (``load``)
    files           reading files, applying ``--set``, building dataclasses, ConfigError
    deepspeed_keys  the DeepSpeed keys we accept at the top level
    fsdp            the ``engine.fsdp`` section and the DeepSpeed-only keys refused under it
    arcface_torch   converting an arcface_torch config (``python -m engine.convert_config``)

May import engine.runtime only.
"""
from engine.config.files import ConfigError
from engine.config.schema import RunConfig, load

__all__ = ["ConfigError", "RunConfig", "load"]
