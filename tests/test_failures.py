"""A failing rank brings the whole job down at once, with its message (issue 9 §4, DESIGN.md §7).

Through the real `deepspeed` launcher, 2 ranks, `dist_timeout_s` at its default (30 minutes): a folder dataset
with one truncated image that rank 1, and only rank 1, reads in step 3 (`on_corrupt=error`). Rank 0 is then
waiting in that step's gradient all-reduce. Before the fix, rank 1 went into `trainer.close()`'s barrier in a
`finally`, rank 0 waited in its all-reduce, and nothing was printed until the collective timed out. Now rank 1
prints one line naming the file and exits; rank 0's collective fails at once and the launcher stops the job.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.runtime.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]
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
