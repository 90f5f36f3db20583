"""Report side of engine.profile: per-rank records -> profile.json, summary.txt and profile.png.

Everything here is arithmetic on what engine.perf.profiler measured on each rank, plus the planner's predictions
(engine.plan: FLOPs per sample and per-rank memory rows). The schema of profile.json is documented in
docs/profile_json.md and checked by `validate` against `SCHEMA` (a JSON-Schema subset, so a jsonschema
validator accepts it too).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from engine.perf import hardware
from engine.runtime.fileio import atomic_write_text

STEP_PHASES = ("data", "h2d", "forward", "head", "backward", "guard", "backbone_step", "head_step")  # engine.train.trainer's
HOOK_PHASES = ("log", "eval", "checkpoint")  # the hooks after a step, timed by engine.perf.profiler
PHASES = STEP_PHASES + HOOK_PHASES
SCHEMA_NAME = "arcscale.profile"
SCHEMA_VERSION = 1
GiB = 2 ** 30

# Dense peak TFLOP/s per card name for engine.plan's --card (engine.perf.timing), from the per-model table in
# engine.perf.hardware (GPU_PEAKS: bf16/fp16, TF32 and fp32 apart). "fp32" here is what an fp32 run's convolutions
# reach: TF32 while cuDNN's allow_tf32 is on (PyTorch's default), else plain fp32. Variants before their family
# (the first key whose words are all in the card name wins); V100 has no bf16 units (None: pass a peak).
GPU_PEAK_TFLOPS: Dict[str, Dict[str, Optional[float]]] = {
    card: {"bf16": hardware.gpu_model(model).bf16, "fp16": hardware.gpu_model(model).fp16,
           "fp32": (hardware.gpu_peak_tflops(model, "fp32") or (None,))[0]}
    for card, model in (("H200 NVL", "H200 NVL"), ("H200", "H200"), ("H100 NVL", "H100 NVL"),
                        ("H100 PCIe", "H100 PCIe"), ("H100", "H100"), ("A100", "A100"), ("V100", "V100"))
}
DATA_BOUND_SHARE = 0.20  # the loader's share of the step (worst rank) from which a run is called data-bound
STRAGGLER_SPREAD = 0.15  # busy-time spread between ranks (share of the step) from which a straggler is named

# Measured component -> planner rows it is compared with, and how it is measured.
MEMORY_ROWS: List[Tuple[str, Tuple[str, ...], str]] = [
    ("backbone parameters", ("backbone parameters",), "storages of the module's parameters (+ ZeRO-3 partitions)"),
    ("backbone gradients", ("backbone gradients",),
     ".grad of the module's parameters + ZeRO's reduced partitions, after the boundary backward"),
    ("fp32 partitions/masters + grads", ("ZeRO fp32 partition + grad", "fp32 master weights"),
     "optimizer parameters that are not the module's (ZeRO fp32 partitions, masters) and their .grad"),
    ("backbone optimizer state", ("backbone optimizer state",), "tensors in the optimizer's state after its step"),
    ("activations", ("activations", "activations (checkpointed)"),
     "storages autograd saved in the backbone forward (saved-tensor hooks; parameters excluded)"),
    ("head weights", ("head weights",), "this rank's class-centre shard"),
    ("head optimizer state", ("head optimizer state",), "row-sparse optimizer state tensors after its step"),
    ("head sampled rows", ("head sampled rows",),
     "[rows, E] tensors the head saved for backward + the head weight's gradient"),
    ("head logits", ("head logits",), "[global batch, columns] tensors the head saved for backward"),
    ("runtime (RSS before the model was built)", ("runtime",), "RSS when the profiler was created (CPU only)"),
]


def device_peak_tflops(precision: str, device: torch.device, override: Optional[float]) -> Tuple[float, str]:
    """Peak TFLOP/s of one rank's device at `precision`, and where the number comes from.

    A given value wins; a known GPU uses its model's datasheet peak (engine.perf.hardware.gpu_peak_tflops: H100
    SXM, PCIe and NVL apart; an fp32 run against TF32 or plain fp32 as cuDNN computes it); a CPU (or an unknown
    GPU, or V100 bf16) is measured now by a matmul
    probe in the run's precision on this process's threads (engine.perf.hardware), and reported as measured.
    """
    if override:
        return float(override), "given"
    if device.type == "cuda":
        found = hardware.gpu_peak_tflops(torch.cuda.get_device_name(device), precision)
        if found is not None:
            return found
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # CPU autocast runs 16-bit as bf16
    # best of 5 short probes: on a shared host, other jobs only ever make a probe slower
    tflops = max(hardware.measure_matmul_tflops(dtype, size=1024, min_time_s=0.04, device=device) for _ in range(5))
    return tflops, (f"measured: {str(dtype).replace('torch.', '')} 1024x1024 matmul, best of 5, "
                    f"{torch.get_num_threads()} threads")


def _spread(values: List[float]) -> Dict[str, Any]:
    """min / median / max over ranks, and the rank holding the max."""
    top = max(range(len(values)), key=lambda r: values[r])
    return dict(min=min(values), median=statistics.median(values), max=values[top], max_rank=top)


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def phase_names(ranks: List[Dict[str, Any]]) -> Tuple[str, ...]:
    """The trainer's phases, any other phase a (newer) trainer marked, then the hooks' phases."""
    seen = {name for r in ranks for s in r["steps"] for name in s["phases"]}
    return STEP_PHASES + tuple(sorted(seen - set(PHASES))) + HOOK_PHASES


def _rank_phases(rank: Dict[str, Any], names: Tuple[str, ...], phases: str = "phases",
                 total: str = "step_s") -> Dict[str, float]:
    """Mean seconds per step of every phase on one rank, plus "other" (step time no phase covers).

    With phases="phases_cpu", total="cpu_s": the same in process CPU seconds (0 where not recorded).
    """
    steps = rank["steps"]
    out = {name: _mean([s.get(phases, {}).get(name, 0.0) for s in steps]) for name in names}
    out["other"] = _mean([s.get(total, 0.0) - sum(s.get(phases, {}).values()) for s in steps])
    return out


def _memory_rows(measured: Dict[str, int], plan: Any, peak: int, cuda: bool) -> List[Dict[str, Any]]:
    planned_by_name = {r.name: r.bytes for r in plan.rows if r.where != "info"}
    rows, used_plan, attributed = [], set(), 0
    for name, plan_names, how in MEMORY_ROWS:
        names = [n for n in plan_names if n in planned_by_name]
        if name.startswith("runtime") and cuda:
            continue
        value = measured.get(name)
        if value is None and not names:
            continue
        planned = sum(planned_by_name[n] for n in names) if names else None
        used_plan.update(names)
        attributed += value or 0
        rows.append(_row(name, value, planned, how))
    rest_planned = sum(b for n, b in planned_by_name.items() if n not in used_plan and n != "CUDA context")
    act = planned_by_name.get("activations", planned_by_name.get("activations (checkpointed)", 0.0))
    rows.append(_row("rest: workspace, casts, allocator (peak - rows above)", max(0, peak - attributed), rest_planned,
                     "peak minus every measured row above"))
    rows.append(_row("activations + rest (peak - static rows)", max(0, peak - attributed) + measured.get(
        "activations", 0), rest_planned + act, "peak minus parameters, gradients, optimizer, head, runtime"))
    total_planned = plan.total_bytes - (planned_by_name.get("CUDA context", 0.0) if cuda else 0.0)
    rows.append(_row("peak", peak, total_planned, "CUDA max_memory_allocated in the window" if cuda else
                     "peak RSS (VmHWM) in the window"))
    return rows


def _row(name: str, measured: Optional[float], planned: Optional[float], how: str) -> Dict[str, Any]:
    error = None
    if measured is not None and planned:
        error = 100.0 * (measured - planned) / planned
    return dict(name=name, measured_bytes=None if measured is None else int(measured),
                planned_bytes=None if planned is None else int(planned), error_pct=error, how=how)


def build_report(cfg: Any, ranks: List[Dict[str, Any]], *, argv: List[str], trace_files: List[str]) -> Dict[str, Any]:
    """The whole profile (schema in engine/profile.py) from every rank's `Profiler._local_report()`."""
    from engine.perf import planner

    world = len(ranks)
    num_steps = min(len(r["steps"]) for r in ranks)
    cuda = ranks[0]["device"].startswith("cuda")
    p = planner.plan(cfg, world, device="gpu" if cuda else "cpu")
    names = phase_names(ranks)
    per_rank = [_rank_phases(r, names) for r in ranks]
    step_by_rank = [_mean([s["step_s"] for s in r["steps"]]) for r in ranks]
    step = statistics.median(step_by_rank)
    cpu_by_rank = [_rank_phases(r, names, "phases_cpu", "cpu_s") for r in ranks]
    phase_summary = {}
    for name in names + ("other",):
        values = [pr[name] for pr in per_rank]
        phase_summary[name] = dict(_spread(values), share=statistics.median(values) / step if step else 0.0,
                                   cpu_median=statistics.median([c[name] for c in cpu_by_rank]))
    comm_by_rank = [r["comm_s_per_step"] for r in ranks]
    busy = [max(0.0, s - c) for s, c in zip(step_by_rank, comm_by_rank)]
    straggler = max(range(world), key=lambda r: busy[r])
    spread = (max(busy) - min(busy)) / step if step else 0.0

    global_batch = cfg.global_batch_size(world)
    window_s = max(sum(s["step_s"] for s in r["steps"]) for r in ranks)
    sps = num_steps * global_batch / window_s if window_s else 0.0
    b = p.backbone
    head_flops = p.train_flops_per_image - 2 * (b.train_macs + b.recompute_macs)
    flops = dict(source="engine.plan", forward_per_sample=2 * b.macs, backward_per_sample=2 * (b.train_macs - b.macs),
                 recompute_per_sample=2 * b.recompute_macs, head_per_sample=head_flops,
                 model_per_sample=2 * b.train_macs + head_flops, hardware_per_sample=p.train_flops_per_image)
    peaks = [r["peak_tflops"] for r in ranks]
    peak = statistics.median(peaks)
    achieved = flops["model_per_sample"] * sps / world / 1e12
    util = dict(peak_tflops_per_rank=peak, peak_tflops_by_rank=peaks, peak_source=ranks[0]["peak_source"],
                achieved_model_tflops_per_rank=achieved,
                achieved_hardware_tflops_per_rank=flops["hardware_per_sample"] * sps / world / 1e12,
                mfu=achieved / peak if peak else None,
                hfu=flops["hardware_per_sample"] * sps / world / 1e12 / peak if peak else None)
    memory = dict(kind=ranks[0]["peak_kind"], per_rank=[
        dict(rank=r["rank"], peak_bytes=int(r["peak_bytes"]), rows=_memory_rows(r["memory"], p, r["peak_bytes"], cuda))
        for r in ranks])
    comm = dict(per_step=ranks[straggler]["comm"], rank=straggler,
                bytes_per_step=sum(c["bytes_per_step"] for c in ranks[straggler]["comm"]),
                seconds_per_step_by_rank=comm_by_rank,
                step_seconds_per_step_by_rank=[r.get("step_comm_s_per_step", r["comm_s_per_step"]) for r in ranks],
                time_note=("host wall time around each blocking collective (waiting for peers included)" if not cuda
                           else "CUDA events around blocking collectives on the current stream; async ones untimed"))
    end_of_run = {k: max(r["end_of_run"].get(k, 0.0) for r in ranks) for k in HOOK_PHASES}
    report: Dict[str, Any] = {
        "schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "kind": "run",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv), "config_digest": cfg.digest(),
        "run": dict(backbone=cfg.engine.model.name, embedding_size=cfg.engine.model.embedding_size,
                    num_classes=cfg.engine.head.num_classes, sample_rate=cfg.engine.head.sample_rate,
                    world_size=world, micro_batch=cfg.micro_batch_size,
                    gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
                    precision=cfg.precision, zero_stage=cfg.zero_stage, backend=cfg.engine.train.backend,
                    checkpointing=bool(cfg.engine.model.checkpoint), device=ranks[0]["device"],
                    device_name=ranks[0]["device_name"], threads_per_rank=[r["threads"] for r in ranks],
                    timer=ranks[0]["timer"], steps=[s["step"] for s in ranks[0]["steps"]]),
        "phases": dict(names=list(names) + ["other"], summary=phase_summary,
                       per_rank=[dict(rank=r["rank"], step_s=[s["step_s"] for s in r["steps"]],
                                      phases_s={n: [s["phases"].get(n, 0.0) for s in r["steps"]] for n in names},
                                      cpu_step_s=[s.get("cpu_s", 0.0) for s in r["steps"]],
                                      other_comm_s=r.get("other_comm_s_per_step", 0.0),
                                      phases_cpu_s={n: [s.get("phases_cpu", {}).get(n, 0.0) for s in r["steps"]]
                                                    for n in names})
                                 for r in ranks]),
        "step": dict(_spread(step_by_rank), cpu_median=statistics.median(
            [_mean([s.get("cpu_s", 0.0) for s in r["steps"]]) for r in ranks])),
        "straggler": dict(rank=straggler, busy_s_by_rank=busy, spread=spread, named=spread >= STRAGGLER_SPREAD),
        "throughput": dict(samples_per_s=sps, samples_per_s_per_rank=sps / world, step_time_s=step,
                           num_steps=num_steps),
        "flops": flops, "utilisation": util, "memory": memory, "communication": comm,
        "end_of_run_s": end_of_run, "trace_files": list(trace_files),
    }
    report["bottleneck"] = bottleneck(report)
    report["summary_text"] = summary_text(report)
    return report


