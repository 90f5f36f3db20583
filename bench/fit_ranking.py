"""The planner's time model against measurement: predicted step-time order of candidate settings vs measured.

    python bench/fit_ranking.py [--backbone r18] [--micro-batch 8] [--num-classes 10000] [--precision fp32]
        [--settings base,ckpt12,ckptall,fsdp_all,zero3_all_mb2] [--freeze 'conv1.*,bn1.*,prelu.*,layer1.*']
        [--warmup-steps 1] [--steps 2] [--rounds 4] [--json PATH]

One model, one global batch (micro-batch x accumulation x 2 ranks), several settings the search of
`engine.plan --fit` chooses among (SETTINGS: backend and sharding, activation checkpointing, micro-batch x
accumulation). Prediction: the time model of engine.perf.timing calibrated on this machine as the command does
(`timing.calibrate_cpu`: spawned ranks measure a convolution, a copy, tiny ops and an all-reduce), each
setting's step time from `fit.search`'s candidates, so the keys and the arithmetic are the planner's own.
Measurement: 2 ranks spawned (engine.runtime.spawn, gloo, 1 thread each); each builds one trainer per setting
with `engine.train.build.build_trainer` in the same processes (the configs are the base config with
`fit.overrides` applied, as `--write` would write them), runs `--warmup-steps` untimed steps on each, then
`--rounds` rounds of `--steps` steps per setting, the order rotated and reversed from round to round so that a
drift of the machine's load hits every setting alike. The median seconds per step of each setting is its
measured time, in wall time and in the CPU seconds each rank spent (work, not waiting). Verdict: the predicted
order equals the measured order (and Kendall's tau, for how far off); the measured order is the wall-time
order, or the CPU-time order when the 1-minute load average exceeded the CPUs during the run (then wall time
measures the other jobs as much as the step).

The settings ending in `_ft` are a fine-tune: the same setting with `--freeze`'s patterns as engine.model.freeze
(default: IResNet's stem and layer1). For each one whose trained twin runs too, the predicted and the measured
step-time ratio fine-tune / full training are printed (what the time model's count of the backward autograd skips
is for).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORLD = 2
# name -> (label, backend, ZeRO stage, reshard, checkpoint (0: none, k: the first k stages, "all"), micro-batch
# (None: the configured one)); a name ending in "_ft" is the setting without it, with --freeze applied
SETTINGS = {
    "base": ("ZeRO-0, no checkpointing", "deepspeed", 0, True, 0, None),
    "ckpt12": ("ZeRO-0, first 2 stages checkpointed", "deepspeed", 0, True, 2, None),
    "ckptall": ("ZeRO-0, every block checkpointed", "deepspeed", 0, True, "all", None),
    "fsdp_mb2": ("FSDP2 reshard, micro-batch 2", "fsdp", 0, True, 0, 2),
    "zero3_all_mb2": ("ZeRO-3, every block, micro-batch 2", "deepspeed", 3, True, "all", 2),
    "zero3": ("ZeRO-3, no checkpointing", "deepspeed", 3, True, 0, None),
    "fsdp_noreshard": ("FSDP2 no reshard", "fsdp", 0, False, 0, None),
    "fsdp": ("FSDP2 reshard", "fsdp", 0, True, 0, None),
    "zero0_mb2": ("ZeRO-0, micro-batch 2", "deepspeed", 0, True, 0, 2),
    "fsdp_all": ("FSDP2 reshard, every block", "fsdp", 0, True, "all", None),
}
SETTINGS.update({f"{name}_ft": (f"{label}, fine-tune", *rest) for name, (label, *rest) in list(SETTINGS.items())})


def frozen(name: str) -> bool:
    return name.endswith("_ft")


def freeze_override(args: argparse.Namespace) -> str:
    return "engine.model.freeze=" + json.dumps(args.freeze.split(","))


def base_overrides(args: argparse.Namespace, max_steps: int) -> List[str]:
    return [f"engine.model.name={args.backbone}", f"train_micro_batch_size_per_gpu={args.micro_batch}",
            "gradient_accumulation_steps=1", "zero_optimization.stage=0", "engine.model.checkpoint={}",
            "engine.data.source=synthetic", "engine.data.synthetic=noise", f"engine.train.max_steps={max_steps}",
            f"engine.train.log_every={max_steps}", "engine.optim.warmup_steps=0",
            f"engine.head.num_classes={args.num_classes}",
            f"torch_autocast.enabled={'true' if args.precision == 'bf16' else 'false'}",
            "torch_autocast.dtype=bfloat16", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
            "engine.checkpoint.export=false", "engine.eval.targets=[]"]


def settings_for(cfg, names: List[str]):
    """fit.Setting of each name, on `cfg`."""
    from engine.perf import fit, planner

    measure = planner.measure_backbone(cfg.engine.model.name, cfg.engine.model.embedding_size,
                                       tuple(cfg.engine.model.freeze))
    base = fit._setting_of(cfg)
    out = {}
    for name in names:
        _, backend, stage, reshard, ckpt, micro = SETTINGS[name]
        if ckpt == "all":
            checkpoint: Any = "all"
        else:
            stages = list(measure.units)[:ckpt]  # the search's least-memory segment count for each
            checkpoint = tuple(sorted((s, fit._best_segments(measure, s)) for s in stages))
        images = base.micro_batch * base.accumulation
        m = micro or base.micro_batch
        out[name] = fit.Setting(backend=backend, zero_stage=stage, reshard=reshard, cpu_offload=False,
                                checkpoint=checkpoint, micro_batch=m, accumulation=images // m,
                                head_dtype=base.head_dtype, head_offload=base.head_offload, chunk_size=base.chunk_size)
    return out


def predict(args: argparse.Namespace, names: List[str]) -> Dict[str, Any]:
    """The planner's predicted step time of each setting, on this machine calibrated as engine.plan does."""
    from engine.config import schema as config
    from engine.perf import fit, timing

    hw, out = None, {}
    for fine_tune in (False, True):
        group = [n for n in names if frozen(n) == fine_tune]
        if not group:
            continue
        cfg = config.load(ROOT / "ds_configs" / "r50.json",
                          base_overrides(args, 10) + ([freeze_override(args)] if fine_tune else []))
        hw = hw or timing.calibrate_cpu(cfg.precision, WORLD)
        result = fit.search(cfg, WORLD, 1024.0, hw, device="cpu")
        by_setting = {c.setting: c for c in result.fits}
        for name, s in settings_for(cfg, group).items():
            cand = by_setting[s]
            out[name] = {"predicted_s": cand.time.total,
                         "parts": {k: round(v, 4) for k, v in cand.time.parts().items()},
                         "overrides": fit.overrides(cfg, s) + ([freeze_override(args)] if fine_tune else []),
                         "predicted_gib": cand.mem_bytes / 2 ** 30}
    return {"hardware": hw.source, "settings": out}


