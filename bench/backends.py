"""FSDP2 vs DeepSpeed: the same model, batch and precision, interleaved in one run.

    python bench/backends.py [--backbone r50] [--pairs zero3,zero2,zero0] [--precision fp32|bf16]
        [--micro-batch 4] [--steps 1] [--warmup-steps 2] [--rounds 8] [--num-classes 1000]
        [--memory-steps 3] [--no-memory] [--no-speed] [--set KEY.PATH=VALUE ...] [--json PATH]
    python bench/backends.py --r2060 [--micro-batch 2] [--memory-steps 2]   # r2060 ZeRO-3 vs FSDP2, fp32

Pairs (DeepSpeed side vs FSDP2 side, `engine.train.backend` deepspeed vs fsdp):

    zero3   ZeRO-3                        vs  reshard_after_forward=true   parameters, gradients and optimizer
                                                                           state sharded; each block gathered in
                                                                           forward and again in backward
    zero2   ZeRO-2                        vs  reshard_after_forward=false  gradients and optimizer state sharded;
                                                                           parameters gathered once per step and
                                                                           kept to the backward
    zero0   ZeRO-0 (DeepSpeed's DDP:      vs  hybrid=true on a 2 x 1 mesh  "plain DDP-like": HSDP with one rank
            every rank holds everything,      (LOCAL_WORLD_SIZE=1: each     per shard group shards nothing; the
            gradients all-reduced)            rank its own "node"),         replicas all-reduce the gradients,
                                              reshard_after_forward=false   every rank holds the whole model and
                                                                            optimizer, as DDP (torch's DDP itself
                                                                            is not behind the backend seam)

Both sides come from the same recipe (ds_configs/<backbone>.json, else r50.json) with the same overrides:
synthetic noise data, micro-batch, precision (fp32, or bf16: `torch_autocast` under DeepSpeed, FSDP's bf16
MixedPrecisionPolicy under fsdp), gradient clipping, optimizer, LR schedule, class count, seed. The DeepSpeed
side sets `zero_optimization.stage`; the FSDP side sets `engine.train.backend=fsdp` and its `engine.fsdp`
settings, and empties the recipe's DeepSpeed-only sections (`zero_optimization` to {"stage": 0}, a DeepSpeed
`activation_checkpointing` section to {}; `engine.model.checkpoint` stays). Nothing else differs.

Speed: 2 ranks are spawned (engine.runtime.spawn, gloo, one thread per rank); each builds both trainers with
`engine.train.build.build_trainer` in the same processes, runs `--warmup-steps` untimed steps on each, then
`--rounds` pairs of segments of `--steps` optimizer steps (`Trainer.train_step`), in ABBA order (D F | F D | ...)
so that drift hits both sides; each side's segments run with the glibc mmap threshold its own backend's build
sets (process-wide, so re-applied per segment). Segments are bracketed by barriers; samples/s is global. Figure of merit: the
ratio fsdp / deepspeed per pair, median with IQR (as bench/overhead.py), pooled ratio, and the CPU-time view
(all ranks' CPU seconds for the same samples). Goal: fsdp within 5% of the faster backend.

Memory: one side at a time, through the `deepspeed` launcher and run.py as a user runs it (peak RSS is a
process's high-water mark, so the two sides cannot share processes here): `--memory-steps` steps, each rank's
peak RSS from summary.json (ru_maxrss on the CPU) against `engine.plan`'s prediction for that config, and the
step times from metrics.jsonl. `--r2060` runs only this, for ZeRO-3 vs reshard_after_forward=true on
ds_configs/r2060.json, micro-batch 2, 2 steps, SGD without momentum, fp32, the recipes' activation
checkpointing, 1,000 classes, as tests/launch/test_r2060.py's runs: one backend after the other, never both at
once, and not at all when the machine's available memory is below twice the planner's prediction (`--force`
runs anyway). The speed figures of --r2060 are single steps of sequential runs, not interleaved.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2 ** 30
WORLD = 2
# name -> (DeepSpeed overrides, FSDP overrides, LOCAL_WORLD_SIZE for the FSDP side or None)
PAIRS: Dict[str, Tuple[List[str], List[str], Optional[int]]] = {
    "zero3": (["zero_optimization.stage=3"],
              ["engine.fsdp.reshard_after_forward=true", "engine.fsdp.hybrid=false"], None),
    "zero2": (["zero_optimization.stage=2"],
              ["engine.fsdp.reshard_after_forward=false", "engine.fsdp.hybrid=false"], None),
    "zero0": (["zero_optimization.stage=0"],
              ["engine.fsdp.reshard_after_forward=false", "engine.fsdp.hybrid=true"], 1),
}
FSDP_BASE = ["engine.train.backend=fsdp", "engine.fsdp.cpu_offload=false"]


def recipe_for(backbone: str) -> Path:
    path = ROOT / "ds_configs" / f"{backbone}.json"
    return path if path.is_file() else ROOT / "ds_configs" / "r50.json"


def common_overrides(args: argparse.Namespace, max_steps: int) -> List[str]:
    """What both sides share: model, data, batch, precision, schedule, head size, no side work."""
    out = [
        f"engine.model.name={args.backbone}", f"train_micro_batch_size_per_gpu={args.micro_batch}",
        "gradient_accumulation_steps=1", "engine.data.source=synthetic", "engine.data.synthetic=noise",
        f"engine.train.max_steps={max_steps}", f"engine.train.log_every={max(1, max_steps)}",
        "engine.optim.warmup_steps=0", f"engine.head.num_classes={args.num_classes}",
        f"torch_autocast.enabled={'true' if args.precision == 'bf16' else 'false'}",
        "torch_autocast.dtype=bfloat16", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
        "engine.checkpoint.export=false", "engine.eval.targets=[]",
    ]
    return out + list(args.overrides)


def side_overrides(pair: str, side: str, recipe: str) -> List[str]:
    """The side's own settings. The fsdp side runs the same DeepSpeed recipe with its DeepSpeed-only sections
    emptied (engine.config refuses them under fsdp): `zero_optimization` becomes {"stage": 0} and a DeepSpeed
    `activation_checkpointing` section {} (engine.model.checkpoint, which both backends read, stays)."""
    ds, fs, _ = PAIRS[pair]
    if side == "deepspeed":
        return list(ds)
    raw = json.loads(Path(recipe).read_text())
    emptied = ['zero_optimization={"stage":0}'] + (["activation_checkpointing={}"]
                                                   if "activation_checkpointing" in raw else [])
    return FSDP_BASE + emptied + list(fs)


def side_label(pair: str, side: str) -> str:
    if side == "deepspeed":
        return f"ZeRO-{PAIRS[pair][0][0].split('=')[1]}"
    fs = dict(o.split("=", 1) for o in PAIRS[pair][1])
    label = f"fsdp reshard={fs['engine.fsdp.reshard_after_forward']}"
    return label + (" hybrid 2x1" if fs["engine.fsdp.hybrid"] == "true" else "")


def _sync(device) -> None:
    import torch

    from engine.runtime import dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _sum_over_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t.item())


def _build(recipe: str, overrides: List[str], local_world_size: Optional[int]):
    """A trainer for one side, and the glibc mmap threshold its backend leaves the process with (None: unset).

    LOCAL_WORLD_SIZE is set for the build only (FSDP's hybrid mesh reads it). The threshold is process-wide and
    each backend's build sets its own (engine.parallel.freed_host_memory_returned: "lean" for DeepSpeed ZeRO-3
    on the CPU); the interleaved run re-applies each side's before its segments, as its own process would have.
    """
    from engine.config import schema as config
    from engine.parallel import common as parallel
    from engine.train.build import build_trainer

    cfg = config.load(recipe, overrides)
    saved = os.environ.get("LOCAL_WORLD_SIZE")
    original, policy = parallel.freed_host_memory_returned, []

    @contextlib.contextmanager
    def recorded(lean_after: bool = False):
        with original(lean_after=lean_after):
            yield
        policy.append(parallel._SET_UP_MMAP_THRESHOLD if lean_after else parallel._TRAIN_MMAP_THRESHOLD)

    parallel.freed_host_memory_returned = recorded
    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    try:
        trainer = build_trainer(cfg)
    finally:
        parallel.freed_host_memory_returned = original
        if saved is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved
    trainer.backbone.train()
    trainer.head.train()
    return trainer, (policy[-1] if policy else None)


def _apply_mmap_threshold(value: Optional[int]) -> None:
    if value is None:
        return
    import ctypes

    from engine.parallel import common as parallel

    try:
        ctypes.CDLL("libc.so.6").mallopt(parallel._M_MMAP_THRESHOLD, value)
    except (OSError, AttributeError):  # not glibc: nothing was set at build either
        pass


def _timed_steps(trainer, num_steps: int) -> Tuple[float, float]:
    """Wall seconds and all ranks' CPU seconds of `num_steps` optimizer steps, between barriers."""
    import time as _t

    _sync(trainer.device)
    t0, c0 = _t.perf_counter(), _t.process_time()
    for _ in range(num_steps):
        loss = trainer.train_step()
    float(loss)  # the step's result reaches the host, as the logger reads it
    _sync(trainer.device)
    wall = _t.perf_counter() - t0
    return wall, _sum_over_ranks(_t.process_time() - c0, trainer.device)


