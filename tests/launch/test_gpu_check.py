"""scripts/gpu_check.sh, the GPU check for a lent machine, as a CPU dry run of the same script at tiny sizes:
every run of its plan (r50 ZeRO-0, r50 FSDP2, r100 ZeRO-3 with DeepSpeed's activation checkpointing, the Partial FC
head at two sizes with offload none and cpu, engine.profile, engine.auto's choice for r50 and r2060 with
predicted beside measured, the r2060 recipe) finishes, its figures reach
results.json and table.txt, and only the few small files a lent machine can send back are written. Also its
guards: no CUDA or no DeepSpeed stops it before any run (exit 2, one line), and a run the budget cannot fit is
skipped, not started."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")


def _check(*args: str, env=None, timeout: int = 1100) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_dry_run_runs_the_whole_plan_and_leaves_only_small_files(tmp_path):
    out = tmp_path / "out"
    proc = _check("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(files) == {"results.json", "table.txt", "gpu_check.log", "runs.log", "profile_r50.png"}, files
    assert all(size < 16 * 2 ** 20 for size in files.values()) and len(files) <= 8  # what a lent machine returns
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["device"] is None
    runs = {r["run"]: r for r in results["runs"]}
    assert list(runs) == ["r50", "r50_fsdp", "r100_z3", "prof_r50", "fit_r50", "fit_r2060", "r2060"]
    for name, r in runs.items():
        assert r["status"] == "ok", (name, r)
        assert r["samples_per_sec"] > 0 and r["achieved_tflops"] > 0 and r["model_gflops_per_image"] > 0, r
        assert r["peak_allocated_gib"] > 0 and r["peak_memory_kind"] == "rss" and r["mfu"] is None, r
    assert (runs["r50"]["backend"], runs["r50"]["zero_stage"]) == ("deepspeed", 0)
    assert runs["r50_fsdp"]["backend"] == "fsdp"
    assert runs["r100_z3"]["zero_stage"] == 3 and runs["r2060"]["zero_stage"] == 3
    # recomputation is not model FLOPs: r100_z3 checkpoints every stage of the same r18 as r50
    assert runs["r100_z3"]["model_gflops_per_image"] == runs["r50"]["model_gflops_per_image"]
    for name in ("fit_r50", "fit_r2060"):  # engine.auto's choice, predicted beside measured
        a = runs[name]["auto"]
        assert a["predicted_step_s"] > 0 and a["measured_step_s"] > 0, a
        assert 0 < a["predicted_gib_per_rank"] <= a["budget_gib_per_rank"] == 8 and a["measured_gib_per_rank"] > 0, a
    assert "engine.auto's choice for this device" in (out / "table.txt").read_text()
    prof = runs["prof_r50"]["profile"]
    assert prof["mfu"] > 0 and "MFU" in prof["summary_txt"]
    pfc = results["pfc"]
    assert pfc["status"] == "ok" and [(r["classes"], r["offload"]) for r in pfc["runs"]] == [
        (20000, "none"), (20000, "cpu"), (50000, "none"), (50000, "cpu")]
    assert all(r["median_ms"] > 0 and "error" not in r for r in pfc["runs"])
    layout = results["layout"]  # bench/channels_last.py: both layouts timed
    assert layout["status"] == "ok" and [r["backbone"] for r in layout["rows"]] == ["r18"], layout
    assert all(r["nchw_s"] > 0 and r["nhwc_s"] > 0 and r["mixed_s"] > 0 and r["ratio_median"] > 0
               and r["mixed_ratio_median"] > 0 for r in layout["rows"]), layout
    table = (out / "table.txt").read_text()
    assert "Memory layout" in table
    assert all(name in table for name in runs) and "dry run on the CPU" in table
    # no checkpoint, no model.pt (checkpoint.every=0, export=false): each run wrote a few small files
    for name, r in runs.items():
        assert "out/summary.json" in r["files_written"], (name, r["files_written"])
        assert not any("step_" in f or f.endswith(".pt") for f in r["files_written"]), (name, r["files_written"])
        assert r["bytes_written"] < 4 * 2 ** 20, (name, r["files_written"])
    assert "out/profile/profile.json" in runs["prof_r50"]["files_written"]
    assert pfc["files_written"] == ["log.txt", "rc", "results.json"]
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check: dry run on the CPU" in log and log.rstrip().splitlines()[-1].startswith("gpu_check: ")


def test_no_cuda_stops_before_any_run(tmp_path):
    """On this CPU machine without --dry-run: one line, exit 2, no run started."""
    proc = _check("--out", str(tmp_path), env={"PYTHON": PY}, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu_check: torch.cuda.is_available() is False (torch "), lines
    assert "==" not in proc.stdout and not (tmp_path / "results.json").exists()


def test_no_deepspeed_stops_before_any_run(tmp_path):
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no DeepSpeed here')\n")
    env = {"PYTHON": PY, "PYTHONPATH": str(fake.parent)}
    proc = _check("--dry-run", "--out", str(tmp_path / "out"), env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        "gpu_check: import deepspeed failed (ImportError: no DeepSpeed here): build .whl/ with "
        "scripts/gpu_wheels.sh and carry it")


def test_a_run_the_budget_cannot_fit_is_skipped(tmp_path):
    out = tmp_path / "out"
    proc = _check("--dry-run", "--budget", "5", "--out", str(out), "r50", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "== r50: skipped" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["status"]) for r in results["runs"]] == [("r50", "SKIPPED (time)")]
