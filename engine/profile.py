"""Throughput profiler: where every millisecond and byte of a training step goes, against the hardware's limit.

    python -m engine.profile --config ds_configs/r50.json [--set key.path=value ...] --steps 5 --warmup 2
        [--trace] [--peak-tflops X] [--world-sizes 1,2]
    deepspeed --num_gpus 2 --module engine.profile --config ds_configs/r50.json --steps 5 --warmup 2
    # or in any training run: --set engine.profile.enabled=true [engine.profile.start_step=N num_steps=M trace=true]

It runs the real trainer (engine.train.build.build_trainer with an engine.perf.profiler.Profiler as its phase timer):
`--warmup` steps, then `--steps` profiled steps, then the run's end (final evaluation, checkpoint, export,
timed as "end_of_run_s"). `engine.train.max_steps` becomes warmup + steps. `--world-sizes 1,2` launches the
same config (same per-rank batch) once per world size through the deepspeed launcher, one after the other,
and compares them. Outputs go to `<engine.train.output_dir>/profile/`:

* profile.json   - the schema below (checked by engine.perf.report.validate before it is written);
* summary.txt    - one screen: phases over ranks, throughput/MFU, memory vs plan, communication, bottleneck
                   (also printed by rank 0);
* profile.png    - phase bars per rank and memory bars measured vs planned (sweep: the scaling curve);
* trace_rank<r>.json - with --trace (engine.profile.trace): torch.profiler Chrome trace of the window
                   (open in chrome://tracing or Perfetto); the phases appear as arcscale.<phase> ranges.

profile.json, schema "arcscale.profile" version 1, kind "run" (all times in seconds, bytes in bytes):

    schema, version, kind ("run"), created (ISO time), argv [str], config_digest
    run: backbone, embedding_size, num_classes, sample_rate, world_size, micro_batch,
         gradient_accumulation_steps, global_batch, precision (bf16|fp16|fp32), zero_stage, backend,
         checkpointing, device, device_name, threads_per_rank [int], timer (perf_counter|cuda_events),
         steps [optimizer step numbers in the window]
    phases: names [data, h2d, forward, head, backward, backbone_step, head_step, log, eval, checkpoint, other]
        summary: {phase: {min, median, max, max_rank, share, cpu_median}}  mean seconds per step of each
                 rank, over ranks; share = median / median step time; cpu_median: the same in process CPU
                 seconds (all threads of the rank; a shared host disturbs it less than wall time). "other" =
                 step time no phase covers.
        per_rank: [{rank, step_s [per step], phases_s {phase: [per step]}, cpu_step_s, phases_cpu_s,
                    other_comm_s (mean seconds per step in collectives issued between phases)}]
        A step runs from the end of the previous step's hooks to the end of its own hooks, so steps tile the
        wall clock and the phases plus "other" add up to it exactly.
    step: {min, median, max, max_rank, cpu_median}  mean step time over ranks
    straggler: {rank, busy_s_by_rank, spread, named}  busy = step time minus time inside collectives (a rank
        that waits for a slower one waits inside a collective); the straggler is the busiest rank, named when
        spread = (max busy - min busy) / step >= 0.15
    throughput: {samples_per_s (global), samples_per_s_per_rank, step_time_s, num_steps}
    flops (per sample, from engine.plan's counts of conv/linear MACs): forward_per_sample (2 x MACs),
        backward_per_sample (2 x forward), recompute_per_sample (checkpointed blocks' forward again),
        head_per_sample, model_per_sample (3 x forward + head), hardware_per_sample (model + recompute; equals
        engine.plan's train_flops_per_image), source
    utilisation: {peak_tflops_per_rank, peak_tflops_by_rank, peak_source ("given", "table: H100 bf16", or
        "measured: <dtype> matmul ..." on a CPU), achieved_model_tflops_per_rank,
        achieved_hardware_tflops_per_rank, mfu, hfu}  (mfu/hfu null when no peak is known)
    memory: {kind (cuda_max_allocated | rss_vmhwm_window | rss_peak_process), per_rank: [{rank, peak_bytes,
        rows: [{name, measured_bytes, planned_bytes, error_pct, how}]}]}  planned = engine.plan's rows for
        this config and world size; error_pct = 100 (measured - planned) / planned; `how` says how each
        measured value is obtained
    communication: {per_step: [{key (owner.op), owner (head|backbone|hooks|trainer|other), op, site
        (file:function of our code that issued it), phases ("none": issued between phases), calls_per_step,
        bytes_per_step, bus_bytes_per_step, seconds_per_step (null: async)}], rank,
        bytes_per_step, seconds_per_step_by_rank, step_seconds_per_step_by_rank (without those issued by the
        hooks: logging, evaluation, checkpoints), time_note}  bytes = the collective's full result (all-gather:
        world x input; all-reduce, broadcast: the tensor; reduce-scatter: the input); bus bytes = what each rank
        sends in a ring (all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n of it)
    end_of_run_s: {log, eval, checkpoint}  the hooks' end-of-run work (final evaluation, checkpoint, export)
    bottleneck: {kind (data|communication|compute|host|eval/checkpoint), share, rank, text}
    summary_text, trace_files [paths], files {json, summary, png}

kind "sweep" (--world-sizes): schema, version, kind, created, argv, world_sizes, runs: [{world_size,
    samples_per_s, step_time_s, cpu_step_s (process CPU seconds per step, median rank), efficiency (samples/s
    over linear scaling of the smallest size), phases_s {phase: median s}, lost_s_by_phase {phase: s more per
    step than the smallest size}, comm_bytes_per_step, bottleneck, profile (that run's profile.json)}],
    summary_text
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config, e.g. ds_configs/r50.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--steps", type=int, default=5, help="profiled optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the window (default 2)")
    parser.add_argument("--trace", action="store_true", help="also write a torch.profiler Chrome trace")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak per rank at the run's precision (default: GPU table, or measured)")
    parser.add_argument("--world-sizes", default=None, help="sweep, e.g. 1,2 (CPU) or 1,2,4,8 (GPUs)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def profile_once(args: argparse.Namespace, argv: List[str]) -> int:
    """Profile on the ranks this process belongs to (launched by deepspeed/torchrun, or a world of one)."""
    from engine.config import schema as config

    overrides = args.overrides + [f"engine.train.max_steps={args.warmup + args.steps}"]
    try:
        cfg = config.load(args.config, overrides)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from engine.train.build import run_job
    from engine.perf.profiler import Profiler

    return run_job(cfg, make_timer=lambda c: Profiler(c, start_step=args.warmup, num_steps=args.steps,
                                                      trace=args.trace, peak_tflops=args.peak_tflops, argv=argv))


def _output_dir(args: argparse.Namespace) -> Path:
    from engine.config import schema as config

    return Path(config.load(args.config, args.overrides).engine.train.output_dir)


def sweep(args: argparse.Namespace, argv: List[str]) -> int:
    """Launch the profile at each world size through the deepspeed launcher, then compare them."""
    from engine.perf import report as profile_report
    from engine.runtime.dist import find_free_port

    try:
        sizes = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(w < 1 for w in sizes) or sizes != sorted(set(sizes)):
        print(f"error: --world-sizes: expected increasing integers >= 1 like 1,2, got {args.world_sizes!r}",
              file=sys.stderr)
        return 2
    out = _output_dir(args)
    launcher = Path(sys.executable).parent / "deepspeed"
    env = dict(os.environ, PATH=f"{launcher.parent}:{os.environ.get('PATH', '')}")
    import torch

    if not torch.cuda.is_available():
        # Same threads per rank at every size: the sweep measures scaling, not the split of this host's cores.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(sizes)))
    reports, paths = [], []
    for w in sizes:
        run_dir = out / f"world{w}"
        cmd = [str(launcher if launcher.exists() else "deepspeed"), "--num_gpus", str(w), "--master_port",
               str(find_free_port()), "--module", "engine.profile", "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        for o in args.overrides + [f"engine.train.output_dir={run_dir}"]:
            cmd += ["--set", o]
        if args.trace:
            cmd.append("--trace")
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        print(f"profile: world size {w}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        path = run_dir / "profile" / "profile.json"
        if proc.returncode != 0 or not path.is_file():
            print(f"error: the world-size-{w} run failed (exit {proc.returncode}); no {path}", file=sys.stderr)
            return 1
        reports.append(json.loads(path.read_text()))
        paths.append(str(path))
    report = profile_report.build_sweep(reports, paths, argv)
    profile_report.write_outputs(report, out / "profile")
    print(report["summary_text"], flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    raw = list(sys.argv if argv is None else ["engine.profile"] + list(argv))
    args = parse_args(raw[1:])
    if args.world_sizes:
        return sweep(args, raw)
    return profile_once(args, raw)


if __name__ == "__main__":
    sys.exit(main())
