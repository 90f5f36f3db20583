"""What profiling costs: steps with engine.perf.profiler.Profiler measuring vs steps without, in the same run.

    python bench/profile_overhead.py [--backbone r18] [--world-size 2] [--micro-batch 8] [--pairs 10]
        [--embedding-size 512] [--num-classes 10000] [--warmup 2]

One trainer per rank (engine.train.build.build_trainer, synthetic data, fp32, ZeRO-0) gets a Profiler whose window
spans the whole run. A hook switches profiling on and off between steps in ABBA order: "on" steps run with the
profiler as the trainer's phase timer and its collective counting installed; "off" steps with the trainer's
no-op timer and torch.distributed untouched (--timers-only: collectives are never counted, so the ratio is
the cost of the phase timers alone). Each step's wall time is taken on rank 0 between consecutive
on_step_end calls (steps are synchronous across ranks), and the process CPU seconds of every rank (summed),
which other jobs on a shared host disturb much less. The result is the median of the per-pair ratios on/off
with its inter-quartile range, and the pooled ratio (BENCHMARKS.md policy). The goal: < 3%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(args: argparse.Namespace, out_dir: str, max_steps: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
        "engine": {"model": {"name": args.backbone, "embedding_size": args.embedding_size},
                   "head": {"num_classes": args.num_classes, "sample_rate": 1.0},
                   "data": {"source": "synthetic", "synthetic": "noise"},
                   "optim": {"name": "sgd", "lr": 0.01},
                   "train": {"max_steps": max_steps, "log_every": 10 ** 6, "output_dir": out_dir, "seed": 0},
                   "checkpoint": {"export": False}}}


def rank_main(args: argparse.Namespace, out_dir: str) -> dict:
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.build import build_trainer
    from engine.train.hooks import Hook
    from engine.perf.profiler import Profiler
    from engine.train.trainer import NullPhaseTimer

    # steps: warm-up (off), then pairs in ABBA order: on off | off on | on off ...
    order = []
    for i in range(args.pairs):
        order += ["on", "off"] if i % 2 == 0 else ["off", "on"]
    max_steps = args.warmup + len(order)
    cfg = config.from_dict(_config(args, out_dir, max_steps))
    profiler = Profiler(cfg, start_step=0, num_steps=max_steps, argv=sys.argv)
    null = NullPhaseTimer()
    times = {"on": [], "off": []}
    cpu = {"on": [], "off": []}  # process CPU seconds: less disturbed than wall time by other jobs on the host

    class Switch(Hook):
        """Runs before the profiler's hook; the profiler installs its collective counting when its window opens
        at train start, so the warm-up steps run with it installed (untimed)."""

        def __init__(self):
            self.t_last = self.c_last = 0.0
            self.installed = True

        def on_train_start(self, trainer) -> None:
            trainer.timer = null
            self.t_last, self.c_last = time.perf_counter(), time.process_time()

        def _set(self, trainer, mode: str) -> None:
            trainer.timer = profiler if mode == "on" else null
            want = mode == "on" and not args.timers_only
            if want != self.installed:  # the profiler's own patches, toggled with its timer
                profiler._comm.install() if want else profiler._comm.remove()  # noqa: SLF001
                self.installed = want

        def on_step_end(self, trainer, step: int, loss) -> None:
            now, now_cpu = time.perf_counter(), time.process_time()
            i = step - 1 - args.warmup
            if 0 <= i < len(order):
                times[order[i]].append(now - self.t_last)
                cpu[order[i]].append(now_cpu - self.c_last)
            self._set(trainer, order[i + 1] if -1 <= i < len(order) - 1 else "off")
            self.t_last, self.c_last = time.perf_counter(), time.process_time()

    trainer = build_trainer(cfg, hooks=[Switch()], timer=profiler)
    trainer.train()
    trainer.close()
    return {"rank": dist.get_rank(), "on": times["on"], "off": times["off"], "cpu_on": cpu["on"],
            "cpu_off": cpu["off"], "order": order}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="r18")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=10000)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timers-only", action="store_true",
                        help="'on' steps time the phases but do not count collectives (the timers' cost alone)")
    args = parser.parse_args(argv)
    from engine.runtime.spawn import run_distributed

    with tempfile.TemporaryDirectory() as out:
        results = run_distributed(rank_main, args.world_size, args, out, timeout_s=3600)
    print(f"{args.backbone} emb {args.embedding_size}, {args.num_classes} classes, micro-batch {args.micro_batch}, "
          f"world {args.world_size}, {args.pairs} pairs (ABBA), "
          + ("phase timers only" if args.timers_only else "phase timers + collective counting"))
    record = dict(bench="profile_overhead", backbone=args.backbone, world_size=args.world_size,
                  micro_batch=args.micro_batch, timers_only=args.timers_only, pairs=args.pairs)
    for label, on_key, off_key in (("wall", "on", "off"), ("cpu (all ranks)", "cpu_on", "cpu_off")):
        # wall: rank 0 (steps are synchronous); CPU seconds: summed over the ranks
        on = [sum(r[on_key][i] for r in results) if on_key.startswith("cpu") else results[0][on_key][i]
              for i in range(args.pairs)]
        off = [sum(r[off_key][i] for r in results) if off_key.startswith("cpu") else results[0][off_key][i]
               for i in range(args.pairs)]
        ratios = sorted(a / b for a, b in zip(on, off))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        pooled = sum(on) / sum(off)
        print(f"{label:>16}: off median {1e3 * statistics.median(off):8.1f} ms, on {1e3 * statistics.median(on):8.1f} "
              f"ms; on/off median {statistics.median(ratios):.4f} (IQR {q[0]:.4f}-{q[2]:.4f}), pooled {pooled:.4f}")
        record[label.split()[0]] = dict(median_ratio=statistics.median(ratios), iqr=[q[0], q[2]],
                                        pooled_ratio=pooled, on_s=on, off_s=off)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
