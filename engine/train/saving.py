"""The hooks that save what a run produces: checkpoints (to continue it) and the exported models (to use it).

- `CheckpointHook`: a checkpoint every `every` optimizer steps and every `every_minutes` of wall time (each rank
  watches its own clock; the trainer's per-step all-reduce makes the save happen at the same step on every rank:
  `Hook.save_due`), at a stop request, and at the end once checkpointing is on (a step interval, or a checkpoint
  already written or resumed from: the same command run again then continues from the end, not from the last
  interval). `model.pt` at every epoch's end and at the end.
- `BestModelHook`: `model_best.pt` whenever the mean verification accuracy over the evaluated sets beats the best
  so far; which sets, which step and the score go to ``model_best.json`` beside it and to summary.json.

Every file goes through atomic writes (engine.runtime.fileio): a reader, or a run killed mid-write, sees the
previous file or the whole new one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from engine.runtime import dist
from engine.runtime.fileio import atomic_write_text
from engine.runtime.log import get_logger
from engine.state import checkpoint
from engine.train.hooks import Hook, VerificationHook

log = get_logger(__name__)

MODEL_NAME = "model.pt"
BEST_NAME = "model_best.pt"
BEST_RECORD = "model_best.json"


class CheckpointHook(Hook):
    """Checkpoints on a step or time interval with `keep` bounding how many stay, and `model.pt` every epoch.

    Args:
        every: save after every `every` optimizer steps; 0: no step interval.
        keep: newest complete checkpoints kept (engine.state.checkpoint.save); 0: all.
        export: write ``model.pt`` (arcface_torch keys) at each epoch's end and at the end.
        every_minutes: also save once this many minutes have passed since the last save (or the start); 0: off.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, every: int, keep: int, export: bool = True, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.keep = keep
        self.export = export
        self.every_s = every_minutes * 60.0
        self.clock = clock
        self.last_saved_step: Optional[int] = None
        self.num_saved = 0
        self._since = clock()
        self._continues = False  # this run resumed from a checkpoint
        self.exports: List[Dict[str, int]] = []  # model.pt written at epoch ends: {"epoch", "step"}

    def on_train_start(self, trainer) -> None:
        self._since = self.clock()
        if getattr(trainer, "resumed_from", None) is not None:
            self._continues = True
            self.last_saved_step = trainer.step  # that checkpoint is this step's

    def save_due(self, trainer) -> bool:
        return self.every_s > 0 and self.clock() - self._since >= self.every_s

    def _save(self, trainer) -> Path:
        path = checkpoint.save(trainer, keep=self.keep)
        self.last_saved_step, self.num_saved, self._since = trainer.step, self.num_saved + 1, self.clock()
        return path

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        if (self.every > 0 and step % self.every == 0) or getattr(trainer, "save_due", False):
            self._save(trainer)
        per_epoch = getattr(trainer, "steps_per_epoch", None)
        if self.export and per_epoch and step % per_epoch == 0 and step < trainer.max_steps:
            checkpoint.export_model(trainer, trainer.output_dir / MODEL_NAME)  # the end exports it anyway
            self.exports.append({"epoch": step // per_epoch, "step": step})
            log.info(f"epoch {step // per_epoch} done (step {step}): {trainer.output_dir / MODEL_NAME} written")

    def on_stop(self, trainer) -> None:
        if self.last_saved_step != trainer.step:
            path = self._save(trainer)
            log.info(f"stopped at step {trainer.step}: checkpoint {path} written; the same command continues it "
                     f"(engine.checkpoint.resume=auto)")

    def on_train_end(self, trainer) -> None:
        if (self.every > 0 or self.num_saved or self._continues) and self.last_saved_step != trainer.step:
            self._save(trainer)
        if self.export:
            checkpoint.export_model(trainer, trainer.output_dir / MODEL_NAME)

    def summary(self) -> Dict[str, Any]:
        """Called by the summary hook before this hook's own on_train_end: the end's model.pt is announced."""
        if not self.export:
            return {}
        return {"model": {"path": MODEL_NAME, "epoch_exports": list(self.exports)}}


class BestModelHook(Hook):
    """`model_best.pt` at the best mean accuracy over the verification sets (every evaluation counts, the one
    before the first step included), with ``model_best.json``: {"step", "epoch", "score", "sets": {name: acc}}.

    A resumed run reads the record back, so an evaluation after a restart replaces the file only when it beats the
    best of the whole run. Runs after the verification hook (engine.train.build.build_hooks), on every rank: the
    results are the same on every rank, so every rank takes part in the same exports (a ZeRO-3 gather).
    """

    def __init__(self, verification: VerificationHook, output_dir: Path):
        self.verification = verification
        self.output_dir = Path(output_dir)
        self.best: Optional[Dict[str, Any]] = None
        self._seen = 0  # evaluations of the verification hook already considered

    def on_train_start(self, trainer) -> None:
        record = self.output_dir / BEST_RECORD
        if getattr(trainer, "resumed_from", None) is not None and record.is_file():
            try:
                self.best = json.loads(record.read_text())
            except ValueError:  # a hand-edited record: the next evaluation writes a new one
                self.best = None
        self._consider(trainer)  # an evaluation before the first step (engine.eval.at_start)

    def _consider(self, trainer) -> None:
        history = self.verification.history
        for record in history[self._seen:]:
            sets = {name: float(e["acc_mean"]) for name, e in record["eval"].items()}
            score = sum(sets.values()) / len(sets)
            if self.best is None or score > self.best["score"]:
                self.best = {"step": record["step"], "epoch": record.get("epoch", 0), "score": score, "sets": sets,
                             "path": BEST_NAME}
                checkpoint.export_model(trainer, self.output_dir / BEST_NAME)
                if dist.get_rank() == 0:
                    atomic_write_text(json.dumps(self.best, indent=1) + "\n", self.output_dir / BEST_RECORD)
                log.info(f"{self.output_dir / BEST_NAME}: step {record['step']}, mean verification accuracy "
                         f"{score:.4f} over {', '.join(sets)}")
        self._seen = len(history)

    def on_step_end(self, trainer, step: int, loss: torch.Tensor) -> None:
        self._consider(trainer)

    def on_train_end(self, trainer) -> None:
        self._consider(trainer)

    def summary(self) -> Dict[str, Any]:
        return {"model_best": dict(self.best)} if self.best is not None else {}
