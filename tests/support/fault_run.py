"""run.py's entry point with faults injected, for the fault tests: the launchers start this file instead of
run.py (`deepspeed ... tests/support/fault_run.py --config ...`) and it calls `run.main` unchanged after patching.

The faults come from the environment variable ARCSCALE_TEST_FAULTS, a JSON object:

- ``pause_after_step`` N, ``pause_file`` P: after optimizer step N every rank writes ``P.ready<rank>`` and waits
  (up to 5 minutes) until P exists, so a test can signal or kill processes at a known point of the run.
- ``stop_after_step`` N: set the process's stop request after step N (as SIGTERM would).
- ``kill`` {"rank": r, "step": s}: rank r SIGKILLs itself once its optimizer step s is done (before that step's
  hooks: no checkpoint, no log line of it), in the launcher's first attempt only (torchrun's
  TORCHELASTIC_RESTART_COUNT 0 or unset), so a launcher's restart of the same command runs through.
- ``freeze`` {"rank": r, "step": s, "seconds": t}: in the backward of step s, once the head's collectives are
  done and before the backbone's gradients are reduced, rank r sleeps t seconds; its peers wait in DeepSpeed's
  gradient reduction (on DeepSpeed's own data-parallel group).
- ``nan_pixels_steps`` [N, ...]: in these steps every micro-batch's images are NaN (a broken loader).
- ``audit_writes`` D: every file this rank opens for writing is appended to ``D/writes_rank<r>.txt``.

Nothing here is imported by the engine.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install(faults: dict) -> None:
    """Patch the trainer (and the process's file opens) as `faults` says."""
    import torch

    from engine.runtime import faults as engine_faults
    from engine.train.trainer import Trainer

    train_step, next_batch = Trainer.train_step, Trainer._next_batch

    def patched_train_step(self):
        freeze = faults.get("freeze")
        if freeze and self.rank == freeze["rank"] and self.step + 1 == freeze["step"]:
            head_forward, step = self.head.forward, self.step + 1

            def frozen_in_backward(grad):
                print(f"[rank {self.rank}] test fault: frozen in the backward of step {step}, after the head's "
                      f"collectives, before the backbone's gradient reduction", file=sys.stderr, flush=True)
                time.sleep(freeze.get("seconds", 600))
                return grad

            def head_forward_once(embeddings, labels):
                self.head.forward = head_forward
                if embeddings.requires_grad:
                    embeddings.register_hook(frozen_in_backward)
                return head_forward(embeddings, labels)

            self.head.forward = head_forward_once
        out = train_step(self)
        kill = faults.get("kill")
        if (kill and self.rank == kill["rank"] and self.step == kill["step"]
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            print(f"[rank {self.rank}] test fault: killed after step {self.step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get("stop_after_step") == self.step:
            engine_faults.STOP.set("test fault: stop_after_step")
        if faults.get("pause_after_step") == self.step:
            pause = Path(faults["pause_file"])
            Path(f"{pause}.ready{self.rank}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not pause.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return out

    def patched_next_batch(self):
        images, labels = next_batch(self)
        if self.step + 1 in faults.get("nan_pixels_steps", ()):
            images = torch.full_like(images, float("nan"))
        return images, labels

    Trainer.train_step = patched_train_step
    Trainer._next_batch = patched_next_batch
    if faults.get("audit_writes"):
        log = Path(faults["audit_writes"]) / f"writes_rank{os.environ.get('RANK', '0')}.txt"

        def audit(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    with open(os.fspath(log), "a") as f:  # not audited again: its own path is skipped below
                        f.write(f"{os.fsdecode(args[0])}\n")

        def guarded(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                    and os.fsdecode(args[0]) == str(log):
                return
            audit(event, args)

        sys.addaudithook(guarded)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    install(json.loads(os.environ.get("ARCSCALE_TEST_FAULTS", "{}")))
    import run

    return run.main()


if __name__ == "__main__":
    sys.exit(main())
