"""Distributed softmax cross-entropy for Partial FC: the all-gather of embeddings, the plain (one logits buffer)
loss and the memory-lean chunked loss with an online softmax recomputed in backward.

Both losses are split over the ranks of `group` by column (class): each rank holds the columns of its own
class shard, the row max and the sum of exponentials are all-reduced (MAX, SUM) in float32, so every rank
gets the same loss, the mean over the global batch of ``logsumexp(row) - target logit``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from heads.comm import get_rank, get_world_size, is_initialized

# chunk_size=0 (auto) chunks when global batch x sampled columns exceeds AUTO_CHUNK_MIN_LOGITS (32 MiB of fp32
# logits per buffer), with chunks of about AUTO_CHUNK_LOGITS logits (4 MiB, cache-sized) and >= 1024 columns.
# On CUDA the chunks are AUTO_CHUNK_LOGITS_CUDA logits (64 MiB): a GPU has no cache to fit and each chunk costs
# some 20 kernel launches each way (29M classes at rate 0.1, batch 512: 1,416 chunks of 2**20 logits, 88 of
# 2**24). Not yet measured on a GPU (`bench/pfc_scale.py device` is the check).
# Measured on the 2-core AVX2 CPU (BENCHMARKS.md): with 4096-column chunks the step took the same time as one
# buffer despite the recomputation (median per-step ratio 1.01, 2 ranks, 1M classes), and the peak memory of
# the loss fell 4.7x at 256 x 500k columns. On GPUs the recomputed matmul may cost more: set chunk_size.
AUTO_CHUNK_MIN_LOGITS = 1 << 23
AUTO_CHUNK_LOGITS = 1 << 20
AUTO_CHUNK_LOGITS_CUDA = 1 << 24


def _distributed(group) -> bool:
    return is_initialized() and get_world_size(group) > 1


class AllGatherEmbeddings(torch.autograd.Function):
    """Concatenate every rank's [B, E] tensor into [W*B, E]; backward returns W * (summed gradient)[this slice].

    Each rank computes the gradient of the (identical) loss w.r.t. the gathered batch only through its own
    class columns; summing over ranks gives the full gradient of the global batch. This rank's slice of that
    sum is the true dLoss/d(local embeddings). We return it multiplied by world_size because the backbone is
    data-parallel and its wrapper (DDP/DeepSpeed/FSDP) averages backbone gradients over ranks: the average of
    W * (per-rank contribution) is exactly the gradient of the global loss. (arcface_torch does the same.)
    Gloo has no reduce_scatter, so the sum is an all_reduce.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = get_rank(group)
        ctx.world_size = get_world_size(group)
        ctx.batch_size = tensor.size(0)
        if not _distributed(group):
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not _distributed(ctx.group):
            return grad, None
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        b = ctx.batch_size
        return grad[ctx.rank * b:(ctx.rank + 1) * b] * ctx.world_size, None


class DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy whose classes (columns) are split over the ranks of `group`.

    forward(logits [N, S] local columns, targets [N] local column or -1, group) -> mean over the N rows of
    ``logsumexp(row over all ranks' columns) - target logit``. Row max (MAX), sum of exp (SUM) and the target
    logit (SUM, 0 on ranks that do not hold it) are all-reduced, so the loss is the same on every rank.
    The log-sum-exp form stays finite for any logits (no log of a clamped probability).
    backward: ``(softmax - onehot) / N * grad_out`` for the local columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
        logits = logits.float()
        n = logits.size(0)
        distributed = _distributed(group)
        if logits.size(1) > 0:
            row_max = logits.max(dim=1, keepdim=True)[0]
        else:  # a rank can hold no sampled column; the other ranks supply the max
            row_max = logits.new_full((n, 1), -math.inf)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (logits - row_max).exp_()
        sum_exp = probs.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        probs.div_(sum_exp)

        rows = torch.nonzero(targets != -1).reshape(-1)
        cols = targets[rows]
        target_logit = logits.new_zeros(n)
        target_logit[rows] = logits[rows, cols]
        if distributed:
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        loss = (sum_exp.reshape(-1).log() + row_max.reshape(-1) - target_logit).mean()
        ctx.save_for_backward(probs, rows, cols)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        probs, rows, cols = ctx.saved_tensors
        scale = grad_out / probs.size(0)
        grad = probs * scale
        grad.index_put_((rows, cols), -scale.expand(rows.numel()), accumulate=True)
        return grad, None, None


def resolve_chunk_size(chunk_size: int, num_rows: int, num_columns: int, device_type: str = "cpu") -> int:
    """Columns per chunk, 0 = unchunked. ``chunk_size`` 0 means auto (see AUTO_CHUNK_MIN_LOGITS); the auto
    chunk is larger on CUDA (AUTO_CHUNK_LOGITS_CUDA) than elsewhere (AUTO_CHUNK_LOGITS)."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = auto), got {chunk_size}")
    if chunk_size == 0:
        if num_rows * num_columns <= AUTO_CHUNK_MIN_LOGITS:
            return 0
        target = AUTO_CHUNK_LOGITS_CUDA if device_type == "cuda" else AUTO_CHUNK_LOGITS
        chunk_size = max(1024, target // max(1, num_rows))
    return 0 if chunk_size >= num_columns else chunk_size


class ChunkedMarginSoftmaxCE(torch.autograd.Function):
    """Margin + distributed softmax cross-entropy over column chunks, without a [N, S] logits buffer.

    forward(emb [N, E] fp32 normalised, centres [S, E] fp32 class rows (not normalised), targets [N] (local
    column or -1), margin, chunk, group) -> the same scalar as
    ``DistSoftmaxCrossEntropy(margin(emb @ normalize(centres).T, targets))``.

    Forward walks the columns in chunks of `chunk`, keeping a running row max and a running sum of
    exponentials rescaled to it (the online softmax of Milakov & Gimelshein 2018), and picks up the target
    logit in the chunk that holds it; the margin is applied per chunk with the targets re-based to the chunk
    (-1 where the target is elsewhere), which gives exactly the unchunked margin output column by column,
    inter-class filtering included. Max and sum are then all-reduced over the ranks as in the unchunked path.

    The centres are normalised chunk by chunk inside the function (and again in backward), so no normalised
    [S, E] copy and no [S, E] normalisation temporaries exist either: with a batch of a few hundred and E=128,
    those are as large as the logits themselves.

    Backward recomputes each chunk's normalisation, cosines and margin under autograd and back-propagates
    ``(softmax - onehot) / N`` of that chunk through them, so the margin's gradient convention
    (straight-through or exact) is whatever `margin` implements. Peak extra memory is O(N x chunk) plus the
    gradient of `centres` [S, E], which the row update needs anyway; the saved state is emb, centres and two
    [N] vectors. The price is one extra [N, S] matmul (the recomputation), about a third more head FLOPs.
    """

    @staticmethod
    def forward(ctx, emb: torch.Tensor, centres: torch.Tensor, targets: torch.Tensor, margin: Callable,
                chunk: int, group) -> torch.Tensor:
        n, num_cols = emb.size(0), centres.size(0)
        distributed = _distributed(group)
        run_max = emb.new_full((n,), -math.inf)
        run_sum = emb.new_zeros(n)
        target_logit = emb.new_zeros(n)
        for start in range(0, num_cols, chunk):
            stop = min(start + chunk, num_cols)
            local_t = _rebase(targets, start, stop)
            out = margin(emb @ F.normalize(centres[start:stop]).t(), local_t)
            rows = torch.nonzero(local_t != -1).reshape(-1)
            target_logit[rows] = out[rows, local_t[rows]]
            new_max = torch.maximum(run_max, out.amax(dim=1))
            run_sum = run_sum * (run_max - new_max).exp() + out.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
            del out
        row_max = run_max.clone()
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # a rank without columns has run_max = -inf and run_sum = 0: contributes 0, not nan
        scale = torch.where(run_sum > 0, (run_max - row_max).exp(), torch.zeros_like(run_sum))
        sum_exp = run_sum * scale
        if distributed:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        loss = (sum_exp.log() + row_max - target_logit).mean()
        ctx.save_for_backward(emb, centres, targets, row_max, sum_exp)
        ctx.margin, ctx.chunk = margin, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        emb, centres, targets, row_max, sum_exp = ctx.saved_tensors
        n = emb.size(0)
        scale = grad_out / n
        row_factor = (scale / sum_exp)[:, None]  # softmax normalisation and loss scale in one multiply
        grad_emb = torch.zeros_like(emb)
        grad_centres = torch.empty_like(centres)
        for start in range(0, centres.size(0), ctx.chunk):
            stop = min(start + ctx.chunk, centres.size(0))
            local_t = _rebase(targets, start, stop)
            # fp32 recomputation even if backward() is called under autocast (docs/architecture.md, "Numerics")
            with torch.enable_grad(), torch.autocast(device_type=emb.device.type, enabled=False):
                e = emb.detach().requires_grad_()
                c = centres[start:stop].detach().requires_grad_()
                out = ctx.margin(e @ F.normalize(c).t(), local_t)
                with torch.no_grad():
                    g = (out.detach() - row_max[:, None]).exp_().mul_(row_factor)
                    rows = torch.nonzero(local_t != -1).reshape(-1)
                    g.index_put_((rows, local_t[rows]), -scale.expand(rows.numel()), accumulate=True)
                ge, gc = torch.autograd.grad(out, (e, c), g)
            grad_emb += ge
            grad_centres[start:stop] = gc
        return grad_emb, grad_centres, None, None, None, None


def _rebase(targets: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Targets as columns of the chunk [start, stop), -1 where the target is not in it."""
    inside = (targets >= start) & (targets < stop)
    return torch.where(inside, targets - start, torch.full_like(targets, -1))
