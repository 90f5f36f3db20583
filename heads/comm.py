"""Rank and world-size helpers of the process group, for the heads and the engine alike.

Why this module is here: the heads are a lower layer than the engine (the engine builds and steps them; a head
only needs to know its rank and world in the group it is given), so they must not import ``engine``. The few
helpers both need live in this leaf, which imports nothing but torch; ``engine.runtime.dist`` re-exports them with the
rest of its process-group helpers (init, devices, barrier, ...), so engine code keeps calling
``engine.runtime.dist.get_rank()``. Placing the leaf in ``engine`` instead would make every head import the engine
package.

Every helper answers for a single process (rank 0, world 1) when no process group exists, so code that runs
under one process needs no special case.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

__all__ = ["is_initialized", "get_rank", "get_world_size"]


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """Rank in `group` (default group when None); 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Size of `group` (default group when None); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1
