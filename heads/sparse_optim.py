"""Row-sparse optimizers for the Partial FC class centres.

With sampling, `PartialFC.weight.grad` is a sparse COO tensor holding only the rows (classes) used this step.
These optimizers update exactly those rows and leave every other row, and its optimizer state, untouched
("lazy" updates): an unsampled class centre gets no weight decay and its momentum is frozen until it is
sampled again, as in the original Partial FC (insightface) and PaddlePaddle's PLSC. Dense gradients are
accepted too and update every row, matching torch.optim.SGD / AdamW.

Cost per step is O(rows present x E): only those rows of the weight and of the optimizer state are read
(``index_select``) and written (``index_copy_``); nothing of size num_local is allocated after the state's
first creation. A gradient from `PartialFC` is already coalesced (sorted distinct rows, checked in O(k)) and
the weight rows gathered for its forward are reused when the weight is unchanged since; other sparse
gradients are coalesced (a sort of the k row ids). On the CPU the rows are updated in blocks of
``CPU_BLOCK_ELEMS`` elements, so no [k, E] temporary is allocated. The rows are moved to the gradient's device
and upcast to fp32 for the math, then rounded to the storage dtype and written back (`heads.class_store`), so
the same code
serves a shard on the device, a shard offloaded to host memory and a bf16/fp16 shard. The state (momentum,
Adam moments) is fp32 and lives where the weight lives.

The gradient comes from ``p.grad`` (dense or sparse COO) or, for layouts whose gradient cannot be stored in
``.grad`` (offloaded or non-fp32 storage), from ``p.sampled_grad`` (`heads.class_store.RowGrad`).

Both are ordinary `torch.optim.Optimizer`s: `param_groups[i]["lr"]` is driven by the LR schedule and
`state_dict()` / `load_state_dict()` are inherited.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

from heads.class_store import clear_row_grad, forget_rows, load_rows, row_grad_of, store_rows_


def _state_table(p: torch.Tensor) -> torch.Tensor:
    """Zero fp32 optimizer state shaped like `p`, where `p` lives (pinned if `p` is)."""
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device,
                       pin_memory=p.device.type == "cpu" and p.is_pinned())


# Rows per block of the sparse update on the CPU: 2**17 fp32 elements (512 KiB at E=128). Every temporary then
# stays in cache and below glibc's mmap threshold (1 MiB under ZeRO-3 on the CPU, engine.parallel), so it is
# reused from the heap; whole-size [k, E] temporaries were fresh mmaps, page-faulted in on every step (~0.2 s
# per 256 MB). On GPUs the caching allocator reuses memory and fewer, larger kernels are better: one block.
CPU_BLOCK_ELEMS = 1 << 17




class _RowSparseOptimizer(Optimizer):
    """Shared plumbing: find the pending row gradient, clear `sampled_grad` with the ordinary grads."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                clear_row_grad(p)

    @staticmethod
    def _closure_loss(closure):
        """torch.optim's `closure` convention: re-evaluate the loss with autograd on (step runs without)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _pending(p: torch.Tensor):
        """(rows, fp32 grad rows, fp32 weight rows or None) on the gradient's device; None if the gradient is dense.

        The weight rows are those gathered for the forward when they are still current; they are updated in
        place (a second backward through the same graph then fails autograd's version check, it is not wrong
        silently). None means: gather them block by block.
        """
        rg = row_grad_of(p)
        if rg is None:
            return None
        rows, g = rg.coalesced()
        w = rg.rows if (rg.rows is not None and rg.distinct) else None
        if w is not None and (w.dtype != torch.float32 or w.device != g.device):
            w = None
        return rows, g.float(), w

    @staticmethod
    def _row_blocks(p: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, w_all):
        """(row ids, fp32 grad rows, fp32 weight rows) per block of the update (see CPU_BLOCK_ELEMS).

        The weight rows are slices of `w_all` (the forward's rows) or gathered from `p` block by block. After
        the last block the forward's rows are forgotten: the step changed the weight.
        """
        num_rows = rows.numel()
        row_elems = g[0].numel() if num_rows else 1
        step = num_rows if g.device.type != "cpu" else max(1, CPU_BLOCK_ELEMS // row_elems)
        for lo in range(0, num_rows, max(1, step)):
            r, gb = rows[lo:lo + step], g[lo:lo + step]
            yield r, gb, (w_all[lo:lo + step] if w_all is not None else load_rows(p, r, g.device))
        forget_rows(p)


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum (dampening 0, no Nesterov) that updates only the rows present in a sparse gradient.

    For each present row: ``d = g + wd * w``; ``m = momentum * m + d``; ``w -= lr * m`` -- the operation order
    of torch.optim.SGD, so with every row present it equals torch.optim.SGD (the zero-initialised buffer gives
    ``m = d`` on a row's first update, like SGD's first step). Absent rows: no decay, momentum frozen.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                pending = self._pending(p)
                if pending is None and p.grad is None:
                    continue
                state = self.state[p]
                if momentum != 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = _state_table(p)
                if pending is None:  # dense: every row, in place
                    d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                    if momentum != 0:
                        d = state["momentum_buffer"].mul_(momentum).add_(d)
                    p.add_(d, alpha=-lr)
                    continue
                for r, gb, w in self._row_blocks(p, *pending):
                    d = gb if wd == 0 else gb.add(w, alpha=wd)
                    if momentum != 0:
                        buf = state["momentum_buffer"]
                        d = load_rows(buf, r, gb.device).mul_(momentum).add_(d)
                        store_rows_(buf, r, d)
                    store_rows_(p, r, w.add_(d, alpha=-lr))
        return loss


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay) with lazy row updates and a step count per row.

    Each row keeps its own step count, incremented only when the row is present, and its bias correction
    uses that count ("lazy Adam"), so a class sampled for the first time at step 1000 gets the same
    first update as at step 1. With every row present each step it equals torch.optim.AdamW.
    State: ``step`` (int64, one per row), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _update(w, g, exp_avg, exp_avg_sq, steps, *, lr, beta1, beta2, eps, wd) -> None:
        """In-place AdamW on row blocks; `steps` [rows] already incremented (torch's op order)."""
        if wd != 0:
            w.mul_(1 - lr * wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        shape = (-1,) + (1,) * (w.dim() - 1)
        st = steps.to(torch.float64)
        step_size = (lr / (1 - beta1 ** st)).to(w.dtype).view(shape)
        bc2_sqrt = (1 - beta2 ** st).sqrt().to(w.dtype).view(shape)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        w.addcdiv_(exp_avg * step_size, denom, value=-1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hp = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"])
            for p in group["params"]:
                pending = self._pending(p)
                if pending is None and p.grad is None:
                    continue
                if p.dim() == 0:
                    raise ValueError("RowSparseAdamW needs parameters with at least one dimension (rows)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                    state["exp_avg"] = _state_table(p)
                    state["exp_avg_sq"] = _state_table(p)
                if state["step"].device != p.device:  # load_state_dict leaves "step" where it was saved
                    state["step"] = state["step"].to(p.device)
                steps, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if pending is None:
                    steps += 1
                    self._update(p, p.grad, exp_avg, exp_avg_sq, steps, **hp)
                    continue
                rows, g, _ = pending
                if rows.numel() == 0:
                    continue
                host_rows = rows.to(steps.device)
                steps.index_add_(0, host_rows, torch.ones_like(host_rows))
                for r, gb, w in self._row_blocks(p, *pending):
                    m, v = load_rows(exp_avg, r, g.device), load_rows(exp_avg_sq, r, g.device)
                    self._update(w, gb, m, v, steps.index_select(0, r.to(steps.device)).to(g.device), **hp)
                    store_rows_(p, r, w)
                    store_rows_(exp_avg, r, m)
                    store_rows_(exp_avg_sq, r, v)
        return loss


HEAD_OPTIMIZERS = ("sgd", "adamw")


def build_head_optimizer(name: str, params: Iterable, lr: float, momentum: float = 0.9,
                         weight_decay: float = 5e-4, *, betas: tuple[float, float] = (0.9, 0.999),
                         eps: float = 1e-8) -> Optimizer:
    """The head's row-sparse optimizer by config name: "sgd" (RowSparseSGD) or "adamw" (RowSparseAdamW).

    `momentum` is used by SGD only; `betas` and `eps` by AdamW only (its defaults are torch's, which
    arcface_torch uses), so one call site can pass the whole optimizer config.
    """
    key = str(name).lower()
    if key == "sgd":
        return RowSparseSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adamw":
        return RowSparseAdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown head optimizer {name!r}; known: {list(HEAD_OPTIMIZERS)}")