def bottleneck(report: Dict[str, Any]) -> Dict[str, Any]:
    """What bounds the step: data, straggler, communication, compute, host or eval/checkpoint (with a hint)."""
    per_rank = report["phases"]["per_rank"]
    step = report["step"]["median"] or 1e-12
    data = [_mean(r["phases_s"]["data"]) for r in per_rank]
    worst = max(range(len(data)), key=lambda i: data[i])
    s = report["straggler"]
    r = s["rank"]
    # collectives inside the step's phases (those of logging, evaluation and checkpoints are theirs)
    comm_s = report["communication"]["step_seconds_per_step_by_rank"][r]
    rank_phases = {n: _mean(v) for n, v in per_rank[r]["phases_s"].items()}
    compute = sum(v for n, v in rank_phases.items() if n not in ("data", "h2d") + HOOK_PHASES) - comm_s
    host = rank_phases["h2d"] + rank_phases["log"] + max(0.0, step - sum(rank_phases.values()))
    shares = {"communication": comm_s / step, "compute": max(0.0, compute) / step, "host": host / step,
              "eval/checkpoint": (rank_phases["eval"] + rank_phases["checkpoint"]) / step}
    suffix = ""
    if s["named"] and len(per_rank) > 1:
        suffix = (f"; rank {r} is the straggler (busy {s['busy_s_by_rank'][r] * 1e3:.0f} ms vs "
                  f"{min(s['busy_s_by_rank']) * 1e3:.0f} ms; the others wait for it inside collectives)")
    if data[worst] / step >= DATA_BOUND_SHARE:
        share = data[worst] / step
        return dict(kind="data", share=share, rank=worst, text=(
            f"data-bound: {100 * share:.0f}% of the step waiting on the loader (rank {worst}); raise "
            f"engine.data.num_workers" + suffix))
    kind = max(shares, key=shares.get)
    share = shares[kind]
    if kind == "communication":
        top = max(report["communication"]["per_step"], key=lambda c: c["seconds_per_step"] or 0.0, default=None)
        what = f" (largest: {top['key']} at {top['site']}, {top['bytes_per_step'] / 2**20:.2f} MiB/step)" if top else ""
        text = (f"communication-bound: {100 * share:.0f}% of the step in collectives{what}; raise the micro-batch "
                "or gradient_accumulation_steps, or overlap the reduction (ZeRO-1/2 overlap_comm)")
    elif kind == "compute":
        u = report["utilisation"]
        mfu = f"MFU {100 * u['mfu']:.1f}% of {u['peak_tflops_per_rank']:.2f} TFLOP/s ({u['peak_source']})" \
            if u["mfu"] is not None else "no peak known"
        text = f"compute-bound: {100 * share:.0f}% of the step in the model's forward, backward and steps; {mfu}"
    elif kind == "host":
        text = (f"host-bound: {100 * share:.0f}% of the step outside the model (h2d copy, logging hooks, the "
                "trainer's unmarked work: 'other'); raise engine.train.log_every")
    else:
        text = f"eval/checkpoint-bound: {100 * share:.0f}% of the step evaluating or saving; raise their `every`"
    return dict(kind=kind, share=share, rank=r, text=text + suffix)


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:9.1f}"


