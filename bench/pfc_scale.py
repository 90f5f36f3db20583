"""Partial FC at scale: head step time of ours vs a dense-update baseline, and chunked vs unchunked softmax memory.

Usage:
    python bench/pfc_scale.py steps --mode dense   [--classes 100000,1000000,10000000] [--sample-rate 0.1]
                                    [--batch 256] [--emb 128] [--steps 5] [--warmup 2] [--no-dense-above N]
                                    [--interleave-max 2000000]
    python bench/pfc_scale.py steps --mode scaling [--classes ...] [--fixed-sample K]
    python bench/pfc_scale.py steps --mode chunk   [--classes ...] [--chunk 4096]
    python bench/pfc_scale.py memory [--columns 500000] [--batch 256] [--emb 128] [--chunk 16384]
    python bench/pfc_scale.py device [--classes 1000000,10000000,29000000] [--batch 512] [--emb 128]
                                     [--offload none,cpu] [--device cuda] [--steps 5] [--warmup 2] [--json F]

``steps`` runs 2 gloo ranks (one thread each). For every class count, in the same processes, it times the head
step (forward + backward + optimizer update, median over --steps after --warmup) of

- ours: `heads.PartialFC` (sampler without a shard sort, sparse row gradient, `RowSparseSGD`: only sampled
  rows of weight and momentum are touched);
- dense: arcface_torch v2's way: rand + topk sampler over the shard, ``weight[index]`` (dense [num_local, E]
  gradient), ``torch.optim.SGD`` with momentum over the whole shard every step.

Both use the same loss code, momentum 0.9, weight decay 5e-4. With a fixed sample *rate* the logits work grows
with the class count for any method, so ``--mode scaling`` also times ours at every class count with the same
number K of sampled classes per rank (all heads built together and interleaved): what remains is the part of
the step that depends on the class count. In ``--mode dense``, up to --interleave-max classes both heads exist
at once and take turns step by step (ABAB), so the per-step ratio is robust to other load on the machine;
above it (memory) they run one after the other in the same processes.
Peak RSS per rank (VmHWM, reset between phases through /proc/self/clear_refs) is reported per phase; for
interleaved phases it covers both heads.

``device`` is the single-device head check (the GPU check: world size 1, batch 512, 1M/10M/29M
classes, with and without ``offload="cpu"``): one process, `heads.PartialFC` + `RowSparseSGD` on --device
(cuda when available), the trainer's order (``prefetch`` before the step when offloaded), device-synchronised
step times, peak device memory (``torch.cuda.max_memory_allocated``), host RSS, and with offload on a GPU the
pinned bytes asked for beside what the caching host allocator holds (its power-of-two rounding) per configuration.

``--mode chunk`` times ours unchunked vs chunked (interleaved). ``memory`` measures, each in a fresh single
process, the peak RSS increase of one forward + backward of the loss over --columns columns, unchunked vs
chunked.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer  # noqa: E402
from heads.class_store import pinned_host_bytes  # noqa: E402
from heads.sampling import sample_rows_topk  # noqa: E402
from heads.softmax import resolve_chunk_size  # noqa: E402


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
    """kind: "ours" (auto chunking), "unchunked", "chunk<N>" (ours with N-column chunks) or "dense"."""
    cls = DenseUpdatePFC if kind == "dense" else PartialFC
    chunk = 10 ** 9 if kind == "unchunked" else int(kind[5:]) if kind.startswith("chunk") else 0
    head = cls(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), emb, num_classes, rate, seed=1, chunk_size=chunk)
    if kind != "dense":
        opt = build_head_optimizer("sgd", [head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head, opt


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _estimate_bytes(kind: str, num_classes: int, emb: int, world: int) -> int:
    """Rough bytes per rank: shard + momentum (+ the dense gradient for the baseline); the phase adds 1 GiB."""
    shard = num_classes // world * emb * 4
    return (3 if kind == "dense" else 2) * shard


def _time_heads(heads, batch, emb, steps, warmup, seed):
    """Per-step times of each head (name -> (head, opt, num_classes)); heads take turns step by step (ABAB...)
    so that load from other jobs on the machine hits them alike."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    times = {name: [] for name in heads}
    losses = {}
    for i in range(warmup + steps):
        x = torch.randn(batch, emb, generator=g)
        labels_of = {n: torch.randint(0, n, (batch,), generator=g) for n in sorted({h[2] for h in heads.values()})}
        for name, (head, opt, num_classes) in heads.items():
            labels = labels_of[num_classes]  # heads of the same size see the same batch
            xi = x.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            loss = head(xi, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            losses[name] = float(loss.detach())
    return times, losses


def _rank_steps(args_json: str) -> dict:
    """Time the configured phases on this rank; every phase's heads are built together and interleaved."""
    import torch.distributed as dist

    a = json.loads(args_json)
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {}
    for phase in a["phases"]:  # a phase: list of [name, kind, num_classes, sample_rate]
        gc.collect()
        need = (sum(_estimate_bytes(kind, n, a["emb"], world) for _, kind, n, _ in phase) + 2 ** 30) * world
        fits = torch.tensor([int(_mem_available() >= need)])
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank takes the same decision
        if not fits.item():
            for name, kind, num_classes, rate in phase:
                out[name] = dict(skipped=f"needs ~{need / 2**30:.1f} GiB for {world} ranks, "
                                         f"{_mem_available() / 2**30:.1f} GiB available", num_classes=num_classes)
            continue
        _reset_peak()
        heads = {}
        for name, kind, num_classes, rate in phase:
            heads[name] = _build(kind, num_classes, rate, a["emb"]) + (num_classes,)
        times, losses = _time_heads(heads, a["batch"] // world, a["emb"], a["steps"], a["warmup"], seed=rank)
        peak = _rss_mb()
        for name, _, num_classes, rate in phase:
            out[name] = dict(times=times[name], loss=losses[name], peak_rss_mb=peak, num_classes=num_classes,
                             sample_rate=rate, num_sample=heads[name][0].num_sample)
        del heads
    return out


def _stats(xs):
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, int(f * (len(xs) - 1) + 0.5))]  # noqa: E731
    return q(0.5), q(0.25), q(0.75)


