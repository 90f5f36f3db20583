"""Measurement side of engine.profile: the trainer's phase timer, collective counting and a memory census.

`Profiler` is the object the trainer's `timer` argument takes (engine.trainer.NullPhaseTimer is the no-op
one). It does nothing outside a window of `num_steps` optimizer steps that starts after `start_step` steps of
this process; inside it, every rank records

* the wall time of each phase the trainer marks ("data", "h2d", "forward", "head", "backward", "backbone_step",
  "head_step") and of the hooks after each step ("log", "eval", "checkpoint"), with `time.perf_counter` on the
  CPU and CUDA events on a GPU (recorded on the current stream, read only when the window closes: no
  synchronisation is added inside a step). A step runs from the end of the previous step's hooks to the end
  of its own, so consecutive steps tile the wall clock; "other" is what no phase covers (the trainer's LR
  update and loop);
* every torch.distributed collective (patched on this process for the window only and restored after):
  kind, who called it (the head, the backbone's backend, the hooks), the bytes it moved and its time;
* a memory census of one step: tensor sizes of parameters, gradients, optimizer state and head rows, the
  tensors the backbone forward and the head save for backward (autograd saved-tensor hooks), peak memory.

When the window closes, the ranks' records are gathered (one collective, same step on every rank) and rank 0
writes the report (engine.profile_report). This module never imports engine.build (build imports it).
"""
from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from engine import dist, profile_report
from engine.hooks import Hook
from engine.profile_report import HOOK_PHASES, PHASES, STEP_PHASES  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]

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


class _Clock:
    """Time marks: perf_counter floats on the CPU; CUDA events on a GPU, resolved once the window closes."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.name = "cuda_events" if self.cuda else "perf_counter"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Elapsed seconds between two marks (on CUDA: call after `synchronize`)."""
        if not self.cuda:
            return end - start
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _owner(frames: List[Tuple[str, str]]) -> Tuple[str, str]:
    """Who issued a collective, from the calling frames (innermost first): (owner, site).

    owner: "head" (a frame in heads/), "backbone" (DeepSpeed, FSDP or our backend modules), "hooks" (engine's
    hooks, dist helpers, checkpoints) or "other". site: the innermost frame of this repository's own code
    (file:function), with the library in between when there is one, e.g. "heads/softmax.py:forward" for the
    head's embedding all-gather or "engine/ds_backend.py:backward via deepspeed".
    """
    heads_dir, engine_dir = str(ROOT / "heads"), str(ROOT / "engine")
    owner, site, library = "other", "", ""
    for filename, function in frames:
        ours = filename.startswith(str(ROOT)) and "site-packages" not in filename
        if not ours and not site and not library and "site-packages" in filename:
            library = filename.split("site-packages/", 1)[1].split("/", 1)[0]
        if ours and not site and not filename.endswith("profiler.py"):
            site = f"{os.path.relpath(filename, ROOT)}:{function}" + (f" via {library}" if library else "")
        if filename.startswith(heads_dir):
            return "head", site
        if owner == "other":
            if "deepspeed" in filename or "fsdp" in filename or filename.endswith(("ds_backend.py", "parallel.py")):
                owner = "backbone"
            elif filename.startswith(engine_dir) and filename.endswith(("hooks.py", "dist.py", "checkpoint.py")):
                owner = "hooks"
    return owner, site or library


class CommMeter:
    """Counts torch.distributed collectives while installed (this process only; `remove` restores them).

    Patched: the functions of torch.distributed (the heads, FSDP and DeepSpeed's torch backend look them up
    there at call time) and DeepSpeed's comm backend's cached all-gather/reduce-scatter functions. A call made
    from inside another counted call (all_gather_object uses all_gather) is counted once, as the outer one.
    Times are host wall time on the CPU (gloo collectives block, so waiting for a slower peer is included) and
    CUDA events on a GPU for blocking calls; an async call (async_op=True) has its bytes counted, no time.
    """

    def __init__(self, clock: _Clock, current_phase: Callable[[], str]):
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
            from engine import compat

            try:
                grads += [g for g in compat.zero_local_grads(engine) if g is not None]
            except Exception:  # noqa: BLE001 - a private DeepSpeed attribute moved: count what the module holds
                pass
        self.measured["backbone gradients"] = max(self.measured.get("backbone gradients", 0), unique_bytes(grads))
        weight = trainer.head.weight
        head_grad = weight.grad if weight.grad is not None else getattr(weight, "sampled_grad", None)
        if head_grad is not None:
            self.head_grad = max(self.head_grad, _tensor_bytes(head_grad))

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


class _ProfileHook(Hook):
    """Runs last: marks the end of each step's hooks, times the other hooks, opens and closes the window."""

    def __init__(self, profiler: "Profiler"):
        self.profiler = profiler

    def on_train_start(self, trainer) -> None:
        self.profiler.attach(trainer)

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        self.profiler.end_of_step_hooks(trainer)

    def on_train_end(self, trainer) -> None:
        self.profiler.end_of_run(trainer)

    def summary(self) -> Dict[str, Any]:
        # A window that ends with the run is reported after summary.json is written (it waits for the
        # end-of-run hooks' times): then only the directory is known here.
        entry = {"dir": str(self.profiler.out_dir)}
        if self.profiler.report:
            entry["bottleneck"] = self.profiler.report["bottleneck"]["text"]
        return {"profile": entry}


