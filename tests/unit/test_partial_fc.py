"""PartialFC in one process against a full-softmax reference written with plain torch ops: loss and gradients,
shard sizes and block init independent of the world size, bf16 storage, autocast, errors, the meta device.
(2 gloo ranks against the same reference: tests/distributed/test_partial_fc.py.)
"""

import pytest
import torch
import torch.nn.functional as F

from heads import CombinedMarginLoss, PartialFC

E = 8
B = 4  # per rank
S = 64.0


def make_batch(world_size, num_classes, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(world_size * batch, E, generator=g)
    labels = torch.randint(0, num_classes, (world_size * batch,), generator=g)
    return emb, labels


def margin_logits(cos, labels, m2, m3, margin_grad):
    """Scaled logits with an explicit margin formula on the target entries."""
    onehot = F.one_hot(labels, cos.size(1)).bool()
    if m3 > 0:
        target = cos - m3
    elif margin_grad == "exact":
        target = torch.cos(torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) + m2)
    else:  # straight-through: the margin's value, the plain cosine's gradient
        target = cos + (torch.cos(torch.acos(cos.detach().clamp(-1, 1)) + m2) - cos.detach())
    return S * torch.where(onehot, target, cos)


def reference(emb, labels, weight, m2=0.5, m3=0.0, margin_grad="straight_through"):
    """Loss, d loss/d emb, d loss/d weight of the full softmax over all classes (columns = weight rows)."""
    emb = emb.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    cos = F.normalize(emb) @ F.normalize(weight).t()
    loss = F.cross_entropy(margin_logits(cos, labels, m2, m3, margin_grad), labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def assert_close_rel(actual, expected, rtol=1e-5):
    atol = rtol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _head(num_classes, sample_rate=1.0, seed=0, m2=0.5, m3=0.0, margin_grad="straight_through"):
    return PartialFC(CombinedMarginLoss(s=S, m2=m2, m3=m3, margin_grad=margin_grad), E, num_classes,
                     sample_rate, seed=seed)


def _run_step(head, emb, labels, rank, world_size, batch=B):
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


def _check_full(results, world_size, num_classes, m2, m3, margin_grad):
    emb, labels = make_batch(world_size, num_classes, seed=num_classes)
    full = _head(num_classes).weight.detach()  # a 1-rank head's weight, same seed
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


@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_process_matches_full_softmax_reference(cfg):
    num_classes, m2, m3, margin_grad = cfg
    emb, labels = make_batch(1, num_classes, seed=num_classes)
    head = _head(num_classes, m2=m2, m3=m3, margin_grad=margin_grad)
    _check_full([_run_step(head, emb, labels, 0, 1)], 1, *cfg)


def test_shard_sizes_and_block_init_are_world_size_independent():
    from heads.partial_fc import shard_range

    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    import heads.partial_fc as pfc

    old = pfc.INIT_BLOCK_ROWS
    pfc.INIT_BLOCK_ROWS = 4  # several init blocks, shards straddling them
    try:
        full = _head(10, seed=3).weight.detach()
        # emulate ranks of a 3-way split without a process group
        parts = []
        for r in range(3):
            head = _head(10, seed=3)
            head.class_start, head.num_local = shard_range(10, r, 3)
            head.weight.data = torch.empty(head.num_local, E)
            head.reset_parameters()
            parts.append(head.weight.detach())
        assert torch.equal(torch.cat(parts), full)
        assert not torch.equal(_head(10, seed=4).weight, full)
    finally:
        pfc.INIT_BLOCK_ROWS = old
    assert float(full.std()) == pytest.approx(0.01, rel=0.5)


def test_bf16_storage_and_embeddings_give_fp32_loss_and_grads():
    emb, labels = make_batch(1, 12)
    head = PartialFC(CombinedMarginLoss(), E, 12, storage_dtype="bf16")
    assert head.weight.dtype == torch.bfloat16
    x = emb.bfloat16().requires_grad_()
    loss = head(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # the gradient cannot live in .grad (bf16): it stays fp32 as weight.sampled_grad
    assert head.weight.grad is None and head.weight.sampled_grad.grad.dtype == torch.float32


def test_autocast_does_not_lower_head_precision():
    emb, labels = make_batch(1, 12)
    ref_loss, ref_emb_grad, _ = reference(emb, labels, _head(12).weight.detach())
    head = _head(12)
    x = emb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, labels)
    loss.backward()
    assert_close_rel(loss.detach(), ref_loss)
    assert_close_rel(x.grad, ref_emb_grad)


def test_trainer_sees_a_non_finite_sparse_head_gradient():
    """The trainer's guard reads a sampled head's sparse .grad through its stored values (no coalesce): finite
    after a normal step, not finite once one sampled row holds inf or NaN."""
    from engine.train.trainer import head_grad_finite

    head = _head(40, sample_rate=0.5)
    emb, labels = make_batch(1, 40)
    head(emb, labels).backward()
    grad = head.weight.grad
    assert grad.is_sparse and bool(head_grad_finite(head.weight))
    for bad in (float("inf"), float("nan")):
        values = grad.coalesce().values().clone()
        values[1, 3] = bad
        head.weight.grad = torch.sparse_coo_tensor(grad.coalesce().indices(), values, grad.shape, check_invariants=True)
        assert not bool(head_grad_finite(head.weight)), bad


def test_errors_single_process():
    head = _head(12)
    with pytest.raises(ValueError, match=r"outside \[0, 12\).*-1"):
        head(torch.randn(B, E), torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="embedding_size"):
        head(torch.randn(B, E + 1), torch.arange(B))
    with pytest.raises(ValueError, match="integer"):
        head(torch.randn(B, E), torch.arange(B).float())
    head(torch.randn(B, E), torch.arange(B).view(B, 1))  # [B, 1] labels accepted
    with pytest.raises(ValueError, match="changed from 4"):
        head(torch.randn(B + 2, E), torch.arange(B + 2))
    with pytest.raises(ValueError, match="sample_rate"):
        _head(12, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        _head(0)


def test_head_lives_on_meta_without_init():
    head = PartialFC(CombinedMarginLoss(), E, 10**7, device="meta")
    assert head.weight.shape == (10**7, E) and head.weight.is_meta
    assert head.num_local == 10**7 and head.class_start == 0
