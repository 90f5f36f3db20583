"""Additive angular / cosine margins (ArcFace, CosFace) with the semantics of arcface_torch's CombinedMarginLoss.

The module maps a matrix of cosines (logits before scaling) to scaled logits with the margin applied to each
row's target entry. It is used by `heads.PartialFC` on the rank-local (sampled) columns, where a row whose
class lives on another rank, or was not sampled, has label -1 ("target not among these columns").
"""
from __future__ import annotations

import math

import torch
from torch import nn

MARGIN_GRADS = ("straight_through", "exact")


class CombinedMarginLoss(nn.Module):
    """ArcFace (m2) or CosFace (m3) margin on cosine logits, then scale by `s`.

    Forward: `logits` [N, C] cosines (float32), `labels` [N] column of each row's target, or -1 when the
    target is not among these columns. Returns a new [N, C] tensor; the inputs are never modified.

    - ArcFace (m3 == 0): target entry becomes ``s * cos(acos(c) + m2)``, every other entry ``s * c``.
      As in arcface_torch there is no "easy margin" fix-up for ``acos(c) + m2 > pi``.
    - CosFace (m3 > 0): target entry becomes ``s * (c - m3)``.
    - m2 == m3 == 0: plain scaled cosine softmax logits.

    Gradient (`margin_grad`):
        ``"straight_through"`` (default) is what arcface_torch trains with: it rewrites the target value under
        ``torch.no_grad`` so the gradient w.r.t. every cosine, target included, is ``s`` times the incoming
        gradient. We keep it as the default because the published models and hyper-parameters were trained
        that way, and because the true derivative ``s * sin(theta + m2) / sin(theta)`` blows up as the target
        cosine approaches 1 (theta -> 0). ``"exact"`` uses the true derivative of ``s * cos(acos(c) + m2)``
        (with ``c`` clamped to [-1 + 1e-7, 1 - 1e-7] so acos stays differentiable). CosFace's gradient is exact
        in both modes (it is ``s`` anyway).

    Inter-class filtering (``interclass_filtering_threshold > 0``, from arcface_torch): negatives whose cosine
    exceeds the threshold are zeroed (the mask is computed without gradient, so the gradient of a zeroed
    entry is 0). Exactly as arcface_torch does it, the target entry is exempt only on rows with a label;
    a row with label -1 has every entry above the threshold zeroed.

    Unlike arcface_torch, only the target entries go through acos/cos; the others are scaled directly
    (arcface_torch's cos(acos(c)) round trip changes them by float rounding only). The target cosine is
    clamped to [-1, 1] before acos so float rounding just above 1 cannot produce NaN.

    Args:
        s: scale (> 0).
        m1: multiplicative angular margin; must be 1.0 (SphereFace is not supported).
        m2: additive angular margin (ArcFace), in [0, pi/2).
        m3: additive cosine margin (CosFace), >= 0. At most one of m2, m3 may be non-zero.
        interclass_filtering_threshold: in [0, 1); 0 disables filtering.
        margin_grad: "straight_through" (arcface_torch) or "exact".
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0, margin_grad: str = "straight_through") -> None:
        super().__init__()
        s, m1, m2, m3 = float(s), float(m1), float(m2), float(m3)
        threshold = float(interclass_filtering_threshold)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"s (scale) must be a finite number > 0, got {s}")
        if m1 != 1.0:
            raise ValueError(f"m1 must be 1.0 (the SphereFace multiplicative margin is not supported), got {m1}")
        if not (math.isfinite(m2) and 0.0 <= m2 < math.pi / 2):
            raise ValueError(f"m2 (ArcFace angular margin) must be in [0, pi/2), got {m2}")
        if not (math.isfinite(m3) and m3 >= 0.0):
            raise ValueError(f"m3 (CosFace cosine margin) must be >= 0, got {m3}")
        if m2 > 0 and m3 > 0:
            raise ValueError(f"m2 and m3 cannot both be > 0 (got m2={m2}, m3={m3}): use m2 for ArcFace or m3 "
                             "for CosFace (arcface_torch would silently ignore m2)")
        if not (0.0 <= threshold < 1.0):
            raise ValueError(f"interclass_filtering_threshold must be in [0, 1), got {threshold}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {list(MARGIN_GRADS)}, got {margin_grad!r}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = threshold
        self.margin_grad = margin_grad

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}, "
                f"margin_grad={self.margin_grad!r}")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
        labels = labels.reshape(-1)
        if labels.numel() != logits.size(0):
            raise ValueError(f"labels must have one entry per logits row ({logits.size(0)}), got {labels.numel()}")
        labels = labels.to(device=logits.device, dtype=torch.long)
        rows = torch.nonzero(labels != -1).reshape(-1)
        cols = labels[rows]

        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                keep = (logits <= self.interclass_filtering_threshold).to(logits.dtype)
                keep[rows, cols] = 1.0  # the target is never filtered (rows with a label only)
                keep.mul_(self.s)
            out = logits * keep
        else:
            out = logits * self.s
        if rows.numel() == 0:
            return out

        target = logits[rows, cols]
        if self.m3 > 0:  # CosFace: exact gradient (d/dc = s)
            out.index_put_((rows, cols), (target - self.m3) * self.s)
        elif self.m2 > 0:
            if self.margin_grad == "exact":
                c = target.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
                out.index_put_((rows, cols), torch.cos(torch.acos(c) + self.m2) * self.s)
            else:  # straight-through: change the value, keep d out / d c = s (arcface_torch)
                with torch.no_grad():
                    new = torch.cos(torch.acos(target.detach().clamp(-1.0, 1.0)) + self.m2) * self.s
                    out[rows, cols] = new
        return out