def summary_text(report: Dict[str, Any]) -> str:
    """One screen: phases over ranks, throughput and utilisation, memory vs plan, communication, bottleneck."""
    run, u, t = report["run"], report["utilisation"], report["throughput"]
    out = [f"ArcScale profile: {run['backbone']} emb {run['embedding_size']}, {run['num_classes']:,} classes "
           f"(rate {run['sample_rate']}), world {run['world_size']}, micro-batch {run['micro_batch']} x accum "
           f"{run['gradient_accumulation_steps']}, {run['precision']}, ZeRO-{run['zero_stage']}, {run['backend']}, "
           f"{run['device']} ({run['timer']}), {t['num_steps']} steps",
           f"{'phase':<14}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'max rank':>9}{'share':>7}{'cpu ms':>9}"]
    for name in report["phases"]["names"]:
        ph = report["phases"]["summary"][name]
        if ph["max"] == 0.0 and name in HOOK_PHASES:
            continue
        out.append(f"{name:<14}{ph['median'] * 1e3:>10.1f}{ph['min'] * 1e3:>9.1f}{ph['max'] * 1e3:>9.1f}"
                   f"{ph['max_rank']:>9}{100 * ph['share']:>6.1f}%{ph['cpu_median'] * 1e3:>9.1f}")
    st = report["step"]
    out.append(f"{'step':<14}{st['median'] * 1e3:>10.1f}{st['min'] * 1e3:>9.1f}{st['max'] * 1e3:>9.1f}"
               f"{st['max_rank']:>9}{'':>7}{st['cpu_median'] * 1e3:>9.1f}")
    f = report["flops"]
    mfu = "-" if u["mfu"] is None else f"{100 * u['mfu']:.1f}%"
    hfu = "-" if u["hfu"] is None else f"{100 * u['hfu']:.1f}%"
    out.append(f"throughput {t['samples_per_s']:.1f} samples/s ({t['samples_per_s_per_rank']:.1f}/rank); "
               f"{f['model_per_sample'] / 1e9:.2f} model GFLOP/sample (+{f['recompute_per_sample'] / 1e9:.2f} "
               f"recompute); {u['achieved_model_tflops_per_rank']:.3f} TFLOP/s/rank; MFU {mfu}, HFU {hfu} of "
               f"{u['peak_tflops_per_rank']:.2f} TFLOP/s ({u['peak_source']})")
    mem = max(report["memory"]["per_rank"], key=lambda m: m["peak_bytes"])
    out.append(f"memory, rank {mem['rank']} ({report['memory']['kind']}):  measured MiB / planned MiB / error")
    for row in mem["rows"]:
        err = "" if row["error_pct"] is None else f"{row['error_pct']:+.0f}%"
        out.append(f"  {row['name'][:52]:<52}{_mib(row['measured_bytes'])} {_mib(row['planned_bytes'])} {err:>6}")
    comm = report["communication"]
    out.append(f"communication per step (rank {comm['rank']}): {comm['bytes_per_step'] / 2**20:.2f} MiB")
    for c in comm["per_step"][:6]:
        sec = "-" if c["seconds_per_step"] is None else f"{c['seconds_per_step'] * 1e3:.1f} ms"
        out.append(f"  {c['key']:<30}{c['calls_per_step']:>5.1f} calls {c['bytes_per_step'] / 2**10:>10.1f} KiB "
                   f"{sec:>10}  {c['site']}")
    eor = report["end_of_run_s"]
    if any(eor.values()):
        out.append("end of run: " + ", ".join(f"{k} {v:.2f} s" for k, v in eor.items() if v))
    other = report["phases"]["summary"]["other"]
    if other["share"] > 0.03:
        outside = [c for c in comm["per_step"] if "none" in c["phases"]]
        in_comm = statistics.median([r.get("other_comm_s", 0.0) for r in report["phases"]["per_rank"]])
        sites = f" at {', '.join(sorted({c['site'] for c in outside}))}" if outside else ""
        out.append(f"note: {100 * other['share']:.1f}% of the step ({other['median'] * 1e3:.1f} ms, "
                   f"{other['cpu_median'] * 1e3:.1f} ms CPU) is in no marked phase ('other'): trainer work between "
                   f"its phases ({in_comm * 1e3:.1f} ms in collectives{sites}), or a busy host")
    out.append(f"bottleneck: {report['bottleneck']['text']}")
    return "\n".join(out)


