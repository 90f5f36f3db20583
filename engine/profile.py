"""Throughput profiler: where every millisecond and byte of a training step goes, against the hardware's limit.

    python -m engine.profile --config ds_configs/r50.json [--set key.path=value ...] --steps 5 --warmup 2
        [--trace] [--peak-tflops X] [--world-sizes 1,2]
    deepspeed --num_gpus 2 --module engine.profile --config ds_configs/r50.json --steps 5 --warmup 2
    # or in any training run: --set engine.profile.enabled=true [engine.profile.start_step=N num_steps=M trace=true]

It runs the real trainer (engine.train.build.build_trainer with an engine.perf.profiler.Profiler as its phase timer):
`--warmup` steps, then `--steps` profiled steps, then the run's end (final evaluation, checkpoint, export,
timed as "end_of_run_s"). `engine.train.max_steps` becomes warmup + steps (over a recipe's epochs), and the run
starts fresh (`engine.checkpoint.resume=null` unless --set says otherwise); a recipe profiles its dataset's
loading too, `--set engine.data.source=synthetic` the step alone. `--world-sizes 1,2` launches the
same config (same per-rank batch) once per world size through the deepspeed launcher, one after the other,
and compares them. Outputs go to `<engine.train.output_dir>/profile/`:

* profile.json   - the measurements (docs/profile_json.md; checked by engine.perf.report.validate first);
* summary.txt    - one screen: phases over ranks, throughput/MFU, memory vs plan, communication, bottleneck
                   (also logged, and printed by a sweep);
* profile.png    - phase bars per rank and memory bars measured vs planned (sweep: the scaling curve);
* trace_rank<r>.json - with --trace (engine.profile.trace): torch.profiler Chrome trace of the window
                   (open in chrome://tracing or Perfetto); the phases appear as arcscale.<phase> ranges.

The schema of profile.json (kind "run", and kind "sweep" for --world-sizes) is docs/profile_json.md, field
by field; engine.perf.report.validate checks a report against it before it is written.
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
    from engine import config

    # A fresh run (a resumed one may have no steps left to profile), unless --set says otherwise; the window's
    # length wins over the recipe's epochs.
    overrides = ["engine.checkpoint.resume=null"] + args.overrides
    cfg = config.load_or_report(args.config, overrides + [f"engine.train.max_steps={args.warmup + args.steps}"])
    if cfg is None:
        return config.CONFIG_ERROR_EXIT
    from engine.perf.profiler import Profiler
    from engine.train.build import run_job

    return run_job(cfg, make_timer=lambda c: Profiler(c, start_step=args.warmup, num_steps=args.steps,
                                                      trace=args.trace, peak_tflops=args.peak_tflops, argv=argv))


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
    from engine import config

    cfg = config.load_or_report(args.config, args.overrides)
    if cfg is None:
        return config.CONFIG_ERROR_EXIT
    out = Path(cfg.engine.train.output_dir)
    launcher = Path(sys.executable).parent / "deepspeed"
    # The runs start here, as this command did (relative paths in the config and --set mean the same), and
    # import this engine wherever "here" is.
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PATH=f"{launcher.parent}:{os.environ.get('PATH', '')}", PYTHONPATH=pythonpath)
    import torch

    host_load = None
    if not torch.cuda.is_available():
        # Same threads per rank at every size: the sweep measures scaling, not the split of this host's cores.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(sizes)))
        host_load = (os.getloadavg()[0], os.cpu_count() or 1)  # others' work, before ours starts
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
        proc = subprocess.run(cmd, env=env)
        path = run_dir / "profile" / "profile.json"
        if proc.returncode != 0 or not path.is_file():
            print(f"error: the world-size-{w} run failed (exit {proc.returncode}); no {path}", file=sys.stderr)
            return 1
        reports.append(json.loads(path.read_text()))
        paths.append(str(path))
    report = profile_report.build_sweep(reports, paths, argv, host_load=host_load)
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
