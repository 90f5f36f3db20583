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
* optimizer and bookkeeping: bytes of memory traffic per parameter of the optimizer step and of each backend's
  flat-buffer copies, at the device's memory bandwidth (a CPU-side step for offloaded state: host bandwidth);
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

# Bytes of memory traffic per parameter beyond the optimizer's own (3 + 2 x state values of 4 bytes, read and
# written): the flat-buffer copies each backend makes per step. DeepSpeed ZeRO-0 flattens every gradient into its
# all-reduce buckets and back (2 x 4 B each way); ZeRO 1-2 also copy the gradient partition into the fp32
# partition and the updated partition back into the parameters (all ranks' parameters after the all-gather);
# ZeRO-3 copies each gathered block in and out of its flat buffer in forward and backward. FSDP2 copies in
# and out of its all-gather and reduce-scatter buffers.
BOOKKEEPING_BYTES = {"ZeRO-0": 16, "ZeRO-1": 32, "ZeRO-2": 32, "ZeRO-3": 40, "FSDP2": 24}


@dataclass(frozen=True)
class Hardware:
    """What one rank's device and links can do, and where each figure comes from.

    Attributes:
        device: "gpu" or "cpu".
        tflops: achievable dense TFLOP/s at the run's precision (GPU: peak x GPU_ACHIEVABLE; CPU: measured).
        link_gbps: collective bus bandwidth between ranks of one node, GB/s per rank.
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


def measure_collective(device: torch.device, nbytes: int = 4 * 2 ** 20, min_time_s: float = 0.2) -> Dict[str, float]:
    """Bus bandwidth (GB/s per rank) and per-call latency (s) of an all-reduce on the default process group;
    every rank must call it. The slowest rank's figures (each rank's timing is all-reduced with max)."""
    import torch.distributed as tdist

    n = tdist.get_world_size()
    big = torch.ones(nbytes // 4, device=device)
    small = torch.ones(1, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(t, reps):
        tdist.all_reduce(t)
        sync()
        tdist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            tdist.all_reduce(t)
        sync()
        return (time.perf_counter() - t0) / reps

    latency = timed(small, 20)
    estimate = torch.tensor([timed(big, 2)], dtype=torch.float64, device=device)
    tdist.all_reduce(estimate, op=tdist.ReduceOp.MAX)  # every rank must run the same number of calls
    reps = max(2, min(50, int(min_time_s / max(float(estimate), 1e-6))))
    per_call = timed(big, reps)
    out = torch.tensor([latency, per_call], dtype=torch.float64, device=device)
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    latency, per_call = float(out[0]), float(out[1])
    bus_bytes = 2 * (n - 1) / n * nbytes
    return {"link_gbps": bus_bytes / max(per_call - latency, 1e-9) / 1e9, "latency_s": latency}


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
                    host_mem_gbps=figures["mem_gbps"], source=source, batch_efficiency=eff)


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
            per_rank = [dict(measure_compute(precision), link_gbps=float("inf"), latency_s=0.0)]
        finally:
            torch.set_num_threads(torch_threads)
    figures = {k: (max if k in ("op_s", "latency_s") else min)(r[k] for r in per_rank) for k in per_rank[0]}
    if peak_tflops:  # a given rate is the rate at every batch
        figures.update({k: 1.0 for k in figures if k.startswith("eff_")})
    if peak_tflops:
        figures["tflops"] = peak_tflops
    if link_gbps:
        figures["link_gbps"] = link_gbps
    small = ", ".join(f"{figures[f'eff_{b}']:.2f}" for b in PROBE_BATCHES if f"eff_{b}" in figures)
    source = (f"measured on {ranks} rank(s) x {threads} thread(s): conv fwd+bwd {figures['tflops'] * 1e3:.1f} "
              f"GFLOP/s {precision}{' (given)' if peak_tflops else ''} (x {small} at {'/'.join(map(str, PROBE_BATCHES))} "
              f"images), copy {figures['mem_gbps']:.1f} GB/s, "
              f"op {figures['op_s'] * 1e6:.1f} us, all-reduce "
              + (f"{figures['link_gbps']:.2f} GB/s{' (given)' if link_gbps else ''} + "
                 f"{figures['latency_s'] * 1e6:.0f} us/call" if ranks > 1 else "none (1 rank)"))
    return cpu_hardware(figures, source)


def with_overrides(hw: Hardware, peak_tflops: Optional[float], link_gbps: Optional[float]) -> Hardware:
    """`hw` with a given peak / link bandwidth in place of its own (GPU: the peak scaled by GPU_ACHIEVABLE)."""
    if peak_tflops:
        hw = replace(hw, tflops=peak_tflops * (GPU_ACHIEVABLE if hw.device == "gpu" else 1.0))
    if link_gbps:
        hw = replace(hw, link_gbps=link_gbps)
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

    # Collectives: (bytes per rank, calls, overlapped?) per step.
    cross = n > per_node
    bw = (hw.inter_node_gbps if cross else hw.link_gbps) * 1e9
    comm_parts = []  # (bytes, calls, overlapped, bandwidth)
    backend = planner.backend_of(cfg)
    offload_bytes, host_step = 0.0, False
    if backend == "deepspeed":
        stage = cfg.zero_stage
        zero = cfg.deepspeed.get("zero_optimization", {})
        bucket = float(zero.get("reduce_bucket_size", planner.DS_REDUCE_BUCKET))
        reduce_calls = max(1.0, P / bucket)
        family = f"ZeRO-{stage}"
        if stage == 0:  # fp32 parameters: engine.parallel.reducer starts it during the backward, as DDP
            overlap = pb["param"] == 4
            comm_parts.append((_ring("all_reduce", n, P * pb["grad"]), max(1.0, P * 4 / (25 * 2 ** 20)) if overlap
                               else reduce_calls, overlap, bw))
        elif stage == 1:
            comm_parts.append((_ring("reduce_scatter", n, P * pb["grad"]), reduce_calls, False, bw))
            comm_parts.append((_ring("all_gather", n, P * pb["param"]), reduce_calls, False, bw))
        elif stage == 2:
            overlap = bool(zero.get("overlap_comm", False))
            comm_parts.append((accum * _ring("reduce_scatter", n, P * pb["grad"]), accum * reduce_calls, overlap, bw))
            comm_parts.append((_ring("all_gather", n, P * pb["param"]), reduce_calls, False, bw))
        else:
            threshold = int(zero.get("stage3_param_persistence_threshold", 100000))
            fetched = [m for m in measure.module_params if m > threshold]
            gathered = sum(fetched)
            comm_parts.append((accum * 2 * _ring("all_gather", n, gathered * pb["param"]), accum * 2 * len(fetched),
                               True, bw))
            comm_parts.append((accum * _ring("reduce_scatter", n, P * pb["grad"]), accum * reduce_calls, True, bw))
        sharded = P / n if stage >= 1 else P
    else:
        fs = planner.fsdp_settings(cfg)
        family = "FSDP2"
        k = per_node if fs["hybrid"] else n
        replicas = n // k
        group_bw = hw.link_gbps * 1e9 if fs["hybrid"] else bw
        passes = 2 if fs["reshard_after_forward"] else 1
        units = prof.num_units + 1
        comm_parts.append((accum * passes * _ring("all_gather", k, P * c), accum * passes * units, True, group_bw))
        reduces = 1 if accum > 1 else accum  # no-sync accumulation reduces once per step
        comm_parts.append((reduces * _ring("reduce_scatter", k, P * 4), reduces * units, True, group_bw))
        if replicas > 1:
            comm_parts.append((_ring("all_reduce", replicas, P * 4 / k), units, True, hw.inter_node_gbps * 1e9))
        sharded = P / k
        if fs["cpu_offload"] and hw.device == "gpu":
            offload_bytes += accum * passes * 4 * P / k + reduces * 4 * P / k
            host_step = True

    busy = compute + recompute + head + overhead
    hidden_budget = OVERLAP_SHARE * busy if hw.device == "gpu" else 0.0
    exposed, overlapped, total_bytes = 0.0, 0.0, 0.0
    for nbytes, calls, over, link in comm_parts:
        t = nbytes / link + calls * hw.latency_s if nbytes else 0.0
        total_bytes += nbytes
        if over:
            overlapped += t
        else:
            exposed += t
    comm = exposed + max(0.0, overlapped - hidden_budget)

    step_bytes = step_bytes_per_param * sharded
    optimizer = (step_bytes / (hw.host_mem_gbps if host_step else hw.mem_gbps)
                 + BOOKKEEPING_BYTES[family] * P / hw.mem_gbps) / 1e9
    storage = planner.STORAGE_BYTES[planner._head_setting(cfg, "storage_dtype", "fp32")]
    if planner._head_setting(cfg, "offload", "none") == "cpu" and hw.device == "gpu":
        offload_bytes += accum * num_sampled * E * (storage + 4)  # rows up, their gradient down
        optimizer += (3 + 2 * state) * 4 * num_sampled * E / (hw.host_mem_gbps * 1e9)
    else:
        optimizer += (3 + 2 * state) * 4 * num_sampled * E / (hw.mem_gbps * 1e9)
    offload = offload_bytes / (hw.pcie_gbps * 1e9)
    return StepTime(compute=compute, recompute=recompute, head=head, overhead=overhead, comm=comm,
                    optimizer=optimizer, offload=offload, comm_bytes=total_bytes)
