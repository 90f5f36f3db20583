"""Row-sparse SGD / AdamW: equal to torch.optim with every row present, lazy (untouched) rows otherwise."""
import copy

import pytest
import torch

from heads import CombinedMarginLoss, PartialFC, RowSparseAdamW, RowSparseSGD, build_head_optimizer, sparse_optim
from heads.class_store import row_grad_of, sampled_rows

ROWS, COLS = 10, 6


def grads(num_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ROWS, COLS, generator=g) for _ in range(num_steps)]


def as_sparse(dense, rows, split_duplicates=False):
    """COO gradient with `rows` of `dense`, uncoalesced and unordered; optionally each row split in two halves."""
    rows = torch.as_tensor(rows)
    perm = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(1))]
    values = dense[perm]
    if split_duplicates:
        perm = torch.cat([perm, perm])
        values = torch.cat([values * 0.25, values * 0.75])
    return torch.sparse_coo_tensor(perm.view(1, -1), values, dense.shape, check_invariants=True)


def run(opt_cls, grad_list, sparse, rows=None, **kw):
    w = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(42)))
    opt = opt_cls([w], **kw)
    for g in grad_list:
        r = range(ROWS) if rows is None else rows
        w.grad = as_sparse(g, list(r), split_duplicates=True) if sparse else g.clone()
        opt.step()
    return w.detach(), opt


@pytest.fixture(params=["one_block", "blocks_of_3_rows"])
def blocks(request, monkeypatch):
    """The CPU row-block size of the sparse update: default (one block here) or 3 rows (4 blocks, last partial)."""
    if request.param == "blocks_of_3_rows":
        monkeypatch.setattr(sparse_optim, "CPU_BLOCK_ELEMS", 3 * COLS)
    return request.param


@pytest.mark.parametrize("sparse", [True, False])
def test_sgd_equals_torch_sgd_with_all_rows(sparse, blocks):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    ours, _ = run(RowSparseSGD, grads(6), sparse, **kw)
    ref, _ = run(torch.optim.SGD, grads(6), False, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_adamw_equals_torch_adamw_with_all_rows(sparse, blocks):
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours, _ = run(RowSparseAdamW, grads(6), sparse, **kw)
    ref, _ = run(torch.optim.AdamW, grads(6), False, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sgd_updates_only_present_rows_and_freezes_momentum(blocks):
    lr, mom, wd = 0.1, 0.9, 5e-4
    w = torch.nn.Parameter(torch.randn(ROWS, COLS))
    opt = RowSparseSGD([w], lr=lr, momentum=mom, weight_decay=wd)
    g1, g2 = grads(2)
    w0 = w.detach().clone()
    w.grad = as_sparse(g1, [1, 3, 5], split_duplicates=True)
    opt.step()
    w1 = w.detach().clone()
    absent = [0, 2, 4, 6, 7, 8, 9]
    assert torch.equal(w1[absent], w0[absent])
    m1 = g1[[1, 3, 5]] + wd * w0[[1, 3, 5]]
    torch.testing.assert_close(w1[[1, 3, 5]], w0[[1, 3, 5]] - lr * m1)
    buf = opt.state[w]["momentum_buffer"]
    assert torch.equal(buf[absent], torch.zeros(len(absent), COLS))

    w.grad = as_sparse(g2, [3, 4])
    opt.step()
    w2 = w.detach()
    for r in [0, 1, 2, 5, 6, 7, 8, 9]:  # row 1 and 5: momentum kept but frozen, weight not moved
        assert torch.equal(w2[r], w1[r])
    torch.testing.assert_close(opt.state[w]["momentum_buffer"][[1, 5]], m1[[0, 2]])
    m3 = mom * m1[1] + g2[3] + wd * w1[3]
    torch.testing.assert_close(w2[3], w1[3] - lr * m3)
    torch.testing.assert_close(w2[4], w1[4] - lr * (g2[4] + wd * w1[4]))


def test_adamw_lazy_rows_use_their_own_step_count(blocks):
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    g = grads(4)
    w = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(42)))
    w0 = w.detach().clone()
    opt = RowSparseAdamW([w], **kw)
    for i in range(3):
        w.grad = as_sparse(g[i], [0, 1])
        opt.step()
    w.grad = as_sparse(g[3], [1, 7])  # row 7 seen for the first time at the 4th step
    opt.step()
    assert opt.state[w]["step"].tolist() == [3, 4, 0, 0, 0, 0, 0, 1, 0, 0]
    untouched = [2, 3, 4, 5, 6, 8, 9]
    assert torch.equal(w.detach()[untouched], w0[untouched])
    # row 7's update equals a fresh torch AdamW's first step on that row
    row = torch.nn.Parameter(w0[7:8].clone())
    ref = torch.optim.AdamW([row], **kw)
    row.grad = g[3][7:8].clone()
    ref.step()
    torch.testing.assert_close(w.detach()[7:8], row.detach(), rtol=1e-6, atol=1e-6)