def speed_rank(recipe: str, common: List[str], pair: str, warmup: int, rounds: int, steps: int,
               out_dir: str) -> Dict[str, Any]:
    """One rank of the interleaved run: both trainers built here, ABBA segments of `steps` steps each."""
    import torch

    from engine.runtime import dist

    device = dist.init()
    built = {side: _build(recipe, common + side_overrides(pair, side, recipe)
                          + [f"engine.train.output_dir={out_dir}/{side}"],
                          PAIRS[pair][2] if side == "fsdp" else None)
             for side in ("deepspeed", "fsdp")}
    trainers = {side: t for side, (t, _) in built.items()}
    try:
        for side in ("deepspeed", "fsdp"):
            _apply_mmap_threshold(built[side][1])
            _timed_steps(trainers[side], warmup)
        segments = []
        for r in range(rounds):
            for side in (("deepspeed", "fsdp") if r % 2 == 0 else ("fsdp", "deepspeed")):
                t = trainers[side]
                _apply_mmap_threshold(built[side][1])
                wall, cpu = _timed_steps(t, steps)
                segments.append({"side": side, "round": r, "seconds": wall, "cpu_seconds": cpu,
                                 "samples_per_sec": steps * t.global_batch_size / wall,
                                 "loadavg_1m": os.getloadavg()[0]})
        global_batch = trainers["fsdp"].global_batch_size
    finally:
        for t in trainers.values():
            t.close()
    return {"segments": segments, "global_batch_size": global_batch, "threads_per_rank": torch.get_num_threads(),
            "device": str(device), "mmap_threshold": {side: v for side, (_, v) in built.items()}}


