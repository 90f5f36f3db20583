"""CombinedMarginLoss against direct formulas on a handcrafted cosine matrix."""
import math

import pytest
import torch

from heads import CombinedMarginLoss

COS = torch.tensor([
    [0.90, -0.20, 0.35, 0.10],
    [0.10, 0.50, -0.70, 0.60],
    [-0.30, 0.20, 0.05, -0.95],
    [0.45, 0.80, 0.30, 0.25],  # label -1: target on another rank
    [1.00, -1.00, 0.00, 0.999],
], dtype=torch.float32)
LABELS = torch.tensor([0, 3, 2, -1, 0])


def direct(cos, labels, s, m2=0.0, m3=0.0, threshold=0.0, clamp_eps=0.0):
    """Row-by-row reference written with plain ops. The cosine is clamped to [-1 + eps, 1 - eps] before acos:
    eps=0 for values (straight-through), 1e-7 for the exact mode (so acos stays differentiable)."""
    rows = []
    for i in range(cos.size(0)):
        row = cos[i]
        y = int(labels[i])
        if threshold > 0:
            keep = (row.detach() <= threshold).float()
            if y >= 0:
                keep[y] = 1.0
            row = row * keep
        if y >= 0:
            t = row[y]
            if m3 > 0:
                t = t - m3
            elif m2 > 0:
                t = torch.cos(torch.acos(t.clamp(-1 + clamp_eps, 1 - clamp_eps)) + m2)
            row = torch.cat([row[:y], t.reshape(1), row[y + 1:]])
        rows.append(row * s)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["arcface", "cosface", "plain"])
@pytest.mark.parametrize("margin_grad", ["straight_through", "exact"])
def test_values_match_direct_formula(kind, margin_grad):
    m2, m3 = {"arcface": (0.5, 0.0), "cosface": (0.0, 0.35), "plain": (0.0, 0.0)}[kind]
    loss = CombinedMarginLoss(s=64.0, m2=m2, m3=m3, margin_grad=margin_grad)
    cos, labels = COS.clone(), LABELS.clone()
    out = loss(cos, labels)
    eps = 1e-7 if margin_grad == "exact" else 0.0
    torch.testing.assert_close(out, direct(COS, LABELS, 64.0, m2, m3, clamp_eps=eps), rtol=1e-5, atol=1e-4)
    assert torch.equal(cos, COS) and torch.equal(labels, LABELS)  # inputs untouched
    assert torch.equal(out[3], COS[3] * 64.0)  # label -1 row: no margin anywhere
    if kind == "arcface":  # spot check one entry by hand
        assert out[0, 0].item() == pytest.approx(64.0 * math.cos(math.acos(0.9) + 0.5), rel=1e-5)


def test_straight_through_gradient_is_s_everywhere():
    loss = CombinedMarginLoss(s=30.0, m2=0.5)
    cos = COS.clone().requires_grad_()
    grad_out = torch.randn(COS.shape, generator=torch.Generator().manual_seed(0))
    loss(cos, LABELS).backward(grad_out)
    torch.testing.assert_close(cos.grad, 30.0 * grad_out)


@pytest.mark.parametrize("m2,m3", [(0.5, 0.0), (0.0, 0.35), (0.3, 0.0)])
def test_exact_gradient_matches_autograd_of_formula(m2, m3):
    loss = CombinedMarginLoss(s=64.0, m2=m2, m3=m3, margin_grad="exact")
    grad_out = torch.randn(COS.shape, generator=torch.Generator().manual_seed(1))
    a = COS.clone().requires_grad_()
    loss(a, LABELS).backward(grad_out)
    b = COS.clone().requires_grad_()
    direct(b, LABELS, 64.0, m2, m3, clamp_eps=1e-7).backward(grad_out)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)
    if m2 > 0:  # the target entries really differ from the straight-through gradient
        assert not torch.allclose(a.grad[0, 0], 64.0 * grad_out[0, 0])


def test_filtering_zeroes_negatives_above_threshold():
    thr = 0.4
    loss = CombinedMarginLoss(s=10.0, m2=0.0, m3=0.0, interclass_filtering_threshold=thr)
    cos = COS.clone().requires_grad_()
    out = loss(cos, LABELS)
    expected_zero = torch.zeros_like(COS, dtype=torch.bool)
    for i in range(COS.size(0)):
        for j in range(COS.size(1)):
            is_target = int(LABELS[i]) == j
            expected_zero[i, j] = bool(COS[i, j] > thr) and not is_target
    assert expected_zero[3].any()  # the label -1 row is filtered too (arcface_torch semantics)
    assert torch.all(out[expected_zero] == 0)
    torch.testing.assert_close(out[~expected_zero], 10.0 * COS[~expected_zero])
    out.sum().backward()
    assert torch.all(cos.grad[expected_zero] == 0)
    assert torch.all(cos.grad[~expected_zero] == 10.0)
    # with ArcFace on top, the target (0.9, above the threshold) keeps its margin
    arc = CombinedMarginLoss(s=10.0, m2=0.5, interclass_filtering_threshold=thr)(COS, LABELS)
    torch.testing.assert_close(arc, direct(COS, LABELS, 10.0, m2=0.5, threshold=thr), rtol=1e-5, atol=1e-4)


def test_inputs_never_mutated_with_filtering_and_grad():
    cos = COS.clone().requires_grad_()
    before = cos.detach().clone()
    CombinedMarginLoss(m2=0.5, interclass_filtering_threshold=0.3)(cos, LABELS).sum().backward()
    assert torch.equal(cos.detach(), before)


@pytest.mark.parametrize("kwargs,field,value", [
    (dict(s=0.0), "s", 0.0),
    (dict(s=-1.0), "s", -1.0),
    (dict(m1=0.9), "m1", 0.9),
    (dict(m2=-0.1), "m2", -0.1),
    (dict(m2=2.0), "m2", 2.0),
    (dict(m2=0.0, m3=-0.1), "m3", -0.1),
    (dict(m2=0.5, m3=0.35), "m2", 0.5),
    (dict(interclass_filtering_threshold=1.0), "interclass_filtering_threshold", 1.0),
    (dict(interclass_filtering_threshold=-0.1), "interclass_filtering_threshold", -0.1),
    (dict(margin_grad="approx"), "margin_grad", "approx"),
])
def test_validation_errors_name_the_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as info:
        CombinedMarginLoss(**kwargs)
    assert field in str(info.value) and str(value) in str(info.value)
