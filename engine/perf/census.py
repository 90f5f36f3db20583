"""What engine.perf.profiler measures besides time: the collectives of a step and the memory of one step.

`CommMeter` counts torch.distributed collectives while installed (patched on this process only, restored by
`remove`): kind, owner (head, backbone, hooks) and call site, bytes, ring bus bytes and time. `MemoryCensus`
takes exact tensor sizes at the phase boundaries where each kind of tensor exists (parameters, gradients,
optimizer state, head rows, what autograd saves in the backbone forward and the head). Helpers read and reset
a process's peak RSS. Nothing here knows the trainer's structure beyond its documented attributes.
"""
from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository: sites are named relative to it (heads/..., engine/...)

# torch.distributed collectives counted in the window -> how many bytes the call's full result holds.
# all-gather: world x input (the gathered result); all-reduce / broadcast: the tensor; reduce-scatter: the input.
_TENSOR_BYTES = lambda t: t.numel() * t.element_size()  # noqa: E731
COLLECTIVES: Dict[str, Callable[..., int]] = {
    "all_reduce": lambda tensor, *a, **k: _TENSOR_BYTES(tensor),
    "broadcast": lambda tensor, *a, **k: _TENSOR_BYTES(tensor),
    "reduce": lambda tensor, *a, **k: _TENSOR_BYTES(tensor),
    "all_gather": lambda tensor_list, *a, **k: sum(_TENSOR_BYTES(t) for t in tensor_list),
    "all_gather_into_tensor": lambda output_tensor, *a, **k: _TENSOR_BYTES(output_tensor),
    "reduce_scatter_tensor": lambda output_tensor, input_tensor, *a, **k: _TENSOR_BYTES(input_tensor),
    "reduce_scatter": lambda output, input_list, *a, **k: sum(_TENSOR_BYTES(t) for t in input_list),
    "all_reduce_coalesced": lambda tensors, *a, **k: sum(_TENSOR_BYTES(t) for t in tensors),
    "all_to_all_single": lambda output, input, *a, **k: _TENSOR_BYTES(input),
    "all_gather_object": lambda *a, **k: 0,  # pickled objects: size unknown before the call
    "barrier": lambda *a, **k: 0,
}
# Bytes each rank sends per byte of result in a ring implementation (NCCL-tests' bus bandwidth factors).
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_reduce_coalesced": lambda n: 2 * (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n, "all_gather_into_tensor": lambda n: (n - 1) / n,
              "reduce_scatter_tensor": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_to_all_single": lambda n: (n - 1) / n}



# Helpers that issue collectives for their callers: the caller is the owner and the site.
_HELPERS = ("engine/runtime/dist.py", "heads/comm.py", "engine/perf/census.py")


def _owner(frames: List[Tuple[str, str]]) -> Tuple[str, str]:
    """Who issued a collective, from the calling frames (innermost first): (owner, site).

    owner, by precedence: "hooks" (called from engine's hooks or checkpoints: logging, evaluation, saving,
    whatever library does the work), "head" (heads/), "backbone" (DeepSpeed, FSDP or our backend modules),
    "trainer" (the training loop itself), else "other". site: the innermost frame of this repository's own
    code past the helpers in `_HELPERS` (file:function), with the library in between when there is one, e.g.
    "heads/softmax.py:forward" for the head's embedding all-gather or "engine/parallel/deepspeed_backend.py:backward via
    deepspeed".
    """
    found, site, library = set(), "", ""
    for filename, function in frames:
        ours = filename.startswith(str(ROOT)) and "site-packages" not in filename
        relative = os.path.relpath(filename, ROOT) if ours else ""
        if not ours and not site and not library and "site-packages" in filename:
            library = filename.split("site-packages/", 1)[1].split("/", 1)[0]
        if ours and relative in _HELPERS:
            continue
        if ours and not site:
            site = f"{relative}:{function}" + (f" via {library}" if library else "")
        if relative in ("engine/train/hooks.py", "engine/state/checkpoint.py"):
            found.add("hooks")
        elif relative.startswith("heads/"):
            found.add("head")
        elif "deepspeed" in filename or "fsdp" in filename or relative in ("engine/parallel/deepspeed_backend.py",
                                                                            "engine/parallel/common.py"):
            found.add("backbone")
        elif relative == "engine/train/trainer.py":
            found.add("trainer")
    owner = next((o for o in ("hooks", "head", "backbone", "trainer") if o in found), "other")
    return owner, site or library