# ---- outputs -----------------------------------------------------------------------------------------------

def write_outputs(report: Dict[str, Any], out_dir: Path) -> Dict[str, str]:
    """profile.json (validated first), summary.txt and profile.png into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "profile.json"), "summary": str(out_dir / "summary.txt"),
             "png": str(out_dir / "profile.png")}
    report["files"] = files
    validate(report)
    (out_dir / "summary.txt").write_text(report["summary_text"] + "\n")
    plot(report, out_dir / "profile.png")
    atomic_write_text(json.dumps(report, indent=1) + "\n", out_dir / "profile.json")
    return files


def plot(report: Dict[str, Any], path: Path) -> None:
    """Stacked phase bars per rank and measured-vs-planned memory (run), or the scaling curve (sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report["kind"] == "sweep":
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        runs = report["runs"]
        ws = [r["world_size"] for r in runs]
        ax1.plot(ws, [r["samples_per_s"] for r in runs], "o-", label="measured")
        ax1.plot(ws, [runs[0]["samples_per_s"] * w / ws[0] for w in ws], "--", label="linear")
        ax1.set(xlabel="ranks", ylabel="samples/s", title="scaling (same per-rank batch)")
        ax1.legend(loc="upper left")
        _stack(ax2, [f"world {r['world_size']}" for r in runs], [r["phases_s"] for r in runs], "mean step by phase")
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        per_rank = report["phases"]["per_rank"]
        _stack(ax1, [f"rank {r['rank']}" for r in per_rank],
               [{n: _mean(v) for n, v in r["phases_s"].items()} for r in per_rank], "mean step by phase")
        mem = report["memory"]["per_rank"][0]["rows"]
        names = [r["name"][:28] for r in mem]
        x = range(len(mem))
        ax2.barh([i - 0.2 for i in x], [(r["measured_bytes"] or 0) / 2**20 for r in mem], 0.4, label="measured")
        ax2.barh([i + 0.2 for i in x], [(r["planned_bytes"] or 0) / 2**20 for r in mem], 0.4, label="planned")
        ax2.set_yticks(list(x), names, fontsize=7)
        ax2.set(xlabel="MiB (rank 0)", title="memory: measured vs engine.plan")
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _stack(ax, labels: List[str], phases: List[Dict[str, float]], title: str) -> None:
    bottom = [0.0] * len(labels)
    for name in STEP_PHASES + HOOK_PHASES:
        values = [1e3 * p.get(name, 0.0) for p in phases]
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(ylabel="ms per step", title=title)
    ax.legend(fontsize=7, loc="upper right")


# ---- scaling sweep -----------------------------------------------------------------------------------------

def build_sweep(reports: List[Dict[str, Any]], paths: List[str], argv: List[str],
                host_load: Optional[Tuple[float, int]] = None) -> Dict[str, Any]:
    """Samples/s per world size, efficiency against linear scaling of the smallest, and where time was lost.

    An efficiency above 100% is not scaling but noise (the runs, one after the other, saw different machines:
    other processes, clocks, caches), and the summary says so; so it does for every figure when `host_load`
    (the 1-minute load average before the first run, the CPUs) shows other work on at least half the CPUs.
    """
    base = reports[0]
    base_w, base_sps = base["run"]["world_size"], base["throughput"]["samples_per_s"]
    runs, lines = [], []
    for rep, path in zip(reports, paths):
        w = rep["run"]["world_size"]
        sps = rep["throughput"]["samples_per_s"]
        phases = {n: v["median"] for n, v in rep["phases"]["summary"].items()}
        lost = {n: phases[n] - base["phases"]["summary"][n]["median"] for n in phases}
        runs.append(dict(world_size=w, samples_per_s=sps, step_time_s=rep["throughput"]["step_time_s"],
                         cpu_step_s=rep["step"].get("cpu_median"),
                         efficiency=sps / (base_sps * w / base_w) if base_sps else None, phases_s=phases,
                         lost_s_by_phase=lost, comm_bytes_per_step=rep["communication"]["bytes_per_step"],
                         bottleneck=rep["bottleneck"]["text"], profile=path))
    for r in runs:
        extra = r["step_time_s"] - runs[0]["step_time_s"]
        top = sorted(((v, n) for n, v in r["lost_s_by_phase"].items() if v > 0), reverse=True)[:3]
        where = ", ".join(f"{n} +{v * 1e3:.0f} ms" for v, n in top) or "nowhere"
        eff = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f}%"
        cpu = "" if r["cpu_step_s"] is None else f", {r['cpu_step_s'] * 1e3:.0f} ms CPU"
        if r["efficiency"] is not None and r["efficiency"] > 1.0 and r is not runs[0]:
            eff += " (above 100%: noise, not scaling)"
        lines.append(f"world {r['world_size']}: {r['samples_per_s']:.1f} samples/s, efficiency {eff}, step "
                     f"{r['step_time_s'] * 1e3:.0f} ms{cpu} ({extra * 1e3:+.0f} ms vs world {base_w}: {where}); "
                     f"{r['comm_bytes_per_step'] / 2**20:.2f} MiB/step in collectives")
    report = {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "kind": "sweep",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv),
              "world_sizes": [r["world_size"] for r in runs], "runs": runs}
    if runs[-1]["cpu_step_s"] and runs[0]["cpu_step_s"] and runs[-1]["step_time_s"] > runs[0]["step_time_s"]:
        extra_cpu = runs[-1]["cpu_step_s"] - runs[0]["cpu_step_s"]
        extra = runs[-1]["step_time_s"] - runs[0]["step_time_s"]
        lines.append(f"of the {extra * 1e3:.0f} ms lost per step at world {runs[-1]['world_size']}, "
                     f"{max(0.0, extra_cpu) * 1e3:.0f} ms is more work per rank (CPU seconds); the rest is waiting: "
                     "collectives, peers, or other processes on the host")
    if host_load is not None and host_load[0] >= 0.5 * host_load[1]:
        lines.append(f"host loaded: load average {host_load[0]:.1f} on {host_load[1]} CPUs before the first run; "
                     "other processes shared the cores, so the efficiencies above are noise: rerun on a quiet host")
    report["summary_text"] = "ArcScale scaling sweep (same per-rank batch)\n" + "\n".join(lines)
    return report


