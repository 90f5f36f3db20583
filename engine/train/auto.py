"""`engine.auto: true`: the job applies engine.plan --fit's choice to itself at start-up.

Two moments of run_job (engine.train.build):

* `check_fits(cfg)`, before the process group: the world size from the launcher's environment, the memory of
  this device (`engine.auto_mem_gb`, else the GPU's memory, else the host's memory over the ranks of this
  node) and the planner's memory model, which needs no measurement. When no setting fits, the job is refused
  here, in one line that says what the least-memory setting would need (the same on every rank: the inputs
  are the same on every rank of a node).
* `choose(cfg, device)`, once the process group is up: the time model's figures measured on this job's own
  ranks (a CPU: a convolution, a copy, tiny ops and an all-reduce between the ranks, about 2 s; a GPU: the
  card's table, and an all-reduce), the search, and rank 0's choice given to every rank (a measurement may
  differ between ranks; the setting must not). Rank 0 logs it; the returned config has it applied (config.json
  is written from it) and the returned hook puts it in summary.json under "auto".

The choice changes only the keys the search may change (engine.perf.fit): never the model, precision, optimizer,
schedule, global batch, seed or data. A resumed run chooses again; checkpoints do not depend on the choice.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from engine.config import ConfigError
from engine.config.schema import RunConfig
from engine.perf import fit, timing
from engine.runtime import dist
from engine.runtime.log import get_logger
from engine.train.hooks import Hook

log = get_logger(__name__)
GiB = 2 ** 30


def _launch_world() -> Tuple[int, int]:
    """(world size, ranks on this node) as the launcher's environment says; (1, 1) without a launcher."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    return world, max(1, min(local, world))


def _host_memory_bytes() -> int:
    """MemTotal of this host (the same for every rank of a node, unlike what is free at one moment)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_gb(cfg: RunConfig, device: torch.device, ranks_on_node: int) -> float:
    """engine.auto_mem_gb, else the GPU's memory, else the host's memory divided by the ranks of this node."""
    if cfg.engine.auto_mem_gb > 0:
        return float(cfg.engine.auto_mem_gb)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GiB
    return _host_memory_bytes() / ranks_on_node / GiB


def _kind(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


# Figures for the memory-only search before the process group: the memory model does not use them.
_NOMINAL = timing.cpu_hardware({"tflops": 1.0, "mem_gbps": 10.0, "op_s": 1e-5, "link_gbps": 1.0, "latency_s": 1e-4},
                               "nominal (memory check only)")


def check_fits(cfg: RunConfig) -> None:
    """Before the process group: refuse the job when no setting fits this device's memory.

    Raises:
        ConfigError: "engine.auto: nothing fits ...", naming the least-memory setting and what it needs.
    """
    cfg = fit.with_class_count(cfg)  # the data's property file, or the public set's count, when left to the data
    if cfg.engine.head.num_classes is None:
        raise ConfigError("engine.auto: needs engine.head.num_classes (the head's size decides what fits, and the "
                          "dataset is opened only after the choice; this data has no property file to read it "
                          "from); set it to the dataset's class count")
    world, local = _launch_world()
    device = dist.get_device()
    budget = memory_budget_gb(cfg, device, local)
    result = fit.search(cfg, world, budget, _NOMINAL, device=_kind(device), ranks_per_node=local)
    if result.best is None:
        where = ("engine.auto_mem_gb" if cfg.engine.auto_mem_gb > 0 else
                 "this GPU's memory" if device.type == "cuda" else f"the host's memory over {local} rank(s)")
        raise ConfigError(f"engine.auto: {fit.nothing_fits(result)} (budget: {where}; engine.plan --fit shows "
                          f"the candidates)")


def _hardware(cfg: RunConfig, device: torch.device) -> timing.Hardware:
    """The time model's figures, measured on this job's ranks (every rank must call: one all-reduce)."""
    world = dist.get_world_size()
    if device.type == "cuda":
        try:
            hw = timing.gpu_hardware(cfg.precision, torch.cuda.get_device_name(device))
        except ValueError:  # a card without a table row: its matmul peak, measured now
            from engine.perf.report import device_peak_tflops

            peak, _ = device_peak_tflops(cfg.precision, device, None)
            hw = timing.gpu_hardware(cfg.precision, "H100", peak_tflops=peak)
        if world > 1:
            link = timing.measure_collective(device, sizes=(64 * 2 ** 20,))
            hw = timing.with_overrides(hw, None, link["link_gbps"])
        return hw
    figures = timing.measure_compute(cfg.precision)
    if world > 1:
        figures.update(timing.measure_collective(device))
        figures["unit_s"] = timing.measure_unit_overhead(device)
    else:
        figures.update(link_gbps=float("inf"), latency_s=0.0)
    merged = timing.merge_figures(dist.all_gather_object(figures))
    return timing.cpu_hardware(merged, f"measured at start-up on {world} rank(s) x {torch.get_num_threads()} "
                                       f"thread(s)")


class AutoChoiceHook(Hook):
    """Puts engine.auto's choice into summary.json (under "auto")."""

    def __init__(self, record: Dict[str, Any]):
        self.record = record

    def summary(self) -> Dict[str, Any]:
        return {"auto": self.record}


def choose(cfg: RunConfig, device: torch.device) -> Tuple[RunConfig, AutoChoiceHook]:
    """Once the process group is up: measure, search, agree on rank 0's choice, apply it.

    Returns:
        The config with the chosen keys applied (validated as a loaded config), and the hook recording it.

    Raises:
        ConfigError: nothing fits (the world size the process group has may differ from the launcher's).
    """
    world = dist.get_world_size()
    _, local = _launch_world()
    budget = memory_budget_gb(cfg, device, local)
    hw = _hardware(cfg, device)
    result = fit.search(fit.with_class_count(cfg), world, budget, hw, device=_kind(device), ranks_per_node=local)
    mine: Optional[fit.Setting] = result.best.setting if result.best else None
    chosen = dist.all_gather_object(mine)[0]  # rank 0's, on every rank
    if chosen is None:
        raise ConfigError(f"engine.auto: {fit.nothing_fits(result)}")
    cand = next((c for c in result.fits if c.setting == chosen), None)  # memory decides what fits: every rank
    keys = fit.overrides(cfg, chosen)
    applied = fit.apply(cfg, chosen) if keys else cfg
    record = {
        "setting": {"backend": chosen.family, "checkpoint": chosen.checkpoint_value,
                    "micro_batch": chosen.micro_batch, "gradient_accumulation_steps": chosen.accumulation,
                    "head": chosen.describe_head()},
        "overrides": keys,
        "budget_gib_per_rank": round(budget, 3),
        "predicted_gib_per_rank": round(cand.mem_bytes / GiB, 3) if cand else None,
        "predicted_step_s": round(cand.time.total, 4) if cand else None,
        "time_model": hw.source,
    }
    log.info(f"engine.auto: {chosen.family}, checkpointing {chosen.describe_checkpoint()}, micro-batch "
             f"{chosen.micro_batch} x {chosen.accumulation}, head {chosen.describe_head()}"
             + (f"; predicted {cand.mem_bytes / GiB:.2f} GiB per rank of {budget:.1f}, step {cand.time.total:.3f} s"
                if cand else "")
             + ("; keys: " + " ".join(keys) if keys else "; the config as written"))
    return applied, AutoChoiceHook(record)
