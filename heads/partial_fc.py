"""Model-parallel Partial FC (arcface_torch's PartialFC_V2 mathematics) with explicit process group and device.

The identity classifier is sharded by class over the ranks of `group`: rank r holds a contiguous block of
class centres and is the only owner of them (they are never averaged, partitioned or wrapped by data
parallelism; DESIGN.md section 2). One step:

1. all-gather the embeddings (autograd-aware) and labels of the whole global batch;
2. validate the step collectively (every rank raises the same ValueError together instead of one hanging);
3. optionally sample a subset of this rank's classes (all positives + uniform random negatives);
4. local cosine logits ``normalize(emb) @ normalize(W[index]).T`` in float32;
5. margin (`CombinedMarginLoss`) on the local columns;
6. softmax cross-entropy distributed over the ranks' columns: loss = mean over the global batch, the same
   value on every rank.

Gradients: ``.weight.grad`` holds dLoss/dWeight for this rank's rows. With ``sample_rate < 1`` it is a sparse
COO tensor holding only the sampled rows (use `heads.RowSparseSGD` / `RowSparseAdamW`); with
``sample_rate == 1`` it is dense. The gradient w.r.t. the local embeddings is ``world_size`` times the true
dLoss/d(local embeddings), because the data-parallel backbone wrapper averages gradients over ranks (see
`AllGatherEmbeddings`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.dist import get_rank, get_world_size, is_initialized

INIT_STD = 0.01
INIT_BLOCK_ROWS = 65536  # class rows per independently seeded init block


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


def _mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 finaliser per value)."""
    h = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        h = (h ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9 & mask
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & mask
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank`: contiguous blocks, remainder to the first ranks (10/3 -> 4, 3, 3)."""
    base, rem = divmod(num_classes, world_size)
    return base * rank + min(rank, rem), base + int(rank < rem)


class PartialFC(nn.Module):
    """Model-parallel, optionally sampled, margin softmax classifier (see the module docstring).

    Args:
        margin_loss: maps local cosine logits and local labels (-1 = not here) to scaled logits,
            normally `heads.CombinedMarginLoss`.
        embedding_size: E.
        num_classes: total number of classes over all ranks (>= world size).
        sample_rate: fraction of this rank's classes used per step, in (0, 1]. Positives are always used.
        group: process group holding the shards (default: the world; no group: a single process).
        device: where the weight lives (default CPU).
        seed: weight init and negative sampling. Row i of the weight depends only on (seed, i, num_classes,
            E), never on the world size, so shards of a W-rank head concatenate to a 1-rank head's weight.
        dtype: weight dtype (logits are always computed in float32).

    Attributes: ``weight`` [num_local, E], ``class_start``, ``num_local``, ``num_sample``, ``num_classes``,
    ``step`` (forward calls so far; seeds the sampling, save it with the head to resume the same sequence),
    ``last_sampled_index`` (sorted local rows used in the last forward; None when sample_rate == 1).
    """

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 *, group: Optional[dist.ProcessGroup] = None, device=None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        world_size, rank = get_world_size(group), get_rank(group)
        if not (isinstance(embedding_size, int) and embedding_size > 0):
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not (isinstance(num_classes, int) and num_classes >= world_size):
            raise ValueError(f"num_classes must be an int >= the group's world size ({world_size}) so every "
                             f"rank holds at least one class, got {num_classes!r}")
        if not (0.0 < float(sample_rate) <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.margin_loss = margin_loss
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.step = 0
        self.last_sampled_index: Optional[torch.Tensor] = None
        self._batch_size: Optional[int] = None
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}, "
                f"rank={self.rank}/{self.world_size}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, 0.01) like arcface_torch, generated on the CPU in blocks of INIT_BLOCK_ROWS classes.

        Block b (global classes [b*INIT_BLOCK_ROWS, ...)) comes from its own generator seeded by (seed, b),
        so a rank only generates the blocks overlapping its shard, never the full matrix, and its rows are the
        same whatever the world size.
        """
        if self.weight.device.type == "meta":
            return
        end = self.class_start + self.num_local
        first, last = self.class_start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS
        for b in range(first, last + 1):
            b_start = b * INIT_BLOCK_ROWS
            b_rows = min(INIT_BLOCK_ROWS, self.num_classes - b_start)
            gen = torch.Generator().manual_seed(_mix_seed(self.seed, b))
            block = torch.empty(b_rows, self.embedding_size).normal_(0.0, INIT_STD, generator=gen)
            lo, hi = max(self.class_start, b_start), min(end, b_start + b_rows)
            self.weight[lo - self.class_start:hi - self.class_start].copy_(block[lo - b_start:hi - b_start])

    # -- one step -------------------------------------------------------------------------------------------

    def _validate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Gather [B, E, ok-flags, num_bad, min, max] from every rank and raise the same error everywhere."""
        device = self.weight.device
        b = embeddings.size(0) if embeddings.dim() >= 1 else -1
        e = embeddings.size(1) if embeddings.dim() == 2 else -1
        labels_ok = (not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
                     and labels.numel() == b and labels.dim() <= 2)
        shape = torch.tensor([b, e, int(embeddings.dim() == 2), int(labels_ok)], dtype=torch.int64, device=device)
        if labels_ok and labels.numel() > 0:  # label statistics stay on the device: one sync per step
            lab = labels.reshape(-1).to(device=device, dtype=torch.long)
            bad = (lab < 0) | (lab >= self.num_classes)
            stats = torch.stack([bad.sum(), lab.min(), lab.max()])
        else:
            stats = torch.zeros(3, dtype=torch.int64, device=device)
        info = torch.cat([shape, stats])
        if _distributed(self.group):
            parts = [torch.empty_like(info) for _ in range(self.world_size)]
            dist.all_gather(parts, info, group=self.group)
            table = torch.stack(parts).cpu().tolist()
        else:
            table = [info.cpu().tolist()]

        for r, (rb, re, emb_ok, lab_ok, _, _, _) in enumerate(table):
            if not emb_ok:
                raise ValueError(f"local_embeddings on rank {r} must be 2-D [batch, {self.embedding_size}]")
            if re != self.embedding_size:
                raise ValueError(f"local_embeddings on rank {r} have dimension {re}, expected embedding_size "
                                 f"{self.embedding_size}")
            if not lab_ok:
                raise ValueError(f"local_labels on rank {r} must be an integer tensor with one label per "
                                 f"embedding ({rb}), shape [B] or [B, 1]")
        sizes = [row[0] for row in table]
        if len(set(sizes)) != 1:
            raise ValueError("local batch size must be the same on every rank, got "
                             + ", ".join(f"rank {r}: {s}" for r, s in enumerate(sizes)))
        if sizes[0] == 0:
            raise ValueError("local batch size must be > 0, got 0")
        if self._batch_size is not None and sizes[0] != self._batch_size:
            raise ValueError(f"local batch size changed from {self._batch_size} (first step) to {sizes[0]}; "
                             "Partial FC needs a fixed batch size (drop the last incomplete batch)")
        for r, (_, _, _, _, num_bad, lo, hi) in enumerate(table):
            if num_bad:
                value = lo if lo < 0 else hi
                raise ValueError(f"{num_bad} label(s) on rank {r} outside [0, {self.num_classes}) "
                                 f"(num_classes), e.g. {value}")
        self._batch_size = sizes[0]

    @torch.no_grad()
    def _sample(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted local row index: every positive plus uniform random negatives, num_sample in all
        (positives only when they alone exceed num_sample). Seeded by (seed, rank, step)."""
        positive = torch.unique(local_labels[local_labels >= 0], sorted=True)
        if positive.numel() >= self.num_sample:
            return positive
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed(_mix_seed(self.seed, self.rank, self.step))
        score = torch.rand(self.num_local, generator=gen, device=self.weight.device)
        score[positive] = 2.0
        index = torch.topk(score, k=self.num_sample, sorted=False)[1]
        return index.sort()[0]

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss: mean over the global batch, identical on every rank of the group."""
        self._validate(local_embeddings, local_labels)
        device = self.weight.device
        embeddings = AllGatherEmbeddings.apply(local_embeddings.to(device=device, dtype=torch.float32),
                                               self.group)
        labels = local_labels.reshape(-1).to(device=device, dtype=torch.long)
        if _distributed(self.group):
            parts = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(parts, labels.contiguous(), group=self.group)
            labels = torch.cat(parts)

        local = labels - self.class_start
        is_local = (local >= 0) & (local < self.num_local)
        local = torch.where(is_local, local, torch.full_like(local, -1))
        if self.sample_rate < 1.0:
            index = self._sample(local)
            self.last_sampled_index = index
            # rows gathered with a sparse gradient: weight.grad holds only the sampled rows
            weight = F.embedding(index, self.weight, sparse=True)
            targets = torch.where(is_local, torch.searchsorted(index, local), local)
        else:
            weight = self.weight
            targets = local
        self.step += 1

        # fp32 logits, margin and softmax even when the caller runs the step under autocast (DESIGN.md 5)
        with torch.autocast(device_type=device.type, enabled=False):
            logits = F.linear(F.normalize(embeddings), F.normalize(weight.float()))
            logits = self.margin_loss(logits, targets)
            return DistSoftmaxCrossEntropy.apply(logits, targets, self.group)
