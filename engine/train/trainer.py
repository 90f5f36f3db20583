"""The Trainer: runs optimizer steps over ready-made parts (engine/train/build.py makes them from a config).

The backbone is data-parallel behind the backend seam (engine/parallel/backend.py: DeepSpeed or FSDP2); the
Partial FC head is model-parallel and stays outside it with its own row-sparse optimizer, stepped by
`HeadStep`: its class centres are rank-unique shards, which data parallelism must never average, partition or
wrap (docs/architecture.md, "The one subtle rule"). One LR schedule drives both, stepping once per optimizer
step. Logging, evaluation, checkpoints and other side work are hooks (engine/train/hooks.py, whose `Hook`
says when each is called); training state is engine/state/checkpoint.py's.

Before any optimizer step, every rank agrees in one all-reduce whether the step's loss and this step's head
and backbone gradients are finite everywhere, and whether some rank was asked to stop (engine.runtime.faults). A
non-finite step updates nothing (both optimizers skipped, gradients dropped, BatchNorm statistics restored to
their values before the step), is counted and logged with its step; `engine.train.max_nonfinite_steps`
consecutive ones end the run with `NonFiniteError`. Under fp16 the backbone's own loss scaler still decides
about backbone gradient overflow (skipped steps counted as `head_step.num_skipped`); the guard then checks the
loss and the head. A stop request ends `train()` at the agreed step boundary after the hooks' `on_stop`
(the checkpoint hook saves there).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, ContextManager, List, Optional

import torch

import heads
from engine.config.length import run_length
from engine.config.schema import RunConfig
from engine.parallel import common as parallel
from engine.parallel.backend import ParallelBackbone
from engine.runtime import dist, faults
from engine.runtime.log import get_logger
from engine.train.hooks import Hook
from heads.compat import sparse_values

log = get_logger(__name__)


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str, power: float = 2.0,
              milestones: Optional[List[int]] = None, gamma: float = 0.1) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Warm-up is linear from 0 (arcface_torch's PolyScheduler: step t < warmup uses t / warmup); then poly
    (1 - progress) ** power, cosine, step decay at `milestones`, or constant.
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(1 for m in (milestones or []) if step >= m)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"engine.optim.schedule: unknown schedule {schedule!r}")


def set_group_lrs(param_groups: List[dict], lr: float) -> None:
    """Set each backbone optimizer group's LR for the coming step: the schedule's `lr` times the group's
    ``lr_scale`` (engine.optim.param_groups; 1 for the base group)."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class NullPhaseTimer:
    """The trainer's phase timer when nothing profiles: every phase is a no-op context.

    A profiler (engine.profile) passes its own object with the same `phase(name)` method; the trainer marks
    the phases of a step with it and does nothing else for profiling. Phase names: "data" (waiting on the
    loader), "h2d" (host-to-device copy), "forward" (backbone), "head" (Partial FC forward), "backward",
    "guard" (the non-finite check and its all-reduce), "backbone_step" (optimizer step incl. the backend's
    communication), "head_step".
    """

    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def step_done(self, step: int) -> None:
        """Called after every optimizer step, once its phases are all marked."""


