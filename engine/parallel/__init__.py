"""The data-parallel backbone behind one interface (``backend.ParallelBackbone``), implemented by DeepSpeed ZeRO 0-3
(``deepspeed_backend``) and PyTorch FSDP2 (``fsdp_backend``); what both share (``common``: building the plain
backbone, host memory during set-up, activation checkpointing, the non-finite check).

The Partial FC head never goes through this package: its class centres are rank-unique shards
(docs/architecture.md, "The one subtle rule"). May import engine.runtime and engine.config.
"""
from engine.parallel.common import (all_finite, apply_activation_checkpointing, build_plain_model,
                                    check_state_keys, freed_host_memory_returned, init_as_plain_build)

__all__ = ["all_finite", "apply_activation_checkpointing", "build_plain_model", "check_state_keys",
           "freed_host_memory_returned", "init_as_plain_build"]
