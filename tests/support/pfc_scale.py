"""Partial FC at scale, the helpers of the one-process checks (tests/unit/test_pfc_scale.py) and of the chunked
softmax on 2 spawned ranks (tests/distributed/test_pfc_scale.py): a head with a named margin, seeded batches, one
forward/backward's loss and gradients, and the chunked == unchunked comparison both run.

Module-level functions: the spawned ranks call them (engine.runtime.spawn pickles functions by reference).
"""
from __future__ import annotations

from typing import List

import torch

from heads import CombinedMarginLoss, PartialFC

E, B = 8, 6  # embedding size, per-rank batch
MARGINS = {  # name -> CombinedMarginLoss kwargs
    "arc_st": dict(m2=0.5),
    "arc_exact": dict(m2=0.5, margin_grad="exact"),
    "cos": dict(m2=0.0, m3=0.35),
    "arc_filter": dict(m2=0.5, interclass_filtering_threshold=0.05),
}


def make_head(num_classes: int, sample_rate: float = 1.0, margin: str = "arc_st", seed: int = 3, **kw) -> PartialFC:
    """A Partial FC head (scale 16, embedding E) with the margin named in MARGINS; `kw` are PartialFC's options."""
    return PartialFC(CombinedMarginLoss(s=16.0, **MARGINS[margin]), E, num_classes, sample_rate, seed=seed, **kw)


def make_batch(world: int, num_classes: int, step: int = 0, batch: int = B) -> tuple:
    """Embeddings [world * batch, E] and labels of every rank for `step` (seeded by the step)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * batch, E, generator=g), torch.randint(0, num_classes, (world * batch,), generator=g)


def dense(grad: torch.Tensor) -> torch.Tensor:
    """`grad` as a dense tensor (a sparse one densified)."""
    return grad.to_dense() if grad.is_sparse else grad


def one_step(head: PartialFC, emb: torch.Tensor, labels: torch.Tensor, rank: int = 0, batch: int = B) -> dict:
    """Loss, local embedding grad, dense weight grad (from .grad or .sampled_grad) of one forward/backward."""
    x = emb[rank * batch:(rank + 1) * batch].clone().requires_grad_()
    loss = head(x, labels[rank * batch:(rank + 1) * batch])
    loss.backward()
    if head.weight.grad is not None:
        wg = dense(head.weight.grad)
    else:
        rg = head.weight.sampled_grad
        wg = torch.zeros(head.weight.shape).index_add_(0, rg.index, rg.grad)
    head.weight.grad = None
    if hasattr(head.weight, "sampled_grad"):
        head.weight.sampled_grad = None
    return dict(loss=loss.detach(), emb_grad=x.grad, weight_grad=wg,
                index=None if head.last_sampled_index is None else head.last_sampled_index.clone())


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> None:
    """Assert `a` == `b` to `rtol`, relative to b's largest magnitude."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-9)


# -- chunked == unchunked ---------------------------------------------------------------------------------------

CHUNK_CASES = [  # num_classes, sample_rate, margin
    (40, 1.0, "arc_st"), (40, 1.0, "arc_exact"), (40, 1.0, "cos"), (40, 1.0, "arc_filter"),
    (100, 0.3, "arc_st"), (100, 0.3, "arc_filter"),
]
CHUNKS = (1, 7, 16)  # 7 divides neither 40/20 nor the 30/15 sampled columns


def chunk_compare(world: int, rank: int) -> List[List[dict]]:
    """Per case of CHUNK_CASES: one_step's results of the unchunked head, then of each chunk size in CHUNKS."""
    out = []
    for num_classes, rate, margin in CHUNK_CASES:
        emb, labels = make_batch(world, num_classes)
        results = [one_step(make_head(num_classes, rate, margin, chunk_size=c), emb, labels, rank)
                   for c in (10 ** 6,) + CHUNKS]  # 10**6 >= columns: the unchunked path
        out.append(results)
    return out


def check_chunks(per_case: List[List[dict]]) -> None:
    """Assert every chunked result of `chunk_compare` equals the unchunked one (same sample, loss, gradients)."""
    for (num_classes, rate, margin), results in zip(CHUNK_CASES, per_case):
        ref = results[0]
        for res in results[1:]:
            if rate < 1:
                assert torch.equal(res["index"], ref["index"])  # same sample: sampling is chunk-independent
            close(res["loss"], ref["loss"])
            close(res["emb_grad"], ref["emb_grad"])
            close(res["weight_grad"], ref["weight_grad"])