def test_lr_schedule_and_state_dict_round_trip():
    for cls, kw in [(RowSparseSGD, dict(lr=0.1)), (RowSparseAdamW, dict(lr=0.01))]:
        g = grads(4, seed=3)
        w = torch.nn.Parameter(torch.randn(ROWS, COLS))
        opt = cls([w], **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
        for i in range(2):
            w.grad = as_sparse(g[i], [0, 2, 4 + i])
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(kw["lr"] * 0.25)
        saved, saved_w = copy.deepcopy(opt.state_dict()), w.detach().clone()  # as if saved to disk
        w2 = torch.nn.Parameter(saved_w.clone())
        opt2 = cls([w2], **kw)
        opt2.load_state_dict(saved)
        for p, o in [(w, opt), (w2, opt2)]:
            p.grad = as_sparse(g[2], [0, 5, 9])
            o.step()
        assert torch.equal(w.detach(), w2.detach())
        if cls is RowSparseAdamW:
            assert opt2.state[w2]["step"].dtype == torch.int64


def test_build_head_optimizer():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    sgd = build_head_optimizer("sgd", [w], lr=0.1, momentum=0.8, weight_decay=1e-4)
    assert isinstance(sgd, RowSparseSGD) and sgd.param_groups[0]["momentum"] == 0.8
    adamw = build_head_optimizer("AdamW", [w], lr=0.1, momentum=0.9, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    assert isinstance(adamw, RowSparseAdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    assert adamw.param_groups[0]["betas"] == (0.8, 0.99) and adamw.param_groups[0]["eps"] == 1e-6
    with pytest.raises(ValueError, match="lamb.*sgd.*adamw"):
        build_head_optimizer("lamb", [w], lr=0.1, momentum=0.9, weight_decay=0.0)


def test_sampled_partial_fc_step_touches_only_sampled_rows():
    head = PartialFC(CombinedMarginLoss(), 8, 100, sample_rate=0.2, seed=1)
    opt = RowSparseSGD(head.parameters(), lr=0.5)
    before = head.weight.detach().clone()
    labels = torch.tensor([3, 50, 50, 97])
    head(torch.randn(4, 8), labels).backward()
    assert head.weight.grad.is_sparse
    opt.step()
    index = head.last_sampled_index
    assert index.numel() == 20 and set(labels.tolist()) <= set(index.tolist())
    changed = (head.weight.detach() != before).any(dim=1).nonzero().view(-1)
    assert set(changed.tolist()) <= set(index.tolist()) and set(labels.tolist()) <= set(changed.tolist())


def test_sampled_rows_gradient_is_coalesced_embedding_gradient():
    """sampled_rows == F.embedding(sparse=True) in value and gradient; its .grad needs no sort to coalesce."""
    index = torch.tensor([0, 2, 3, 7, 9])
    w1 = torch.nn.Parameter(torch.randn(ROWS, COLS))
    w2 = torch.nn.Parameter(w1.detach().clone())
    c = torch.randn(index.numel(), COLS)
    r1, r2 = sampled_rows(w1, index), torch.nn.functional.embedding(index, w2, sparse=True)
    assert torch.equal(r1, r2)
    (r1 * c).sum().backward()
    (r2 * c).sum().backward()
    assert w1.grad.is_sparse and torch.equal(w1.grad.to_dense(), w2.grad.to_dense())
    pending = row_grad_of(w1)
    assert torch.equal(pending.index, index) and torch.equal(pending.grad, c)
    assert pending.rows is not None and torch.equal(pending.rows, w1.detach()[index])  # reused by the optimizer
    with torch.no_grad():  # no gradient: nothing is kept on the weight
        sampled_rows(w2, index)
    assert getattr(w2, "_pfc_rows", None) is None


@pytest.mark.parametrize("opt_cls,kw", [(RowSparseSGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                        (RowSparseAdamW, dict(lr=0.01, weight_decay=0.05))])
def test_rows_from_forward_are_not_used_after_the_weight_changed(opt_cls, kw):
    """The optimizer reuses the forward's rows only while the weight is unmodified; else it reads the weight."""
    index = torch.tensor([1, 4, 5, 8])
    c = torch.randn(index.numel(), COLS, generator=torch.Generator().manual_seed(5))
    base = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(6))
    results = {}
    for case in ("reuse", "changed_after_backward", "reference"):
        w = torch.nn.Parameter(base.clone())
        opt = opt_cls([w], **kw)
        (sampled_rows(w, index) * c).sum().backward()
        if case == "changed_after_backward":
            with torch.no_grad():
                w.add_(1.0)
        if case == "reference":  # the same gradient, no forward rows to reuse
            w.grad = as_sparse(w.grad.to_dense(), index.tolist())
        opt.step()
        assert getattr(w, "_pfc_rows", None) is None  # forgotten after the step
        results[case] = w.detach().clone()
    torch.testing.assert_close(results["reuse"], results["reference"], rtol=0, atol=0)
    w = torch.nn.Parameter(base + 1.0)  # the changed weight, stepped from its own (new) values
    opt = opt_cls([w], **kw)
    w.grad = torch.sparse_coo_tensor(index.view(1, -1), c, (ROWS, COLS), check_invariants=True)
    opt.step()
    torch.testing.assert_close(results["changed_after_backward"], w.detach(), rtol=0, atol=0)
