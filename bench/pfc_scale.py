"""Partial FC at scale: head step time of ours vs a dense-update baseline, and chunked vs unchunked softmax memory.

Usage:
    python bench/pfc_scale.py steps   [--classes 100000,1000000,10000000] [--sample-rate 0.1] [--batch 256]
                                      [--emb 128] [--steps 5] [--warmup 2] [--fixed-sample 0] [--no-dense-above N]
    python bench/pfc_scale.py memory  [--columns 500000] [--batch 256] [--emb 128] [--chunk 16384]

``steps`` runs 2 gloo ranks (one thread each). For every class count, in the same processes, it times the head
step (forward + backward + optimizer update, median over --steps after --warmup) of

- ours: `heads.PartialFC` (sampler without a shard sort, sparse row gradient, `RowSparseSGD`: only sampled
  rows of weight and momentum are touched);
- dense: arcface_torch v2's way: rand + topk sampler over the shard, ``weight[index]`` (dense [num_local, E]
  gradient), ``torch.optim.SGD`` with momentum over the whole shard every step.

Both use the same loss code, momentum 0.9, weight decay 5e-4. ``--fixed-sample K`` keeps K sampled classes per
rank at every class count instead of a fixed rate, which isolates the class-count-dependent part of the step.
Up to --interleave-max classes both heads exist at once and take turns step by step (ABAB), so the ratio is
robust to other load on the machine; above it (memory) they run one after the other in the same processes.
Peak RSS per rank (VmHWM, reset between phases through /proc/self/clear_refs) is reported per phase; for
interleaved phases it covers both heads.

``memory`` measures, each in a fresh single process, the peak RSS increase of one forward + backward of the
loss over --columns sampled columns, unchunked vs chunked, and their times.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer  # noqa: E402
from heads.sampling import sample_rows_topk  # noqa: E402


def _rss_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class DenseUpdatePFC(PartialFC):
    """arcface_torch v2 behaviour: shard-wide rand + topk sampling and a dense [num_local, E] weight gradient."""

    def _sample(self, positive, gen):
        return sample_rows_topk(positive, self.num_local, self.num_sample, gen)

    def _centres(self, plan):
        return self.weight if plan["index"] is None else self.weight[plan["index"]]


def _build(kind, num_classes, rate, emb):
    cls = PartialFC if kind == "ours" else DenseUpdatePFC
    head = cls(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), emb, num_classes, rate, seed=1)
    if kind == "ours":
        opt = build_head_optimizer("sgd", [head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head, opt


def _time_heads(heads, batch, emb, steps, warmup, num_classes, seed):
    """Median step time per head; heads take turns step by step (ABAB) so machine noise hits them alike."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    times = {kind: [] for kind in heads}
    losses = {}
    for i in range(warmup + steps):
        x = torch.randn(batch, emb, generator=g)
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        for kind, (head, opt) in heads.items():
            xi = x.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            loss = head(xi, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i >= warmup:
                times[kind].append(time.perf_counter() - t0)
            losses[kind] = float(loss.detach())
    return {kind: (sorted(t)[len(t) // 2], losses[kind]) for kind, t in times.items()}


def _rank_steps(args_json: str) -> dict:
    """Per class count: ours and dense interleaved when both fit (<= --interleave-max classes), else in turn."""
    import torch.distributed as dist

    a = json.loads(args_json)
    world, rank = dist.get_world_size(), dist.get_rank()
    local_batch = a["batch"] // world
    out = {}
    for num_classes in a["classes"]:
        rate = a["sample_rate"]
        if a["fixed_sample"]:
            rate = min(1.0, a["fixed_sample"] * world / num_classes)
        row = {"sample_rate": rate}
        kinds = ["ours"] + (["dense"] if num_classes <= a["no_dense_above"] else [])
        groups = [kinds] if num_classes <= a["interleave_max"] else [[k] for k in kinds]
        for group in groups:
            gc.collect()
            _reset_peak()
            heads = {kind: _build(kind, num_classes, rate, a["emb"]) for kind in group}
            res = _time_heads(heads, local_batch, a["emb"], a["steps"], a["warmup"], num_classes, seed=rank)
            for kind, (t, loss) in res.items():
                row[kind] = {"step_s": t, "loss": loss, "peak_rss_mb": _rss_mb(),
                             "num_sample": heads[kind][0].num_sample, "interleaved": len(group) > 1}
            del heads
        out[num_classes] = row
    return out


def run_steps(args) -> None:
    from tests.distributed import run_distributed

    a = dict(classes=[int(c) for c in args.classes.split(",")], sample_rate=args.sample_rate, batch=args.batch,
             emb=args.emb, steps=args.steps, warmup=args.warmup, fixed_sample=args.fixed_sample,
             no_dense_above=args.no_dense_above, interleave_max=args.interleave_max)
    t0 = time.time()
    per_rank = run_distributed(_rank_steps, 2, json.dumps(a), timeout_s=3600)
    print(f"# {json.dumps(a)}  wall {time.time() - t0:.0f} s")
    print(f"{'classes':>10} {'rate':>7} {'sampled/rank':>12} {'ours s':>8} {'dense s':>8} {'dense/ours':>10} "
          f"{'ours peak MB/rank':>17} {'dense peak MB/rank':>18}")
    base = None
    for num_classes in a["classes"]:
        r0, r1 = per_rank[0][num_classes], per_rank[1][num_classes]
        ours = max(r0["ours"]["step_s"], r1["ours"]["step_s"])
        base = base or ours
        dense = max(r0["dense"]["step_s"], r1["dense"]["step_s"]) if "dense" in r0 else float("nan")
        peak_o = max(r0["ours"]["peak_rss_mb"], r1["ours"]["peak_rss_mb"])
        peak_d = max(r0["dense"]["peak_rss_mb"], r1["dense"]["peak_rss_mb"]) if "dense" in r0 else float("nan")
        print(f"{num_classes:>10} {r0['sample_rate']:>7.4g} {r0['ours']['num_sample']:>12} {ours:>8.3f} "
              f"{dense:>8.3f} {dense / ours:>10.2f} {peak_o:>17.0f} {peak_d:>18.0f}")
    last = max(per_rank[i][a["classes"][-1]]["ours"]["step_s"] for i in range(2))
    print(f"ours at {a['classes'][-1]} / ours at {a['classes'][0]}: {last / base:.2f}x")
    print("json:", json.dumps({str(k): v for k, v in per_rank[0].items()}))


def _memory_child(columns: int, batch: int, emb: int, chunk: int) -> None:
    torch.set_num_threads(1)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), emb, columns, 1.0, seed=1, chunk_size=chunk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, emb, generator=g).requires_grad_()
    labels = torch.randint(0, columns, (batch,), generator=g)
    head(x, labels).backward()  # warm-up: allocator and dense weight.grad exist before we measure
    head.weight.grad = None
    gc.collect()
    _reset_peak()
    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    loss = head(x, labels)
    loss.backward()
    dt = time.perf_counter() - t0
    print(json.dumps({"chunk": chunk, "loss": float(loss), "peak_increase_mb": _rss_mb() - before, "s": dt}))


def run_memory(args) -> None:
    results = []
    for chunk in (10 ** 9, args.chunk):  # 10**9 >= columns: the unchunked path
        out = subprocess.run([sys.executable, __file__, "_memory_child", str(args.columns), str(args.batch),
                              str(args.emb), str(chunk)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    un, ch = results
    print(f"# memory: batch {args.batch} x {args.columns} columns, E={args.emb}, 1 process")
    print(f"unchunked: peak +{un['peak_increase_mb']:.0f} MB, {un['s']:.2f} s fwd+bwd, loss {un['loss']:.6f}")
    print(f"chunk {args.chunk}: peak +{ch['peak_increase_mb']:.0f} MB, {ch['s']:.2f} s fwd+bwd, "
          f"loss {ch['loss']:.6f}")
    print(f"peak ratio unchunked/chunked {un['peak_increase_mb'] / ch['peak_increase_mb']:.2f}x, "
          f"time ratio chunked/unchunked {ch['s'] / un['s']:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        _memory_child(*map(int, sys.argv[2:6]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--classes", default="100000,1000000,10000000")
    s.add_argument("--sample-rate", type=float, default=0.1)
    s.add_argument("--batch", type=int, default=256, help="global batch (2 ranks)")
    s.add_argument("--emb", type=int, default=128)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--fixed-sample", type=int, default=0, help="sampled classes per rank (0: use --sample-rate)")
    s.add_argument("--no-dense-above", type=int, default=10 ** 12, help="skip the dense baseline above N classes")
    s.add_argument("--interleave-max", type=int, default=2_000_000,
                   help="up to this many classes, ours and dense are built together and timed ABAB")
    m = sub.add_parser("memory")
    m.add_argument("--columns", type=int, default=500000)
    m.add_argument("--batch", type=int, default=256)
    m.add_argument("--emb", type=int, default=128)
    m.add_argument("--chunk", type=int, default=16384)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_steps(args) if args.cmd == "steps" else run_memory(args)


if __name__ == "__main__":
    main()