class RssSampler:
    """Samples the RSS of this process's children twice a second: a peak is there even when a rank is killed for
    memory before it can report its own."""

    def __init__(self):
        import psutil

        self._root, self.peak, self._stop = psutil.Process(), {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            try:
                children = self._root.children(recursive=True)
            except psutil.Error:
                continue
            for c in children:
                try:
                    self.peak[c.pid] = max(self.peak.get(c.pid, 0), c.memory_info().rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int) -> List[float]:
        return sorted((b / GiB for b in self.peak.values()), reverse=True)[:n]


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

def _quartiles(values: List[float]) -> List[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def summarise_speed(result: Dict[str, Any], pair: str, args: argparse.Namespace) -> Dict[str, Any]:
    segs = result["segments"]
    by_round: Dict[int, Dict[str, Dict[str, float]]] = {}
    for s in segs:
        by_round.setdefault(s["round"], {})[s["side"]] = s
    rounds = [by_round[r] for r in sorted(by_round)]
    ratios = [r["fsdp"]["samples_per_sec"] / r["deepspeed"]["samples_per_sec"] for r in rounds]
    cpu = [r["deepspeed"]["cpu_seconds"] / r["fsdp"]["cpu_seconds"] for r in rounds]
    total = {side: sum(s["seconds"] for s in segs if s["side"] == side) for side in ("deepspeed", "fsdp")}
    sps = {side: [round(s["samples_per_sec"], 3) for s in segs if s["side"] == side] for side in total}
    loads = [s["loadavg_1m"] for s in segs]
    return {
        "pair": pair, "deepspeed": side_label(pair, "deepspeed"), "fsdp": side_label(pair, "fsdp"),
        "deepspeed_samples_per_sec_median": round(statistics.median(sps["deepspeed"]), 3),
        "fsdp_samples_per_sec_median": round(statistics.median(sps["fsdp"]), 3),
        "ratio_per_pair": [round(x, 4) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_iqr": [round(q, 4) for q in _quartiles(ratios)],
        "ratio_pooled": round(total["deepspeed"] / total["fsdp"], 4),
        "cpu_time_ratio_median": round(statistics.median(cpu), 4),
        "loadavg_1m": [round(min(loads), 2), round(max(loads), 2)],
        "global_batch_size": result["global_batch_size"], "threads_per_rank": result["threads_per_rank"],
        "mmap_threshold": result.get("mmap_threshold"),
    }


def run_speed(args: argparse.Namespace, pair: str) -> Dict[str, Any]:
    from engine.runtime.spawn import run_distributed

    max_steps = args.warmup_steps + args.rounds * args.steps
    common = common_overrides(args, max_steps)
    with tempfile.TemporaryDirectory(prefix="arcscale_backends_") as tmp:
        (result,) = run_distributed(speed_rank, WORLD, str(recipe_for(args.backbone)), common, pair,
                                    args.warmup_steps, args.rounds, args.steps, tmp, timeout_s=args.timeout)[:1]
    s = summarise_speed(result, pair, args)
    s["fsdp_vs_faster"] = min(1.0, s["ratio_median"])  # the goal: >= 0.95
    print(f"   speed {s['fsdp']} / {s['deepspeed']}: median {s['ratio_median']:.3f} (IQR {s['ratio_iqr'][0]:.3f}.."
          f"{s['ratio_iqr'][1]:.3f}), pooled {s['ratio_pooled']:.3f}; CPU-time ratio {s['cpu_time_ratio_median']:.3f}; "
          f"samples/s {s['deepspeed_samples_per_sec_median']:.2f} vs {s['fsdp_samples_per_sec_median']:.2f} "
          f"[{'OK' if s['ratio_median'] >= 0.95 else 'BELOW'} goal: fsdp >= 0.95 x the faster]; load "
          f"{s['loadavg_1m'][0]:.1f}..{s['loadavg_1m'][1]:.1f}", flush=True)
    return s


def predicted_bytes(recipe: str, overrides: List[str], local_world_size: Optional[int]) -> float:
    from engine.config import schema as config
    from engine.perf import planner as plan

    cfg = config.load(recipe, overrides)
    return plan.plan(cfg, WORLD, device="cpu", ranks_per_node=local_world_size).total_bytes


def run_memory(args: argparse.Namespace, pair: str, side: str, recipe: str, common: List[str]) -> Dict[str, Any]:
    """One side alone through the `deepspeed` launcher and run.py (what a user runs): each rank's peak RSS from
    summary.json (ru_maxrss), the step times from metrics.jsonl, and the planner's prediction for the config."""
    from engine.runtime.dist import find_free_port

    lws = PAIRS[pair][2] if side == "fsdp" else None
    launcher = Path(sys.executable).parent / "deepspeed"
    out_dir = Path(tempfile.mkdtemp(prefix=f"arcscale_backends_{pair}_{side}_"))
    overrides = common + side_overrides(pair, side, recipe) + ["engine.train.log_every=1",
                                                       f"engine.train.output_dir={out_dir / 'run'}"]
    predicted = predicted_bytes(recipe, overrides, lws)
    cmd = [str(launcher), "--num_gpus", str(WORLD), "--master_port", str(find_free_port()), "run.py",
           "--config", recipe]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PATH": f"{launcher.parent}:{os.environ['PATH']}"}
    if lws is not None:
        env["LOCAL_WORLD_SIZE"] = str(lws)  # FSDP's hybrid mesh reads it before DeepSpeed's LOCAL_SIZE
    row: Dict[str, Any] = {"pair": pair, "side": side, "label": side_label(pair, side), "recipe": recipe,
                           "command": " ".join(cmd), "predicted_gib": round(predicted / GiB, 3)}
    t0 = time.perf_counter()
    with open(out_dir / "launcher.log", "w") as log, RssSampler() as sampler:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    row.update(wall_s=round(time.perf_counter() - t0, 1),
               sampled_peak_rss_gib=[round(x, 2) for x in sampler.top(WORLD)])
    summary_path = out_dir / "run" / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        tail = (out_dir / "launcher.log").read_text(errors="replace").splitlines()[-30:]
        row.update(ok=False, returncode=proc.returncode, log=str(out_dir / "launcher.log"), tail=tail)
        print(f"   memory {row['label']}: FAILED (rc {proc.returncode}); sampled peaks {row['sampled_peak_rss_gib']} "
              f"GiB; log {row['log']}", flush=True)
        return row
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    gb = summary["global_batch_size"]
    peaks = summary["peak_memory_bytes_per_rank"]
    row.update(ok=True, peak_rss_gib_per_rank=[round(b / GiB, 3) for b in peaks],
               plan_error=round(predicted / max(peaks) - 1, 4),
               step_seconds=[round(gb / m["samples_per_sec"], 2) for m in metrics if m.get("samples_per_sec")],
               losses=[round(m["loss"], 4) for m in metrics if "loss" in m], global_batch_size=gb,
               run_wall_time_s=round(summary["wall_time_s"], 1))
    print(f"   memory {row['label']}: peak RSS per rank {row['peak_rss_gib_per_rank']} GiB, plan "
          f"{row['predicted_gib']:.2f} GiB ({100 * row['plan_error']:+.1f}%); step s {row['step_seconds']}; "
          f"losses {row['losses']}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return row


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GiB
    return float("nan")


def run_r2060(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """ZeRO-3 vs reshard_after_forward=true on r2060, one backend after the other (never both at once)."""
    recipe = str(ROOT / "ds_configs" / "r2060.json")
    common = [f"train_micro_batch_size_per_gpu={args.micro_batch}", "gradient_accumulation_steps=1",
              "engine.data.source=synthetic", "engine.data.synthetic=noise",
              f"engine.train.max_steps={args.memory_steps}", "engine.train.log_every=1",
              "engine.head.num_classes=1000", "engine.optim.momentum=0.0", "torch_autocast.enabled=false",
              "engine.checkpoint.every=0", "engine.checkpoint.export=false"] + list(args.overrides)
    sides = args.sides.split(",")
    rows = []
    for side in sides:
        overrides = common + side_overrides("zero3", side, recipe)
        need = 2 * predicted_bytes(recipe, overrides, None) / GiB  # the planner over-predicts ZeRO-3 ~15%
        have = available_gib()
        if have < need and not args.force:
            print(f"   r2060 {side_label('zero3', side)}: NOT RUN: {have:.1f} GiB available, the planner needs "
                  f"{need:.1f} GiB for 2 ranks; --force runs it anyway", flush=True)
            rows.append({"pair": "zero3", "side": side, "label": side_label("zero3", side), "ok": False,
                         "skipped": f"{have:.1f} GiB available < {need:.1f} GiB"})
            continue
        rows.append(run_memory(args, "zero3", side, recipe, common))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="r50")
    p.add_argument("--pairs", default="zero3,zero2,zero0", help=f"comma-separated, of {list(PAIRS)}")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=None, help="per rank (default 4; --r2060: 2)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed segment")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--rounds", type=int, default=8, help="deepspeed/fsdp segment pairs (order alternates)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--memory-steps", type=int, default=None, help="steps of each memory run (default 3; --r2060: 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the one-side-at-a-time memory runs")
    p.add_argument("--no-speed", action="store_true", help="skip the interleaved speed runs")
    p.add_argument("--r2060", action="store_true", help="r2060 ZeRO-3 vs fsdp memory and step time instead")
    p.add_argument("--force", action="store_true", help="--r2060 even when too little memory looks available")
    p.add_argument("--sides", default="deepspeed,fsdp",
                   help="--r2060: which sides, in this order (one per invocation when memory is only free now "
                        "and then)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra config override for both sides (repeatable)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a spawned run is killed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or (2 if args.r2060 else 4)
    args.memory_steps = args.memory_steps or (2 if args.r2060 else 3)
    if not args.sides or set(args.sides.split(",")) - {"deepspeed", "fsdp"}:
        p.error(f"--sides: expected deepspeed, fsdp or both, got {args.sides!r}")
    unknown = sorted(set(args.pairs.split(",")) - set(PAIRS))
    if unknown:
        p.error(f"--pairs: unknown {unknown}; known {list(PAIRS)}")
    if min(args.micro_batch, args.steps, args.warmup_steps, args.rounds, args.memory_steps) < 1:
        p.error("--micro-batch, --steps, --warmup-steps, --rounds and --memory-steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.perf import hardware

    head = {"bench": "backends", "argv": sys.argv[1:], "cpu": hardware.cpu_description(),
            "loadavg_start": os.getloadavg(), "available_gib_start": round(available_gib(), 1)}
    print(json.dumps(head), flush=True)
    t0 = time.perf_counter()
    out: Dict[str, Any] = dict(head, speed=[], memory=[])
    if args.r2060:
        out["memory"] = run_r2060(args)
    else:
        recipe = str(recipe_for(args.backbone))
        for pair in args.pairs.split(","):
            print(f"== {pair}: {side_label(pair, 'deepspeed')} vs {side_label(pair, 'fsdp')}, {args.backbone} "
                  f"{args.precision}, micro-batch {args.micro_batch} x {WORLD} ranks", flush=True)
            if not args.no_speed:
                out["speed"].append(run_speed(args, pair))
            if not args.no_memory:
                common = common_overrides(args, args.memory_steps)
                for side in ("deepspeed", "fsdp"):
                    out["memory"].append(run_memory(args, pair, side, recipe, common))
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    failed = [m for m in out["memory"] if not m.get("ok") and "skipped" not in m]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
