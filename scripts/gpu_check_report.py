"""The summary of scripts/gpu_check.sh: results.json, table.txt and the profile's plot, from the run folders.

    python scripts/gpu_check_report.py WORK RESULTS DRY NAME...

WORK holds machine.txt and runs/<name>/ (rc, log.txt; a training run's out/ with summary.json and config.json;
engine.profile's out/profile/; the head benchmark's results.json). Only small files are written to RESULTS.
Per training run: img/s (summary.json, from the end of the first step), the model's achieved TFLOP/s (img/s x
engine.plan's FLOPs per image without recomputation) and MFU against the card's datasheet peak at the run's
precision (engine.perf.hardware; none on a CPU), peak allocated and peak reserved memory (since the first step).
Exit status 1 when a run did not finish (failed, timed out or skipped).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 2 ** 30


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else None


def _written(run: Path) -> Dict[str, Any]:
    """The files a run wrote (relative paths) and their bytes, from files.txt (gpu_check.sh lists them)."""
    listing = run / "files.txt"
    if not listing.exists():
        return {}
    entries = [line.split(" ", 1) for line in listing.read_text().splitlines() if line.strip()]
    return {"files_written": sorted(path for _, path in entries),
            "bytes_written": sum(int(size) for size, _ in entries)}


def _status(rc: str) -> str:
    if rc == "0":
        return "ok"
    if rc == "skipped":
        return "SKIPPED (time)"
    return "TIMEOUT" if rc in ("124", "137") else f"FAILED rc={rc}"


def model_flops_per_image(config_path: Path) -> Optional[float]:
    """FLOPs of one training image without recomputation (3x the forward's backbone MACs x 2, plus the head's
    share), from engine.plan's meta-device count of the run's own config; None when the config is missing."""
    if not config_path.exists():
        return None
    from engine.config import load
    from engine.perf import planner

    cfg = load(config_path)
    p = planner.plan(cfg, 1, device="gpu")
    return p.train_flops_per_image - 2 * p.backbone.recompute_macs


def training_row(name: str, run: Path, rc: str, device_name: Optional[str]) -> Dict[str, Any]:
    from engine.perf import hardware

    summary = _read_json(run / "out" / "summary.json")
    row: Dict[str, Any] = {"run": name, "status": _status(rc), "rc": rc}
    if summary is None:
        return row
    cfg = _read_json(run / "out" / "config.json") or {}
    backend = cfg.get("engine", {}).get("train", {}).get("backend", "deepspeed")
    sps = summary.get("samples_per_sec")
    flops = model_flops_per_image(run / "out" / "config.json")
    achieved = sps * flops / 1e12 if sps and flops else None
    peak = hardware.gpu_peak_tflops(device_name, summary["precision"]) if device_name else None
    reserved = summary.get("peak_reserved_bytes_per_rank")
    row.update({
        "backbone": summary["backbone"], "precision": summary["precision"], "backend": backend,
        "zero_stage": summary["zero_stage"], "global_batch_size": summary["global_batch_size"],
        "steps": summary["steps"], "samples_per_sec": sps,
        "ms_per_step": 1000.0 * summary["global_batch_size"] / sps if sps else None,
        "model_gflops_per_image": flops / 1e9 if flops else None, "achieved_tflops": achieved,
        "peak_tflops": peak[0] if peak else None, "peak_source": peak[1] if peak else None,
        "mfu": achieved / peak[0] if achieved and peak else None,
        "peak_allocated_gib": max(summary["peak_memory_bytes_per_rank"]) / GiB,
        "peak_reserved_gib": max(reserved) / GiB if reserved else None,
        "peak_memory_kind": summary["peak_memory_kind"], "wall_time_s": summary["wall_time_s"],
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
    })
    chosen = summary.get("auto")
    if chosen:  # engine.auto: the planner's choice and its predictions beside what the run measured
        measured_gib = row["peak_reserved_gib"] or row["peak_allocated_gib"]
        row["auto"] = {**chosen, "measured_step_s": row["ms_per_step"] / 1000.0 if row["ms_per_step"] else None,
                       "measured_gib_per_rank": measured_gib}
    prof = _read_json(run / "out" / "profile" / "profile.json")
    if prof is not None:  # engine.profile: its own MFU over the profiled window, phases, memory vs the plan
        u = prof["utilisation"]
        row["profile"] = {"mfu": u.get("mfu"), "hfu": u.get("hfu"), "peak_source": u.get("peak_source"),
                          "step_time_s": prof["throughput"]["step_time_s"],
                          "phase_share": {k: v["share"] for k, v in prof["phases"]["summary"].items()},
                          "memory": prof.get("memory")}
        text = run / "out" / "profile" / "summary.txt"
        row["profile"]["summary_txt"] = text.read_text() if text.exists() else None
    return row


def _fmt(value: Optional[float], spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'run':9} {'backbone':8} {'prec':4} {'backend':8} {'batch':>5} {'img/s':>8} {'TFLOP/s':>8} "
            f"{'MFU':>6} {'alloc GiB':>9} {'rsrv GiB':>8} {'wall s':>6}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "backbone" not in r:
            lines.append(f"{r['run']:9} {'':8} {'':4} {'':8} {'':>5} {'':>8} {'':>8} {'':>6} {'':>9} {'':>8} "
                         f"{'':>6}  {r['status']}")
            continue
        where = "fsdp" if r["backend"] == "fsdp" else f"ZeRO-{r['zero_stage']}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{r['run']:9} {r['backbone']:8} {r['precision']:4} {where:8} {r['global_batch_size']:5d} "
                     f"{_fmt(r['samples_per_sec'], '8.1f')} {_fmt(r['achieved_tflops'], '8.2f')} {mfu:>6} "
                     f"{r['peak_allocated_gib']:9.2f} {_fmt(r['peak_reserved_gib'], '8.2f')} "
                     f"{r['wall_time_s']:6.1f}  {r['status']}")
    return "\n".join(lines)


def auto_table(rows: List[Dict[str, Any]]) -> str:
    """engine.auto's runs: the chosen setting, predicted vs measured step time and memory per rank."""
    lines = [f"{'run':9} {'pred. s/step':>12} {'meas. s/step':>12} {'pred. GiB':>9} {'meas. GiB':>9}  setting"]
    for r in rows:
        a = r.get("auto")
        if not a:
            continue
        st = a["setting"]
        lines.append(f"{r['run']:9} {_fmt(a.get('predicted_step_s'), '12.3f')} {_fmt(a.get('measured_step_s'), '12.3f')}"
                     f" {_fmt(a.get('predicted_gib_per_rank'), '9.2f')} {_fmt(a.get('measured_gib_per_rank'), '9.2f')}"
                     f"  {st['backend']}, checkpoint {st['checkpoint']}, micro-batch {st['micro_batch']} x "
                     f"{st['gradient_accumulation_steps']}, head {st['head']}")
    return "\n".join(lines) if len(lines) > 1 else ""


