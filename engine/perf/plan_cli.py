"""`python -m engine.plan`: the memory table of one config, or (--fit) the fastest settings that fit.

    python -m engine.plan --config ds_configs/r2060.json --world-size 64 [--num-classes 10000000]
        [--gpu-mem-gb 80] [--micro-batch N] [--peak-tflops X] [--device gpu|cpu] [--ranks-per-node N]
        [--set key.path=value ...]
    python -m engine.plan --config C --world-size N --gpu-mem-gb M --fit [--device cpu|gpu] [--ranks-per-node K]
        [--write C2.json] [--peak-tflops X] [--link-gbps Y] [--card H100] [--margin 0.1] [--top 3]
        [--num-classes N]

Without --fit: engine.perf.planner's per-rank table (what the config needs, the largest class count and
micro-batch that fit, FLOPs). With --fit: engine.perf.fit's search over backend and sharding, activation
checkpointing, micro-batch x accumulation (same global batch) and head storage; the fastest few that fit within
--gpu-mem-gb less the margin, side by side, why each other backend lost, and the keys to change (--write: the
input config with only those keys changed). With --device cpu, --gpu-mem-gb is the per-rank host memory
budget and the time model is measured on this machine (a few seconds: a convolution, a copy, tiny ops and an
all-reduce between spawned ranks); with --device gpu it comes from the card's table (--card, default H100) or
--peak-tflops (the datasheet peak at the config's precision) and --link-gbps (GB/s per rank, the bus bandwidth
nccl-tests reports).

Exit status: 0 done, 1 nothing fits (--fit; the line says what would), 2 a config or argument error.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from engine.perf import planner


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config, e.g. ds_configs/r2060.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0,
                        help="memory per rank in GiB (default 80); with --device cpu the per-rank host budget")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the precision used")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="processes per node: engine.fsdp.hybrid shards within one, and collectives across "
                             "nodes use the slower link (default: the launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE, "
                             "else the world size)")
    fit = parser.add_argument_group("search (--fit)")
    fit.add_argument("--fit", action="store_true", help="search the fastest settings that fit")
    fit.add_argument("--write", default=None, metavar="PATH", help="write the chosen config (JSON) there")
    fit.add_argument("--link-gbps", type=float, default=None,
                     help="collective bus bandwidth per rank in GB/s (default: the card's table, or measured)")
    fit.add_argument("--card", default=None, help="GPU model for the table (H100, H200, A100, V100; default H100)")
    fit.add_argument("--margin", type=float, default=None,
                     help="share of the memory kept free (default 0.10)")
    fit.add_argument("--top", type=int, default=3, help="settings shown side by side (default 3)")
    return parser


def hardware_for(device: str, precision: str, world_size: int, *, card: Optional[str] = None,
                 peak_tflops: Optional[float] = None, link_gbps: Optional[float] = None):
    """The time model's figures: a GPU's table / given values, or this CPU measured as `world_size` ranks."""
    from engine.perf import timing

    if device == "gpu":
        return timing.gpu_hardware(precision, card, peak_tflops, link_gbps)
    return timing.calibrate_cpu(precision, world_size, peak_tflops=peak_tflops, link_gbps=link_gbps)


def run_fit(args: argparse.Namespace, cfg) -> int:
    """The --fit branch of main."""
    from engine.perf import fit

    if args.micro_batch is not None:
        raise ValueError("--micro-batch: not with --fit (the search splits the config's images per rank itself); "
                         "use --set train_micro_batch_size_per_gpu=N to change the global batch")
    if args.num_classes is not None:  # as --set engine.head.num_classes=N (also in what --write writes)
        from engine import config

        args.overrides = list(args.overrides) + [f"engine.head.num_classes={args.num_classes}"]
        cfg = config.load(args.config, args.overrides)
    for name in ("peak_tflops", "link_gbps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected > 0, got {value}")
    hw = hardware_for(args.device, cfg.precision, args.world_size, card=args.card, peak_tflops=args.peak_tflops,
                      link_gbps=args.link_gbps)
    margin = fit.DEFAULT_MARGIN if args.margin is None else args.margin
    result = fit.search(cfg, args.world_size, args.gpu_mem_gb, hw, margin=margin, ranks_per_node=args.ranks_per_node)
    print(fit.format_fit(result, cfg, top=args.top))
    if result.best is None:
        return 1
    if args.write:
        fit.write_config(args.write, args.config, args.overrides, cfg, result.best.setting)
        print(f"wrote {args.write}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from engine import config

    cfg = config.load_or_report(args.config, args.overrides)
    if cfg is None:
        return config.CONFIG_ERROR_EXIT
    if args.write and not args.fit:
        print("error: --write needs --fit", file=sys.stderr)
        return config.CONFIG_ERROR_EXIT
    try:
        if args.fit:
            return run_fit(args, cfg)
        p = planner.plan(cfg, args.world_size, num_classes=args.num_classes, micro_batch=args.micro_batch,
                         mem_gb=args.gpu_mem_gb, device=args.device, peak_tflops=args.peak_tflops,
                         ranks_per_node=args.ranks_per_node)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return config.CONFIG_ERROR_EXIT
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config.CONFIG_ERROR_EXIT
    print(planner.format_plan(p, cfg))
    return 0
