"""PartialFC in one process against a full-softmax reference written with plain torch ops: loss and gradients,
shard sizes and block init independent of the world size, bf16 storage, autocast, errors, the meta device.
(2 gloo ranks against the same reference: tests/distributed/test_partial_fc.py; the reference:
tests/support/partial_fc.py.)
"""

import pytest
import torch

from heads import CombinedMarginLoss, PartialFC
from tests.support.partial_fc import (B, CONFIGS, E, assert_close_rel, check_full, make_batch, make_head, reference,
                                     run_step)


# -- full softmax (sample_rate=1) -------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_process_matches_full_softmax_reference(cfg):
    num_classes, m2, m3, margin_grad = cfg
    emb, labels = make_batch(1, num_classes, seed=num_classes)
    head = make_head(num_classes, m2=m2, m3=m3, margin_grad=margin_grad)
    check_full([run_step(head, emb, labels, 0, 1)], 1, *cfg)


def test_shard_sizes_and_block_init_are_world_size_independent():
    from heads.partial_fc import shard_range

    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    import heads.partial_fc as pfc

    old = pfc.INIT_BLOCK_ROWS
    pfc.INIT_BLOCK_ROWS = 4  # several init blocks, shards straddling them
    try:
        full = make_head(10, seed=3).weight.detach()
        # emulate ranks of a 3-way split without a process group
        parts = []
        for r in range(3):
            head = make_head(10, seed=3)
            head.class_start, head.num_local = shard_range(10, r, 3)
            head.weight.data = torch.empty(head.num_local, E)
            head.reset_parameters()
            parts.append(head.weight.detach())
        assert torch.equal(torch.cat(parts), full)
        assert not torch.equal(make_head(10, seed=4).weight, full)
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
    ref_loss, ref_emb_grad, _ = reference(emb, labels, make_head(12).weight.detach())
    head = make_head(12)
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

    head = make_head(40, sample_rate=0.5)
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
    head = make_head(12)
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
        make_head(12, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        make_head(0)


def test_head_lives_on_meta_without_init():
    head = PartialFC(CombinedMarginLoss(), E, 10**7, device="meta")
    assert head.weight.shape == (10**7, E) and head.weight.is_meta
    assert head.num_local == 10**7 and head.class_start == 0