def _hook_kind(hook: Any) -> str:
    name = type(hook).__name__
    if "Verification" in name or "Eval" in name:
        return "eval"
    if "Checkpoint" in name:
        return "checkpoint"
    return "log"


class Profiler:
    """The trainer's phase timer for a profiled window (module docstring); pass as build_trainer(timer=...).

    Args:
        cfg: the run config; `engine.profile` gives the defaults of the other arguments.
        start_step: steps of this process before the window.
        num_steps: steps in the window.
        trace: also record a torch.profiler Chrome trace of the window (one file per rank).
        peak_tflops: the device's peak at the run's precision per rank (0/None: GPU table or measured).
        argv: the command line recorded in profile.json.
    """

    def __init__(self, cfg: Any, *, start_step: Optional[int] = None, num_steps: Optional[int] = None,
                 trace: Optional[bool] = None, peak_tflops: Optional[float] = None,
                 argv: Optional[List[str]] = None):
        p = cfg.engine.profile
        self.cfg = cfg
        self.start_step = p.start_step if start_step is None else int(start_step)
        self.num_steps = p.num_steps if num_steps is None else int(num_steps)
        if self.start_step < 0 or self.num_steps < 1:
            raise ValueError(f"profile window: expected start_step >= 0 and num_steps >= 1, got "
                             f"{self.start_step}, {self.num_steps}")
        self.trace = p.trace if trace is None else bool(trace)
        self.peak_tflops = (p.peak_tflops or None) if peak_tflops is None else (peak_tflops or None)
        self.argv = list(argv if argv is not None else sys.argv)
        self.device = dist.get_device()
        self.clock = _Clock(self.device)
        self.runtime_rss = current_rss()  # before the model is built (build_trainer makes us first)
        self.hooks = [_ProfileHook(self)]
        self.out_dir = Path(cfg.engine.train.output_dir) / "profile"
        self.report: Optional[Dict[str, Any]] = None
        self.steps_done = 0
        self.trainer: Any = None
        self._phase = "idle"
        self._record: Optional[Dict[str, Any]] = None
        self._records: List[Dict[str, Any]] = []
        self._iter_start: Any = None
        self._iter_cpu = 0.0  # process CPU seconds at the same point (a shared host disturbs them much less)
        self._active = False
        self._finished = False
        self._census = MemoryCensus()
        self._census_step = False
        self._comm = CommMeter(self.clock, lambda: self._phase)
        self._torch_profiler: Any = None
        self._end_of_run: Dict[str, float] = defaultdict(float)
        self._peak_tflops: Optional[float] = None
        self._peak_source = ""

    # -- the timer interface (engine.trainer.NullPhaseTimer) ----------------------------------------------
    def phase(self, name: str):
        if not self._active:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self._record is None:
            self._record = dict(start=self._iter_start, cpu_start=self._iter_cpu, phases=[], step=None,
                                step_end=None, end=None, cpu_end=None)
        previous, self._phase = self._phase, name
        saver = contextlib.nullcontext()
        if self._census_step and name == "forward":
            saver = self._census.forward_saver()
        elif self._census_step and name == "head":
            world = dist.get_world_size()
            saver = self._census.head_saver(self._num_sampled(), self.cfg.engine.model.embedding_size,
                                            self.cfg.micro_batch_size * world)
        label = torch.profiler.record_function(f"arcscale.{name}") if self._torch_profiler else contextlib.nullcontext()
        start, cpu_start = self.clock.mark(), time.process_time()
        try:
            with label, saver:
                yield
        finally:
            end = self.clock.mark()
            self._record["phases"].append((name, start, end, time.process_time() - cpu_start))
            self._phase = previous
            if self._census_step and self.trainer is not None:
                if name == "backward":
                    self._census.take_grads(self.trainer)
                elif name == "head_step":
                    self._census.take_optimizer(self.trainer)

    def step_done(self, step: int) -> None:
        if self._active and self._record is not None:
            self._record["step"] = step
            self._record["step_end"] = self.clock.mark()
            self._phase = "hooks"

    # -- hook side -------------------------------------------------------------------------------------------
    def _num_sampled(self) -> int:
        head = self.trainer.head if self.trainer is not None else None
        if head is None:
            return -1
        return head.num_sample if head.sample_rate < 1.0 else head.num_local

    def attach(self, trainer: Any) -> None:
        """Called at train start: time the other hooks (instance attributes shadow their methods), start."""
        self.trainer = trainer
        for hook in trainer.hooks:
            if hook is self.hooks[0]:
                continue
            kind = _hook_kind(hook)
            hook.on_step_end = self._wrap_hook(hook.on_step_end, kind)
            hook.on_train_end = self._wrap_hook(hook.on_train_end, kind, end_of_run=True)
        self._peak_tflops, self._peak_source = self._peak()  # at start-up: a CPU's peak is a matmul probe
        self._iter_start, self._iter_cpu = self.clock.mark(), time.process_time()
        if self.start_step == 0:
            self._open()

    def _wrap_hook(self, fn: Callable, kind: str, end_of_run: bool = False) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if end_of_run:
                self.clock.synchronize()
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.clock.synchronize()
                    self._end_of_run[kind] += time.perf_counter() - t0
            if self._record is None:  # no step of the window is open (its phases were not marked)
                return fn(*args, **kwargs)
            with self.phase(kind):
                return fn(*args, **kwargs)
        return timed

    def end_of_step_hooks(self, trainer: Any) -> None:
        mark, cpu = self.clock.mark(), time.process_time()
        if self._active and self._record is not None:
            self._record["end"], self._record["cpu_end"] = mark, cpu
            self._records.append(self._record)
            self._record = None
            self._census_step = False
        self._iter_start, self._iter_cpu = mark, cpu
        self.steps_done += 1
        if self.steps_done == self.start_step and not self._finished:
            self._open()
            # the next step starts after the window's set-up (trace start, peak reset, patches), not before it
            self._iter_start, self._iter_cpu = self.clock.mark(), time.process_time()
        elif self._active and self.steps_done == self.start_step + self.num_steps:
            if trainer.step < trainer.max_steps:
                self._close()
            else:
                self._pause()  # the last step of the run: the report waits for the end-of-run hooks' times

    def end_of_run(self, trainer: Any) -> None:
        if self._active or (self._records and not self._finished):
            self._close()

    # -- window ----------------------------------------------------------------------------------------------
    def _open(self) -> None:
        trainer = self.trainer
        self._active = True
        self._census_step = True
        self._census.take_static(trainer)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._peak_kind = "cuda_max_allocated"
        else:
            self._peak_kind = "rss_vmhwm_window" if reset_rss_peak() else "rss_peak_process"
        if self.trace:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self._torch_profiler.__enter__()
        self._comm.install()

    def _pause(self) -> None:
        """Stop measuring (comm patches off, trace stopped); the records wait for `_close`."""
        if not self._active:
            return
        self._active = False
        self._comm.remove()
        self.clock.synchronize()
        if self.device.type == "cuda":
            self._peak = cuda_peak(self.device)
        else:
            self._peak = read_rss_peak()[0]
        if self._torch_profiler is not None:
            self._torch_profiler.__exit__(None, None, None)

    def _close(self) -> None:
        self._pause()
        self._finished = True
        local = self._local_report()
        gathered = dist.all_gather_object(local)
        trace_files = []
        if self._torch_profiler is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / f"trace_rank{dist.get_rank()}.json"
            self._torch_profiler.export_chrome_trace(str(path))
            trace_files = [str(path)]
            self._torch_profiler = None
        traces = dist.all_gather_object(trace_files)
        self.report = profile_report.build_report(self.cfg, gathered, argv=self.argv, trace_files=sum(traces, []))
        if dist.is_main_process():
            profile_report.write_outputs(self.report, self.out_dir)
            print(self.report["summary_text"], flush=True)

    def _local_report(self) -> Dict[str, Any]:
        """This rank's raw numbers (seconds per step and phase, comm, memory, peak) for the gather."""
        steps = []
        for rec in self._records:
            phases: Dict[str, float] = defaultdict(float)
            phases_cpu: Dict[str, float] = defaultdict(float)
            for name, start, end, cpu_s in rec["phases"]:
                phases[name] += self.clock.seconds(start, end)
                phases_cpu[name] += cpu_s
            step_s = self.clock.seconds(rec["start"], rec["end"])
            steps.append(dict(step=rec["step"], step_s=step_s, phases=dict(phases), cpu_s=rec["cpu_end"] - rec[
                "cpu_start"], phases_cpu=dict(phases_cpu), train_s=self.clock.seconds(rec["start"], rec["step_end"])))
        num = max(1, len(steps))
        comm = self._comm.summary(num, dist.get_world_size())
        comm_s = sum(r["seconds_per_step"] or 0.0 for r in comm)
        peak_tflops, peak_source = self._peak_tflops, self._peak_source
        measured = dict(self._census.measured)
        measured.update(self._census.head_saved)
        if self._census.head_grad:  # the head weight's gradient: one of the planner's row copies
            measured["head sampled rows"] = measured.get("head sampled rows", 0) + self._census.head_grad
        measured["runtime (RSS before the model was built)"] = self.runtime_rss if self.device.type == "cpu" else 0
        return dict(rank=dist.get_rank(), steps=steps, comm=comm, comm_s_per_step=comm_s, peak_bytes=self._peak,
                    peak_kind=self._peak_kind, memory=measured, peak_tflops=peak_tflops, peak_source=peak_source,
                    timer=self.clock.name, threads=torch.get_num_threads(), end_of_run=dict(self._end_of_run),
                    device=str(self.device), device_name=_device_name(self.device))

    def _peak(self) -> Tuple[float, str]:
        return profile_report.device_peak_tflops(self.cfg.precision, self.device, self.peak_tflops)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from engine import hardware

    return hardware.cpu_description()
