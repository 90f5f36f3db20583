"""Where Partial FC class centres live, and how the sampled rows travel between storage and compute.

Two options decide the layout of a shard (config ``engine.head.offload`` and ``engine.head.storage_dtype``):

- ``offload="none"``: the shard lives on the training device. ``offload="cpu"``: the shard and its optimizer
  state live in host memory (pinned when computing on a GPU, so copies can be asynchronous); each step only
  the sampled rows are copied to the device and, after the update, written back. On a CPU-only machine the
  same code path runs with device = cpu (the copies are then plain gathers).
- ``storage_dtype`` "fp32" | "bf16" | "fp16": the dtype of the stored centres. Rows are upcast to fp32 when
  gathered; logits, loss, gradients and the optimizer math are fp32; only the write-back rounds.

Gradient hand-over. PyTorch requires ``param.grad`` to have the parameter's dtype and device, so a bf16 or
host-resident weight cannot receive an fp32 device gradient. In the default layout (fp32 on the device) the
head keeps the contract of `heads.PartialFC` (docs/architecture.md, "Adding a backbone / head / backend"):
``weight.grad`` is a sparse COO tensor of the sampled rows. In any
other layout the gradient is left, in fp32 on the compute device, as ``weight.sampled_grad`` (a `RowGrad`),
which the row-sparse optimizers in `heads.sparse_optim` consume and `scale_head_grad_` scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from heads.compat import mark_sorted_sparse_coalesced, version_counter

# The one list of each choice: engine.config checks engine.head.storage_dtype / offload against these before
# start-up; the checks below guard direct callers of PartialFC.
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OFFLOADS = ("none", "cpu")


def storage_dtype_of(name) -> torch.dtype:
    """torch dtype for a config name ("fp32" | "bf16" | "fp16"); torch dtypes pass through."""
    if isinstance(name, torch.dtype):
        if name not in STORAGE_DTYPES.values():
            raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {name}")
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def storage_device(offload: str, device: torch.device) -> torch.device:
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {list(OFFLOADS)}, got {offload!r}")
    return torch.device("cpu") if offload == "cpu" else device


def empty_table(shape, dtype: torch.dtype, device: torch.device, *, pin: bool) -> torch.Tensor:
    """Uninitialised storage; pinned host memory when `pin` (offload with a CUDA compute device)."""
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")


def pinned_host_bytes(nbytes: int, round_threshold: Optional[int] = None) -> int:
    """Host memory a pinned tensor of `nbytes` takes (an offloaded table, its optimizer state).

    Pinned tensors come from PyTorch's caching host allocator (ATen/core/CachingHostAllocator.h, `allocate`),
    which rounds every request up to the next power of two (its free lists are indexed by log2 of the size) and
    pins all of it with cudaHostAlloc: a 14.8 GB (13.8 GiB) table takes 16 GiB of page-locked host memory, and
    so does its momentum. torch 2.11 always rounds; newer versions skip the rounding above
    `pinned_max_round_threshold_mb` of PYTORCH_ALLOC_CONF (`round_threshold`, bytes; None: rounded at any size).
    """
    if nbytes <= 0:
        return 0
    if round_threshold is not None and nbytes > round_threshold:
        return int(nbytes)
    return 1 << (int(nbytes) - 1).bit_length()


@dataclass
class RowGrad:
    """fp32 gradient of some rows of a table, on the compute device (the sparse COO ``(index, grad)`` pair).

    Attributes:
        index: [k] local rows (distinct when `distinct`).
        grad: [k, E] float32.
        rows: fp32 values of ``table[index]`` as gathered for the forward (compute device), reused by the
            optimizer to avoid a second copy from storage; None when unknown (e.g. after accumulation).
        distinct: whether `index` has no duplicates (else the optimizer sums duplicates first).
    """

    index: torch.Tensor
    grad: torch.Tensor
    rows: Optional[torch.Tensor] = None
    distinct: bool = True

    def accumulate(self, other: "RowGrad") -> "RowGrad":
        """Sum of two row gradients (gradient accumulation over micro-steps): concatenated, not coalesced."""
        return RowGrad(torch.cat([self.index, other.index]), torch.cat([self.grad, other.grad]), None, False)

    def coalesced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct rows, summed gradient rows); O(k log k), never a dense [num_local, E] tensor."""
        if self.distinct:
            return self.index, self.grad
        shape = (int(self.index.max()) + 1, self.grad.size(1))
        sp = torch.sparse_coo_tensor(self.index.view(1, -1), self.grad, shape).coalesce()
        return sp.indices()[0], sp.values()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one, however spelled: ``cuda`` is the current CUDA device, so it equals
    ``cuda:0`` when that is current (``torch.device`` compares the spelling: ``cuda != cuda:0``)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type in ("cpu", "meta"):
        return True
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _host_rows(table: torch.Tensor, rows: torch.Tensor, pin: bool) -> torch.Tensor:
    """``table[rows]`` of a host table into a fresh host buffer, pinned when `pin` (then PyTorch's caching host
    allocator reuses it, and the device copy from it is truly asynchronous)."""
    host = torch.empty((rows.numel(),) + tuple(table.shape[1:]), dtype=table.dtype, pin_memory=pin)
    torch.index_select(table, 0, rows.to(table.device), out=host)
    return host


