"""The full-softmax reference of PartialFC, written with plain torch ops, and the checks against it that
tests/unit/test_partial_fc.py (one process) and tests/distributed/test_partial_fc.py (2 gloo ranks) share: seeded
batches, a head with ArcFace/CosFace margins, one step's results of a rank, and the comparison of every rank's
results with the reference.

Module-level functions: the spawned ranks call them (engine.runtime.spawn pickles functions by reference).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from heads import CombinedMarginLoss, PartialFC

E = 8
B = 4  # per rank
S = 64.0


def make_batch(world_size: int, num_classes: int, seed: int = 0, batch: int = B) -> tuple:
    """Embeddings [world_size * batch, E] and labels of every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(world_size * batch, E, generator=g)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=g)
    return emb, labels


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, m2: float, m3: float, margin_grad: str) -> torch.Tensor:
    """Scaled logits with an explicit margin formula on the target entries."""
    onehot = F.one_hot(labels, cos.size(1)).bool()
    if m3 > 0:
        target = cos - m3
    elif margin_grad == "exact":
        target = torch.cos(torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) + m2)
    else:  # straight-through: the margin's value, the plain cosine's gradient
        target = cos + (torch.cos(torch.acos(cos.detach().clamp(-1, 1)) + m2) - cos.detach())
    return S * torch.where(onehot, target, cos)


def reference(emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, m2: float = 0.5, m3: float = 0.0,
              margin_grad: str = "straight_through") -> tuple:
    """Loss, d loss/d emb, d loss/d weight of the full softmax over all classes (columns = weight rows)."""
    emb = emb.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    cos = F.normalize(emb) @ F.normalize(weight).t()
    loss = F.cross_entropy(margin_logits(cos, labels, m2, m3, margin_grad), labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Assert `actual` == `expected` to `rtol`, relative to expected's largest magnitude."""
    atol = rtol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def make_head(num_classes: int, sample_rate: float = 1.0, seed: int = 0, m2: float = 0.5, m3: float = 0.0,
              margin_grad: str = "straight_through") -> PartialFC:
    """A PartialFC head (scale S, embedding E) with the margins m2 (ArcFace) and m3 (CosFace)."""
    return PartialFC(CombinedMarginLoss(s=S, m2=m2, m3=m3, margin_grad=margin_grad), E, num_classes,
                     sample_rate, seed=seed)


def run_step(head: PartialFC, emb: torch.Tensor, labels: torch.Tensor, rank: int, world_size: int,
             batch: int = B) -> dict:
    """One forward/backward of rank `rank` on its slice of the batch: loss, gradients, its shard and sample, and
    whether the head left its inputs unchanged."""
    local = emb[rank * batch:(rank + 1) * batch].clone().requires_grad_()
    local_labels = labels[rank * batch:(rank + 1) * batch].clone()
    loss = head(local, local_labels)
    loss.backward()
    grad = head.weight.grad
    return dict(loss=loss.detach(), emb_grad=local.grad, weight=head.weight.detach().clone(),
                weight_grad=grad.to_dense() if grad.is_sparse else grad, sparse=grad.is_sparse,
                class_start=head.class_start, num_local=head.num_local,
                index=None if head.last_sampled_index is None else head.last_sampled_index.clone(),
                inputs_unchanged=torch.equal(local.detach(), emb[rank * batch:(rank + 1) * batch])
                and torch.equal(local_labels, labels[rank * batch:(rank + 1) * batch]))


# -- full softmax (sample_rate=1) -------------------------------------------------------------------------------

CONFIGS = [  # num_classes, m2, m3, margin_grad
    (12, 0.5, 0.0, "straight_through"),
    (11, 0.5, 0.0, "straight_through"),  # not divisible by the world size
    (11, 0.5, 0.0, "exact"),
    (12, 0.0, 0.35, "straight_through"),  # CosFace
]


def check_full(results: List[dict], world_size: int, num_classes: int, m2: float, m3: float,
               margin_grad: str) -> None:
    """Assert every rank's run_step results (full softmax, the batch of make_batch seeded with num_classes) equal
    the reference: shards, loss, embedding and weight gradients."""
    emb, labels = make_batch(world_size, num_classes, seed=num_classes)
    full = make_head(num_classes).weight.detach()  # a 1-rank head's weight, same seed
    ref_loss, ref_emb_grad, ref_w_grad = reference(emb, labels, full, m2, m3, margin_grad)
    assert sum(r["num_local"] for r in results) == num_classes
    assert [r["class_start"] for r in results] == [sum(x["num_local"] for x in results[:i])
                                                   for i in range(world_size)]
    # shards of a W-rank head concatenate to the 1-rank head's weight
    assert torch.equal(torch.cat([r["weight"] for r in results]), full)
    for r in results:
        assert r["inputs_unchanged"] and not r["sparse"]
        assert_close_rel(r["loss"], ref_loss)
    # each rank's embedding gradient is world_size x the true gradient (the DP wrapper averages it back)
    assert_close_rel(torch.cat([r["emb_grad"] for r in results]) / world_size, ref_emb_grad)
    assert_close_rel(torch.cat([r["weight_grad"] for r in results]), ref_w_grad)