def run_steps(args) -> None:
    from engine.runtime.spawn import run_distributed

    classes = [int(c) for c in args.classes.split(",")]
    phases = []
    if args.mode == "dense":  # ours vs dense per class count (together when both fit)
        for n in classes:
            pair = [[f"ours@{n}", "ours", n, args.sample_rate], [f"dense@{n}", "dense", n, args.sample_rate]]
            if args.dense_only:
                phases.append(pair[1:])
            elif n > args.no_dense_above:
                phases.append(pair[:1])
            elif n > args.interleave_max:
                phases += [pair[:1], pair[1:]]
            else:
                phases.append(pair)
    elif args.mode == "chunk":  # ours unchunked vs chunked, interleaved
        for n in classes:
            phases.append([[f"unchunked@{n}", "unchunked", n, args.sample_rate],
                           [f"chunk{args.chunk}@{n}", f"chunk{args.chunk}", n, args.sample_rate]])
    else:  # scaling: ours at every class count in one phase, K sampled classes per rank everywhere
        k = args.fixed_sample or int(args.sample_rate * classes[0] / 2)
        phases.append([[f"ours@{n}", "ours", n, min(1.0, 2 * k / n)] for n in classes])
    a = dict(phases=phases, batch=args.batch, emb=args.emb, steps=args.steps, warmup=args.warmup)
    t0, load0 = time.time(), os.getloadavg()[0]
    per_rank = run_distributed(_rank_steps, 2, json.dumps(a), timeout_s=3600)
    print(f"# mode={args.mode} classes={classes} batch={args.batch} emb={args.emb} steps={args.steps} "
          f"warmup={args.warmup}; wall {time.time() - t0:.0f} s; load avg (1 min) {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    # a step's time is the slower rank's (the barriers make them nearly equal)
    for name in [n for n, r in per_rank[0].items() if "skipped" in r]:
        print(f"{name}: skipped, {per_rank[0].pop(name)['skipped']}")
        per_rank[1].pop(name)
    step = {name: [max(t) for t in zip(per_rank[0][name]["times"], per_rank[1][name]["times"])]
            for name in per_rank[0]}
    peak = {name: max(r[name]["peak_rss_mb"] for r in per_rank) for name in per_rank[0]}
    print(f"{'head':>16} {'rate':>8} {'sampled/rank':>12} {'median s':>9} {'IQR s':>15} {'peak MB/rank*':>13}")
    for name, r in per_rank[0].items():
        med, lo, hi = _stats(step[name])
        print(f"{name:>16} {r['sample_rate']:>8.4g} {r['num_sample']:>12} {med:>9.3f} {lo:>7.3f}-{hi:<7.3f} "
              f"{peak[name]:>13.0f}")
    print("* peak RSS of the phase (all heads built together in it)")
    names = list(per_rank[0])
    if not names:
        return
    ref = names[0]
    for name in names[1:]:
        if args.mode in ("dense", "chunk") and not name.startswith(("dense@", "chunk")):
            continue
        base = {"dense": "ours@", "chunk": "unchunked@"}.get(args.mode, "") + name.split("@")[1]
        base = ref if args.mode == "scaling" else base
        if base not in step:
            continue
        paired = len(step[name]) == len(step[base]) and any(
            set(p[0] for p in ph) >= {name, base} for ph in phases)
        if paired:
            med, lo, hi = _stats([x / y for x, y in zip(step[name], step[base])])
            print(f"{name} / {base}: median per-step ratio {med:.2f} (IQR {lo:.2f}-{hi:.2f}), interleaved")
        else:
            print(f"{name} / {base}: ratio of medians {_stats(step[name])[0] / _stats(step[base])[0]:.2f} "
                  "(not interleaved: run one after the other)")
    print("json:", json.dumps({n: dict(per_rank[0][n], times_max_rank=step[n]) for n in names}))


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
        # a fixed mmap threshold: every large buffer is mmap'd and unmapped when freed, so RSS tracks live memory
        # (glibc's adaptive threshold would keep freed buffers of up to 32 MB in the heap, hiding the chunks')
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, __file__, "_memory_child", str(args.columns), str(args.batch),
                              str(args.emb), str(chunk)], capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    un, ch = results
    print(f"# memory: batch {args.batch} x {args.columns} columns, E={args.emb}, 1 process")
    print(f"unchunked: peak +{un['peak_increase_mb']:.0f} MB, loss {un['loss']:.6f}")
    print(f"chunk {args.chunk}: peak +{ch['peak_increase_mb']:.0f} MB, loss {ch['loss']:.6f}")
    print(f"peak ratio unchunked/chunked {un['peak_increase_mb'] / ch['peak_increase_mb']:.2f}x "
          "(times: use `steps --mode chunk`; the fixed mmap threshold here makes every buffer page-fault)")


