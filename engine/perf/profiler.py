"""Measurement side of engine.profile: the trainer's phase timer, collective counting and a memory census.

`Profiler` is the object the trainer's `timer` argument takes (engine.train.trainer.NullPhaseTimer is the no-op
one). It does nothing outside a window of `num_steps` optimizer steps that starts after `start_step` steps of
this process; inside it, every rank records

* the wall time of each phase the trainer marks ("data", "h2d", "forward", "head", "backward", "guard" (the
  non-finite check and its all-reduce), "backbone_step", "head_step", and any other name it passes) and of the
  hooks after each step ("log", "eval", "checkpoint"), with `time.perf_counter` on the CPU and CUDA events on a
  GPU (recorded on the current stream, read only when the window closes: no synchronisation is added inside a
  step), and the process CPU seconds of each. A step runs from the end of the previous step's hooks to the end
  of its own, so consecutive steps tile the wall clock; "other" is what no phase covers (the trainer's work
  between its phases);
* every torch.distributed collective (engine.perf.census.CommMeter, patched on this process for the window
  only): kind, who called it (the head, the backbone's backend, the hooks), the bytes it moved and its time;
* a memory census of the window's first step (engine.perf.census.MemoryCensus): tensor sizes of parameters,
  gradients, optimizer state and head rows, what autograd saves in the backbone forward and the head, peak.

When the window closes, the ranks' records are gathered (one collective, same step on every rank) and rank 0
writes the report (engine.perf.report). This module never imports engine.train.build (build imports it).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from engine.perf import report as profile_report
from engine.perf.census import CommMeter, MemoryCensus, cuda_peak, current_rss, read_rss_peak, reset_rss_peak
from engine.perf.report import HOOK_PHASES
from engine.runtime import dist
from engine.runtime.log import get_logger

log = get_logger(__name__)


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
        self.out_dir = Path(cfg.engine.train.output_dir) / "profile"
        self.report: Optional[Dict[str, Any]] = None
        self.steps_done = 0
        self.trainer: Any = None
        self._phase = "none"  # the phase being timed; "none" between phases
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

    # -- the timer interface (engine.train.trainer.NullPhaseTimer) ----------------------------------------------
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

    # -- hook side -------------------------------------------------------------------------------------------
    def _num_sampled(self) -> int:
        head = self.trainer.head if self.trainer is not None else None
        if head is None:
            return -1
        return head.num_sample if head.sample_rate < 1.0 else head.num_local

    def attach(self, trainer: Any) -> None:
        """Called at train start: time the other hooks (instance attributes shadow their methods), start."""
        self.trainer = trainer
        self.cfg = trainer.cfg  # the run's config as trained: with the data's class count when the config has none
        for hook in trainer.hooks:
            if getattr(hook, "profiler", None) is self:  # its own hook (engine.train.hooks.ProfilerHook)
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

    def close(self) -> None:
        """Stop measuring without a report, when the run ended inside the window (a stop request, an
        exception): the collective patches come off and a running trace stops. Local; after a report, nothing."""
        if self._active:
            self._active = False
            self._comm.remove()
            if self._torch_profiler is not None:
                self._torch_profiler.__exit__(None, None, None)
                self._torch_profiler = None

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
        if dist.get_rank() == 0:
            profile_report.write_outputs(self.report, self.out_dir)
        log.info(self.report["summary_text"])

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
        outside = self._comm.seconds_in_phases({"none"}) / num  # collectives issued between the phases
        in_hooks = self._comm.seconds_in_phases(set(HOOK_PHASES)) / num  # logging, evaluation, checkpoints
        peak_tflops, peak_source = self._peak_tflops, self._peak_source
        measured = dict(self._census.measured)
        measured.update(self._census.head_saved)
        if self._census.head_grad:  # the head weight's gradient: one of the planner's row copies
            measured["head sampled rows"] = measured.get("head sampled rows", 0) + self._census.head_grad
        measured["runtime (RSS before the model was built)"] = self.runtime_rss if self.device.type == "cpu" else 0
        return dict(rank=dist.get_rank(), steps=steps, comm=comm, comm_s_per_step=comm_s,
                    other_comm_s_per_step=outside, step_comm_s_per_step=comm_s - in_hooks, peak_bytes=self._peak,
                    peak_kind=self._peak_kind, memory=measured, peak_tflops=peak_tflops, peak_source=peak_source,
                    timer=self.clock.name, threads=torch.get_num_threads(), end_of_run=dict(self._end_of_run),
                    device=str(self.device), device_name=_device_name(self.device))

    def _peak(self) -> Tuple[float, str]:
        return profile_report.device_peak_tflops(self.cfg.precision, self.device, self.peak_tflops)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from engine.perf import hardware

    return hardware.cpu_description()
