"""Trainer hooks: logging and metrics, TensorBoard, the end-of-run summary.

A hook sees the trainer at three points (start, after each optimizer step, end). The trainer itself only
trains; everything a person or a script reads about a run is written here.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from engine import dist


class Hook:
    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None: ...

    def on_train_end(self, trainer) -> None: ...


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class LoggerHook(Hook):
    """Every `log_every` steps: rank 0 prints a line and appends one JSON object to metrics.jsonl.

    The loss is the mean of the global-batch losses since the last line (already identical on every rank);
    samples/s is global (all ranks); peak memory is the largest over ranks.
    """

    def __init__(self, log_every: int, output_dir: Path, tensorboard: bool = False):
        self.log_every = log_every
        self.output_dir = output_dir
        self.tensorboard = tensorboard
        self._writer = None
        self._loss_sum: Optional[torch.Tensor] = None
        self._num = 0
        self._t_last = 0.0
        self._step_last = 0
        self.history: List[Dict[str, Any]] = []

    def on_train_start(self, trainer) -> None:
        self._t_last = time.perf_counter()
        self._step_last = trainer.step
        if dist.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.jsonl").open("a").close()
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        self._loss_sum = loss.detach().float() if self._loss_sum is None else self._loss_sum + loss.detach().float()
        self._num += 1
        if step % self.log_every != 0 and step != trainer.max_steps:
            return
        now = time.perf_counter()
        mean_loss = float(self._loss_sum.item()) / self._num
        steps_done = step - self._step_last
        sps = steps_done * trainer.global_batch_size / max(now - self._t_last, 1e-9)
        peak = dist.all_reduce_max(float(peak_memory_bytes(trainer.device)), trainer.device)
        record = {
            "step": step, "epoch": trainer.epoch, "loss": mean_loss, "lr": trainer.current_lr,
            "samples_per_sec": sps, "peak_mem_gb": peak / 2 ** 30, "time": time.time(),
        }
        self.history.append(record)
        self._loss_sum, self._num, self._t_last, self._step_last = None, 0, now, step
        if not dist.is_main_process():
            return
        eta = (trainer.max_steps - step) * trainer.global_batch_size / max(sps, 1e-9)
        print(f"step {step}/{trainer.max_steps} epoch {trainer.epoch} loss {mean_loss:.4f} "
              f"lr {trainer.current_lr:.5f} samples/s {sps:.1f} eta {_fmt_eta(eta)} "
              f"peak_mem {peak / 2 ** 30:.2f}GB", flush=True)
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key in ("loss", "lr", "samples_per_sec", "peak_mem_gb"):
                self._writer.add_scalar(f"train/{key}", record[key], step)
            self._writer.flush()

    def on_train_end(self, trainer) -> None:
        if self._writer is not None:
            self._writer.close()


class SummaryHook(Hook):
    """Writes `<output_dir>/summary.json` at the end: steps, losses, throughput, peak memory per rank, wall time."""

    def __init__(self, output_dir: Path, logger: LoggerHook):
        self.output_dir = output_dir
        self.logger = logger
        self._t0 = 0.0
        self._t_first = None
        self._step_first = 0
        self._first_loss: Optional[float] = None

    def on_train_start(self, trainer) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        if self._first_loss is None:
            # Throughput is measured from the end of the first step: it excludes one-off start-up work.
            self._first_loss = float(loss.detach().float().item())
            self._t_first, self._step_first = time.perf_counter(), step

    def on_train_end(self, trainer) -> None:
        t_end = time.perf_counter()
        peaks = dist.all_gather_object(peak_memory_bytes(trainer.device))
        steps_timed = trainer.step - self._step_first
        sps = (steps_timed * trainer.global_batch_size / (t_end - self._t_first)
               if self._t_first is not None and steps_timed > 0 else None)
        if not dist.is_main_process():
            return
        summary = {
            "steps": trainer.step,
            "first_loss": self._first_loss,
            "final_loss": self.logger.history[-1]["loss"] if self.logger.history else None,
            "samples_per_sec": sps,
            "global_batch_size": trainer.global_batch_size,
            "peak_memory_bytes_per_rank": peaks,
            "peak_memory_gb_max": max(peaks) / 2 ** 30,
            "peak_memory_kind": "cuda_max_allocated" if trainer.device.type == "cuda" else "rss",
            "wall_time_s": t_end - self._t0,
            "world_size": dist.get_world_size(),
            "precision": trainer.cfg.precision,
            "zero_stage": trainer.cfg.zero_stage,
            "backbone": trainer.cfg.engine.model.name,
            "num_classes": trainer.cfg.engine.head.num_classes,
            "config_digest": trainer.cfg.digest(),
            "argv": sys.argv,
        }
        path = self.output_dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"summary: {json.dumps({k: summary[k] for k in ('steps', 'first_loss', 'final_loss', 'samples_per_sec', 'peak_memory_gb_max')})}",
              flush=True)