def measure_rank(args_dict: Dict[str, Any], names: List[str], overrides: Dict[str, List[str]],
                 out_dir: str) -> Dict[str, Any]:
    """One rank: a trainer per setting in this process, warm-up, then rotated rounds of timed steps."""
    import torch

    import backends  # bench/backends.py: the build with each backend's mmap policy, timed steps between barriers
    from engine.runtime import dist

    args = argparse.Namespace(**args_dict)
    device = dist.init()
    max_steps = args.warmup_steps + args.rounds * args.steps + 1
    recipe = str(ROOT / "ds_configs" / "r50.json")
    built = {n: backends._build(recipe, base_overrides(args, max_steps) + overrides[n]
                                + [f"engine.train.output_dir={out_dir}/{n}"], None) for n in names}
    trainers = {n: t for n, (t, _) in built.items()}
    try:
        for n in names:
            backends._apply_mmap_threshold(built[n][1])
            backends._timed_steps(trainers[n], args.warmup_steps)
        segments = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in (order if r % 2 == 0 else order[::-1]):
                backends._apply_mmap_threshold(built[n][1])
                wall, cpu = backends._timed_steps(trainers[n], args.steps)
                segments.append({"setting": n, "round": r, "s_per_step": wall / args.steps,
                                 "cpu_s_per_step": cpu / args.steps / WORLD, "loadavg_1m": os.getloadavg()[0]})
    finally:
        for t in trainers.values():
            t.close()
    return {"segments": segments, "threads_per_rank": torch.get_num_threads(), "device": str(device)}