class HeadStep:
    """The head's optimizer step, bound to the backbone's by the mixed-precision contract (docs/architecture.md,
    "The one subtle rule").

    Under fp16 the backbone's dynamic loss scaler multiplies the loss before backward, so the head's
    gradients, which come out of the same backward, carry the same factor: they are divided by the scale that
    backward used before the head steps. When the backbone's step is skipped (an fp16 overflow: its scaler
    lowers the scale and drops the gradients), the head's step is skipped too and its gradient dropped, so the
    two halves of the model never see different steps. Without loss scaling (fp32, bf16) the scale is 1.0 and
    every step is applied. Sparse or dense, `.grad` or `.sampled_grad`: scaling is O(rows present).
    """

    def __init__(self, head: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.head = head
        self.optimizer = optimizer
        self.num_skipped = 0

    def __call__(self, loss_scale: float, backbone_applied: bool) -> bool:
        """Step the head after the backbone's step; returns whether the head was updated."""
        if backbone_applied:
            if loss_scale != 1.0:
                heads.scale_head_grad_(self.head.weight, 1.0 / loss_scale)
            self.optimizer.step()
        else:
            self.num_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return backbone_applied


class NonFiniteError(dist.JobError):
    """`engine.train.max_nonfinite_steps` consecutive steps had a non-finite loss or gradient: the run diverged
    (LR too high, bad data) and stops instead of skipping forever."""


def head_grad_finite(weight: torch.Tensor) -> torch.Tensor:
    """Whether the head's pending gradient is all finite (a device bool tensor; no sync), wherever the layout put
    it: `.sampled_grad` rows, a sparse `.grad` (its values only, O(rows present)), or a dense `.grad`."""
    pending = getattr(weight, "sampled_grad", None)
    grad = weight.grad
    values = [pending.grad if pending is not None else None,
              None if grad is None else sparse_values(grad) if grad.is_sparse else grad]
    return parallel.all_finite(values).to(weight.device)


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm running statistics), restorable after a skipped step.

    The forward of a step whose loss turns out non-finite has already moved the running statistics (to NaN,
    for NaN inputs); restoring them makes the skipped step leave no trace, so no non-finite value reaches an
    evaluation, a checkpoint or model.pt.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.buffers = [b for b in module.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, [b.detach() for b in self.buffers])

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.copies)


