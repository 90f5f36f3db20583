"""Trainer hooks: logging and metrics, TensorBoard, verification evaluation, the end-of-run summary, the
profiler's timing (checkpoints and the exported models: engine/train/saving.py).

The trainer itself only trains; everything a person or a script reads about a run, and every file it leaves
besides the checkpoints' contents, is written by a hook. `Hook` declares the points at which the trainer calls
them (its docstring is the contract); a hook's `summary()` lands in summary.json.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from engine.eval import embed
from engine.runtime import dist
from engine.runtime.fileio import atomic_write_text
from engine.runtime.log import get_logger

if TYPE_CHECKING:
    from engine.perf.profiler import Profiler

log = get_logger(__name__)


class Hook:
    """Work the trainer runs at fixed points of `Trainer.train()`; the base class does nothing at each.

    The trainer calls every hook at each point, in the order of its hook list (engine.train.build.build_hooks
    puts logging first, then evaluation, the best model's export, summary, checkpoints, then the caller's hooks,
    the profiler's last), on every rank. Calls at the same point happen at the same step on every rank, so a
    hook may use collectives in them, except in `close` and `save_due`.

    - `on_train_start(trainer)`: once per `train()`, before its first step. The model, data, output directory
      and a resumed state are in place: `trainer.step` is the step training continues from (0 for a fresh
      run), nothing of this call has trained yet.
    - `on_step_end(trainer, step, loss)`: after every optimizer step, applied or skipped as non-finite.
      `step == trainer.step` (steps done, from 1); `loss` is that step's loss, the mean over the global batch,
      a device tensor (reading its value syncs the device; the same on every rank).
    - `save_due(trainer) -> bool`: asked during every optimizer step, before the trainer's one all-reduce of the
      step's flags (local: no collectives, nothing slow). True on any rank sets `trainer.save_due` on every rank
      for that step's `on_step_end`, so a checkpoint on a time interval (each rank's own clock) happens at the
      same step everywhere.
    - `on_stop(trainer)`: when a stop request (a signal, a dead launcher; engine.runtime.faults) ends training
      before `max_steps`: after that step's `on_step_end`, at the same step on every rank. `on_train_end` is
      then not called.
    - `on_train_end(trainer)`: once, after the step that reaches `max_steps` and its `on_step_end`.
    - `close()`: always, once per `train()`, after it ends however it ends: finished, stopped, or by an
      exception (on this rank only: another rank may have failed, so no collectives here, and nothing slow).
      Release what the hook holds open (files, TensorBoard writers, a profiler's trace).
    - `summary()`: entries for summary.json; the summary hook calls it on every hook during its own
      `on_train_end`, on every rank.

    Between `on_train_start` and the end of training, an exception in any hook ends the job
    (engine.runtime.dist.fail_fast); `close` still runs first.
    """

    def on_train_start(self, trainer) -> None:
        """Before the first step of `train()` (see the class docstring)."""

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        """After each optimizer step."""

    def save_due(self, trainer) -> bool:
        """Whether this hook wants a checkpoint after the current step (see the class docstring)."""
        return False

    def on_stop(self, trainer) -> None:
        """Training stops early at a stop request, instead of `on_train_end`."""

    def on_train_end(self, trainer) -> None:
        """After the last step (`max_steps`)."""

    def close(self) -> None:
        """Release files and writers; called after `train()` however it ended. Local: no collectives."""

    def summary(self) -> Dict[str, Any]:
        """Entries this hook adds to summary.json (called on every rank during the summary hook's on_train_end)."""
        return {}


def reset_peak_memory(device: torch.device) -> None:
    """Start the training window of the peak-memory figures (SummaryHook does, before the first step).

    CUDA: the allocator's peaks restart from what is held now, so set-up transients (a checkpoint read onto
    the GPU, weights built and cast) do not count, and the figures are the training steps' own. The CPU's peak
    RSS cannot be reset portably and stays the process's.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: on GPU the CUDA allocator's peak of allocated tensor memory (since
    `reset_peak_memory`), on CPU the peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_reserved_bytes(device: torch.device) -> Optional[int]:
    """GPU: the CUDA allocator's peak of reserved memory (allocated plus its cached free blocks, what the GPU
    really had to hold, since `reset_peak_memory`; the CUDA context and NCCL's buffers are outside both).
    CPU: None (no such split)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    return None


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class LoggerHook(Hook):
    """Every `log_every` steps: rank 0 prints a line and appends one JSON object to metrics.jsonl.

    The loss is the mean of the global-batch losses since the last line (already identical on every rank);
    samples/s is global (all ranks); peak memory is the largest over ranks. `trackers` (a zero-arg function,
    called on rank 0 when training starts: engine.train.trackers.build_trackers) gives the experiment trackers
    (W&B, MLflow) that receive every record metrics.jsonl receives.
    """

    def __init__(self, log_every: int, output_dir: Path, tensorboard: bool = False,
                 trackers: Optional[Callable[[], List[Any]]] = None):
        self.log_every = log_every
        self.output_dir = output_dir
        self.tensorboard = tensorboard
        self._writer = None
        self._make_trackers = trackers
        self._trackers: List[Any] = []
        self._completed = False
        self._loss_sum: Optional[torch.Tensor] = None
        self._num = 0
        self._t_last = 0.0
        self._step_last = 0
        self.history: List[Dict[str, Any]] = []

    def on_train_start(self, trainer) -> None:
        self._t_last = time.perf_counter()
        self._step_last = trainer.step
        self._wait_last = getattr(trainer, "data_wait_s", 0.0)
        if dist.get_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.jsonl").open("a").close()
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            if self._make_trackers is not None and not self._trackers:
                self._trackers = list(self._make_trackers())

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
        # Fraction of the interval the slowest-fed rank spent blocked on its loader (0: data never the bottleneck)
        wait = getattr(trainer, "data_wait_s", 0.0)
        wait_frac = dist.all_reduce_max((wait - self._wait_last) / max(now - self._t_last, 1e-9), trainer.device)
        skipped = int(getattr(trainer.data, "num_corrupt_skipped", 0))
        record = {
            "step": step, "epoch": trainer.epoch, "loss": mean_loss, "lr": trainer.current_lr,
            "samples_per_sec": sps, "peak_mem_gb": peak / 2 ** 30, "data_wait_fraction": wait_frac,
            "time": time.time(),
        }
        if skipped:
            record["num_corrupt_skipped_rank0"] = skipped
        self.history.append(record)
        self._loss_sum, self._num, self._t_last, self._step_last = None, 0, now, step
        self._wait_last = wait
        eta = (trainer.max_steps - step) * trainer.global_batch_size / max(sps, 1e-9)
        log.info(f"step {step}/{trainer.max_steps} epoch {trainer.epoch} loss {mean_loss:.4f} "
                 f"lr {trainer.current_lr:.5f} samples/s {sps:.1f} eta {_fmt_eta(eta)} "
                 f"peak_mem {peak / 2 ** 30:.2f}GB data_wait {100 * wait_frac:.0f}%"
                 + (f" corrupt_skipped {skipped}" if skipped else ""))
        self.write(record, {f"train/{k}": record[k]
                            for k in ("loss", "lr", "samples_per_sec", "peak_mem_gb", "data_wait_fraction")}, step)

    def write(self, record: Dict[str, Any], scalars: Dict[str, float], step: int) -> None:
        """Rank 0: append `record` to metrics.jsonl and `scalars` to TensorBoard (when enabled).

        Other hooks (verification) write through here, so metrics.jsonl and the event file have one owner.
        """
        if dist.get_rank() != 0:
            return
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._trackers:
            from engine.train.trackers import record_scalars

            metrics = record_scalars(record)
            for tracker in list(self._trackers):
                try:
                    tracker.log(metrics, step)
                except Exception as exc:  # noqa: BLE001 - a tracker's outage must not end the run
                    self._trackers.remove(tracker)
                    log.warning(f"{tracker.name}: logging failed ({type(exc).__name__}: {exc}); switched off for "
                                f"the rest of the run (metrics.jsonl has every record)")

    def on_train_end(self, trainer) -> None:
        self._completed = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for tracker in self._trackers:
            try:
                tracker.close(self._completed, self.output_dir)
            except Exception as exc:  # noqa: BLE001 - the other trackers still close
                log.warning(f"{tracker.name}: closing failed ({type(exc).__name__}: {exc})")
        self._trackers = []


class SummaryHook(Hook):
    """Writes `<output_dir>/summary.json` at the end: steps, losses, throughput, peak memory per rank, wall time."""

    def __init__(self, output_dir: Path, logger: LoggerHook):
        self.output_dir = output_dir
        self.logger = logger
        self._t0 = 0.0
        self._t_first = None
        self._step_first = 0
        self._first_loss: Optional[float] = None
        self._last_loss: Optional[torch.Tensor] = None

    def on_train_start(self, trainer) -> None:
        reset_peak_memory(trainer.device)  # the peaks below are the training steps', not the set-up's
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        self._last_loss = loss.detach()  # read once at the end: no per-step device sync
        if self._first_loss is None:
            # Throughput is measured from the end of the first step: it excludes one-off start-up work.
            self._first_loss = float(loss.detach().float().item())
            self._t_first, self._step_first = time.perf_counter(), step

    def on_train_end(self, trainer) -> None:
        t_end = time.perf_counter()
        peaks = dist.all_gather_object(peak_memory_bytes(trainer.device))
        reserved = dist.all_gather_object(peak_reserved_bytes(trainer.device))
        waits = dist.all_gather_object(float(getattr(trainer, "data_wait_s", 0.0)))
        skipped = dist.all_gather_object(int(getattr(trainer.data, "num_corrupt_skipped", 0)))
        extra: Dict[str, Any] = {}
        for hook in trainer.hooks:
            if hook is not self:
                extra.update(hook.summary())
        steps_timed = trainer.step - self._step_first
        sps = (steps_timed * trainer.global_batch_size / (t_end - self._t_first)
               if self._t_first is not None and steps_timed > 0 else None)
        if dist.get_rank() != 0:
            return
        summary = {
            "steps": trainer.step,
            # first_loss and final_loss are single optimizer steps' losses (each the mean over that step's global
            # batch), so they compare like with like; the last log line's mean over its interval is separate.
            "first_loss": self._first_loss,
            "final_loss": float(self._last_loss.float().item()) if self._last_loss is not None else None,
            "final_interval_loss": self.logger.history[-1]["loss"] if self.logger.history else None,
            "samples_per_sec": sps,
            "global_batch_size": trainer.global_batch_size,
            "peak_memory_bytes_per_rank": peaks,
            "peak_memory_gb_max": max(peaks) / 2 ** 30,
            # GPU: allocated and reserved peaks since the first step started (set-up excluded); CPU: peak RSS
            "peak_memory_kind": "cuda_max_allocated" if trainer.device.type == "cuda" else "rss",
            "peak_reserved_bytes_per_rank": reserved if trainer.device.type == "cuda" else None,
            "wall_time_s": t_end - self._t0,
            # seconds each rank's training loop was blocked on its loader, and the worst rank's share of the run
            "data_wait_s_per_rank": waits,
            "data_wait_fraction": max(waits) / max(t_end - self._t0, 1e-9),
            "num_corrupt_skipped": sum(skipped),  # corrupt images replaced (engine.data.on_corrupt = skip)
            # optimizer steps skipped: non-finite loss/gradients (the trainer's guard), fp16 loss-scaler overflow
            "num_nonfinite_skipped": getattr(trainer, "num_nonfinite_skipped", 0),
            "num_overflow_skipped": getattr(getattr(trainer, "head_step", None), "num_skipped", 0),
            "world_size": dist.get_world_size(),
            "precision": trainer.cfg.precision,
            "zero_stage": trainer.cfg.zero_stage,
            "backend": trainer.backbone.name,
            "backbone": trainer.cfg.engine.model.name,
            "num_classes": trainer.cfg.engine.head.num_classes,
            "config_digest": trainer.cfg.digest(),
            "argv": sys.argv,
            **extra,
        }
        atomic_write_text(json.dumps(summary, indent=2) + "\n", self.output_dir / "summary.json")
        keys = ("steps", "first_loss", "final_loss", "samples_per_sec", "peak_memory_gb_max", "data_wait_fraction",
                "num_corrupt_skipped")
        brief = {k: summary[k] for k in keys}
        if "eval" in summary:
            brief["eval_acc"] = {name: e["final"]["acc_mean"] for name, e in summary["eval"].items()}
        log.info(f"summary: {json.dumps(brief)}")


# ----------------------------------------------------------------------------------------------------------
# verification


DEMO_PLACEHOLDER = "{demo}"


def resolve_bin_path(entry: str, data_source: str = "synthetic", data_path: Optional[str] = None) -> Path:
    """The file an `engine.eval.bins` entry names.

    A leading `{demo}/` stands for the demo dataset's directory, so a config can evaluate on the demo's
    held-out pairs (`{demo}/val.bin`) without knowing where the cache lives: `engine.data.path` when
    `engine.data.source` is "demo" and a path is set, else `dali_pipes.loader.default_demo_dir()`. The demo is
    generated there on first use (as the demo data source does), never downloaded.
    """
    if entry.startswith(DEMO_PLACEHOLDER + "/"):
        from dali_pipes.loader import ensure_demo

        root = ensure_demo(data_path if data_source == "demo" and data_path else None)
        return root / entry[len(DEMO_PLACEHOLDER) + 1:]
    return Path(entry).expanduser()


class _BinSet:
    """One verification set as this rank holds it: all pair labels, and only its own slice of the images."""

    def __init__(self, name: str, path: Path, issame: List[bool], images: np.ndarray, start: int,
                 per_rank: int, num_images: int):
        self.name, self.path, self.issame = name, path, issame
        self.images, self.start, self.per_rank, self.num_images = images, start, per_rank, num_images


def _unique_names(paths: Sequence[Path]) -> List[str]:
    """File stems ("lfw", "val"), with the parent folder prepended where two stems collide."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating.

    DeepSpeed, unlike DDP, does not broadcast buffers during training, so each rank's running statistics
    follow its own batches. Rank 0's are the ones a checkpoint or export saves; evaluating with them makes the
    reported accuracy that of the saved model on every rank's slice. Training is unaffected (train-mode
    BatchNorm normalises with batch statistics), and this is what DDP does before every forward.
    """
    if dist.get_world_size() > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf.data, src=0)


class VerificationHook(Hook):
    """Every `every` optimizer steps (and at the end), 10-fold verification accuracy on each `.bin`.

    The images are split across ranks (engine.eval.embed): each rank decodes and embeds its slice, with flip
    test-time augmentation, and the raw embeddings are all-gathered, so every rank works for 1/world of the
    evaluation instead of all ranks waiting for rank 0. Every rank then runs the (cheap) protocol on the
    gathered embeddings, so all ranks hold the same result. BatchNorm statistics are rank 0's (see
    `_broadcast_buffers`). The forward calls are collective under ZeRO-3 (each gathers the parameters), so every
    rank runs the same number of calls with the same batch size: its slice is zero-padded to a common number of
    equal batches, and the padding is dropped in the gather.

    Results go to the rank-0 log, metrics.jsonl as `{"step", "eval": {name: {acc_mean, acc_std, threshold,
    best_acc, best_step, norm_mean, norm_std}}}`, TensorBoard (`eval/<name>/...`) and summary.json (final and
    best per set). The numbers equal `engine.verification.verify_bin` on the same weights and file.

    Args:
        paths: resolved `.bin` paths (see `resolve_bin_path`); each is loaded and its slice decoded here, so a
            missing or corrupt file fails at start-up, before any training, with the path in the message.
        every: evaluate after every `every` optimizer steps; 0: only at the end.
        batch_size: most images per forward call on each rank.
        logger: the LoggerHook that owns metrics.jsonl and TensorBoard (None: only the log).
        at_start: also evaluate before the first step of a fresh run (the untrained baseline); summary.json then
            has it as "start" beside "final" and "best".
        resize: images of another size than `image_size` (`engine.data.resize`; "none": an error naming the
            file and image).
    """

    def __init__(self, paths: Sequence[Union[str, Path]], *, every: int, batch_size: int,
                 logger: Optional[LoggerHook] = None, at_start: bool = False, nrof_folds: int = 10,
                 flip: bool = True, image_size: Tuple[int, int] = (112, 112), resize: str = "none"):
        from engine.eval import verification

        if every < 0 or batch_size < 1:
            raise ValueError(f"engine.eval: expected every >= 0 and batch_size >= 1, got {every}, {batch_size}")
        self.every, self.batch_size, self.logger, self.at_start = every, batch_size, logger, at_start
        self.nrof_folds, self.flip = nrof_folds, flip
        rank, world = dist.get_rank(), dist.get_world_size()
        paths = [Path(p) for p in paths]
        for i, path in enumerate(paths):
            if not path.is_file():
                raise FileNotFoundError(f"engine.eval.bins[{i}]: verification file {path} not found")
        self.sets: List[_BinSet] = []
        for name, path in zip(_unique_names(paths), paths):
            bins, issame = verification.load_bin(path)  # structure errors name the file
            if len(issame) < nrof_folds:
                raise ValueError(f"{path}: {len(issame)} pairs; the {nrof_folds}-fold protocol needs at least "
                                 f"{nrof_folds}")
            start, stop, per_rank = embed.rank_slice(len(bins), rank, world)
            images, error = None, None
            try:
                images = verification.decode_bin(bins[start:stop], image_size, source=path, resize=resize)
            except ValueError:  # name the image by its index in the whole file, not in this slice
                try:
                    verification.decode_bin(bins, image_size, source=path, resize=resize)
                except ValueError as e:
                    error = str(e)
            # Every rank fails together (not just the one holding the bad image, leaving the others waiting).
            errors = [e for e in dist.all_gather_object(error) if e]
            if errors:
                raise ValueError(errors[0])
            self.sets.append(_BinSet(name, path, issame, images, start, per_rank, len(bins)))
        self.best: Dict[str, Tuple[float, int]] = {}
        self.history: List[Dict[str, Any]] = []
        self._last_step: Optional[int] = None

    # -- the work ------------------------------------------------------------------------------------------

    def _embed(self, model, s: _BinSet, device: torch.device) -> np.ndarray:
        """Raw embeddings [views, M, E] of the whole set: this rank's slice, padded, embedded, gathered."""
        from engine.eval import verification

        num_batches = max(1, math.ceil(s.per_rank / self.batch_size))
        batch = math.ceil(s.per_rank / num_batches)  # same on every rank: balanced batches, little padding
        padded = np.zeros((num_batches * batch,) + s.images.shape[1:], dtype=np.uint8)
        padded[: len(s.images)] = s.images
        _, raw = verification.extract_embeddings(model, padded, batch, device, flip=self.flip, return_raw=True)
        return embed.gather_slices(raw, s.num_images, device, axis=1)

    def evaluate(self, model, device: torch.device) -> Dict[str, Dict[str, Any]]:
        """Evaluate `model` (called on every rank) on every set; returns evaluate()'s dict plus norms per set.

        The model runs in eval mode without autograd; its train/eval mode is restored afterwards.
        """
        from engine.eval import verification

        inner = getattr(model, "module", model)  # a ParallelBackbone (or DeepSpeed engine) keeps it on its module
        was_training = inner.training
        _broadcast_buffers(inner)
        results: Dict[str, Dict[str, Any]] = {}
        try:
            with torch.no_grad():
                for s in self.sets:
                    t0 = time.perf_counter()
                    raw = self._embed(model, s, device)
                    res = verification.evaluate(raw.sum(axis=0) if self.flip else raw[0], s.issame,
                                                nrof_folds=self.nrof_folds)
                    res.update(verification.embedding_norm_stats(raw))
                    res["seconds"] = time.perf_counter() - t0
                    results[s.name] = res
        finally:
            model.train(was_training)
        return results

    def run(self, trainer, step: int) -> Dict[str, Dict[str, Any]]:
        """Evaluate the trainer's backbone now and report it as the result at optimizer step `step`."""
        results = self.evaluate(trainer.backbone, trainer.device)
        self._last_step = step
        entry: Dict[str, Dict[str, Any]] = {}
        scalars: Dict[str, float] = {}
        for name, res in results.items():
            if name not in self.best or res["acc_mean"] > self.best[name][0]:
                self.best[name] = (res["acc_mean"], step)
            best_acc, best_step = self.best[name]
            entry[name] = {k: res[k] for k in ("acc_mean", "acc_std", "threshold", "norm_mean", "norm_std")}
            entry[name].update(best_acc=best_acc, best_step=best_step, seconds=res["seconds"])
            scalars.update({f"eval/{name}/acc_mean": res["acc_mean"], f"eval/{name}/best_acc": best_acc})
        record = {"step": step, "epoch": trainer.epoch, "eval": entry, "time": time.time()}
        self.history.append(record)
        for name, e in entry.items():
            log.info(f"eval step {step} {name}: acc {e['acc_mean']:.4f} +- {e['acc_std']:.4f} "
                     f"threshold {e['threshold']:.2f} best {e['best_acc']:.4f} (step {e['best_step']}) "
                     f"norm {e['norm_mean']:.2f} [{e['seconds']:.1f}s]")
        if self.logger is not None:
            self.logger.write(record, scalars, step)  # rank 0 writes
        return entry

    # -- hook points ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer) -> None:
        if self.at_start and trainer.step == 0:
            self.run(trainer, 0)

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        if self.every > 0 and step % self.every == 0:
            self.run(trainer, step)

    def on_train_end(self, trainer) -> None:
        if self._last_step != trainer.step:
            self.run(trainer, trainer.step)

    def summary(self) -> Dict[str, Any]:
        """Per set: "final" and "best", and "start" when the untrained model was evaluated (step 0, at_start)."""
        if not self.history:
            return {}
        final = self.history[-1]
        start = self.history[0] if self.history[0]["step"] == 0 and len(self.history) > 1 else None
        keys = ("acc_mean", "acc_std", "threshold")
        out: Dict[str, Any] = {}
        for s, (name, e) in zip(self.sets, final["eval"].items()):
            out[name] = {"final": {"step": final["step"], **{k: e[k] for k in keys}}}
            if start is not None:
                out[name]["start"] = {"step": 0, **{k: start["eval"][name][k] for k in keys}}
            out[name].update(best={"acc_mean": self.best[name][0], "step": self.best[name][1]}, path=str(s.path),
                             num_pairs=len(s.issame))
        return {"eval": out}


class ProfilerHook(Hook):
    """Runs last: marks the end of each step's hooks, times the other hooks, opens and closes the window."""

    def __init__(self, profiler: "Profiler"):
        self.profiler = profiler

    def on_train_start(self, trainer) -> None:
        self.profiler.attach(trainer)

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        self.profiler.end_of_step_hooks(trainer)

    def on_train_end(self, trainer) -> None:
        self.profiler.end_of_run(trainer)

    def close(self) -> None:
        self.profiler.close()

    def summary(self) -> Dict[str, Any]:
        # A window that ends with the run is reported after summary.json is written (it waits for the
        # end-of-run hooks' times): then only the directory is known here.
        entry = {"dir": str(self.profiler.out_dir)}
        if self.profiler.report:
            entry["bottleneck"] = self.profiler.report["bottleneck"]["text"]
        return {"profile": entry}
