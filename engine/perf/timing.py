"""Step-time model for the planner's search (engine.plan --fit, engine.auto): what a setting costs per step.

A candidate setting (backend and sharding, activation checkpointing, micro-batch and accumulation, head
storage) changes how much work a rank does and how many bytes it moves, not what it computes. The model adds,
per optimizer step and rank:

* compute: FLOPs of the step (3 x the forward's conv/linear MACs x 2, the recomputed blocks' forward again, the
  head's logits and gradients against the sampled rows, the chunked softmax's recomputed logits) at the
  device's achievable rate (`Hardware.tflops`);
* per-call overhead: every leaf module call in forward, backward and recomputation costs `op_s` (kernel launch
  and dispatch on a GPU, the framework's per-op work on a CPU) -- what makes small micro-batches slow. A GPU
  runs kernels asynchronously, so there only the dispatch time the kernels do not cover counts;
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

import os
import time
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

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
HOST_MEM_GBPS = 20.0  # a CPU-side optimizer step over offloaded state, on a GPU machine


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

    def bandwidth(self, kind: str, cross_node: bool = False) -> float:
        """Bytes per second of one rank in a collective of `kind` (all_reduce, all_gather, reduce_scatter)."""
        own = {"all_gather": self.gather_gbps, "reduce_scatter": self.scatter_gbps}.get(kind) or self.link_gbps
        return (min(own, self.inter_node_gbps) if cross_node else own) * 1e9


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
    return Hardware(device="gpu", tflops=peak * GPU_ACHIEVABLE, link_gbps=link_gbps or links["link_gbps"],
                    inter_node_gbps=min(link_gbps or GPU_INTER_NODE_GBPS, GPU_INTER_NODE_GBPS),
                    latency_s=GPU_LATENCY_S, op_s=GPU_OP_S, mem_gbps=links["mem_gbps"],
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


def measure_collective(device: torch.device, nbytes: int = 8 * 2 ** 20, min_time_s: float = 0.2) -> Dict[str, float]:
    """Bus bandwidth (GB/s per rank) of an all-reduce, an all-gather and a reduce-scatter of `nbytes` per rank
    (about one residual block's parameters), and the per-call latency (s), on the default process group; every
    rank must call it. The slowest rank's figures (each rank's timing is all-reduced with max). gloo's
    all-gather and reduce-scatter can be several times slower than its all-reduce on the same bytes."""
    import torch.distributed as tdist

    n = tdist.get_world_size()
    full = torch.ones(nbytes // 4, device=device)
    gathered = torch.empty(nbytes // 4 * n, device=device)
    shard = torch.empty(max(1, nbytes // 4 // n), device=device)
    small = torch.ones(1, device=device)
    ops = {"latency": lambda: tdist.all_reduce(small),
           "all_reduce": lambda: tdist.all_reduce(full),
           "all_gather": lambda: tdist.all_gather_into_tensor(gathered, full),
           "reduce_scatter": lambda: tdist.reduce_scatter_tensor(shard, full[:shard.numel() * n])}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(op, reps, rounds=1):
        """Seconds per call, the best of `rounds` rounds of `reps` calls (other processes only slow a round
        down, as for the compute probes)."""
        op()
        sync()
        best = float("inf")
        for _ in range(rounds):
            tdist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
            sync()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    seconds = {}
    for name, op in ops.items():
        estimate = torch.tensor([timed(op, 2)], dtype=torch.float64, device=device)
        tdist.all_reduce(estimate, op=tdist.ReduceOp.MAX)  # every rank must run the same number of calls
        reps = max(1, min(20, int(min_time_s / len(ops) / 3 / max(float(estimate), 1e-6))))
        seconds[name] = timed(op, reps, rounds=3)
    out = torch.tensor([seconds[k] for k in ops], dtype=torch.float64, device=device)
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    seconds = dict(zip(ops, out.tolist()))
    latency = seconds["latency"]
    bus = {"all_reduce": 2 * (n - 1) / n * nbytes, "all_gather": (n - 1) * nbytes, "reduce_scatter": (n - 1) / n * nbytes}
    gbps = {k: bus[k] / max(seconds[k] - latency, 1e-9) / 1e9 for k in bus}
    return {"link_gbps": gbps["all_reduce"], "gather_gbps": gbps["all_gather"], "scatter_gbps": gbps["reduce_scatter"],
            "latency_s": latency}


def _probe_rank(precision: str, threads: int) -> Dict[str, float]:
    """One rank of `calibrate_cpu`'s spawned probe (module level: spawned processes import it)."""
    torch.set_num_threads(threads)
    out = measure_compute(precision)
    out.update(measure_collective(torch.device("cpu")))
    return out


