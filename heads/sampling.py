"""Partial FC class sampling: every positive class plus uniform random negatives, without a full-shard sort.

arcface_torch (and our first version) drew ``torch.rand(num_local)``, forced the positives to the top and took
``topk(num_sample)`` followed by a sort: O(num_local) random numbers plus an O(num_local log num_sample) selection
every step, whatever the batch. At 10M classes that is the largest per-step cost outside the rows actually used.

`sample_rows` instead draws only about ``num_sample`` candidates:

1. the negatives live in a *compressed* index space ``[0, n)``, n = num_local - num_positive, that skips the
   positives: compressed value c maps to row ``c + #{i : positive[i] - i <= c}`` (one searchsorted), so
   negatives can never collide with positives and no rejection against them is needed;
2. ``m`` candidates are drawn with ``randint`` where m is chosen so the expected number of distinct values
   exceeds the k negatives needed by four standard deviations; ``torch.unique`` dedupes them (a sort of
   ~k values, not of num_local); in the rare case of too few, more are drawn from the same generator;
3. distinct values of i.i.d. uniform draws form a uniformly random subset (by symmetry), so keeping a random
   k of them (randperm over ~k values, order preserved through a mask) is a uniform k-subset of the negatives;
4. positives and negatives, both sorted and disjoint, are merged by searchsorted (no sort of the union).

Cost: O(k log k) for k = num_sample, independent of num_local. When the negatives needed are a large fraction
of the shard (> `DENSE_FRACTION`, e.g. sample_rate 0.5) candidate drawing would need several times the shard
anyway, so the classic rand + topk over the shard is used; its cost is then proportional to the sample too.

Everything runs on the generator's device and depends only on (labels, generator state): the caller seeds
the generator from (seed, rank, step), which makes the sequence reproducible.
"""
from __future__ import annotations

import math

import torch

DENSE_FRACTION = 0.25  # above this fraction of the non-positive rows, rand + topk over the shard is cheaper


def _merge_sorted_disjoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two sorted 1-D tensors with no common value into one sorted tensor, in O((|a|+|b|) log)."""
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    out[torch.arange(a.numel(), device=a.device) + torch.searchsorted(b, a)] = a
    out[torch.arange(b.numel(), device=b.device) + torch.searchsorted(a, b)] = b
    return out


def _num_draws(n: int, k: int) -> int:
    """Draws from [0, n) whose expected distinct count, n(1 - exp(-m/n)), is k + 4 sigma + 16 (capped).

    Why this many: m i.i.d. uniform draws from n values give on average n(1 - exp(-m/n)) distinct values,
    with a standard deviation below sqrt(k) for the k we ask for. Solving for a target of k + 4 sqrt(k) + 16
    makes a top-up round (a second randint + unique) a rare event, while the surplus of a few sqrt(k) values
    costs almost nothing to discard. At rate 0.1 of the non-positive rows, m is about 1.06 k.
    """
    target = min(k + 4.0 * math.sqrt(k) + 16.0, n - 0.5)
    return max(k, int(math.ceil(-n * math.log1p(-target / n))))


def sample_rows(positive: torch.Tensor, num_local: int, num_sample: int,
                generator: torch.Generator) -> torch.Tensor:
    """Sorted, distinct local rows: all of `positive` plus random negatives, ``max(num_sample, |positive|)``.

    Args:
        positive: sorted distinct local rows that must be included (the classes of this step's labels).
        num_local: rows in the shard.
        num_sample: rows wanted in all.
        generator: seeded generator on the device the result should live on.
    """
    device = positive.device
    num_pos = positive.numel()
    k = num_sample - num_pos
    n = num_local - num_pos
    if k <= 0:
        return positive
    if k >= n:
        return torch.arange(num_local, device=device)
    if k > DENSE_FRACTION * n:  # large fraction: one pass over the shard is the cheaper way
        score = torch.rand(num_local, generator=generator, device=device)
        score[positive] = 2.0
        return torch.topk(score, k=num_sample, sorted=False)[1].sort()[0]

    m = _num_draws(n, k)
    values = torch.unique(torch.randint(n, (m,), generator=generator, device=device))
    while values.numel() < k:  # about 3e-5 per step by construction: top up from the same stream
        more = torch.randint(n, (m,), generator=generator, device=device)
        values = torch.unique(torch.cat([values, more]))
    if values.numel() > k:
        keep = torch.zeros(values.numel(), dtype=torch.bool, device=device)
        keep[torch.randperm(values.numel(), generator=generator, device=device)[:k]] = True
        values = values[keep]  # a uniform k-subset, still sorted
    if num_pos:
        shifted = positive - torch.arange(num_pos, device=device)
        values = values + torch.searchsorted(shifted, values, right=True)
        return _merge_sorted_disjoint(positive, values)
    return values


def sample_rows_topk(positive: torch.Tensor, num_local: int, num_sample: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The previous sampler (arcface_torch's): rand over the whole shard + topk + sort. Kept for the benchmark."""
    if positive.numel() >= num_sample:
        return positive
    score = torch.rand(num_local, generator=generator, device=positive.device)
    score[positive] = 2.0
    return torch.topk(score, k=num_sample, sorted=False)[1].sort()[0]
