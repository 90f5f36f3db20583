"""Partial FC at scale: chunked softmax, offload, storage dtype, sampler and row-sparse updates vs references.

References are the unchunked / on-device / fp32 / dense-optimizer paths (themselves checked against a plain
full-softmax in tests/unit/test_partial_fc.py) and plain torch.optim. (Chunked on 2 spawned ranks:
tests/distributed/test_pfc_scale.py, with the helpers of tests/support/pfc_scale.py; bench/pfc_scale.py's device
check: tests/launch/test_pfc_scale.py.)
"""
import math

import pytest
import torch

from engine.config import schema as config
from engine.config.schema import ConfigError
from heads import build_head_optimizer, scale_head_grad_
from heads.sampling import DENSE_FRACTION, sample_rows
from heads.softmax import AUTO_CHUNK_LOGITS_CUDA, AUTO_CHUNK_MIN_LOGITS, resolve_chunk_size
from tests.support.pfc_scale import check_chunks, chunk_compare, close, dense, make_batch, make_head, one_step


# -- chunked == unchunked ---------------------------------------------------------------------------------------

def test_chunked_equals_unchunked_one_process():
    check_chunks(chunk_compare(1, 0))


def test_chunk_size_auto_threshold_and_errors():
    assert resolve_chunk_size(0, 256, AUTO_CHUNK_MIN_LOGITS // 256) == 0  # at the threshold: unchunked
    chunk = resolve_chunk_size(0, 256, AUTO_CHUNK_MIN_LOGITS // 256 + 1)
    assert 1024 <= chunk < AUTO_CHUNK_MIN_LOGITS // 256
    assert resolve_chunk_size(50, 8, 50) == 0 and resolve_chunk_size(49, 8, 50) == 49
    # CUDA: larger auto chunks (fewer kernel launches), same threshold; an explicit size is kept as given
    n = AUTO_CHUNK_MIN_LOGITS // 256 * 64
    assert resolve_chunk_size(0, 256, n, "cuda") == AUTO_CHUNK_LOGITS_CUDA // 256 > resolve_chunk_size(0, 256, n)
    assert resolve_chunk_size(0, 256, AUTO_CHUNK_MIN_LOGITS // 256, "cuda") == 0
    assert resolve_chunk_size(49, 8, 50, "cuda") == 49
    with pytest.raises(ValueError, match="chunk_size must be an int >= 0.*-1"):
        make_head(10, chunk_size=-1)


def test_chunked_under_autocast_stays_fp32():
    emb, labels = make_batch(1, 40)
    ref = one_step(make_head(40, chunk_size=10 ** 6), emb, labels)
    head = make_head(40, chunk_size=7)
    x = emb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, labels)
        loss.backward()
    close(loss.detach(), ref["loss"])
    close(x.grad, ref["emb_grad"])


# -- offload and storage dtype ----------------------------------------------------------------------------------

def _train(head, opt_name, steps, num_classes, lr=0.5, **okw):
    opt = build_head_optimizer(opt_name, [head.weight], lr=lr, **okw)
    losses = []
    for step in range(steps):
        emb, labels = make_batch(1, num_classes, step)
        loss = head(emb.requires_grad_(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, opt


@pytest.mark.parametrize("opt_name,rate", [("sgd", 0.3), ("adamw", 0.3), ("sgd", 1.0)])
def test_offload_equals_on_device(opt_name, rate):
    ref = make_head(100, rate)
    off = make_head(100, rate, offload="cpu")
    assert off.weight.device.type == "cpu" and off.weight.grad is None
    assert torch.equal(off.weight.detach(), ref.weight.detach())
    ref_losses, _ = _train(ref, opt_name, 4, 100)
    off_losses, opt = _train(off, opt_name, 4, 100)
    assert off_losses == pytest.approx(ref_losses, rel=1e-6)
    close(off.weight.detach(), ref.weight.detach(), rtol=1e-6)
    assert off.weight.sampled_grad is None  # zero_grad cleared the hand-over slot


def test_prefetch_then_forward_equals_forward():
    ref, pre = make_head(100, 0.3, offload="cpu"), make_head(100, 0.3, offload="cpu")
    emb, labels = make_batch(1, 100)
    pre.prefetch(labels)
    a, b = one_step(ref, emb, labels), one_step(pre, emb, labels)
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["loss"], b["loss"])
    pre.prefetch(labels)
    with pytest.raises(ValueError, match="other labels than the preceding prefetch"):
        pre(emb, (labels + 1) % 100)
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        pre.prefetch(labels + 100)


def test_sparse_update_equals_torch_sgd_at_sample_rate_1():
    """The row-gradient path with every row present (offload, sample_rate=1) == dense grad + torch.optim.SGD."""
    kw = dict(momentum=0.9, weight_decay=5e-4)
    ref = make_head(30)
    torch_opt = torch.optim.SGD([ref.weight], lr=0.5, **kw)
    ref_losses = []
    for step in range(5):
        emb, labels = make_batch(1, 30, step)
        loss = ref(emb, labels)
        loss.backward()
        assert not ref.weight.grad.is_sparse
        torch_opt.step()
        torch_opt.zero_grad()
        ref_losses.append(float(loss.detach()))
    ours = make_head(30, offload="cpu")
    losses, _ = _train(ours, "sgd", 5, 30, **kw)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    close(ours.weight.detach(), ref.weight.detach(), rtol=1e-6)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_adamw_sparse_semantics(offload):
    """Unsampled rows and their moments stay untouched; sampled rows get exactly torch's AdamW first step."""
    head = make_head(100, 0.2, offload=offload)
    w0 = head.weight.detach().clone()
    emb, labels = make_batch(1, 100)
    x = emb.requires_grad_()
    head(x, labels).backward()
    rg = head.weight.sampled_grad if offload == "cpu" else None
    grad = dense(head.weight.grad) if rg is None else torch.zeros(w0.shape).index_add_(0, rg.index, rg.grad)
    opt = build_head_optimizer("adamw", [head.weight], lr=0.01, weight_decay=0.1)
    opt.step()
    index = head.last_sampled_index
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[index] = False
    state = opt.state[head.weight]
    assert torch.equal(head.weight.detach()[untouched], w0[untouched])
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    assert not state["step"][untouched].any() and bool((state["step"][index] == 1).all())
    ref = torch.nn.Parameter(w0[index].clone())
    ref.grad = grad[index]
    torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1).step()
    close(head.weight.detach()[index], ref.detach(), rtol=1e-6)


@pytest.mark.parametrize("dtype_name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_storage_computes_in_fp32(dtype_name, dtype):
    """Loss and gradients equal an fp32 head holding the rounded weights; the update is fp32, rounded once."""
    low = make_head(100, 0.3, storage_dtype=dtype_name, chunk_size=7)
    ref = make_head(100, 0.3)
    with torch.no_grad():
        ref.weight.copy_(low.weight.float())
    assert low.weight.dtype == dtype
    emb, labels = make_batch(1, 100)
    a, b = one_step(low, emb, labels), one_step(ref, emb, labels)
    close(a["loss"], b["loss"], rtol=1e-6)
    close(a["emb_grad"], b["emb_grad"], rtol=1e-5)
    close(a["weight_grad"], b["weight_grad"], rtol=1e-5)
    # one SGD step: fp32 math on the upcast rows and momentum, written back rounded
    low2, ref2 = make_head(100, 0.3, storage_dtype=dtype_name), make_head(100, 0.3)
    with torch.no_grad():
        ref2.weight.copy_(low2.weight.float())
    _train(low2, "sgd", 1, 100, momentum=0.9, weight_decay=5e-4)
    _, opt = _train(ref2, "sgd", 1, 100, momentum=0.9, weight_decay=5e-4)
    assert torch.equal(low2.weight.detach(), ref2.weight.detach().to(dtype))


def test_fp16_unscale_reaches_the_row_gradient():
    head = make_head(50, 0.4, offload="cpu")
    emb, labels = make_batch(1, 50)
    (head(emb, labels) * 1024.0).backward()
    scaled = head.weight.sampled_grad.grad.clone()
    scale_head_grad_(head.weight, 1.0 / 1024.0)
    close(head.weight.sampled_grad.grad, scaled / 1024.0, rtol=1e-7)


@pytest.mark.parametrize("overflow", [False, True])
def test_trainer_head_step_unscales_offloaded_head(overflow):
    """HeadStep with fp16 loss scale 1024 == an unscaled step; on overflow: no update, grad dropped."""
    from engine.train.trainer import HeadStep

    emb, labels = make_batch(1, 50)
    ref = make_head(50, 0.4, offload="cpu")
    ref_opt = build_head_optimizer("sgd", [ref.weight], lr=0.5)
    ref(emb, labels).backward()
    ref_opt.step()
    head = make_head(50, 0.4, offload="cpu")
    w0 = head.weight.detach().clone()
    step = HeadStep(head, build_head_optimizer("sgd", [head.weight], lr=0.5))
    (head(emb, labels) * 1024.0).backward()
    assert step(1024.0, backbone_applied=not overflow) == (not overflow)
    expected = w0 if overflow else ref.weight.detach()
    close(head.weight.detach(), expected, rtol=1e-6)
    assert head.weight.sampled_grad is None
    assert step.num_skipped == int(overflow)


def test_head_option_errors():
    with pytest.raises(ValueError, match=r"offload must be one of \['none', 'cpu'\], got 'gpu'"):
        make_head(10, offload="gpu")
    with pytest.raises(ValueError, match=r"storage_dtype must be one of \['fp32', 'bf16', 'fp16'\], got 'int8'"):
        make_head(10, storage_dtype="int8")


# -- sampler ----------------------------------------------------------------------------------------------------

def test_sampler_exact_distinct_sorted_with_positives():
    g = torch.Generator().manual_seed(0)
    for num_local, num_sample, num_pos in [(1000, 100, 30), (1000, 100, 0), (50, 40, 5), (10, 5, 7),
                                           (100_000, 1000, 500), (64, 64, 3)]:
        positive = torch.randperm(num_local, generator=g)[:num_pos].sort()[0]
        idx = sample_rows(positive, num_local, num_sample, g)
        assert idx.numel() == max(num_sample, num_pos)
        assert torch.equal(idx, idx.unique()) and 0 <= int(idx.min()) and int(idx.max()) < num_local
        assert set(positive.tolist()) <= set(idx.tolist())


def test_sampler_is_uniform_over_negatives():
    positive = torch.tensor([2, 3, 11])
    counts = torch.zeros(20)
    g = torch.Generator().manual_seed(1)
    trials = 6000
    for _ in range(trials):
        counts[sample_rows(positive, 20, 6, g)] += 1  # 3 of 17 negatives: below DENSE_FRACTION
    assert 3 / 17 < DENSE_FRACTION
    assert torch.equal(counts[positive], torch.full((3,), float(trials)))
    neg = counts[[i for i in range(20) if i not in (2, 3, 11)]] / trials
    # binomial sd of 3/17 over 6000 trials is 0.005: 5 sd bounds
    assert float((neg - 3 / 17).abs().max()) < 0.025


def test_sampling_reproducible_for_seed_rank_step():
    a, b, c = make_head(1000, 0.1, seed=1), make_head(1000, 0.1, seed=1), make_head(1000, 0.1, seed=2)
    emb, labels = make_batch(1, 1000)
    seq = []
    for head in (a, b, c):
        steps = []
        for _ in range(3):
            head(emb, labels)
            steps.append(head.last_sampled_index.clone())
        seq.append(steps)
    assert all(torch.equal(x, y) for x, y in zip(seq[0], seq[1]))
    assert not torch.equal(seq[0][0], seq[0][1]) and not torch.equal(seq[0][0], seq[2][0])
    assert math.isclose(seq[0][0].numel(), 100)


# -- config -----------------------------------------------------------------------------------------------------

def _cfg(**head):
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
            "engine": {"model": {"name": "r18"}, "head": {"num_classes": 10, **head}}}


def test_config_keys_and_errors():
    cfg = config.from_dict(_cfg())
    assert (cfg.engine.head.chunk_size, cfg.engine.head.offload, cfg.engine.head.storage_dtype) == (0, "none", "fp32")
    cfg = config.from_dict(_cfg(chunk_size=4096, offload="cpu", storage_dtype="bf16"))
    assert (cfg.engine.head.chunk_size, cfg.engine.head.offload, cfg.engine.head.storage_dtype) == (4096, "cpu", "bf16")
    with pytest.raises(ConfigError, match=r"engine\.head\.offload: expected one of \['cpu', 'none'\], got 'gpu'"):
        config.from_dict(_cfg(offload="gpu"))
    with pytest.raises(ConfigError, match=r"engine\.head\.storage_dtype: expected one of .*'bf16'.*got 'fp8'"):
        config.from_dict(_cfg(storage_dtype="fp8"))
    with pytest.raises(ConfigError, match=r"engine\.head\.chunk_size: expected an int >= 0.*-5"):
        config.from_dict(_cfg(chunk_size=-5))
