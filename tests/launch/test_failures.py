"""Faults a long run meets, through the real launchers (issue 11): divergence from a huge LR and from NaN data,
a rank frozen before ZeRO's gradient reduction, a full disk during a checkpoint, a truncated checkpoint.

Each test fails on the engine before issue 11: the diverged runs exited 0 with a NaN model.pt, the frozen rank
hung the job for DeepSpeed's 30-minute group timeout, the full disk said `unexpected pos ...`, and the
truncated checkpoint gave `PytorchStreamReader failed` without its path and no fallback.
"""
import os
import subprocess
import uuid

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests import launching as L


def _all_finite(directory) -> list:
    """Names of the tensor files under `directory` holding a non-finite value (empty: all finite)."""
    bad = []
    for path in sorted(directory.rglob("*.pt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = obj.values() if isinstance(obj, dict) else [obj]
        stack = list(tensors)
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif torch.is_tensor(item) and item.is_floating_point() and not torch.isfinite(item).all():
                bad.append(str(path))
                break
    return bad


def _checkpoint_steps(out) -> list:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if p.name[5:].isdigit())


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
    steps = _checkpoint_steps(out)
    assert steps and len(steps) <= 2, steps
    assert _all_finite(out / "checkpoints") == []


def test_nan_pixels_are_skipped_counted_and_stop_the_run(tmp_path):
    """A loader that yields NaN images in steps 2, 4, 5 and 6 (run.main on 2 ranks, at most 3 in a row): each is
    skipped (weights and BatchNorm statistics untouched), step 3 trains and resets the count, the third in a
    row (step 6) stops the run; the checkpoints (every 2 steps) stay finite."""
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out, max_nonfinite_steps=3, max_steps=10)
    with pytest.raises(RuntimeError, match="exited without a result"):
        run_distributed(L.main_in_process, 2, ["--config", str(config)], {"nan_pixels_steps": [2, 4, 5, 6]},
                        str(tmp_path / "err"), timeout_s=600)
    for rank in (0, 1):
        text = (tmp_path / f"err.{rank}").read_text()
        assert f"[rank {rank}] error: NonFiniteError: steps 4..6: 3 consecutive optimizer steps had a non-finite " \
               f"loss" in text and "the weights are those after step 3" in text, text
    text = (tmp_path / "err.0").read_text()
    assert "step 2: non-finite loss" in text and "(1 in a row, 1 in all;" in text, text
    assert "step 6: non-finite loss" in text and "(3 in a row, 4 in all;" in text, text
    assert _checkpoint_steps(out) == [2, 4]  # the run stopped inside step 6, before its checkpoint
    assert _all_finite(out / "checkpoints") == []  # step 2's forward made NaN BatchNorm statistics: restored
    assert not (out / "model.pt").exists()


def test_pruning_keeps_the_checkpoints_after_the_saved_step(tmp_path):
    """After a resume from an older checkpoint, saving step 4 with keep=1 prunes step 2 but not step 6 (a
    continuation that was abandoned: overwritten when the run gets there, never pruned in favour of it)."""
    from engine.state import checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "meta.json").write_text("{}")
    checkpoint._prune(tmp_path, 4, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]


def test_frozen_rank_ends_at_the_group_timeout_with_every_stack(tmp_path):
    """Rank 1 sleeps in the backward of step 3 (after the head's collectives) while rank 0 waits in ZeRO-1's
    gradient reduction, on DeepSpeed's own data-parallel group. With dist_timeout_s=20 the job ends within
    seconds of the timeout, not after torch's 30-minute default, and first the step watchdog of both ranks has
    printed their Python stacks."""
    out = tmp_path / "out"
    # watchdog_min_s 5: well past a loaded machine's forward of step 3, so rank 1's dump comes after it froze
    config = L.tiny_config(tmp_path / "tiny.json", out, dist_timeout_s=20, watchdog_factor=3.0,
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
    # rank 0 timed out in DeepSpeed's gradient reduction (its data-parallel group), not in a head collective
    failure = log[log.index("[rank 0] Traceback"):]
    assert "Timed out waiting 20000ms" in failure, failure[-3000:]
    assert "allreduce_gradients" in failure and "heads/" not in failure, failure[-3000:]
    # the launcher's SIGTERM then ends the hung rank 1 at once (no step boundary will come), not after 30 s
    assert "[rank 1] received SIGTERM while step 3 has run" in log and "exiting now, without a checkpoint" in log


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
        assert _all_finite(out / "checkpoints") == []  # every file of step 2 still loads
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tmp_path_factory):
    """2 ranks (run.main): stopped at step 4 (checkpoints 2 and 4), step 4's backbone.pt truncated: resume=auto
    names the file, falls back to step 2 and finishes equal to the uninterrupted run."""
    reference = L.reference(tmp_path_factory)
    out = tmp_path / "out"
    config = L.tiny_config(tmp_path / "tiny.json", out)
    codes = run_distributed(L.main_in_process, 2, ["--config", str(config)], {"stop_after_step": 3}, timeout_s=600)
    assert codes == [3, 3]  # the stop requested after step 3 takes effect at the next boundary, step 4
    broken = out / "checkpoints" / "step_00000004" / "backbone.pt"
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 2)
    codes = run_distributed(L.main_in_process, 2, ["--config", str(config), "--set", "engine.checkpoint.resume=auto"],
                            None, str(tmp_path / "err"), timeout_s=600)
    assert codes == [0, 0]
    text = (tmp_path / "err.0").read_text()
    assert f"{broken}: unreadable" in text and "falling back to" in text and "step_00000002" in text, text
    assert L.losses(out) == L.losses(reference)  # steps 3 and 4 trained again, as the uninterrupted run did
    L.assert_same_model(L.model(out), L.model(reference))


