"""Embedding a set of images on every rank at once: each rank takes one contiguous slice, and the slices'
embeddings are all-gathered, so every rank ends up with the whole set's embeddings in order.

The verification hook (engine.train.hooks.VerificationHook, a ``.bin``'s images) and the IJB command
(engine.eval.ijb_eval, a dataset's aligned faces) split their work this way: rank r embeds items
[r*P, min((r+1)*P, M)) with P = ceil(M / world), so every rank does 1/world of the work instead of all of them
waiting for rank 0. The all-gather needs tensors of one shape on every rank: each slice is zero-padded to P
rows before it and the padding is dropped after it.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from engine.runtime import dist

__all__ = ["rank_slice", "gather_slices"]


def rank_slice(num_items: int, rank: int, world_size: int) -> Tuple[int, int, int]:
    """(start, stop, per_rank) of rank `rank`'s slice of `num_items` items split over `world_size` ranks.

    per_rank = ceil(num_items / world_size); the last ranks' slices are shorter, possibly empty.
    """
    if num_items < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_slice: expected num_items >= 0 and 0 <= rank < world_size, got {num_items}, "
                         f"{rank}, {world_size}")
    per_rank = -(-num_items // world_size)
    return min(rank * per_rank, num_items), min((rank + 1) * per_rank, num_items), per_rank


def gather_slices(local: np.ndarray, num_items: int, device: torch.device, axis: int = 0) -> np.ndarray:
    """Every rank's slice (see `rank_slice`) of the set's arrays, concatenated along `axis` in rank order.

    All ranks must call (one all-gather), each with its own slice: `local` holds this rank's items along
    `axis`, at least as many as its slice has (rows past them, a caller's batch padding, are ignored), and the
    same shape elsewhere on every rank. Without a process group `local` is the whole set and is returned cut
    to `num_items`.

    Returns:
        An array of `local`'s dtype with `num_items` entries along `axis`.
    """
    if not dist.is_initialized():
        return np.take(local, np.arange(num_items), axis=axis)
    world, rank = dist.get_world_size(), dist.get_rank()
    start, stop, per_rank = rank_slice(num_items, rank, world)
    if local.shape[axis] < stop - start:
        raise ValueError(f"gather_slices: rank {rank} holds {local.shape[axis]} items along axis {axis}, its "
                         f"slice has {stop - start}")
    shape = list(local.shape)
    shape[axis] = per_rank
    padded = np.zeros(shape, dtype=local.dtype)
    keep = [slice(None)] * local.ndim
    keep[axis] = slice(0, min(per_rank, local.shape[axis]))
    padded[tuple(keep)] = local[tuple(keep)]
    mine = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine)
    counts = [rank_slice(num_items, r, world)[1] - rank_slice(num_items, r, world)[0] for r in range(world)]
    return np.concatenate([p.cpu().numpy().take(np.arange(n), axis=axis) for p, n in zip(parts, counts)],
                          axis=axis)