def load_rows(table: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table[rows]`` as float32 on `device`. Host tables: gathered on the host, then one copy (async if pinned)."""
    if same_device(table.device, device):
        return table.index_select(0, rows).float()
    host = _host_rows(table, rows, pin=torch.device(device).type == "cuda")
    return host.to(device, non_blocking=True).float()


def store_rows_(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table[rows] = values``, rounded to the table's dtype on the compute device before any copy back."""
    values = values.to(table.dtype)
    if table.device != values.device:
        rows, values = rows.to(table.device), values.to(table.device)  # blocking: the host reads it next
    table.index_copy_(0, rows, values)


class RowFetcher:
    """Copies sampled rows from storage to the compute device, on a side CUDA stream when there is one.

    `start` is called as soon as the step's index is known (before the backbone forward when the trainer calls
    `PartialFC.prefetch`), `finish` when the rows are needed; in between the host->device copy runs on its own
    stream, concurrently with the backbone's kernels. The host-side gather itself runs on the calling thread.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return load_rows(table, index, self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # index and table updates are ready
        with torch.cuda.stream(self.stream):
            return load_rows(table, index, self.device)

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            rows.record_stream(current)
        return rows


def attach_row_grad(weight: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A leaf copy of `rows` whose gradient is handed to ``weight.sampled_grad`` (see the module docstring).

    The hook runs once per backward through this leaf; several backwards before an optimizer step accumulate,
    as ``.grad`` would.
    """
    leaf = rows.detach().requires_grad_()
    cached = rows.detach()

    def hook(grad: torch.Tensor) -> None:
        new = RowGrad(index, grad.detach().float(), cached)
        old = getattr(weight, "sampled_grad", None)
        weight.sampled_grad = new if old is None else old.accumulate(new)

    leaf.register_hook(hook)
    return leaf


class SampledRows(torch.autograd.Function):
    """``weight[index]`` for a sorted, duplicate-free `index`, whose gradient is a *coalesced* sparse COO tensor.

    The same values and gradient as ``F.embedding(index, weight, sparse=True)``, but that gradient is
    uncoalesced, and the optimizer's ``coalesce()`` would sort the k row ids and copy the [k, E] values again
    (0.3 s at 500k rows on one CPU core). Use `sampled_rows`, which also lets the optimizer reuse the rows.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = weight.index_select(0, index)
        ctx.save_for_backward(index)
        ctx.shape = weight.shape
        return rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index.unsqueeze(0), grad.contiguous(), ctx.shape, is_coalesced=True,
                                       check_invariants=False), None


def sampled_rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``weight[index]`` (sorted distinct `index`) via `SampledRows`; when a gradient will flow, the rows are
    remembered on the weight (`remember_rows`) so the optimizer does not gather the same rows a second time."""
    rows = SampledRows.apply(weight, index)
    if torch.is_grad_enabled() and weight.requires_grad:  # a step will follow; else nothing is kept alive
        remember_rows(weight, index, rows)
    return rows


def remember_rows(weight: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Keep ``rows == weight[index]`` for the optimizer, valid while the weight is not modified in place.

    Validity is autograd's version counter of the weight: any in-place change (``copy_``, an optimizer step,
    ``load_state_dict``) invalidates the rows. Writes through ``weight.data`` bypass version counters (as they
    bypass autograd's own checks) and are not seen; the optimizers forget the rows after each step.
    """
    weight._pfc_rows = (index, rows.detach(), version_counter(weight))


def remembered_rows(weight: torch.Tensor, index: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows `remember_rows` kept if they are ``weight[index]`` still (same index, weight unmodified)."""
    kept = getattr(weight, "_pfc_rows", None)
    if kept is None:
        return None
    kept_index, rows, version = kept
    if version != version_counter(weight) or kept_index.shape != index.shape or kept_index.device != index.device:
        return None
    if kept_index.data_ptr() != index.data_ptr() and not torch.equal(kept_index, index):
        return None
    return rows


def forget_rows(weight: torch.Tensor) -> None:
    if getattr(weight, "_pfc_rows", None) is not None:
        weight._pfc_rows = None


def row_grad_of(p: torch.Tensor) -> Optional[RowGrad]:
    """The pending row gradient of `p`: ``p.sampled_grad``, or ``p.grad`` when it is sparse; None when dense/none.

    For a sparse ``.grad`` the rows of `p` gathered by `SampledRows` in the forward are attached when they are
    still current (same rows, `p` unmodified since), else ``rows`` is None and the optimizer gathers them.
    """
    pending = getattr(p, "sampled_grad", None)
    if pending is not None:
        return pending
    grad = p.grad
    if grad is None or not grad.is_sparse:
        return None
    if grad.sparse_dim() != 1:
        raise ValueError(f"row-sparse optimizers need gradients sparse in dim 0 only, got sparse_dim="
                         f"{grad.sparse_dim()} for a parameter of shape {tuple(p.shape)}")
    grad = mark_sorted_sparse_coalesced(grad)  # autograd's accumulation into .grad dropped the flag
    index = grad.indices()[0]
    return RowGrad(index, grad.values(), remembered_rows(p, index))


def scale_head_grad_(weight: torch.Tensor, factor: float) -> None:
    """Multiply the head's pending gradient by `factor` (fp16 unscaling), wherever the layout put it.

    O(sampled rows): sparse gradients are scaled through their values, never densified.
    """
    pending = getattr(weight, "sampled_grad", None)
    if pending is not None:
        pending.grad.mul_(factor)
    if weight.grad is not None:
        weight.grad = weight.grad * factor  # sparse * scalar scales the values only


def clear_row_grad(p: torch.Tensor) -> None:
    if getattr(p, "sampled_grad", None) is not None:
        p.sampled_grad = None
    forget_rows(p)