class CommMeter:
    """Counts torch.distributed collectives while installed (this process only; `remove` restores them).

    Patched: the functions of torch.distributed (the heads, FSDP and DeepSpeed's torch backend look them up
    there at call time) and DeepSpeed's comm backend's cached all-gather/reduce-scatter functions. A call made
    from inside another counted call (all_gather_object uses all_gather) is counted once, as the outer one.
    Times are host wall time on the CPU (gloo collectives block, so waiting for a slower peer is included) and
    CUDA events on a GPU for blocking calls; an async call (async_op=True) has its bytes counted, no time.
    """

    def __init__(self, clock: Any, current_phase: Callable[[], str]):  # clock: engine.perf.profiler._Clock
        self.clock = clock
        self.current_phase = current_phase
        self.records: List[Dict[str, Any]] = []  # one per call: key fields + start/end marks
        self._saved: List[Tuple[Any, str, Any]] = []
        self._local = threading.local()

    def _wrap(self, op: str, fn: Callable) -> Callable:
        size_of = COLLECTIVES[op]

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            try:
                nbytes = int(size_of(*args, **kwargs))
            except Exception:  # an unusual call form: count the call, not its size
                nbytes = 0
            frame, files = sys._getframe(1), []
            while frame is not None:
                files.append((frame.f_code.co_filename, frame.f_code.co_name))
                frame = frame.f_back
            owner, site = _owner(files)
            is_async = bool(kwargs.get("async_op", False))
            start = None if is_async else self.clock.mark()
            self._local.depth = 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self._local.depth = 0
            end = None if is_async else self.clock.mark()
            self.records.append(dict(op=op, owner=owner, site=site, phase=self.current_phase(), bytes=nbytes,
                                     start=start, end=end))
            return result

        counted._arcscale_original = fn  # type: ignore[attr-defined]
        return counted

    def install(self) -> None:
        import torch.distributed as tdist
        import torch.distributed.distributed_c10d as c10d

        targets = [tdist, c10d]
        for op in COLLECTIVES:
            originals = {id(getattr(m, op)): getattr(m, op) for m in targets if hasattr(m, op)}
            wrapped = {key: self._wrap(op, fn) for key, fn in originals.items()}
            for module in targets:
                if hasattr(module, op):
                    original = getattr(module, op)
                    self._saved.append((module, op, original))
                    setattr(module, op, wrapped[id(original)])
        cdb = sys.modules.get("deepspeed.comm.comm")
        backend = getattr(cdb, "cdb", None) if cdb is not None else None
        for attr, op in (("all_gather_function", "all_gather_into_tensor"),
                         ("reduce_scatter_function", "reduce_scatter_tensor")):
            fn = getattr(backend, attr, None) if backend is not None else None
            if callable(fn):
                self._saved.append((backend, attr, fn))
                setattr(backend, attr, self._wrap(op, fn))

    def remove(self) -> None:
        for obj, attr, original in reversed(self._saved):
            setattr(obj, attr, original)
        self._saved.clear()

    def seconds_in_phases(self, phases) -> float:
        """Seconds of the timed calls made while one of `phases` was being timed (call after synchronize)."""
        return sum(self.clock.seconds(r["start"], r["end"]) for r in self.records
                   if r["phase"] in phases and r["start"] is not None)

    def summary(self, num_steps: int, world_size: int) -> List[Dict[str, Any]]:
        """Per (owner, op, site): calls, bytes, ring bus bytes and seconds per step (call after synchronize)."""
        table: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        for r in self.records:
            key = (r["owner"], r["op"], r["site"])
            row = table.setdefault(key, dict(owner=r["owner"], op=r["op"], site=r["site"], phases=set(), calls=0,
                                             bytes=0, seconds=0.0, timed=True))
            row["calls"] += 1
            row["bytes"] += r["bytes"]
            row["phases"].add(r["phase"])
            if r["start"] is None:
                row["timed"] = False
            else:
                row["seconds"] += self.clock.seconds(r["start"], r["end"])
        out = []
        for row in table.values():
            factor = BUS_FACTOR.get(row["op"], lambda n: 1.0)(world_size) if world_size > 1 else 0.0
            out.append(dict(key=f"{row['owner']}.{row['op']}", owner=row["owner"], op=row["op"], site=row["site"],
                            phases=sorted(row["phases"]), calls_per_step=row["calls"] / num_steps,
                            bytes_per_step=row["bytes"] / num_steps,
                            bus_bytes_per_step=row["bytes"] * factor / num_steps,
                            seconds_per_step=row["seconds"] / num_steps if row["timed"] else None))
        return sorted(out, key=lambda r: (-r["bytes_per_step"], r["key"], r["site"]))


# ---- memory --------------------------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # meta, sparse or wrapper tensors
        return (str(t.device), id(t))


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.is_sparse:
        return _TENSOR_BYTES(t._values()) + _TENSOR_BYTES(t._indices())
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return _TENSOR_BYTES(t)


