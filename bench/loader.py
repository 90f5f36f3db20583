"""Loader throughput: the DALI CPU pipeline vs the torch fallback on the same rec, in one run.

    python bench/loader.py [--rec DIR] [--images 4000] [--threads 2 [4 ...]] [--batch-size 64] [--batches 40]
                           [--augment flip ...]

Both loaders get the same rec, batch size, seed, augmentation and thread count (DALI ``num_threads`` ==
DataLoader ``num_workers``), decode on the CPU and deliver float32 [B, 3, 112, 112] CPU tensors. After
``--warmup`` batches (pipeline build, worker start), ``--batches`` batches are timed; the two are run
alternately ``--repeats`` times and the best run of each is kept (the machine may be shared). Without
``--rec`` a demo rec of ``--images`` images is generated once into ``--cache``. Several ``--threads`` values
give the scaling of both loaders with workers (one table row and one JSON line per value).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(path: str, dali: str, threads: int, args: argparse.Namespace) -> float:
    from dali_pipes.loader import build_loader

    with build_loader("recordio", path, batch_size=args.batch_size, num_workers=threads, dali=dali,
                      augment=args.augment, seed=0) as loader:
        for _ in range(args.warmup):
            next(loader)
        start = time.perf_counter()
        for _ in range(args.batches):
            images, labels = next(loader)
        elapsed = time.perf_counter() - start
        assert images.shape == (args.batch_size, 3, 112, 112)
    return args.batches * args.batch_size / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rec", help="insightface dataset dir (default: a generated demo rec)")
    parser.add_argument("--images", type=int, default=4000, help="size of the generated rec")
    parser.add_argument("--cache", default="/tmp/arcscale_bench_loader", help="where the generated rec goes")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one run per value (scaling)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--augment", nargs="*", default=["flip"])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # the main process only copies batches; decoding threads are what we compare
    path = args.rec
    if path is None:
        from dali_pipes import make_demo

        per_id = 16
        out = Path(args.cache) / f"demo_{args.images}"
        if not make_demo.is_complete(out):
            make_demo.make_demo(out, identities=max(1, args.images // per_id), images_per_identity=per_id,
                                eval_identities=2, eval_images_per_identity=2, eval_pairs=2, progress=True)
        path = str(out)
    print(f"rec: {path}")
    print(f"batch {args.batch_size}, {args.batches} timed batches, augment {args.augment}; best of {args.repeats}")
    print(f"{'threads':>7} {'DALI CPU img/s':>15} {'torch fallback img/s':>21} {'DALI/fallback':>14}")
    lines = []
    for threads in args.threads:
        results: dict[str, list[float]] = {"dali": [], "torch": []}
        for _ in range(args.repeats):
            results["dali"].append(measure(path, "on", threads, args))
            results["torch"].append(measure(path, "off", threads, args))
        dali, fallback = max(results["dali"]), max(results["torch"])
        print(f"{threads:>7} {dali:>15.1f} {fallback:>21.1f} {dali / fallback:>13.2f}x  (runs: DALI "
              f"{', '.join(f'{v:.0f}' for v in results['dali'])}; fallback "
              f"{', '.join(f'{v:.0f}' for v in results['torch'])})", flush=True)
        lines.append(json.dumps(dict(bench="loader", rec=path, threads=threads, batch_size=args.batch_size,
                                     augment=args.augment, dali_images_per_s=round(dali, 1),
                                     fallback_images_per_s=round(fallback, 1), ratio=round(dali / fallback, 3))))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