class Trainer:
    """Train a backbone (behind the backend seam) with a Partial FC head over `data`.

    Build one with `engine.train.build.build_trainer(cfg)`; tests and tools may hand in their own parts. The
    process group is the caller's (run.py initialises and destroys it); the trainer uses the default group.

    Args:
        cfg: the run's configuration (LR schedule, accumulation, output_dir, ...).
        backbone: the data-parallel backbone with its optimizer.
        head: the Partial FC head (this rank's class shard).
        head_optimizer: the head's row-sparse optimizer.
        data: an iterator of (images, labels) micro-batches for this rank; optionally with
            state_dict/load_state_dict (its position) and `epoch`.
        hooks: called in order at the points engine.train.hooks.Hook documents (start, after every optimizer
            step, a stop request, the end, close).
        timer: marks the phases of each step (see NullPhaseTimer); a profiler's, or none.
        run_dir: the claimed output directory (engine.state.rundir.claim), released by `close()`.
        stop: the stop request to honour at step boundaries (default: the process-wide engine.runtime.faults.STOP,
            which the entry point's signal handlers set).
    """

    def __init__(self, cfg: RunConfig, *, backbone: ParallelBackbone, head: torch.nn.Module,
                 head_optimizer: torch.optim.Optimizer, data: Any, hooks: Optional[List[Hook]] = None,
                 timer: Any = None, run_dir: Any = None, stop: Optional[faults.StopFlag] = None):
        self.cfg = cfg
        self.backbone = backbone
        self.head = head
        self.head_optimizer = head_optimizer
        self.head_step = HeadStep(head, head_optimizer)
        self.data = data
        self.hooks: List[Hook] = list(hooks or [])
        self.device = backbone.device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # engine.train.max_steps, or epochs x (dataset images // global batch): engine/config/length.py
        self.length = run_length(cfg, self.world_size, getattr(data, "num_images", None))
        self.max_steps = self.length.max_steps
        self.steps_per_epoch = self.length.steps_per_epoch  # None: the data has no size (synthetic)
        self.output_dir = Path(cfg.engine.train.output_dir)
        self.global_batch_size = cfg.global_batch_size(self.world_size)
        self.step = 0  # optimizer steps done
        self.epoch = getattr(data, "epoch", 0)
        self.current_lr = 0.0
        self.data_wait_s = 0.0  # seconds this rank's training loop spent blocked on the loader
        self.resumed_from: Optional[Path] = None
        self.timer = timer if timer is not None else NullPhaseTimer()
        self.run_dir = run_dir
        self.stop = stop if stop is not None else faults.STOP
        self.stop_requested = False  # agreed by all ranks at the last step boundary
        self.save_due = False  # a hook asked for a checkpoint after this step (Hook.save_due), agreed by all ranks
        self.stopped_early = False  # train() returned before max_steps because of a stop request
        self.num_nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self._buffers = BufferSnapshot(backbone.module)
        t = cfg.engine.train
        self.watchdog = faults.StepWatchdog(t.watchdog_factor, t.watchdog_min_s, max_s=t.dist_timeout_s / 2,
                                            rank=self.rank)
        self.stop.overdue = self.watchdog.overdue  # a signal during a hung step ends the process at once

    def hook(self, kind: type) -> Optional[Hook]:
        """The first hook of type `kind`, or None."""
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    # -- training ------------------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        o = self.cfg.engine.optim
        factor = lr_factor(self.step, max_steps=self.max_steps, warmup_steps=self.length.warmup_steps,
                           schedule=o.schedule,
                           power=o.poly_power, milestones=o.step_milestones, gamma=o.step_gamma)
        self.current_lr = o.lr * factor
        set_group_lrs(self.backbone.param_groups, self.current_lr)
        for group in self.head_optimizer.param_groups:
            group["lr"] = self.current_lr * self.cfg.engine.head.lr_scale

    def _next_batch(self):
        t_wait = time.perf_counter()
        with self.timer.phase("data"):
            images, labels = next(self.data)
        self.data_wait_s += time.perf_counter() - t_wait
        with self.timer.phase("h2d"):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.cfg.engine.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def train_step(self) -> torch.Tensor:
        """One optimizer step: `gradient_accumulation_steps` micro-batches, then backbone and head steps, or
        neither when some rank's loss or gradients are not finite (see the module docstring).

        Returns the step's loss (mean over the global batch of all micro-batches), a device tensor.

        Raises:
            NonFiniteError: the `engine.train.max_nonfinite_steps`-th consecutive non-finite step.
        """
        self.watchdog.step_started(self.step + 1)
        self._set_lr()
        with self.timer.phase("guard"):
            self._buffers.save()
        total = torch.zeros((), device=self.device)
        num_micro = self.cfg.gradient_accumulation_steps
        for i in range(num_micro):
            images, labels = self._next_batch()
            timer = self.timer
            if self.cfg.engine.head.offload != "none":
                self.head.prefetch(labels)  # host->device copy of the sampled rows overlaps the backbone
            with timer.phase("forward"):
                embeddings = self.backbone(images)
            with timer.phase("head"):
                loss = self.head(embeddings.float(), labels)
            with timer.phase("backward"):
                # Divided by the accumulation steps (and scaled under fp16); the head's grads get the same factor.
                self.backbone.backward(loss, boundary=i == num_micro - 1)
            total += loss.detach()
        scale = self.backbone.loss_scale()  # the scale this step's backward used, read before step() updates it
        with self.timer.phase("guard"):  # the non-finite check: one reduction per gradient, one all-reduce
            bad = self._agree_on_step(total)
        if bad:
            with self.timer.phase("backbone_step"):
                self.backbone.skip_step()
            self.head_optimizer.zero_grad(set_to_none=True)
            self._buffers.restore()
        else:
            self.consecutive_nonfinite = 0
            with self.timer.phase("backbone_step"):
                applied = self.backbone.step()
            with self.timer.phase("head_step"):
                self.head_step(scale, applied)
        self.step += 1
        self.timer.step_done(self.step)
        self.watchdog.step_finished()
        if bad:
            self._count_nonfinite(bad, total / num_micro)
        return total / num_micro

    def _agree_on_step(self, total: torch.Tensor) -> List[str]:
        """One all-reduce over all ranks: which parts of this step are non-finite anywhere (names, empty when
        all is finite), whether any rank was asked to stop (sets `stop_requested`) and whether a hook on any rank
        asks for a checkpoint after this step (sets `save_due`: a time interval elapses on each rank's own clock,
        and every rank must save at the same step)."""
        loss_ok = torch.isfinite(total)
        head_ok = head_grad_finite(self.head.weight)
        # fp16: DeepSpeed's/FSDP's loss scaler owns backbone gradient overflow (skips and rescales itself)
        backbone_ok = self.cfg.precision == "fp16" or self.backbone.local_grads_finite()
        save = any(hook.save_due(self) for hook in self.hooks)
        flags = dist.all_reduce_flags([~loss_ok, ~head_ok, not backbone_ok, self.stop.is_set(), save], self.device)
        self.stop_requested, self.save_due = flags[3], flags[4]
        return [name for name, flag in zip(("loss", "head gradients", "backbone gradients"), flags) if flag]

    def _count_nonfinite(self, bad: List[str], loss: torch.Tensor) -> None:
        self.num_nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        limit = self.cfg.engine.train.max_nonfinite_steps
        log.warning(f"step {self.step}: non-finite {', '.join(bad)} (loss {float(loss):.4g}): step skipped, "
                    f"nothing updated ({self.consecutive_nonfinite} in a row, {self.num_nonfinite_skipped} in all; "
                    f"the run stops at {limit} in a row)", once=True)
        if self.consecutive_nonfinite >= limit:
            first = self.step - self.consecutive_nonfinite + 1
            raise NonFiniteError(
                f"steps {first}..{self.step}: {self.consecutive_nonfinite} consecutive optimizer steps had a "
                f"non-finite {', '.join(bad)} (engine.train.max_nonfinite_steps={limit}); stopping. Nothing was "
                f"updated by them: the weights are those after step {first - 1}, and no checkpoint or model.pt "
                f"holds a non-finite value (checkpoints: {self.output_dir / 'checkpoints'}). Lower "
                f"engine.optim.lr (or add gradient_clipping / warm-up), check the data for NaN or inf, and "
                f"resume with engine.checkpoint.resume=auto")

    def train(self) -> None:
        """Train from the current step to `max_steps`, running the hooks at the points `Hook` documents; every
        hook's `close` runs afterwards however training ends (finished, stopped, or an exception)."""
        completed = False
        try:
            self._train()
            completed = True
        finally:
            self._close_hooks(raise_errors=completed)

    def _train(self) -> None:
        self.epoch = getattr(self.data, "epoch", self.epoch)
        log.info(self.length.describe() + (f"; continuing after step {self.step}" if self.step else ""))
        for hook in self.hooks:
            hook.on_train_start(self)
        self.backbone.train()
        self.head.train()
        while self.step < self.max_steps:
            loss = self.train_step()
            self.epoch = getattr(self.data, "epoch", 0)
            for hook in self.hooks:
                hook.on_step_end(self, self.step, loss)
            if self.stop_requested and self.step < self.max_steps:
                log.info(f"stopping at step {self.step}/{self.max_steps}: a stop was requested "
                         f"({self.stop.reason or 'on another rank'})")
                for hook in self.hooks:
                    hook.on_stop(self)
                self.stopped_early = True
                return
        for hook in self.hooks:
            hook.on_train_end(self)

    def _close_hooks(self, raise_errors: bool) -> None:
        """Every hook's `close`, each even when an earlier one failed. The first failure is raised when
        training itself completed; after an exception in training, that exception is the one that counts and a
        failing close is only logged."""
        first: Optional[BaseException] = None
        for hook in self.hooks:
            try:
                hook.close()
            except Exception as exc:  # noqa: BLE001 - the other hooks still close
                first = first or exc
                if not raise_errors:
                    log.warning(f"closing {type(hook).__name__} failed: {type(exc).__name__}: {exc}")
        if first is not None and raise_errors:
            raise first

    # -- state (engine/state/checkpoint.py owns it; these delegate) ----------------------------------------------

    def state_dict(self):
        """Every piece of training state, in memory (see engine.state.checkpoint.capture). All ranks must call."""
        from engine.state import checkpoint

        return checkpoint.capture(self, everywhere=True)

    def load_state_dict(self, state) -> None:
        """Restore what `state_dict()` returned (same world size). All ranks must call."""
        from engine.state import checkpoint

        checkpoint.restore(self, state)

    def close(self) -> None:
        """Release the loader, the backend's resources and the output directory's lock (the hooks were closed
        when `train()` ended). Not a collective; the process group stays up."""
        self.watchdog.close()
        close = getattr(self.data, "close", None)
        if close is not None:
            close()
        self.backbone.close()
        if self.run_dir is not None:
            self.run_dir.release()
