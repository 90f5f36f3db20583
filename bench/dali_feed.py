"""DALI feed rate: can the Python callable that feeds DALI's external_source keep up with the pipeline?

    python bench/dali_feed.py [--rec DIR] [--images 4000] [--threads 1 2] [--batch-size 64] [--batches 30]

The DALI backend (dali_pipes.dali_pipe) reads the records itself, in the epoch's global permutation, on the
training process, and hands DALI the encoded bytes through ``fn.external_source(source=self._feed)``. This
script measures, in one run and for each DALI thread count:

* the loader's delivered rate (images/s out of ``next(loader)``, as the trainer sees it);
* the feed rate: batch size / mean seconds inside ``DaliStream._feed`` (record reads, label checks,
  augmentation parameters) - the most images/s the callable could ever supply;
* the feed's share of the loader's time: above ~50% the feed, not decoding, is the limit, and DALI's parallel
  external source (worker processes) would be the next step.

``DaliStream._feed`` is wrapped in this process only (timing, no behaviour change). Without ``--rec`` a demo rec
of ``--images`` images is generated once into ``--cache`` (as bench/loader.py does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_rec(images: int, cache: str) -> str:
    """A demo rec of `images` images (16 per identity), generated once into `cache`."""
    from dali_pipes import make_demo

    per_id = 16
    out = Path(cache) / f"demo_{images}"
    if not make_demo.is_complete(out):
        make_demo.make_demo(out, identities=max(1, images // per_id), images_per_identity=per_id,
                            eval_identities=2, eval_images_per_identity=2, eval_pairs=2, progress=True)
    return str(out)


def measure(path: str, threads: int, args: argparse.Namespace) -> dict:
    """Loader images/s and feed images/s for one thread count."""
    from dali_pipes import dali_pipe
    from dali_pipes.loader import build_loader

    feed_times: list = []
    original = dali_pipe.DaliStream._feed

    def timed_feed(stream):
        t0 = time.perf_counter()
        try:
            return original(stream)
        finally:
            feed_times.append(time.perf_counter() - t0)

    dali_pipe.DaliStream._feed = timed_feed
    try:
        with build_loader("recordio", path, batch_size=args.batch_size, num_workers=threads, dali="on",
                          augment=args.augment, seed=0) as loader:
            for _ in range(args.warmup):
                next(loader)
            feed_times.clear()
            start = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            elapsed = time.perf_counter() - start
    finally:
        dali_pipe.DaliStream._feed = original
    feed_s = sum(feed_times) / max(1, len(feed_times))
    return dict(threads=threads, loader_images_per_s=args.batches * args.batch_size / elapsed,
                feed_images_per_s=args.batch_size / feed_s if feed_s else float("inf"),
                feed_ms_per_batch=1e3 * feed_s, feed_share=sum(feed_times) / elapsed, feeds=len(feed_times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rec", help="insightface dataset dir (default: a generated demo rec)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--cache", default="/tmp/arcscale_bench_loader")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per thread count; the best is kept")
    parser.add_argument("--augment", nargs="*", default=["flip"])
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    path = args.rec or demo_rec(args.images, args.cache)
    rows = []
    for threads in args.threads:
        runs = [measure(path, threads, args) for _ in range(args.repeats)]
        rows.append(max(runs, key=lambda r: r["loader_images_per_s"]))
    print(f"rec: {path}; batch {args.batch_size}, {args.batches} timed batches, augment {args.augment}")
    print(f"{'DALI threads':>12} {'loader img/s':>13} {'feed img/s':>11} {'feed ms/batch':>14} {'feed share':>11}")
    for r in rows:
        print(f"{r['threads']:>12} {r['loader_images_per_s']:>13.1f} {r['feed_images_per_s']:>11.1f} "
              f"{r['feed_ms_per_batch']:>14.2f} {100 * r['feed_share']:>10.1f}%")
    limit = max(r["feed_share"] for r in rows)
    print("verdict: " + ("the Python feed is the limit (share > 50%): use DALI's parallel external source"
                         if limit > 0.5 else f"the feed is not the limit (at most {100 * limit:.0f}% of the loader's "
                         "time); decoding is"))
    print(json.dumps(dict(bench="dali_feed", rec=path, batch_size=args.batch_size, rows=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