def kendall_tau(a: List[str], b: List[str]) -> float:
    """Kendall's tau between two orders of the same items (1: identical, -1: reversed)."""
    pos = {x: i for i, x in enumerate(b)}
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if pos[a[i]] < pos[a[j]] else -1
    return s / (n * (n - 1) / 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="r18")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=10000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--settings", default="base,ckpt12,ckptall,fsdp_all,zero3_all_mb2",
                   help=f"comma-separated, >= 4 of {list(SETTINGS)}")
    p.add_argument("--freeze", default="conv1.*,bn1.*,prelu.*,layer1.*",
                   help="engine.model.freeze of the *_ft settings, comma-separated patterns")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per timed segment")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--timeout", type=float, default=5400.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown or len(set(names)) < 4:
        p.error(f"--settings: expected >= 4 distinct of {list(SETTINGS)}, got {names}")
    if min(args.micro_batch, args.steps, args.warmup_steps, args.rounds) < 1:
        p.error("--micro-batch, --steps, --warmup-steps and --rounds must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.perf import hardware
    from engine.runtime.spawn import run_distributed

    names = args.settings.split(",")
    t0 = time.perf_counter()
    head = {"bench": "fit_ranking", "argv": sys.argv[1:], "cpu": hardware.cpu_description(),
            "loadavg_start": os.getloadavg()}
    print(json.dumps(head), flush=True)
    pred = predict(args, names)
    print(f"time model: {pred['hardware']}", flush=True)
    overrides = {n: pred["settings"][n]["overrides"] for n in names}
    with tempfile.TemporaryDirectory(prefix="arcscale_ranking_") as tmp:
        (result,) = run_distributed(measure_rank, WORLD, vars(args), names, overrides, tmp,
                                    timeout_s=args.timeout)[:1]
    rows = []
    for n in names:
        times = [s["s_per_step"] for s in result["segments"] if s["setting"] == n]
        q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
        rows.append({"setting": n, "label": SETTINGS[n][0], "predicted_s": round(pred["settings"][n]["predicted_s"], 3),
                     "measured_s_median": round(statistics.median(times), 3),
                     "measured_iqr": [round(q[0], 3), round(q[2], 3)],
                     "cpu_s_median": round(statistics.median(s["cpu_s_per_step"] for s in result["segments"]
                                                             if s["setting"] == n), 3),
                     "predicted_gib": round(pred["settings"][n]["predicted_gib"], 2),
                     "predicted_parts": pred["settings"][n]["parts"],
                     "overrides": pred["settings"][n]["overrides"]})
    predicted_order = [r["setting"] for r in sorted(rows, key=lambda r: r["predicted_s"])]
    wall_order = [r["setting"] for r in sorted(rows, key=lambda r: r["measured_s_median"])]
    cpu_order = [r["setting"] for r in sorted(rows, key=lambda r: r["cpu_s_median"])]
    loads = [s["loadavg_1m"] for s in result["segments"]]
    # With more runnable processes than cores, wall time measures the other jobs' share of the cores as much as
    # the step: the order is then read from the CPU seconds each rank spent per step (work, not waiting).
    shared = max(loads) > (os.cpu_count() or 1)
    measured_order = cpu_order if shared else wall_order
    print(f"\n== {args.backbone} {args.precision}, micro-batch {args.micro_batch} x {WORLD} ranks x "
          f"{result['threads_per_rank']} thread(s), {args.num_classes} classes; {args.rounds} rounds x {args.steps} "
          f"steps per setting")
    print(f"{'setting':<40}{'predicted s':>12}{'wall s (IQR)':>26}{'CPU s':>8}{'pred.':>6}{'wall':>5}{'CPU':>5}")
    for r in rows:
        print(f"{r['label']:<40}{r['predicted_s']:>12.3f}{r['measured_s_median']:>12.3f} "
              f"({r['measured_iqr'][0]:.3f}-{r['measured_iqr'][1]:.3f}){r['cpu_s_median']:>8.3f}"
              f"{predicted_order.index(r['setting']) + 1:>6}{wall_order.index(r['setting']) + 1:>5}"
              f"{cpu_order.index(r['setting']) + 1:>5}")
    tau = kendall_tau(predicted_order, measured_order)
    same = predicted_order == measured_order
    print(f"order: predicted {predicted_order}\n       wall      {wall_order}\n       CPU       {cpu_order}\n"
          f"1-min load {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} CPUs: the measured order is the "
          f"{'CPU seconds (the host is shared)' if shared else 'wall time'}; same order: {'yes' if same else 'NO'}; "
          f"Kendall tau {tau:.2f}")
    by_name = {r["setting"]: r for r in rows}
    ratios = {}
    for n in names:
        twin = by_name.get(n[:-len("_ft")]) if frozen(n) else None
        if twin is not None:
            r = by_name[n]
            ratios[n] = {"predicted": round(r["predicted_s"] / twin["predicted_s"], 3),
                         "wall": round(r["measured_s_median"] / twin["measured_s_median"], 3),
                         "cpu": round(r["cpu_s_median"] / twin["cpu_s_median"], 3)}
            print(f"fine-tune / full, {twin['label']}: predicted {ratios[n]['predicted']:.3f}, measured wall "
                  f"{ratios[n]['wall']:.3f}, CPU {ratios[n]['cpu']:.3f}")
    out = dict(head, hardware=pred["hardware"], rows=rows, predicted_order=predicted_order, wall_order=wall_order,
               cpu_order=cpu_order, measured_by="cpu" if shared else "wall", measured_order=measured_order,
               same_order=same, kendall_tau=tau, fine_tune_ratios=ratios, segments=result["segments"],
               total_seconds=round(time.perf_counter() - t0, 1), loadavg_end=os.getloadavg())
    print(json.dumps({k: v for k, v in out.items() if k != "segments"}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