def cpu_hardware(figures: Dict[str, float], source: str) -> Hardware:
    """Hardware for a CPU from measured `figures` (tflops, mem_gbps, op_s, link_gbps, latency_s)."""
    eff = tuple((b, figures[f"eff_{b}"]) for b in PROBE_BATCHES if f"eff_{b}" in figures)
    return Hardware(device="cpu", tflops=figures["tflops"], link_gbps=figures["link_gbps"],
                    inter_node_gbps=figures["link_gbps"], latency_s=figures["latency_s"], op_s=figures["op_s"],
                    mem_gbps=figures["mem_gbps"], pcie_gbps=figures["mem_gbps"],
                    host_mem_gbps=figures["mem_gbps"], source=source, batch_efficiency=eff,
                    gather_gbps=figures.get("gather_gbps", 0.0), scatter_gbps=figures.get("scatter_gbps", 0.0))


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
    figures = {k: (max if k in ("op_s", "latency_s") else min)(r[k] for r in per_rank) for k in per_rank[0]}
    if peak_tflops:  # a given rate is the rate at every batch
        figures.update({k: 1.0 for k in figures if k.startswith("eff_")})
    if peak_tflops:
        figures["tflops"] = peak_tflops
    if link_gbps:  # a given bandwidth is every collective's
        figures.update(link_gbps=link_gbps, gather_gbps=link_gbps, scatter_gbps=link_gbps)
    small = ", ".join(f"{figures[f'eff_{b}']:.2f}" for b in PROBE_BATCHES if f"eff_{b}" in figures)
    source = (f"measured on {ranks} rank(s) x {threads} thread(s): conv fwd+bwd {figures['tflops'] * 1e3:.1f} "
              f"GFLOP/s {precision}{' (given)' if peak_tflops else ''} (x {small} at {'/'.join(map(str, PROBE_BATCHES))} "
              f"images), copy {figures['mem_gbps']:.1f} GB/s, "
              f"op {figures['op_s'] * 1e6:.1f} us, all-reduce "
              + (f"{figures['link_gbps']:.2f} GB/s{' (given)' if link_gbps else ''} (all-gather "
                 f"{figures['gather_gbps']:.2f}, reduce-scatter {figures['scatter_gbps']:.2f}) + "
                 f"{figures['latency_s'] * 1e6:.0f} us/call" if ranks > 1 else "none (1 rank)"))
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
    P, E = prof.num_params, prof.embedding_size
    pb = planner._precision_bytes(cfg)
    c = planner.COMPUTE_BYTES[cfg.precision]
    state, _ = planner._optimizer_state(cfg)
    clip = 1 if float(cfg.deepspeed.get("gradient_clipping", 0) or 0) > 0 else 0
    step_bytes_per_param = (3 + 2 * state + clip) * 4
    rate = hw.tflops * 1e12 * batch_efficiency(hw, micro)
    images = micro * accum

    compute = images * 2 * 3 * prof.macs / rate
    recompute = images * 2 * prof.recompute_macs / rate
    head_flops = 6 * (micro * n) * num_sampled * E * accum + (2 * micro * n * num_sampled * E * accum if chunk else 0)
    head_mem = 3 * num_sampled * E * 4 * accum  # gathered rows, their gradient, the update
    num_local = getattr(cfg.engine.head, "num_classes", 0) or 0
    if cfg.engine.head.sample_rate < 1.0 and num_local:  # per forward: a score per local class, top-k, index
        head_mem += accum * -(-num_local // n) * 16
    head = head_flops / rate + head_mem / (hw.mem_gbps * 1e9)
    recompute_ops = prof.num_ops * (prof.recompute_macs / prof.macs if prof.macs else 0.0)
    overhead = accum * (3 * prof.num_ops + recompute_ops) * hw.op_s
    if hw.device == "gpu":  # kernels run asynchronously: dispatch costs only what the kernels do not cover
        overhead = max(0.0, overhead - (compute + recompute + head))

    # Collectives per step: (kind, bytes this rank sends, calls, overlapped?, across nodes?); and the copies the
    # backends make around them (bytes of memory traffic): flat buffers in and out, per gather pass or reduction.
    cross = n > per_node
    comm_parts = []
    copies = 0.0
    backend = planner.backend_of(cfg)
    offload_bytes, host_step = 0.0, False
    if backend == "deepspeed":
        stage = cfg.zero_stage
        zero = cfg.deepspeed.get("zero_optimization", {})
        bucket = float(zero.get("reduce_bucket_size", planner.DS_REDUCE_BUCKET))
        reduce_calls = max(1.0, P / bucket)
        if stage == 0:  # fp32 parameters: engine.parallel.reducer starts it during the backward, as DDP
            overlap = pb["param"] == 4
            calls = max(1.0, P * 4 / (25 * 2 ** 20)) if overlap else reduce_calls
            comm_parts.append(("all_reduce", _ring("all_reduce", n, P * pb["grad"]), calls, overlap, cross))
            copies += 6 * P * pb["grad"] if n > 1 else 0.0  # into the buckets, the 1/world scaling, back
        elif stage == 1:
            comm_parts.append(("reduce_scatter", _ring("reduce_scatter", n, P * pb["grad"]), reduce_calls, False,
                               cross))
            comm_parts.append(("all_gather", _ring("all_gather", n, P * pb["param"]), reduce_calls, False, cross))
            copies += 4 * P * pb["grad"] + 4 * P * pb["param"] + 8 * P / n
        elif stage == 2:
            overlap = bool(zero.get("overlap_comm", False))
            comm_parts.append(("reduce_scatter", accum * _ring("reduce_scatter", n, P * pb["grad"]),
                               accum * reduce_calls, overlap, cross))
            comm_parts.append(("all_gather", _ring("all_gather", n, P * pb["param"]), reduce_calls, False, cross))
            copies += accum * 4 * P * pb["grad"] + 4 * P * pb["param"] + 8 * P / n
        else:
            threshold = int(zero.get("stage3_param_persistence_threshold", 100000))
            fetched = [m for m in measure.module_params if m > threshold]
            gathered = sum(fetched)
            comm_parts.append(("all_gather", accum * 2 * _ring("all_gather", n, gathered * pb["param"]),
                               accum * 2 * len(fetched), True, cross))
            comm_parts.append(("reduce_scatter", accum * _ring("reduce_scatter", n, P * pb["grad"]),
                               accum * reduce_calls, True, cross))
            copies += accum * (2 * 2 * gathered * pb["param"] + 4 * P * pb["grad"]) + 8 * P / n
        sharded = P / n if stage >= 1 else P
    else:
        fs = planner.fsdp_settings(cfg)
        k = per_node if fs["hybrid"] else n
        replicas = n // k
        group_cross = cross and not fs["hybrid"]
        passes = 2 if fs["reshard_after_forward"] else 1
        units = prof.num_units + 1
        comm_parts.append(("all_gather", accum * passes * _ring("all_gather", k, P * c), accum * passes * units, True,
                           group_cross))
        reduces = 1 if accum > 1 else accum  # no-sync accumulation reduces once per step
        comm_parts.append(("reduce_scatter", reduces * _ring("reduce_scatter", k, P * 4), reduces * units, True,
                           group_cross))
        if replicas > 1:
            comm_parts.append(("all_reduce", _ring("all_reduce", replicas, P * 4 / k), units, True, True))
        copies += accum * passes * 2 * P * c + reduces * 2 * P * 4 + 8 * P / k  # gather copy-out, reduce copy-in
        sharded = P / k
        if fs["cpu_offload"] and hw.device == "gpu":
            offload_bytes += accum * passes * 4 * P / k + reduces * 4 * P / k
            host_step = True

    busy = compute + recompute + head + overhead
    hidden_budget = OVERLAP_SHARE * busy if hw.device == "gpu" else 0.0
    exposed, overlapped, total_bytes = 0.0, 0.0, 0.0
    for kind, nbytes, calls, over, across in comm_parts:
        t = nbytes / hw.bandwidth(kind, across) + calls * hw.latency_s if nbytes else 0.0
        total_bytes += nbytes
        if over:
            overlapped += t
        else:
            exposed += t
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