def _pinned(head, opt, cuda: bool) -> dict:
    """Pinned host memory of an offloaded head: the bytes its pinned tensors ask for (weight, optimizer state),
    what heads.class_store.pinned_host_bytes (engine.plan) says they take, and what PyTorch's caching host
    allocator holds (torch.cuda.host_memory_stats, power-of-two rounded blocks, staging buffers included)."""
    tensors = [head.weight] + [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    pinned = [t for t in tensors if t.device.type == "cpu" and cuda and t.is_pinned()]
    if not pinned:
        return {}
    stats = torch.cuda.host_memory_stats()
    held = stats.get("allocated_bytes.current", stats.get("allocated_bytes.all.current"))
    return dict(pinned_requested_gib=sum(t.untyped_storage().nbytes() for t in pinned) / 2 ** 30,
                pinned_planned_gib=sum(pinned_host_bytes(t.untyped_storage().nbytes()) for t in pinned) / 2 ** 30,
                pinned_allocator_gib=held / 2 ** 30 if held is not None else None)


def run_device(args) -> None:
    """Ours on one device, per class count and offload mode (see the module docstring)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"# device check: {torch.cuda.get_device_name(device) if cuda else 'cpu'}, batch {args.batch}, "
          f"emb {args.emb}, rate {args.sample_rate}, steps {args.steps} (+{args.warmup} warm-up), world size 1")
    print(f"{'classes':>11} {'offload':>7} {'sampled':>10} {'chunk':>6} {'median ms':>10} {'IQR ms':>17} "
          f"{'dev peak GiB':>12} {'host RSS GiB':>12} {'build s':>7}")
    results = []
    for n in [int(c) for c in args.classes.split(",")]:
        for offload in args.offload.split(","):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _reset_peak()
            t0 = time.perf_counter()
            try:
                head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.emb, n, args.sample_rate, seed=1,
                                 device=device, offload=offload, chunk_size=args.chunk)
                opt = build_head_optimizer("sgd", [head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
                build_s = time.perf_counter() - t0
                g = torch.Generator().manual_seed(0)
                times = []
                for i in range(args.warmup + args.steps):
                    x = torch.randn(args.batch, args.emb, generator=g).to(device).requires_grad_()
                    labels = torch.randint(0, n, (args.batch,), generator=g).to(device)
                    sync()
                    t = time.perf_counter()
                    if offload != "none":
                        head.prefetch(labels)  # as the trainer does before the backbone forward
                    loss = head(x, labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
                if not math.isfinite(float(loss.detach())):
                    raise RuntimeError(f"non-finite loss {float(loss.detach())}")
            except (RuntimeError, MemoryError) as exc:  # out of memory at this size: report it, go on
                print(f"{n:>11} {offload:>7}  failed: {str(exc).splitlines()[0][:120]}")
                results.append(dict(classes=n, offload=offload, error=str(exc).splitlines()[0]))
                head = opt = None
                continue
            med, lo, hi = _stats(times)
            dev_peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
            chunk = resolve_chunk_size(args.chunk, args.batch, head.num_sample, device.type)
            row = dict(classes=n, offload=offload, num_sample=head.num_sample, chunk=chunk, median_ms=1e3 * med,
                       iqr_ms=[1e3 * lo, 1e3 * hi], device_peak_gib=dev_peak, host_rss_gib=_rss_mb() / 1024,
                       build_s=build_s, loss=float(loss.detach()), times_ms=[1e3 * t for t in times],
                       **_pinned(head, opt, cuda))
            results.append(row)
            print(f"{n:>11} {offload:>7} {head.num_sample:>10} {chunk:>6} {row['median_ms']:>10.1f} "
                  f"{1e3 * lo:>8.1f}-{1e3 * hi:<8.1f} {dev_peak if cuda else float('nan'):>12.2f} "
                  f"{row['host_rss_gib']:>12.2f} "
                  f"{build_s:>7.1f}")
            del head, opt
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "batch": args.batch, "emb": args.emb,
                                               "sample_rate": args.sample_rate, "runs": results}, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        _memory_child(*map(int, sys.argv[2:6]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--mode", choices=["dense", "scaling", "chunk"], default="dense",
                   help="dense: ours vs the dense-update baseline per class count; scaling: ours at every class "
                        "count interleaved with a fixed sample count per rank (--fixed-sample); chunk: ours "
                        "unchunked vs ours with --chunk columns per chunk")
    s.add_argument("--chunk", type=int, default=4096)
    s.add_argument("--classes", default="100000,1000000,10000000")
    s.add_argument("--sample-rate", type=float, default=0.1)
    s.add_argument("--batch", type=int, default=256, help="global batch (2 ranks)")
    s.add_argument("--emb", type=int, default=128)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--fixed-sample", type=int, default=0,
                   help="scaling mode: sampled classes per rank (0: sample rate x the first class count / 2)")
    s.add_argument("--no-dense-above", type=int, default=10 ** 12, help="skip the dense baseline above N classes")
    s.add_argument("--dense-only", action="store_true", help="dense mode: time the baseline alone")
    s.add_argument("--interleave-max", type=int, default=2_000_000,
                   help="up to this many classes, ours and dense are built together and timed ABAB")
    m = sub.add_parser("memory")
    m.add_argument("--columns", type=int, default=500000)
    m.add_argument("--batch", type=int, default=256)
    m.add_argument("--emb", type=int, default=128)
    m.add_argument("--chunk", type=int, default=16384)
    d = sub.add_parser("device", help="single-device head step (the GPU check), with and without offload")
    d.add_argument("--classes", default="1000000,10000000,29000000")
    d.add_argument("--sample-rate", type=float, default=0.1)
    d.add_argument("--batch", type=int, default=512)
    d.add_argument("--emb", type=int, default=128)
    d.add_argument("--offload", default="none,cpu", help="comma-separated engine.head.offload values")
    d.add_argument("--chunk", type=int, default=0, help="engine.head.chunk_size (0: auto)")
    d.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args()
    if args.cmd == "device":
        run_device(args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_steps(args) if args.cmd == "steps" else run_memory(args)


if __name__ == "__main__":
    main()
