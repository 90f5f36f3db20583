"""Partial FC's chunked softmax on 2 spawned ranks equals the unchunked head (loss, embedding and weight
gradients). (One process, offload, storage dtype, sampler, sparse updates: tests/unit/test_pfc_scale.py.)
"""

import pickle

import torch

from engine.runtime.spawn import run_distributed
from heads import CombinedMarginLoss, PartialFC

E, B = 8, 6  # embedding size, per-rank batch
MARGINS = {  # name -> CombinedMarginLoss kwargs
    "arc_st": dict(m2=0.5),
    "arc_exact": dict(m2=0.5, margin_grad="exact"),
    "cos": dict(m2=0.0, m3=0.35),
    "arc_filter": dict(m2=0.5, interclass_filtering_threshold=0.05),
}


def _head(num_classes, sample_rate=1.0, margin="arc_st", seed=3, **kw):
    return PartialFC(CombinedMarginLoss(s=16.0, **MARGINS[margin]), E, num_classes, sample_rate, seed=seed, **kw)


def _batch(world, num_classes, step=0, batch=B):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * batch, E, generator=g), torch.randint(0, num_classes, (world * batch,), generator=g)


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def _one_step(head, emb, labels, rank=0, batch=B):
    """Loss, local embedding grad, dense weight grad (from .grad or .sampled_grad) of one forward/backward."""
    x = emb[rank * batch:(rank + 1) * batch].clone().requires_grad_()
    loss = head(x, labels[rank * batch:(rank + 1) * batch])
    loss.backward()
    if head.weight.grad is not None:
        wg = _dense(head.weight.grad)
    else:
        rg = head.weight.sampled_grad
        wg = torch.zeros(head.weight.shape).index_add_(0, rg.index, rg.grad)
    head.weight.grad = None
    if hasattr(head.weight, "sampled_grad"):
        head.weight.sampled_grad = None
    return dict(loss=loss.detach(), emb_grad=x.grad, weight_grad=wg,
                index=None if head.last_sampled_index is None else head.last_sampled_index.clone())


def _close(a, b, rtol=2e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-9)


# -- chunked == unchunked ---------------------------------------------------------------------------------------

CHUNK_CASES = [  # num_classes, sample_rate, margin
    (40, 1.0, "arc_st"), (40, 1.0, "arc_exact"), (40, 1.0, "cos"), (40, 1.0, "arc_filter"),
    (100, 0.3, "arc_st"), (100, 0.3, "arc_filter"),
]
CHUNKS = (1, 7, 16)  # 7 divides neither 40/20 nor the 30/15 sampled columns


def _chunk_compare(world, rank):
    out = []
    for num_classes, rate, margin in CHUNK_CASES:
        emb, labels = _batch(world, num_classes)
        results = [_one_step(_head(num_classes, rate, margin, chunk_size=c), emb, labels, rank)
                   for c in (10 ** 6,) + CHUNKS]  # 10**6 >= columns: the unchunked path
        out.append(results)
    return out


def _check_chunks(per_case):
    for (num_classes, rate, margin), results in zip(CHUNK_CASES, per_case):
        ref = results[0]
        for res in results[1:]:
            if rate < 1:
                assert torch.equal(res["index"], ref["index"])  # same sample: sampling is chunk-independent
            _close(res["loss"], ref["loss"])
            _close(res["emb_grad"], ref["emb_grad"])
            _close(res["weight_grad"], ref["weight_grad"])


def _dist_chunks():
    import torch.distributed as dist

    return pickle.dumps(_chunk_compare(dist.get_world_size(), dist.get_rank()))


def test_chunked_equals_unchunked_two_ranks():
    per_rank = [pickle.loads(r) for r in run_distributed(_dist_chunks, 2, timeout_s=180)]
    for r in per_rank:
        _check_chunks(r)
    for case in range(len(CHUNK_CASES)):  # the loss is global: the same on both ranks
        _close(per_rank[1][case][2]["loss"], per_rank[0][case][0]["loss"])