def head_grad_bytes(weight: torch.Tensor) -> int:
    """Bytes of the head's pending gradient wherever its layout put it: a dense or sparse `.grad`, or with
    `offload: cpu` / 16-bit `storage_dtype` a `heads.RowGrad` in `.sampled_grad` (fp32 rows and their index;
    not a tensor: PyTorch requires `.grad` to match the parameter's dtype and device)."""
    from heads import RowGrad

    if weight.grad is not None:
        return _tensor_bytes(weight.grad)
    pending = getattr(weight, "sampled_grad", None)
    if isinstance(pending, RowGrad):
        return _tensor_bytes(pending.grad) + _tensor_bytes(pending.index)
    return 0


def unique_bytes(tensors, exclude: Optional[set] = None) -> int:
    """Bytes of the distinct storages behind `tensors` (views counted once), skipping storages in `exclude`."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def _optimizer_tensors(opt: Any) -> Iterator[torch.Tensor]:
    for state in getattr(opt, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield value


def inner_optimizer(backbone: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer holding the backbone's state, behind DeepSpeed's ZeRO/fp16 wrappers or FSDP's."""
    opt = getattr(getattr(backbone, "engine", None), "optimizer", None) or getattr(backbone, "optimizer", None)
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def read_rss_peak() -> Tuple[int, str]:
    """Peak resident set size of this process since the last `reset_rss_peak` (VmHWM), or since start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss"


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return read_rss_peak()[0]


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryCensus:
    """Exact tensor sizes of one step, taken at the phase boundaries where each kind of tensor exists."""

    def __init__(self) -> None:
        self.measured: Dict[str, int] = {}
        self.head_saved: Dict[str, int] = defaultdict(int)
        self.head_grad = 0
        self._params: set = set()

    @contextlib.contextmanager
    def saved_tensors(self, into: Callable[[torch.Tensor], None]):
        """Call `into(t)` for every tensor autograd saves for backward inside the block (values untouched)."""
        def pack(t):
            into(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def forward_saver(self):
        seen: set = set(self._params)

        def add(t: torch.Tensor) -> None:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                self.measured["activations"] = self.measured.get("activations", 0) + _tensor_bytes(t)
        self.measured["activations"] = 0
        return self.saved_tensors(add)

    def head_saver(self, num_sampled: int, embedding_size: int, global_batch: int):
        """Head saved tensors, sorted into sampled rows [rows, E], logits [global batch, cols] and the rest."""
        seen: set = set(self._params)

        def add(t: torch.Tensor) -> None:
            key = _storage_key(t)
            if key in seen:
                return
            seen.add(key)
            nbytes = _tensor_bytes(t)
            if t.dim() == 2 and t.size(1) == embedding_size and t.size(0) == num_sampled:
                self.head_saved["head sampled rows"] += nbytes
            elif t.dim() == 2 and t.size(0) == global_batch and t.size(1) > 1:
                self.head_saved["head logits"] += nbytes
            else:
                self.head_saved["head other saved"] += nbytes
        return self.saved_tensors(add)

    def take_static(self, trainer: Any) -> None:
        """Parameters and head rows (at the window's start; their sizes do not change)."""
        module = trainer.backbone.module
        params = list(module.parameters())
        self._params = {_storage_key(p) for p in params}
        partitioned = [getattr(p, "ds_tensor", None) for p in params]
        self.measured["backbone parameters"] = unique_bytes(params) + unique_bytes(
            [t for t in partitioned if t is not None])
        self._params |= {_storage_key(t) for t in partitioned if t is not None}
        self._params.add(_storage_key(trainer.head.weight))
        self.measured["head weights"] = unique_bytes([trainer.head.weight])

    def take_grads(self, trainer: Any) -> None:
        """After the boundary backward: gradients of the model's parameters and ZeRO's reduced partitions."""
        params = list(trainer.backbone.module.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        engine = getattr(trainer.backbone, "engine", None)
        if engine is not None:
            from engine.runtime import compat

            try:
                grads += [g for g in compat.zero_local_grads(engine) if g is not None]
            except Exception:  # noqa: BLE001 - a private DeepSpeed attribute moved: count what the module holds
                pass
        self.measured["backbone gradients"] = max(self.measured.get("backbone gradients", 0), unique_bytes(grads))
        self.head_grad = max(self.head_grad, head_grad_bytes(trainer.head.weight))

    def take_optimizer(self, trainer: Any) -> None:
        """After the optimizer steps: backbone optimizer state, fp32 partitions/masters, head optimizer rows."""
        inner = inner_optimizer(trainer.backbone)
        module_keys = {_storage_key(p) for p in trainer.backbone.module.parameters()}
        if inner is not None:
            self.measured["backbone optimizer state"] = unique_bytes(_optimizer_tensors(inner))
            masters = [p for g in inner.param_groups for p in g["params"] if _storage_key(p) not in module_keys]
            if masters:
                self.measured["fp32 partitions/masters + grads"] = unique_bytes(
                    masters + [p.grad for p in masters if p.grad is not None])
        self.measured["head optimizer state"] = unique_bytes(_optimizer_tensors(trainer.head_optimizer))


def cuda_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device))
