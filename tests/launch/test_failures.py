"""A launched run that fails ends the whole job at once, says why in one line and leaves no bad state
(issues 9 and 11), through the real launchers (`deepspeed`, `python run.py`):

- divergence from a huge LR: the non-finite steps are skipped and counted, the third in a row stops the run, no
  checkpoint or model.pt holds a non-finite value (NaN data on 2 in-process ranks: tests/distributed/test_nonfinite.py);
- a rank frozen before ZeRO's gradient reduction: every rank's stack, then the step watchdog ends the job;
- a full disk during a checkpoint: the error names the file, the previous checkpoint stays;
- broken labels and a single-identity dataset through the CLI: one line naming the record, no traceback;
- a rank whose data read fails in step 3: the job ends at once with that rank's message.

Before these fixes the diverged runs exited 0 with a NaN model.pt, the frozen rank hung the job for DeepSpeed's
30-minute group timeout, the full disk said `unexpected pos ...`, and a failing rank waited in a barrier until
the collective timed out. (A truncated checkpoint's fallback: tests/distributed/test_checkpoint.py.)
"""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.dist import find_free_port
from tests.support import launching as L
from tests.support.data import jpeg, write_rec
from tests.support.launching import ROOT, env


def test_divergence_from_lr_stops_without_saving_nan(tmp_path):
    """`--set engine.optim.lr=1e6` through the deepspeed launcher: the non-finite steps are skipped, counted and
    logged; the third in a row stops the run (exit 1) with a one-line reason; no checkpoint or model.pt holds a
    non-finite value and `keep` kept the newest finite checkpoints."""
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out, max_nonfinite_steps=3)
    code = L.run(L.deepspeed_cmd(config, "engine.optim.lr=1e6", "engine.checkpoint.every=1",
                                 "engine.checkpoint.keep=2", "engine.train.max_steps=12"), tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert code == 1, log[-3000:]
    assert "consecutive optimizer steps had a non-finite" in log and "max_nonfinite_steps=3" in log, log[-3000:]
    assert "step skipped, nothing updated (1 in a row" in log, log[-3000:]
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    steps = L.checkpoint_steps(out)
    assert steps and len(steps) <= 2, steps
    assert L.non_finite_files(out / "checkpoints") == []


def test_frozen_rank_is_ended_by_the_step_watchdog_with_every_stack(tmp_path):
    """Rank 1 sleeps in the backward of step 3 (after the head's collectives) while rank 0 waits in ZeRO-1's
    gradient reduction, on DeepSpeed's own data-parallel group. The step watchdog of both ranks prints their
    Python stacks at its threshold (3 x the median step, >= 5 s), and at twice that it ends the hung ranks
    (exit 4), so the job stops long before the collective timeout (dist_timeout_s=60, torch's default 30
    minutes): under NCCL nothing else would end a rank blocked by a hung peer sooner."""
    out = tmp_path / "out"
    # watchdog_min_s 5: well past a loaded machine's forward of step 3, so rank 1's dump comes after it froze
    config = L.tiny_config(tmp_path / "tiny.json", out, dist_timeout_s=60, watchdog_factor=3.0,
                           watchdog_min_s=5.0)
    faults = {"freeze": {"rank": 1, "step": 3, "seconds": 900}}
    code = L.run(L.deepspeed_cmd(config, faults=True), tmp_path / "log", faults, timeout=400)
    log = (tmp_path / "log").read_text()
    assert code != 0, log[-3000:]
    assert "test fault: frozen in the backward of step 3" in log
    for rank in (0, 1):
        assert f"[rank {rank}] watchdog: step 3 has run" in log, log[-4000:]
    # rank 1's stack shows where it hangs; each stack line carries its rank (the two dumps do not interleave)
    assert any(line.startswith("[rank 1] ") and line.rstrip().endswith("in frozen_in_backward")
               for line in log.splitlines()), log[-6000:]
    # rank 0's stack shows it waiting in DeepSpeed's gradient reduction, not in a head collective
    dump0 = [line for line in log.splitlines() if line.startswith("[rank 0] ")]
    assert any(line.rstrip().endswith("in allreduce_gradients") for line in dump0), "\n".join(dump0)[-3000:]
    assert not any("heads/" in line for line in dump0), "\n".join(dump0)[-3000:]
    # the watchdog ended a hung rank; the other was ended by its own watchdog, by the peer's failure, or by the
    # launcher's SIGTERM while hung (at once: no step boundary will come); the collective timeout never fired
    assert "error: watchdog: step 3 has run" in log and "ending it (exit 4)" in log, log[-4000:]
    assert "Timed out waiting" not in log, log[-4000:]


def _mount_tmpfs(path, size: str) -> str:
    """Mount a tmpfs of `size` at `path`; the reason when this machine does not allow it (else '')."""
    path.mkdir()
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"arcscale-{uuid.uuid4().hex[:8]}",
                           str(path)], capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """`python run.py` with output_dir on a 24 MiB tmpfs: step 2's checkpoint (15 MiB) fits, step 4's does not.
    The error names the file and ENOSPC; step 2 and `latest` are intact; no .tmp directory is left."""
    out = tmp_path / "disk"
    reason = _mount_tmpfs(out, "24m")
    if reason:
        print(f"SKIPPED disk-full test: {reason}")
        pytest.skip(reason)
    try:
        config = L.tiny_config(tmp_path / "tiny.json", out)
        code = L.run(L.python_cmd(config, "engine.checkpoint.export=false"), tmp_path / "log")
        log = (tmp_path / "log").read_text()
        assert code == 1, log[-3000:]
        assert "[ENOSPC] No space left on device" in log and "step_00000004.tmp/" in log, log[-3000:]
        assert "checkpoint step 4 not written" in log and "previous checkpoints" in log
        assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002"]
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        assert L.non_finite_files(out / "checkpoints") == []  # every file of step 2 still loads
    finally:
        subprocess.run(["umount", str(out)], check=False)


