"""Gradient all-reduce started during the backward, bucket by bucket, as torch DDP's reducer does.

DeepSpeed at ZeRO stage 0 all-reduces gradients after the backward has finished: it concatenates every
gradient into one fresh buffer (`torch.cat`, a new allocation of the whole model's size each step), all-reduces
it and copies it back. Measured against a plain torch DDP loop on 2 CPU ranks (r18, bench/overhead.py) that
is the engine's largest extra cost: the concatenation alone was 6-10% of a step's CPU time, and nothing of the
communication overlapped the backward. `GradReducer` keeps persistent flat buckets (about `bucket_bytes` each,
parameters in reverse order, the order their gradients become ready), copies each gradient into its bucket the
moment autograd has accumulated it (a post-accumulate-grad hook), starts the bucket's all-reduce
asynchronously as soon as the bucket is complete, and at the end of the backward waits for all of them and
scales by 1 / world size; each `.grad` then is its slice of the bucket (no copy back).

The arithmetic is DeepSpeed's default (postscale: sum, then multiply by 1 / world size), element by element,
so on two ranks the averaged gradients are bitwise DeepSpeed's. Buckets are launched in bucket order on every
rank (a bucket that completes early waits for the ones before it), so the collectives match across ranks
whatever order the hooks fire in. A parameter without a gradient in this backward contributes zeros and gets
the zeros' average as its gradient, as DeepSpeed's path gives it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as tdist

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20  # torch DDP's default bucket_cap_mb


class GradReducer:
    """Averages the gradients of `params` over the default process group while the backward runs.

    Call `start()` before a backward whose gradients must be averaged (the accumulation boundary) and
    `finish()` after it; backwards between the two calls' pairs (no-sync micro-steps) are left alone.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, group=None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.world_size = tdist.get_world_size(group)
        trained = [p for p in params if p.requires_grad]
        if not trained:
            raise ValueError("GradReducer: no parameter requires a gradient")
        dtypes = {p.dtype for p in trained} | {p.device for p in trained}
        if len(dtypes) != 2:
            raise ValueError(f"GradReducer: parameters of one dtype on one device expected, got {dtypes}")
        self.buckets: List[torch.Tensor] = []
        self.members: List[List[Tuple[torch.nn.Parameter, torch.Tensor]]] = []  # per bucket: (parameter, its view)
        self.slot: Dict[int, Tuple[int, torch.Tensor]] = {}  # id(parameter) -> (bucket, its view)
        elem = trained[0].element_size()
        current: List[Tuple[torch.nn.Parameter, int]] = []
        size = 0
        for p in reversed(trained):  # the backward produces the last layers' gradients first
            if current and (size + p.numel()) * elem > bucket_bytes:
                self._add_bucket(current, size)
                current, size = [], 0
            current.append((p, size))
            size += p.numel()
        self._add_bucket(current, size)
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in trained]
        self._active = False
        self._copied: set = set()
        self._pending: List[int] = []
        self._works: List[Optional[object]] = []
        self._next = 0

    def _add_bucket(self, members: List[Tuple[torch.nn.Parameter, int]], numel: int) -> None:
        p0 = members[0][0]
        index = len(self.buckets)
        bucket = torch.zeros(numel, dtype=p0.dtype, device=p0.device)
        self.buckets.append(bucket)
        self.members.append([(p, _view(bucket, offset, p)) for p, offset in members])
        for p, view in self.members[-1]:
            self.slot[id(p)] = (index, view)

    # -- one backward -------------------------------------------------------------------------------------
    def start(self) -> None:
        """The next backward's gradients are averaged (call `finish` after it)."""
        self._active = True
        self._pending = [len(m) for m in self.members]
        self._works = [None] * len(self.buckets)
        self._next = 0
        self._copied = set()

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self._active:
            return
        b, part = self.slot[id(p)]
        if p.grad.data_ptr() != part.data_ptr():  # not already accumulated in place (a bucket view kept as .grad)
            part.copy_(p.grad)
        self._copied.add(id(p))
        self._pending[b] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._works[self._next] = tdist.all_reduce(self.buckets[self._next], group=self.group, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Wait for every bucket (parameters without a gradient count as zeros), average; `.grad` = its slice."""
        if not self._active:
            raise AssertionError("GradReducer.finish() without start()")
        for b, members in enumerate(self.members):
            if self._pending[b]:
                for p, part in members:
                    if id(p) in self._copied:
                        continue
                    if p.grad is None:  # no gradient at all: zeros, as DeepSpeed's all-reduce path
                        part.zero_()
                    elif p.grad.data_ptr() != part.data_ptr():  # accumulated in earlier micro-steps only
                        part.copy_(p.grad)
                self._pending[b] = 0
        self._launch_ready()
        scale = 1.0 / self.world_size
        for b, work in enumerate(self._works):
            work.wait()
            self.buckets[b].mul_(scale)
            for p, part in self.members[b]:
                # .grad becomes the bucket's slice itself (no copy back): the optimizer reads it, zero_grad drops
                # it (or zeroes it in place, and the next backward accumulates straight into the bucket)
                p.grad = part
        self._active = False

    def close(self) -> None:
        """Remove the hooks (the module outlives the reducer in tests that build several engines)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _view(bucket: torch.Tensor, offset: int, p: torch.nn.Parameter) -> torch.Tensor:
    """`p`'s slice of `bucket` from `offset`, shaped and strided as `p` is when the reducer is built (a
    channels_last weight gets a channels_last view): autograd lays a gradient out as its parameter, so the copy
    into the bucket is a straight one, and the optimizer's element-wise ops on `.grad` see the parameter's own
    layout. Made once per parameter: the layout is final before the reducer is built (the DeepSpeed backend
    converts the weights first)."""
    flat = bucket[offset:offset + p.numel()]
    if p.is_contiguous() or not _dense(p):
        return flat.view_as(p)
    return flat.as_strided(p.size(), p.stride(), flat.storage_offset())


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill exactly `numel` consecutive places of its storage in some order of its dimensions
    (contiguous in some permutation: channels_last and the like), so a flat slice can hold it with its strides."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True