# ---- schema ------------------------------------------------------------------------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_SPREAD = {"type": "object", "required": ["min", "median", "max", "max_rank"],
           "properties": {"min": _NUM, "median": _NUM, "max": _NUM, "max_rank": {"type": "integer"}}}
_MEM_ROW = {"type": "object", "required": ["name", "measured_bytes", "planned_bytes", "error_pct", "how"],
            "properties": {"name": {"type": "string"}, "measured_bytes": {"type": ["integer", "null"]},
                           "planned_bytes": {"type": ["integer", "null"]}, "error_pct": _NUM_OR_NULL,
                           "how": {"type": "string"}}}
_COMM_ROW = {"type": "object", "required": ["key", "owner", "op", "site", "calls_per_step", "bytes_per_step",
                                            "bus_bytes_per_step", "seconds_per_step"],
             "properties": {"owner": {"enum": ["head", "backbone", "hooks", "trainer", "other"]},
                            "op": {"type": "string"}, "bytes_per_step": _NUM, "seconds_per_step": _NUM_OR_NULL}}
RUN_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "required": ["schema", "version", "kind", "created", "argv", "run", "phases", "step", "straggler", "throughput",
                 "flops", "utilisation", "memory", "communication", "end_of_run_s", "bottleneck", "summary_text"],
    "properties": {
        "schema": {"enum": [SCHEMA_NAME]}, "version": {"enum": [SCHEMA_VERSION]}, "kind": {"enum": ["run"]},
        "argv": {"type": "array", "items": {"type": "string"}},
        "run": {"type": "object", "required": ["backbone", "world_size", "micro_batch", "global_batch", "precision",
                                               "zero_stage", "device", "timer", "threads_per_rank"]},
        "phases": {"type": "object", "required": ["names", "summary", "per_rank"],
                   "properties": {"summary": {"type": "object", "required": list(PHASES) + ["other"],
                                              "additionalProperties": _SPREAD},
                                  "per_rank": {"type": "array", "items": {
                                      "type": "object", "required": ["rank", "step_s", "phases_s"],
                                      "properties": {"step_s": {"type": "array", "items": _NUM},
                                                     "phases_s": {"type": "object", "required": list(PHASES)}}}}}},
        "step": _SPREAD,
        "straggler": {"type": "object", "required": ["rank", "busy_s_by_rank", "spread", "named"]},
        "throughput": {"type": "object", "required": ["samples_per_s", "samples_per_s_per_rank", "step_time_s"],
                       "properties": {"samples_per_s": _NUM}},
        "flops": {"type": "object", "required": ["forward_per_sample", "backward_per_sample", "recompute_per_sample",
                                                 "head_per_sample", "model_per_sample", "hardware_per_sample"],
                  "additionalProperties": {"type": ["number", "string"]}},
        "utilisation": {"type": "object", "required": ["peak_tflops_per_rank", "peak_source", "mfu", "hfu"],
                        "properties": {"mfu": _NUM_OR_NULL, "hfu": _NUM_OR_NULL, "peak_source": {"type": "string"}}},
        "memory": {"type": "object", "required": ["kind", "per_rank"], "properties": {"per_rank": {
            "type": "array", "items": {"type": "object", "required": ["rank", "peak_bytes", "rows"],
                                       "properties": {"rows": {"type": "array", "items": _MEM_ROW}}}}}},
        "communication": {"type": "object", "required": ["per_step", "bytes_per_step", "seconds_per_step_by_rank"],
                          "properties": {"per_step": {"type": "array", "items": _COMM_ROW}}},
        "end_of_run_s": {"type": "object", "required": list(HOOK_PHASES), "additionalProperties": _NUM},
        "bottleneck": {"type": "object", "required": ["kind", "share", "text"],
                       "properties": {"kind": {"enum": ["data", "communication", "compute", "host",
                                                        "eval/checkpoint"]}, "text": {"type": "string"}}},
        "summary_text": {"type": "string"},
    },
}
SWEEP_SCHEMA: Dict[str, Any] = {
    "type": "object", "required": ["schema", "version", "kind", "world_sizes", "runs", "summary_text"],
    "properties": {"schema": {"enum": [SCHEMA_NAME]}, "version": {"enum": [SCHEMA_VERSION]},
                   "kind": {"enum": ["sweep"]}, "world_sizes": {"type": "array", "items": {"type": "integer"}},
                   "runs": {"type": "array", "items": {"type": "object", "required": [
                       "world_size", "samples_per_s", "step_time_s", "efficiency", "phases_s", "lost_s_by_phase",
                       "profile"]}}}}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _check(value: Any, schema: Dict[str, Any], where: str) -> None:
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = False
        for t in names:
            if t == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif t == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, _TYPES[t])
        if not ok:
            raise ValueError(f"profile.json {where}: expected {types}, got {value!r:.80}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"profile.json {where}: expected one of {schema['enum']}, got {value!r}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"profile.json {where}: missing key {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                _check(item, sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]")


def validate(report: Dict[str, Any]) -> None:
    """Raise ValueError naming the first place where `report` breaks its documented schema."""
    _check(report, SWEEP_SCHEMA if report.get("kind") == "sweep" else RUN_SCHEMA, "$")