def _cli(tmp_path, name: str, data: dict) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2,
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 2, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"num_workers": 0, "dali": "off", "augment": [], **data},
                   "train": {"max_steps": 4, "log_every": 1, "output_dir": str(tmp_path / f"{name}_out")}}}))
    return subprocess.run([sys.executable, "run.py", "--config", str(config)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def test_cli_names_a_non_finite_label_and_refuses_one_identity(tmp_path):
    rec = write_rec(tmp_path / "rec", [0.0, 0.0, 0.0, 1.0, float("nan"), 1.0, 1.0, 1.0])
    proc = _cli(tmp_path, "nan_label", {"source": "recordio", "path": str(rec)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{rec / 'train.rec'}: key 5: label nan is not a finite number" in proc.stderr, proc.stderr[-3000:]
    assert "OverflowError" not in proc.stderr and "Traceback" not in proc.stderr
    folder = tmp_path / "one_id" / "person"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
    proc = _cli(tmp_path, "one_id", {"source": "folder", "path": str(tmp_path / "one_id")})
    assert proc.returncode == 1 and "has 1 class(es)" in proc.stderr, proc.stderr[-3000:]


# -- a rank that fails ends the job -----------------------------------------------------------------------------

NUM_IDS, PER_ID, MICRO, SEED = 4, 8, 2, 5


def _write_folder(root: Path) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(NUM_IDS):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(PER_ID):
            path = root / f"id{i}" / f"{j:02d}.png"
            Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files  # label-then-name order, as dali_pipes.folder.scan_image_folder lists them


def test_rank_failure_ends_the_job_with_its_message(tmp_path):
    from dali_pipes.source import ShardPlan

    files = _write_folder(tmp_path / "faces")
    # The sample rank 1 reads first in step 3 (position 2 of epoch 0): truncate it to half its bytes.
    index = int(ShardPlan(len(files), MICRO, rank=1, world_size=2, seed=SEED).batch_indices(0, 2)[0])
    victim = files[index]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert not any(index in ShardPlan(len(files), MICRO, 0, 2, SEED).batch_indices(0, p) for p in range(3))

    launcher = Path(sys.executable).parent / "deepspeed"
    sets = [f"engine.data.path={tmp_path / 'faces'}", "engine.data.source=folder", "engine.data.dali=off",
            "engine.data.num_workers=0", "engine.data.on_corrupt=error", "engine.data.augment=[]",
            f"engine.head.num_classes={NUM_IDS}", "engine.model.name=mbf", "engine.model.embedding_size=32",
            f"train_micro_batch_size_per_gpu={MICRO}", "engine.train.max_steps=8", "engine.train.log_every=1",
            f"engine.train.seed={SEED}", f"engine.train.output_dir={tmp_path / 'out'}", "engine.eval.bins=[]"]
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(find_free_port()), "run.py",
           "--config", "ds_configs/quickstart.json"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ['PATH']}"}
    env.pop("ARCSCALE_TRACEBACK", None)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # A hang would last dist_timeout_s (1800 s); the job ends as soon as the error is found.
    assert elapsed < 300, f"the job took {elapsed:.0f} s to fail"
    assert "step 2/8" in out and "step 3/8" not in out, out[-3000:]  # it failed in step 3, not before
    lines = [line for line in out.splitlines() if "[rank 1] error" in line]
    assert lines and victim.name in lines[0] and "id" in lines[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]  # a user error is one line, not a traceback per rank
