"""Model-parallel Partial FC (arcface_torch's PartialFC_V2 mathematics) with explicit process group and device.

The identity classifier is sharded by class over the ranks of `group`: rank r holds a contiguous block of
class centres and is the only owner of them (they are never averaged, partitioned or wrapped by data
parallelism; docs/architecture.md, "The one subtle rule"). One step:

1. all-gather the embeddings (autograd-aware) and labels of the whole global batch;
2. validate the step collectively (every rank raises the same ValueError together instead of one hanging);
3. optionally sample a subset of this rank's classes (all positives + uniform random negatives,
   `heads.sampling`: O(num_sample log num_sample), no pass over the shard);
4. local cosine logits ``normalize(emb) @ normalize(W[index]).T`` in float32, upcasting the sampled rows;
5. margin (`CombinedMarginLoss`) on the local columns;
6. softmax cross-entropy distributed over the ranks' columns: loss = mean over the global batch, the same
   value on every rank. Either one [N, num_sample] logits buffer, or (``chunk_size``) column chunks with an
   online softmax recomputed in backward, O(N x chunk) memory (`heads.softmax`).

Gradients: in the default layout (fp32 centres on the compute device) ``.weight.grad`` holds dLoss/dWeight
for this rank's rows: with ``sample_rate < 1`` a sparse COO tensor holding only the sampled rows (use
`heads.RowSparseSGD` / `RowSparseAdamW`), with ``sample_rate == 1`` dense. With ``offload="cpu"`` or a bf16/fp16
``storage_dtype`` the fp32 gradient of the sampled rows stays on the compute device as ``.weight.sampled_grad``
(`heads.class_store` says why); the same optimizers consume it. The gradient w.r.t. the local embeddings is
``world_size`` times the true dLoss/d(local embeddings), because the data-parallel backbone wrapper averages
gradients over ranks (see `AllGatherEmbeddings`).

Per-step cost is independent of the class count apart from the sampled rows: nothing of size num_local is
read, written or allocated per step except the class centres' storage itself (sample_rate == 1 excepted).
Unsampled rows keep their weight and their optimizer state (momentum frozen, no weight decay) until sampled
again, as in the original Partial FC and PaddlePaddle's PLSC; arcface_torch v2 instead updates every row
every step (dense gradient and momentum), which costs O(num_local) per step.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from heads.class_store import (RowFetcher, attach_row_grad, empty_table, sampled_rows, storage_device,
                               storage_dtype_of)
from heads.comm import get_rank, get_world_size
from heads.sampling import sample_rows
from heads.softmax import (AllGatherEmbeddings, ChunkedMarginSoftmaxCE, DistSoftmaxCrossEntropy,  # noqa: F401
                           _distributed, resolve_chunk_size)

INIT_STD = 0.01
INIT_BLOCK_ROWS = 65536  # class rows per independently seeded init block


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
        device: the compute device (default CPU); also where the weight lives unless offloaded.
        seed: weight init and negative sampling. Row i of the weight depends only on (seed, i, num_classes,
            E), never on the world size, so shards of a W-rank head concatenate to a 1-rank head's weight.
        chunk_size: columns per softmax chunk; 0 = auto (chunked when global batch x num_sample exceeds
            ``heads.softmax.AUTO_CHUNK_MIN_LOGITS`` = 2**23 logits, i.e. 32 MiB of fp32, with chunks of about
            2**20 logits, 2**24 on CUDA); a value >= the sampled columns means unchunked. Results equal to fp32
            rounding.
        offload: "none" or "cpu" (weight and optimizer state in host memory, pinned when `device` is a GPU).
        storage_dtype: "fp32", "bf16" or "fp16" (or the torch dtype) for the stored centres; compute is fp32.

    Attributes: ``weight`` [num_local, E] (on the host when offloaded), ``class_start``, ``num_local``,
    ``num_sample``, ``num_classes``, ``device``, ``step`` (steps prepared so far; seeds the sampling, save it
    with the head to resume the same sequence), ``last_sampled_index`` (sorted local rows used in the last
    step; None when sample_rate == 1).
    """

    def __init__(self, margin_loss: nn.Module, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 *, group: Optional[dist.ProcessGroup] = None, device=None, seed: int = 0, chunk_size: int = 0,
                 offload: str = "none", storage_dtype: Union[str, torch.dtype] = "fp32") -> None:
        super().__init__()
        world_size, rank = get_world_size(group), get_rank(group)
        if not (isinstance(embedding_size, int) and embedding_size > 0):
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not (isinstance(num_classes, int) and num_classes >= world_size):
            raise ValueError(f"num_classes must be an int >= the group's world size ({world_size}) so every "
                             f"rank holds at least one class, got {num_classes!r}")
        if not (0.0 < float(sample_rate) <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not (isinstance(chunk_size, int) and chunk_size >= 0):
            raise ValueError(f"chunk_size must be an int >= 0 (0 = auto), got {chunk_size!r}")
        dtype = storage_dtype_of(storage_dtype)
        self.margin_loss = margin_loss
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.chunk_size = chunk_size
        self.offload = offload
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.step = 0
        self.last_sampled_index: Optional[torch.Tensor] = None
        self._batch_size: Optional[int] = None
        self._prefetched: Optional[tuple] = None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current one, by number
            self.device = torch.device("cuda", torch.cuda.current_device())
        home = storage_device(offload, self.device)
        # direct: autograd writes .weight.grad (fp32 on the compute device); else the RowGrad hand-over
        self._direct = offload == "none" and dtype == torch.float32
        pin = offload == "cpu" and self.device.type == "cuda"  # pinned: only a CUDA device copies from it
        self.weight = nn.Parameter(empty_table((self.num_local, embedding_size), dtype, home, pin=pin),
                                   requires_grad=self._direct)
        self._fetcher = RowFetcher(self.device) if self.device.type != "meta" else None
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}, "
                f"chunk_size={self.chunk_size}, offload={self.offload!r}, storage_dtype={self.weight.dtype}, "
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

    def _validate(self, embeddings: Optional[torch.Tensor], labels: torch.Tensor) -> None:
        """Gather [B, E, ok-flags, num_bad, min, max] from every rank and raise the same error everywhere.

        ``embeddings=None`` (from `prefetch`) checks the labels only.
        """
        device = self.device
        if embeddings is None:
            b, e, emb_ok = (labels.size(0) if labels.dim() >= 1 else -1), self.embedding_size, True
        else:
            b = embeddings.size(0) if embeddings.dim() >= 1 else -1
            e = embeddings.size(1) if embeddings.dim() == 2 else -1
            emb_ok = embeddings.dim() == 2
        labels_ok = (not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
                     and labels.numel() == b and labels.dim() <= 2)
        shape = torch.tensor([b, e, int(emb_ok), int(labels_ok)], dtype=torch.int64, device=device)
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
    def _prepare(self, local_labels: torch.Tensor) -> dict:
        """Gather the labels, sample this step's rows and start copying them from storage (one step's plan).

        Sampling is seeded by (seed, rank, step); the sorted index drives the logits, the gradient rows and the
        optimizer update. Positives are always included; exactly ``max(num_sample, num_positive)`` rows.
        """
        labels = local_labels.reshape(-1).to(device=self.device, dtype=torch.long)
        if _distributed(self.group):
            parts = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(parts, labels.contiguous(), group=self.group)
            labels = torch.cat(parts)
        local = labels - self.class_start
        is_local = (local >= 0) & (local < self.num_local)
        local = torch.where(is_local, local, torch.full_like(local, -1))
        index, targets = None, local
        if self.sample_rate < 1.0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_mix_seed(self.seed, self.rank, self.step))
            positive = torch.unique(local[is_local], sorted=True)
            index = self._sample(positive, gen)
            targets = torch.where(is_local, torch.searchsorted(index, local), local)
        elif not self._direct:
            index = torch.arange(self.num_local, device=self.device)
        self.last_sampled_index = index if self.sample_rate < 1.0 else None
        rows = None if self._direct else self._fetcher.start(self.weight.detach(), index)
        self.step += 1
        return dict(labels=local_labels, index=index, targets=targets, rows=rows)

    def _sample(self, positive: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Sorted local rows for this step (`heads.sampling.sample_rows`); a seam for baselines and tests."""
        return sample_rows(positive, self.num_local, self.num_sample, gen)

    def prefetch(self, local_labels: torch.Tensor) -> None:
        """Plan the next step from its labels and start copying its rows while the backbone runs.

        Collective (all ranks call it). The next `forward` must get the same labels. Worth calling before the
        backbone forward with ``offload="cpu"`` on CUDA: the host->device copy of the sampled rows then overlaps
        the backbone's kernels. Without it, `forward` does the same work itself.
        """
        self._validate(None, local_labels)
        self._prefetched = self._prepare(local_labels)

    def _centres(self, plan: dict) -> torch.Tensor:
        """The step's class rows [num_sample, E] as a tensor autograd can route back to the stored weight."""
        index = plan["index"]
        if not self._direct:  # fp32 rows on the device; their gradient goes to weight.sampled_grad
            return attach_row_grad(self.weight, index, self._fetcher.finish(plan["rows"]))
        if index is not None:  # rows gathered with a sparse gradient: weight.grad holds only the sampled rows
            return sampled_rows(self.weight, index)
        return self.weight

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss: mean over the global batch, identical on every rank of the group."""
        with record_function("pfc.validate"):  # labels on the trace's timeline (torch.profiler; no-op otherwise)
            self._validate(local_embeddings, local_labels)
        plan, self._prefetched = self._prefetched, None
        if plan is not None and not (plan["labels"] is local_labels or torch.equal(
                plan["labels"].reshape(-1).cpu(), local_labels.reshape(-1).cpu())):
            raise ValueError("PartialFC.forward got other labels than the preceding prefetch(labels)")
        if plan is None:
            plan = self._prepare(local_labels)
        with record_function("pfc.all_gather_embeddings"):
            embeddings = AllGatherEmbeddings.apply(local_embeddings.to(device=self.device, dtype=torch.float32),
                                                   self.group)
        targets, weight = plan["targets"], self._centres(plan)
        # fp32 logits, margin and softmax even when the caller runs the step under autocast (a bf16 softmax over
        # millions of classes loses the target's probability; docs/architecture.md, "Numerics")
        with torch.autocast(device_type=self.device.type, enabled=False), record_function("pfc.logits_softmax"):
            emb_n = F.normalize(embeddings)
            chunk = resolve_chunk_size(self.chunk_size, emb_n.size(0), weight.size(0), self.device.type)
            if chunk:  # normalises the centres chunk by chunk itself
                return ChunkedMarginSoftmaxCE.apply(emb_n, weight.float(), targets, self.margin_loss, chunk,
                                                    self.group)
            logits = self.margin_loss(F.linear(emb_n, F.normalize(weight.float())), targets)
            return DistSoftmaxCrossEntropy.apply(logits, targets, self.group)