def pfc_table(pfc: Dict[str, Any]) -> str:
    lines = [f"{'classes':>11} {'offload':>7} {'median ms':>9} {'dev GiB':>8} {'host GiB':>8} "
             f"{'pinned asked':>12} {'pinned held':>11}"]
    for r in pfc.get("runs", []):
        if "error" in r:
            lines.append(f"{r['classes']:>11} {r['offload']:>7}  failed: {r['error'][:80]}")
            continue
        lines.append(f"{r['classes']:>11} {r['offload']:>7} {r['median_ms']:9.1f} "
                     f"{_fmt(r.get('device_peak_gib'), '8.2f')} {r['host_rss_gib']:8.2f} "
                     f"{_fmt(r.get('pinned_requested_gib'), '12.2f')} {_fmt(r.get('pinned_allocator_gib'), '11.2f')}")
    return "\n".join(lines)


def layout_table(layout: Dict[str, Any]) -> str:
    lines = [f"{'backbone':>8} {'NCHW s':>8} {'NHWC s':>8} {'mixed s':>8} {'NCHW/NHWC':>9} {'NCHW/mixed':>10}"]
    for r in layout.get("rows", []):
        lines.append(f"{r['backbone']:>8} {r['nchw_s']:8.4f} {r['nhwc_s']:8.4f} {r['mixed_s']:8.4f} "
                     f"{r['ratio_median']:9.3f} {r['mixed_ratio_median']:10.3f}")
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    work, results, dry, names = Path(argv[0]), Path(argv[1]), argv[2] == "1", argv[3:]
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else None
    machine = (work / "machine.txt").read_text() if (work / "machine.txt").exists() else ""
    rows, out = [], {"dry_run": dry, "machine": machine.splitlines(), "device": device_name, "runs": []}
    pfc = layout = None
    for name in names:
        run = work / "runs" / name
        rc = (run / "rc").read_text().strip() if (run / "rc").exists() else "missing"
        written = _written(run)
        if name == "pfc":
            pfc = _read_json(run / "results.json") or {}
            out["pfc"] = {"status": _status(rc), "rc": rc, **pfc, **written}
            continue
        if name == "layout":
            layout = _read_json(run / "results.json") or {}
            out["layout"] = {"status": _status(rc), "rc": rc, **layout, **written}
            continue
        row = {**training_row(name, run, rc, device_name), **written}
        rows.append(row)
        png = run / "out" / "profile" / "profile.png"
        if png.exists():
            shutil.copyfile(png, results / f"profile_{name.removeprefix('prof_')}.png")
    out["runs"] = rows
    text = table(rows)
    chosen = auto_table(rows)
    if chosen:
        text += ("\n\nengine.auto's choice for this device: predicted vs measured (measured memory: peak reserved on a "
                 "GPU, RSS on a CPU)\n" + chosen)
    if pfc is not None:
        text += "\n\nPartial FC head alone (world size 1; pinned GiB: tensors' bytes vs the caching host allocator's)\n"
        text += pfc_table(pfc)
    if layout is not None:
        text += ("\n\nMemory layout: forward + backward seconds, NCHW vs NHWC (engine.model.channels_last; > 1: NHWC "
                 "faster)\n" + layout_table(layout))
    if dry:
        text += "\n(dry run on the CPU: tiny sizes, not GPU numbers)"
    print(text)
    (results / "table.txt").write_text(text + "\n")
    (results / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    statuses = [r["status"] for r in rows] + [out[k]["status"] for k in ("pfc", "layout") if k in out]
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
