"""The real 10M-class run: 2 CPU ranks through the deepspeed launcher, planner prediction vs measured peak RSS.

    python bench/run_10m.py [--out outputs/10m_classes] [--min-available-gb 18] [--settle-s 60] [--wait-s 3600]
                            [--set KEY.PATH=VALUE ...] [--report-only]

Runs exactly ``deepspeed --num_gpus 2 run.py --config ds_configs/10m_classes.json --set
engine.train.output_dir=OUT [--set ...]`` (10,000,000 classes, embedding 128, Partial FC sample rate 0.1, mbf,
20 steps), then reads the run's summary.json and metrics.jsonl and prints a Markdown report: the command, the
machine, the commit, the loss curve, the step time, the peak RSS of each rank and engine.plan's per-rank
prediction for the same config next to it. The report and the raw numbers are also written to
OUT/bench_10m.md and OUT/bench_10m.json.

Why it waits for memory: each rank holds 5 M class centres and their momentum (2 x 2.4 GiB) plus the runtime,
about 7.5 GiB per rank, on a 23 GiB machine shared with other jobs. Starting it next to another large job gets
one of them OOM-killed, so the script polls MemAvailable until --min-available-gb has been free for --settle-s
seconds (or gives up after --wait-s) instead of starting blindly.

Why the demo data: with labels drawn uniformly over 10 M classes, a 20-step run (640 images) sees each class
about 0.00006 times, so no class centre is ever revisited and the loss has nothing to learn from. The recipe
uses the generated demo identities (64 identities, labels 0..63) as the positives, inside a head of 10 M
classes whose other 9,999,936 centres serve as sampled negatives: every memory and compute cost of the 10 M
head is real (5 M-row shards, sampling 500 k rows per rank per step, the distributed softmax over 1 M
columns), and the loss falls because the 64 identities recur every step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = "ds_configs/10m_classes.json"
GiB = 2 ** 30


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return 0.0


def wait_for_memory(min_gib: float, settle_s: float, wait_s: float) -> bool:
    """True once MemAvailable has stayed >= min_gib for settle_s seconds; False after wait_s.

    One reading is not enough on a shared machine: another job that has just started may not have allocated
    yet (two 10M-class jobs started together would both be killed), so the memory must stay free a while.
    """
    deadline, since, said = time.time() + wait_s, None, 0.0
    while time.time() < deadline:
        free = mem_available_gib()
        if free >= min_gib:
            since = since or time.time()
            if time.time() - since >= settle_s:
                return True
        else:
            since = None
            if time.time() - said >= 60:
                print(f"waiting for memory: {free:.1f} GiB available, need {min_gib}", flush=True)
                said = time.time()
        time.sleep(5)
    return False


def machine() -> str:
    """CPU model, core count, SIMD flags of note and RAM, as one line."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 2 ** 20
    return (f"{os.cpu_count()} x {platform.machine()} ({model}; {' '.join(simd) or 'no AVX2'}), "
            f"{total:.0f} GiB RAM")


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "heads", "backbones", "dali_pipes",
                            "run.py", CONFIG], cwd=ROOT, capture_output=True, text=True)
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def run(out: Path, overrides: List[str], timeout_s: int) -> List[str]:
    """Launch the run; returns the command (as run). Raises when the launcher fails."""
    from engine.runtime.dist import find_free_port

    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(find_free_port()), "run.py", "--config", CONFIG,
           "--set", f"engine.train.output_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ['PATH']}"}
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"launcher failed with exit code {proc.returncode}; see {log}")
    return cmd


def report(out: Path, cmd: List[str], overrides: List[str], wall_s: float) -> Dict[str, Any]:
    """Read the run's outputs, plan the same config, and build the Markdown report."""
    from engine.config import schema as config
    from engine.perf import planner as plan

    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = config.load(CONFIG, overrides)
    p = plan.plan(cfg, summary["world_size"], device="cpu", mem_gb=mem_total_gib() / summary["world_size"])
    peaks = summary["peak_memory_bytes_per_rank"]
    sps = summary["samples_per_sec"]
    step_s = summary["global_batch_size"] / sps if sps else None
    predicted = p.total_bytes
    lines = [
        f"- command: `{' '.join(['deepspeed'] + cmd[1:])}` (launched by `python bench/run_10m.py`)",
        f"- machine: {machine()}; date {time.strftime('%Y-%m-%d')}; commit {commit()}",
        f"- steps: {summary['steps']}, global batch {summary['global_batch_size']} "
        f"({cfg.micro_batch_size} per rank x {summary['world_size']} ranks), {summary['num_classes']:,} classes, "
        f"sample rate {cfg.engine.head.sample_rate} ({p.num_sampled:,} sampled rows per rank per step)",
        "- loss (mean over each logged interval): "
        + ", ".join(f"{r['step']}: {r['loss']:.2f}" for r in records)
        + f"; first step {summary['first_loss']:.2f}",
        f"- step time: {step_s:.1f} s/step ({sps:.2f} samples/s, from the end of step 1); wall time of the "
        f"launcher {wall_s:.0f} s" if step_s else f"- wall time {wall_s:.0f} s",
        "- peak RSS per rank: " + ", ".join(f"rank {i} {b / GiB:.2f} GiB" for i, b in enumerate(peaks)),
        f"- planner (`python -m engine.plan --config {CONFIG} --world-size 2 --device cpu`): "
        f"{predicted / GiB:.2f} GiB per rank; measured max {max(peaks) / GiB:.2f} GiB "
        f"({predicted / max(peaks) - 1:+.1%})",
        "",
        "| planner row | GiB per rank |",
        "|---|---|",
    ] + [f"| {r.name} | {r.bytes / GiB:.3f} |" for r in p.rows if r.where == "device"]
    return {"summary": summary, "losses": [(r["step"], r["loss"]) for r in records], "step_s": step_s,
            "predicted_bytes": predicted, "peak_bytes_per_rank": peaks, "command": cmd, "machine": machine(),
            "commit": commit(), "wall_s": wall_s, "markdown": "\n".join(lines)}


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/10m_classes", help="the run's output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--min-available-gb", type=float, default=18.0,
                        help="wait until this much memory is available before starting (GiB)")
    parser.add_argument("--settle-s", type=float, default=60.0,
                        help="the memory must stay available this long before starting")
    parser.add_argument("--wait-s", type=float, default=3600.0, help="give up waiting for memory after this")
    parser.add_argument("--timeout-s", type=int, default=3600, help="limit for the run itself")
    parser.add_argument("--report-only", action="store_true", help="only report on an existing --out")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    cmd, wall = [], 0.0
    if not args.report_only:
        if not wait_for_memory(args.min_available_gb, args.settle_s, args.wait_s):
            print(f"gave up: MemAvailable stayed below --min-available-gb {args.min_available_gb} "
                  f"for --settle-s {args.settle_s:.0f} s within {args.wait_s:.0f} s", file=sys.stderr)
            return 3
        t0 = time.time()
        cmd = run(out, args.overrides, args.timeout_s)
        wall = time.time() - t0
    else:
        cmd = ["deepspeed", "--num_gpus", "2", "run.py", "--config", CONFIG, "--set",
               f"engine.train.output_dir={out}"] + [x for o in args.overrides for x in ("--set", o)]
    result = report(out, cmd, args.overrides, wall)
    (out / "bench_10m.json").write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"},
                                                   indent=2) + "\n")
    (out / "bench_10m.md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
