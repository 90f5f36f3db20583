"""Step-time model for the planner's search (engine.plan --fit, engine.auto): what a setting costs per step.

A candidate setting (backend and sharding, activation checkpointing, micro-batch and accumulation, head
storage) changes how much work a rank does and how many bytes it moves, not what it computes. The model adds,
per optimizer step and rank:

* compute: FLOPs of the step (the forward's and the backward's conv/linear MACs x 2 -- about 3 x the forward,
  less where frozen layers get no gradient -- the recomputed blocks' forward again, the
  head's logits and gradients against the sampled rows, the chunked softmax's recomputed logits) at the
  device's achievable rate (`Hardware.tflops`);
* normalisation and activation layers (BatchNorm, PReLU, ...): their cost follows the activations' size, not
  FLOPs, and is largest where the activations are (the stem and the first stage at 112x112 and 56x56): each output
  element costs `norm_act_s` in forward (and again in a recomputation) and `norm_act_bwd_s` in backward where the
  gradient reaches it;
* per-call overhead: every leaf module call in forward, backward and recomputation costs `op_s` (kernel launch
  and dispatch on a GPU, the framework's per-op work on a CPU), and every sharded unit (FSDP2's blocks,
  ZeRO-3's fetched modules) `unit_s` per micro-batch (hooks, bookkeeping, collective launches) -- what makes
  small micro-batches and fine sharding slow. A GPU runs kernels asynchronously, so there only the dispatch
  time the kernels do not cover counts;
* communication: the bytes each backend's collectives move per rank (ring all-reduce 2(n-1)/n of the buffer,
  all-gather and reduce-scatter (n-1)/n) at the link's bus bandwidth, plus `latency_s` per collective call.
  Collectives a backend overlaps with compute (FSDP2's prefetched gathers and reduce-scatters, ZeRO-3's
  prefetch, ZeRO-2's `overlap_comm`, ZeRO-0's bucketed all-reduce of fp32 gradients: engine.parallel.reducer)
  hide behind up to OVERLAP_SHARE of the compute on a GPU; on a CPU gloo
  runs on the cores that compute, so nothing hides;
* optimizer and copies: bytes of memory traffic of the optimizer step (3 + 2 x its state values of 4 bytes
  per parameter, read and written) and of each backend's flat-buffer copies around its collectives (per
  gather pass and reduction), at the device's memory bandwidth (a CPU-side step for offloaded state: host
  bandwidth);
* offload: host <-> device bytes of offloaded shards and of the offloaded head's sampled rows, at `pcie_gbps`.

The numbers come from `Hardware`: on a CPU measured now (`calibrate_cpu`: a convolution's forward + backward,
a large copy, a chain of tiny autograd ops, and an all-reduce between the ranks), on a GPU from the card's
table (engine.perf.report.GPU_PEAK_TFLOPS and GPU_LINKS here) or the user's --peak-tflops / --link-gbps.
The model ranks candidates; its absolute step time is an estimate (BENCHMARKS.md: predicted vs measured).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch

# Share of the datasheet peak a ResNet's convolutions reach on a GPU (cuDNN at training batch sizes); the CPU's
# rate is measured instead.
GPU_ACHIEVABLE = 0.5
# Share of the compute under which overlapped collectives hide on a GPU (the rest of the time the links idle).
OVERLAP_SHARE = 0.8
# Per-card links and memory (vendor datasheets): intra-node bus bandwidth an NCCL ring reaches (GB/s per rank),
# HBM bandwidth (GB/s), host link (GB/s). Unknown cards: H100's figures, said so in the output.
GPU_LINKS: Dict[str, Dict[str, float]] = {
    "H200": {"link_gbps": 450.0, "mem_gbps": 4800.0, "pcie_gbps": 50.0},
    "H100 PCIe": {"link_gbps": 25.0, "mem_gbps": 2000.0, "pcie_gbps": 50.0},
    "H100": {"link_gbps": 450.0, "mem_gbps": 3350.0, "pcie_gbps": 50.0},
    "A100": {"link_gbps": 230.0, "mem_gbps": 2000.0, "pcie_gbps": 25.0},
    "V100": {"link_gbps": 130.0, "mem_gbps": 900.0, "pcie_gbps": 12.0},
}
GPU_INTER_NODE_GBPS = 50.0  # one 400 Gb/s NIC per GPU
GPU_LATENCY_S = 30e-6  # one NCCL collective call
GPU_OP_S = 8e-6  # launch + dispatch of one kernel from Python
GPU_UNIT_S = 1e-4  # FSDP2's / ZeRO-3's hooks and collective launches per sharded unit and micro-batch (dispatch)
HOST_MEM_GBPS = 20.0  # a CPU-side optimizer step over offloaded state, on a GPU machine
# Memory accesses per output element of a normalisation/activation layer on a GPU, forward (read the input for the
# statistics and again to normalise, write) and backward (read the gradient, the input, write; BatchNorm's two
# reductions read them again)
NORM_ACT_FWD_ACCESSES = 3
NORM_ACT_BWD_ACCESSES = 5


@dataclass(frozen=True)
class Hardware:
    """What one rank's device and links can do, and where each figure comes from.

    Attributes:
        device: "gpu" or "cpu".
        tflops: achievable dense TFLOP/s at the run's precision (GPU: peak x GPU_ACHIEVABLE; CPU: measured).
        link_gbps: collective bus bandwidth between ranks of one node, GB/s per rank (an all-reduce's; gloo's
            all-gather and reduce-scatter measured separately where they are slower: `gather_gbps`,
            `scatter_gbps`).
        inter_node_gbps: the same between nodes.
        latency_s: one collective call's fixed cost.
        op_s: one leaf module call's fixed cost (forward; backward counts twice).
        norm_act_s / norm_act_bwd_s: seconds per output element of a normalisation or activation layer's forward
            / backward (CPU: measured on BatchNorm + PReLU; GPU: their memory traffic at `mem_gbps`).
        mem_gbps: device memory bandwidth (optimizer steps, flat-buffer copies), GB/s.
        pcie_gbps: host <-> device bandwidth (offload), GB/s.
        host_mem_gbps: host memory bandwidth for CPU-side optimizer steps of offloaded state, GB/s.
        source: how the figures were obtained (printed with the search's answer).
    """

    device: str
    tflops: float
    link_gbps: float
    inter_node_gbps: float
    latency_s: float
    op_s: float
    mem_gbps: float
    pcie_gbps: float
    host_mem_gbps: float
    source: str
    batch_efficiency: Tuple[Tuple[int, float], ...] = ()  # (images per call, share of tflops), CPU probe
    gather_gbps: float = 0.0  # all-gather bus bandwidth where it differs from the all-reduce's (gloo); 0: link_gbps
    scatter_gbps: float = 0.0  # reduce-scatter's, likewise
    unit_s: float = 0.0  # per sharded unit and micro-batch: FSDP2's (ZeRO-3's) hooks and collective launches
    # kind -> ((bytes each rank puts in, seconds per call), ...) measured at a few sizes: gloo's all-gather grows
    # faster than linearly with the size (a 32 MiB one took 8x a 32 MiB all-reduce here); empty on a GPU
    curves: Tuple[Tuple[str, Tuple[Tuple[float, float], ...]], ...] = ()
    norm_act_s: float = 0.0
    norm_act_bwd_s: float = 0.0

    def bandwidth(self, kind: str, cross_node: bool = False) -> float:
        """Bytes per second of one rank in a collective of `kind` (all_reduce, all_gather, reduce_scatter)."""
        own = {"all_gather": self.gather_gbps, "reduce_scatter": self.scatter_gbps}.get(kind) or self.link_gbps
        return (min(own, self.inter_node_gbps) if cross_node else own) * 1e9

    def collective_s(self, kind: str, full_bytes: float, n: int, cross_node: bool = False) -> float:
        """Seconds of one collective of `kind` over `n` ranks on a tensor of `full_bytes` (the all-reduced
        tensor, the gathered output, the reduce-scatter's input): the measured curve where there is one (a
        power law between and beyond its points), else the ring's bytes at `bandwidth` plus `latency_s`."""
        if n <= 1 or full_bytes <= 0:
            return 0.0
        per_rank = full_bytes / n if kind == "all_gather" else full_bytes
        curve = dict(self.curves).get(kind)
        if curve and not cross_node:
            pts = sorted(curve)
            i = 0 if per_rank <= pts[0][0] else min(len(pts) - 2, max(i for i, p in enumerate(pts) if p[0] <= per_rank))
            (x0, y0), (x1, y1) = pts[i], pts[i + 1]
            slope = math.log(y1 / y0) / math.log(x1 / x0) if y1 > 0 and y0 > 0 and x1 > x0 else 1.0
            return y0 * (per_rank / x0) ** max(slope, 0.0)
        return _ring(kind, n, full_bytes) / self.bandwidth(kind, cross_node) + self.latency_s


def gpu_hardware(precision: str, card: Optional[str] = None, peak_tflops: Optional[float] = None,
                 link_gbps: Optional[float] = None) -> Hardware:
    """A GPU's figures: the card's table row (default H100), with --peak-tflops / --link-gbps taking precedence.

    Raises:
        ValueError: an unknown card without both --peak-tflops and --link-gbps, or a card without a peak at
            `precision` (V100 bf16) and no --peak-tflops.
    """
    from engine.perf.report import GPU_PEAK_TFLOPS

    name = card or "H100"
    key = next((k for k in GPU_PEAK_TFLOPS if all(part.lower() in name.lower() for part in k.split())), None)
    if key is None and (peak_tflops is None or link_gbps is None):
        raise ValueError(f"card: {name!r} is not in the table {sorted(GPU_PEAK_TFLOPS)}; pass --peak-tflops and "
                         "--link-gbps for it")
    peak = peak_tflops or (GPU_PEAK_TFLOPS[key].get(precision) if key else None)
    if not peak:
        raise ValueError(f"card {key}: no {precision} peak in the table; pass --peak-tflops")
    links = GPU_LINKS.get(key or "", GPU_LINKS["H100"])
    source = (f"{'given' if peak_tflops else f'table {key}'} {peak:g} TFLOP/s {precision} x {GPU_ACHIEVABLE} "
              f"achievable, link {'given' if link_gbps else 'table'} {link_gbps or links['link_gbps']:g} GB/s"
              + ("" if card else " (no --card: H100 assumed)"))
    act_bytes = 4 if precision == "fp32" else 2
    return Hardware(device="gpu", tflops=peak * GPU_ACHIEVABLE, link_gbps=link_gbps or links["link_gbps"],
                    norm_act_s=NORM_ACT_FWD_ACCESSES * act_bytes / (links["mem_gbps"] * 1e9),
                    norm_act_bwd_s=NORM_ACT_BWD_ACCESSES * act_bytes / (links["mem_gbps"] * 1e9),
                    inter_node_gbps=min(link_gbps or GPU_INTER_NODE_GBPS, GPU_INTER_NODE_GBPS),
                    latency_s=GPU_LATENCY_S, op_s=GPU_OP_S, unit_s=GPU_UNIT_S, mem_gbps=links["mem_gbps"],
                    pcie_gbps=links["pcie_gbps"], host_mem_gbps=HOST_MEM_GBPS, source=source)


# ---- CPU calibration ----------------------------------------------------------------------------------------

def _time_loop(fn, min_time_s: float) -> float:
    """Seconds per call of `fn` (one warm-up call, then repeated for at least `min_time_s`); best of 3 runs."""
    fn()
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s / 3:
                break
        best = min(best, elapsed / n)
    return best


PROBE_BATCHES = (1, 2, 4, 8)  # images per convolution call of the CPU probe


def measure_compute(precision: str, min_time_s: float = 0.3) -> Dict[str, float]:
    """This process's rates on its threads: a ResNet-like 3x3 convolution's forward + backward (TFLOP/s) in the
    run's precision at 1, 2, 4 and 8 images per call (a CPU's kernels are less efficient on few images: the
    rate at each batch over the best is `eff_<batch>`), a 32 MiB copy (GB/s of memory traffic) and the fixed
    cost of a tiny autograd op (seconds)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(precision, torch.float32)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    rates = {}
    for batch in PROBE_BATCHES:
        x = torch.randn(batch, 64, 28, 28, requires_grad=True)

        def conv_step():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                y = conv(x)
            y.float().sum().backward()

        flops = 3 * 2 * batch * 64 * 28 * 28 * 64 * 9  # forward + 2x backward
        rates[batch] = flops / _time_loop(conv_step, min_time_s / len(PROBE_BATCHES)) / 1e12
    best = max(rates.values())
    out = {"tflops": best}
    running = 0.0
    for batch in PROBE_BATCHES:  # efficiency never falls with more images (a slower probe is the machine's load)
        running = max(running, rates[batch] / best)
        out[f"eff_{batch}"] = running
    a, b = torch.empty(8 * 2 ** 20), torch.empty(8 * 2 ** 20)
    a.fill_(1.0)
    out["mem_gbps"] = 2 * a.numel() * 4 / _time_loop(lambda: b.copy_(a), min_time_s / 3) / 1e9
    leaf = torch.ones(4, requires_grad=True)

    def tiny_ops():
        y = leaf
        for _ in range(20):
            y = y * 1.0001
        y.sum().backward()

    out["op_s"] = _time_loop(tiny_ops, min_time_s / 3) / 21 / 3  # forward + backward of 21 ops, per forward op
    # BatchNorm + PReLU as in an IResNet block, NHWC as the CNN recipes train: seconds per output element
    norm = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.PReLU(64))
    x = torch.randn(4, 64, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_()
    elems = 2 * x.numel()

    def norm_forward():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return norm(x)

    out["norm_act_s"] = _time_loop(norm_forward, min_time_s / 3) / elems
    out["norm_act_bwd_s"] = max(0.0, _time_loop(lambda: norm_forward().float().sum().backward(), min_time_s / 3)
                                / elems - out["norm_act_s"])
    return out


def batch_efficiency(hw: "Hardware", micro: int) -> float:
    """Share of `hw.tflops` a backbone reaches at `micro` images per call: the probe's measured efficiency at the
    largest probed batch <= micro (1.0 from the largest probed batch on, and on a GPU, whose small-batch cost
    the per-call overhead models)."""
    if not hw.batch_efficiency or micro >= hw.batch_efficiency[-1][0]:
        return 1.0
    eff = hw.batch_efficiency[0][1]
    for batch, value in hw.batch_efficiency:
        if batch <= micro:
            eff = value
    return eff


CURVE_BYTES = (1 * 2 ** 20, 4 * 2 ** 20, 16 * 2 ** 20)  # bytes per rank of the collective probes


def measure_collective(device: torch.device, sizes=CURVE_BYTES, min_time_s: float = 0.3) -> Dict[str, Any]:
    """Seconds per call of an all-reduce, an all-gather and a reduce-scatter with `sizes` bytes put in by each
    rank, the per-call latency, and the bus bandwidths (GB/s per rank) at the middle size, on the default
    process group; every rank must call it. The slowest rank's figures (timings all-reduced with max), each the
    best of 3 rounds (other processes only slow a round down, as for the compute probes)."""
    import torch.distributed as tdist

    n = tdist.get_world_size()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(op, reps):
        op()
        sync()
        best = float("inf")
        for _ in range(3):
            tdist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
            sync()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    small = torch.ones(1, device=device)
    ops = {("latency", 4): lambda: tdist.all_reduce(small)}
    for nbytes in sizes:
        full = torch.ones(nbytes // 4, device=device)
        gathered = torch.empty(nbytes // 4 * n, device=device)
        shard = torch.empty(max(1, nbytes // 4 // n), device=device)
        ops[("all_reduce", nbytes)] = lambda t=full: tdist.all_reduce(t)
        ops[("all_gather", nbytes)] = lambda o=gathered, t=full: tdist.all_gather_into_tensor(o, t)
        ops[("reduce_scatter", nbytes)] = lambda o=shard, t=full: tdist.reduce_scatter_tensor(o, t[:o.numel() * n])
    seconds = {}
    for key, op in ops.items():
        estimate = torch.tensor([timed(op, 1)], dtype=torch.float64, device=device)
        tdist.all_reduce(estimate, op=tdist.ReduceOp.MAX)  # every rank must run the same number of calls
        reps = max(1, min(20, int(min_time_s / len(ops) / 3 / max(float(estimate), 1e-6))))
        seconds[key] = timed(op, reps)
    out = torch.tensor(list(seconds.values()), dtype=torch.float64, device=device)
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    seconds = dict(zip(seconds, out.tolist()))
    latency = seconds.pop(("latency", 4))
    mid = sizes[len(sizes) // 2]
    bus = {"all_reduce": 2 * (n - 1) / n * mid, "all_gather": (n - 1) * mid, "reduce_scatter": (n - 1) / n * mid}
    gbps = {k: bus[k] / max(seconds[(k, mid)] - latency, 1e-9) / 1e9 for k in bus}
    curves = {k: tuple((float(s), seconds[(k, s)]) for s in sizes) for k in bus}
    return {"link_gbps": gbps["all_reduce"], "gather_gbps": gbps["all_gather"], "scatter_gbps": gbps["reduce_scatter"],
            "latency_s": latency, "curves": curves}


def measure_unit_overhead(device: torch.device, num_units: int = 8, width: int = 64) -> float:
    """Seconds FSDP2 adds per sharded unit to a micro-batch's forward + backward beyond the arithmetic: its
    hooks, DTensor bookkeeping and the launches of two all-gathers and a reduce-scatter of a tiny unit (so the
    bytes are negligible). `num_units` Linear+ReLU blocks, each `fully_shard`-ed with reshard_after_forward,
    against the same blocks unsharded; every rank of the default process group must call it."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def blocks() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                     for _ in range(num_units)]).to(device)

    plain, sharded = blocks(), blocks()
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    for block in sharded:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(4, width, device=device)
    seconds = {}
    for name, model in (("plain", plain), ("sharded", sharded)):
        def step():
            model(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        step()
        best = float("inf")
        for _ in range(3):  # the same number of calls on every rank: the sharded step has collectives
            tdist.barrier()
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            best = min(best, (time.perf_counter() - t0) / 5)
        seconds[name] = best
    out = torch.tensor([seconds["sharded"] - seconds["plain"]], dtype=torch.float64, device=device)
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return max(0.0, float(out)) / (num_units + 1)


def _probe_rank(precision: str, threads: int) -> Dict[str, float]:
    """One rank of `calibrate_cpu`'s spawned probe (module level: spawned processes import it)."""
    torch.set_num_threads(threads)
    out = measure_compute(precision)
    out.update(measure_collective(torch.device("cpu")))
    out["unit_s"] = measure_unit_overhead(torch.device("cpu"))
    return out


def merge_figures(per_rank) -> Dict[str, Any]:
    """One set of figures from every rank's: the slowest rank's (lowest rate, highest cost, longest call)."""
    out: Dict[str, Any] = {}
    for key in per_rank[0]:
        if key == "curves":
            out[key] = {k: tuple((s, max(r[key][k][i][1] for r in per_rank)) for i, (s, _) in enumerate(v))
                        for k, v in per_rank[0][key].items()}
        else:
            out[key] = (max if key in ("op_s", "latency_s", "unit_s", "norm_act_s", "norm_act_bwd_s") else min)(
                r[key] for r in per_rank)
    return out


def cpu_hardware(figures: Dict[str, Any], source: str) -> Hardware:
    """Hardware for a CPU from measured `figures` (tflops, mem_gbps, op_s, link_gbps, latency_s)."""
    eff = tuple((b, figures[f"eff_{b}"]) for b in PROBE_BATCHES if f"eff_{b}" in figures)
    return Hardware(device="cpu", tflops=figures["tflops"], link_gbps=figures["link_gbps"],
                    inter_node_gbps=figures["link_gbps"], latency_s=figures["latency_s"], op_s=figures["op_s"],
                    mem_gbps=figures["mem_gbps"], pcie_gbps=figures["mem_gbps"],
                    host_mem_gbps=figures["mem_gbps"], source=source, batch_efficiency=eff,
                    gather_gbps=figures.get("gather_gbps", 0.0), scatter_gbps=figures.get("scatter_gbps", 0.0),
                    unit_s=figures.get("unit_s", 0.0), norm_act_s=figures.get("norm_act_s", 0.0),
                    norm_act_bwd_s=figures.get("norm_act_bwd_s", 0.0),
                    curves=tuple(sorted((k, tuple(v)) for k, v in figures.get("curves", {}).items())))


def calibrate_cpu(precision: str, world_size: int, *, peak_tflops: Optional[float] = None,
                  link_gbps: Optional[float] = None, timeout_s: float = 120.0) -> Hardware:
    """Measure this machine as `world_size` CPU ranks would use it: min(world, cores, 8) spawned gloo ranks,
    each with cores // ranks threads (as engine.runtime.dist.init gives launched ranks), measure compute
    together (so they share the cores as training would) and then an all-reduce between them (a few seconds).
    The slowest rank's figures are used; --peak-tflops / --link-gbps replace the measured ones."""
    from engine.runtime.spawn import run_distributed

    cores = os.cpu_count() or 1
    ranks = max(1, min(world_size, cores, 8))
    threads = max(1, cores // ranks)
    if ranks > 1:
        per_rank = run_distributed(_probe_rank, ranks, precision, threads, timeout_s=timeout_s)
    else:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            per_rank = [dict(measure_compute(precision), link_gbps=float("inf"), gather_gbps=float("inf"),
                             scatter_gbps=float("inf"), latency_s=0.0)]
        finally:
            torch.set_num_threads(torch_threads)
    figures = merge_figures(per_rank)
    if peak_tflops:  # a given rate is the rate at every batch
        figures.update({k: 1.0 for k in figures if k.startswith("eff_")})
    if peak_tflops:
        figures["tflops"] = peak_tflops
    if link_gbps:  # a given bandwidth is every collective's
        figures.update(link_gbps=link_gbps, gather_gbps=link_gbps, scatter_gbps=link_gbps, curves={})
    small = ", ".join(f"{figures[f'eff_{b}']:.2f}" for b in PROBE_BATCHES if f"eff_{b}" in figures)
    source = (f"measured on {ranks} rank(s) x {threads} thread(s): conv fwd+bwd {figures['tflops'] * 1e3:.1f} "
              f"GFLOP/s {precision}{' (given)' if peak_tflops else ''} (x {small} at {'/'.join(map(str, PROBE_BATCHES))} "
              f"images), copy {figures['mem_gbps']:.1f} GB/s, "
              f"op {figures['op_s'] * 1e6:.1f} us, norm/act {figures['norm_act_s'] * 1e9:.2f} + "
              f"{figures['norm_act_bwd_s'] * 1e9:.2f} ns/element, all-reduce "
              + (f"{figures['link_gbps']:.2f} GB/s{' (given)' if link_gbps else ''} (all-gather "
                 f"{figures['gather_gbps']:.2f}, reduce-scatter {figures['scatter_gbps']:.2f}) + "
                 f"{figures['latency_s'] * 1e6:.0f} us/call, sharded unit {figures['unit_s'] * 1e3:.2f} ms"
                 if ranks > 1 else "none (1 rank)"))
    return cpu_hardware(figures, source)


def with_overrides(hw: Hardware, peak_tflops: Optional[float], link_gbps: Optional[float]) -> Hardware:
    """`hw` with a given peak / link bandwidth in place of its own (GPU: the peak scaled by GPU_ACHIEVABLE)."""
    if peak_tflops:
        hw = replace(hw, tflops=peak_tflops * (GPU_ACHIEVABLE if hw.device == "gpu" else 1.0))
    if link_gbps:
        hw = replace(hw, link_gbps=link_gbps, gather_gbps=0.0, scatter_gbps=0.0)
    return hw


# ---- the model ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per optimizer step on one rank, by cause (see the module docstring)."""

    compute: float
    recompute: float
    head: float
    overhead: float
    comm: float
    optimizer: float
    offload: float
    comm_bytes: float  # bytes this rank sends per step (all collectives)

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.head + self.overhead + self.comm + self.optimizer + self.offload

    def parts(self) -> Dict[str, float]:
        """Seconds by cause, with the names the search's verdicts use."""
        return {"compute": self.compute, "recomputation": self.recompute, "head": self.head,
                "per-call overhead": self.overhead, "communication": self.comm, "optimizer and copies": self.optimizer,
                "host transfers": self.offload}


def _ring(kind: str, n: int, nbytes: float) -> float:
    """Bytes one rank sends in a ring collective over n ranks on a buffer of `nbytes` (the full tensor)."""
    if n <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (n - 1) / n * nbytes


def step_time(cfg, world: int, micro: int, measure, prof, num_sampled: int, chunk: int, hw: Hardware,
              ranks_per_node: Optional[int] = None) -> StepTime:
    """Predicted step time of `cfg` (a candidate's config) on `world` ranks at `micro` images per rank.

    Args:
        cfg: the candidate's RunConfig (backend, ZeRO stage / engine.fsdp, precision, optimizer, accumulation,
            engine.head settings are read from it, as the memory planner reads them).
        measure / prof: engine.perf.planner's BackboneMeasure and the BackboneProfile of cfg's checkpointing.
        num_sampled: head rows used per step on this rank; chunk: the softmax chunk (0: unchunked).
        hw: the device's and links' figures.
        ranks_per_node: ranks sharing the fast link (default: all); collectives spanning nodes use
            hw.inter_node_gbps.
    """
    from engine.perf import planner

    n, accum = world, cfg.gradient_accumulation_steps
    per_node = min(ranks_per_node or n, n)
    P, T, E = prof.num_params, prof.trained, prof.embedding_size  # T: the trained ones (engine.model.freeze)
    pb = planner._precision_bytes(cfg)
    c = planner.COMPUTE_BYTES[cfg.precision]
    state, _ = planner._optimizer_state(cfg)
    clip = 1 if float(cfg.deepspeed.get("gradient_clipping", 0) or 0) > 0 else 0
    step_bytes_per_param = (3 + 2 * state + clip) * 4
    rate = hw.tflops * 1e12 * batch_efficiency(hw, micro)
    images = micro * accum

    norm_act = prof.norm_act_elems * hw.norm_act_s + prof.norm_act_backward_elems * hw.norm_act_bwd_s
    compute = images * (2 * prof.train_macs / rate + norm_act)
    recompute = images * (2 * prof.recompute_macs / rate + prof.recompute_norm_act_elems * hw.norm_act_s)
    head_flops = 6 * (micro * n) * num_sampled * E * accum + (2 * micro * n * num_sampled * E * accum if chunk else 0)
    head_mem = 3 * num_sampled * E * 4 * accum  # gathered rows, their gradient, the update
    num_local = getattr(cfg.engine.head, "num_classes", 0) or 0
    if cfg.engine.head.sample_rate < 1.0 and num_local:  # per forward: a score per local class, top-k, index
        head_mem += accum * -(-num_local // n) * 16
    head = head_flops / rate + head_mem / (hw.mem_gbps * 1e9)
    recompute_ops = prof.num_ops * (prof.recompute_macs / prof.macs if prof.macs else 0.0)
    dispatch = accum * (prof.num_ops + 2 * prof.backward_ops + recompute_ops) * hw.op_s

    # Collectives per step: (seconds, bytes this rank sends, overlapped?), each priced by Hardware.collective_s
    # at the sizes the backend calls it with; and the copies the backends make around them (bytes of memory
    # traffic): flat buffers in and out, per gather pass or reduction.
    cross = n > per_node
    comm_parts = []
    copies, unit_cost = 0.0, 0.0

    def add(kind: str, sizes, group: int, overlapped: bool, across: bool = cross, times: float = 1.0) -> None:
        """`times` x one collective of `kind` on each tensor size (bytes) in `sizes` over `group` ranks."""
        sizes = list(sizes)
        comm_parts.append((times * sum(hw.collective_s(kind, s, group, across) for s in sizes),
                           times * sum(_ring(kind, group, s) for s in sizes), overlapped))

    def chunks(total: float, size: float):
        """`total` bytes in calls of at most `size` bytes."""
        full, rest = divmod(total, size)
        return [size] * int(full) + ([rest] if rest else [])

    block_params = [p for _, p in prof.held] + [prof.root_params]  # FSDP2's units: every block and the root
    backend = planner.backend_of(cfg)
    offload_bytes, host_step = 0.0, False
    if backend == "deepspeed":
        stage = cfg.zero_stage
        zero = cfg.deepspeed.get("zero_optimization", {})
        bucket = float(zero.get("reduce_bucket_size", planner.DS_REDUCE_BUCKET))
        if stage == 0:  # fp32 parameters: engine.parallel.reducer starts it during the backward, as DDP
            overlap = pb["param"] == 4
            add("all_reduce", chunks(T * pb["grad"], 25 * 2 ** 20 if overlap else bucket * pb["grad"]), n, overlap)
            copies += 4 * T * pb["grad"] if n > 1 else 0.0  # into the buckets, the 1/world scaling (.grad = a slice)
        elif stage in (1, 2):
            gather_bucket = float(zero.get("allgather_bucket_size", 5e8))
            reductions = 1 if stage == 1 else accum  # ZeRO-2 partitions the gradients every micro-batch
            add("reduce_scatter", chunks(T * pb["grad"], bucket * pb["grad"]), n,
                stage == 2 and bool(zero.get("overlap_comm", False)), times=reductions)
            add("all_gather", chunks(T * pb["param"], gather_bucket * pb["param"]), n, False)
            copies += reductions * 4 * T * pb["grad"] + 4 * T * pb["param"] + 8 * T / n
        else:
            threshold = int(zero.get("stage3_param_persistence_threshold", 100000))
            fetched = [m for m in measure.module_params if m > threshold]
            add("all_gather", [m * pb["param"] for m in fetched], n, True, times=2 * accum)  # forward, backward
            add("reduce_scatter", chunks(T * pb["grad"], bucket * pb["grad"]), n, True, times=accum)
            unit_cost += accum * len(fetched) * hw.unit_s
            copies += accum * (2 * 2 * sum(fetched) * pb["param"] + 4 * T * pb["grad"]) + 8 * T / n
        sharded = T / n if stage >= 1 else T
    else:
        fs = planner.fsdp_settings(cfg)
        k = per_node if fs["hybrid"] else n
        replicas = n // k
        group_cross = cross and not fs["hybrid"]
        passes = 2 if fs["reshard_after_forward"] else 1
        reduces = 1 if accum > 1 else accum  # no-sync accumulation reduces once per step
        add("all_gather", [p * c for p in block_params if p], k, True, group_cross, times=accum * passes)
        add("reduce_scatter", [p * 4 for p in block_params if p], k, True, group_cross, times=reduces)
        if replicas > 1:
            add("all_reduce", [p * 4 / k for p in block_params if p], replicas, True, True)
        unit_cost += accum * len([p for p in block_params if p]) * hw.unit_s  # hooks, launches
        copies += accum * passes * 2 * P * c + reduces * 2 * P * 4 + 8 * P / k  # gather copy-out, reduce copy-in
        sharded = T / k
        if fs["cpu_offload"] and hw.device == "gpu":
            offload_bytes += accum * passes * 4 * P / k + reduces * 4 * P / k
            host_step = True

    overhead = dispatch + unit_cost
    if hw.device == "gpu":  # kernels run asynchronously: dispatch costs only what the kernels do not cover
        overhead = max(0.0, overhead - (compute + recompute + head))
    busy = compute + recompute + head + overhead
    hidden_budget = OVERLAP_SHARE * busy if hw.device == "gpu" else 0.0
    exposed = sum(t for t, _, over in comm_parts if not over)
    overlapped = sum(t for t, _, over in comm_parts if over)
    total_bytes = sum(b for _, b, _ in comm_parts)
    comm = exposed + max(0.0, overlapped - hidden_budget)

    step_bytes = step_bytes_per_param * sharded
    optimizer = (step_bytes / (hw.host_mem_gbps if host_step else hw.mem_gbps) + copies / hw.mem_gbps) / 1e9
    storage = planner.STORAGE_BYTES[planner._head_setting(cfg, "storage_dtype", "fp32")]
    if planner._head_setting(cfg, "offload", "none") == "cpu" and hw.device == "gpu":
        offload_bytes += accum * num_sampled * E * (storage + 4)  # rows up, their gradient down
        optimizer += (3 + 2 * state) * 4 * num_sampled * E / (hw.host_mem_gbps * 1e9)
    else:
        optimizer += (3 + 2 * state) * 4 * num_sampled * E / (hw.mem_gbps * 1e9)
    offload = offload_bytes / (hw.pcie_gbps * 1e9)
    return StepTime(compute=compute, recompute=recompute, head=head, overhead=overhead, comm=comm,
                    optimizer=optimizer, offload=offload, comm_bytes=total_bytes)
