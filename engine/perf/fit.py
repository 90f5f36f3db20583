"""The planner's search: the fastest settings that fit (``python -m engine.plan ... --fit``, ``engine.auto``).

A run's sharding, activation checkpointing, micro-batch and head storage change how much memory a rank needs
and how long a step takes, not what the step computes. `search` tries every combination of

* backend: DeepSpeed ZeRO 0-3, FSDP2 with and without reshard_after_forward, and on a GPU FSDP2's cpu_offload
  (a hybrid FSDP2 config keeps its topology: only FSDP2 candidates);
* activation checkpointing: none, every subset of the backbone's stages (each with the segment count that
  needs the least memory for it: recomputation costs the same for any count), and "all" (every block);
* micro-batch x gradient accumulation: every split of the configured images per rank and step (the global
  batch is kept; at least 2 images where the backbone ends in BatchNorm1d);
* head: class centres in fp32 or bf16, on the device or (GPU) offloaded to the host, the softmax chunk;

predicts each one's peak memory per rank (engine.perf.planner, the same rows as `engine.plan`) and step time
(engine.perf.timing), keeps those within the budget less a safety margin, and orders them by time. Among
candidates within TIE_SHARE of the fastest (the model's resolution) the least machinery wins: less sharding,
checkpointing and offload, fp32 centres, the configured micro-batch (`complexity`).

What it does not change: the model, precision, optimizer, learning-rate schedule, global batch, seed, data.
Two choices still move the numbers a little: BatchNorm normalises over the micro-batch, so a smaller
micro-batch changes its batch statistics (as more ranks would), and bf16 class centres are rounded on storage.
The search names both when it picks them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from engine.config.fsdp import FSDPConfig
from engine.config.schema import RunConfig
from engine.perf import planner, timing

GiB = 2 ** 30
DEFAULT_MARGIN = 0.10  # share of the budget kept free: the planner is within 8-20% of measured peaks
TIE_SHARE = 0.01  # predicted times closer than this count as equal
MIN_MICRO_BN1D = 2  # a BatchNorm1d feature layer cannot train on one sample per rank

CheckpointValue = Union[str, Dict[str, int]]


@dataclass(frozen=True)
class Setting:
    """One candidate: the keys the search may change (see the module docstring)."""

    backend: str
    zero_stage: int
    reshard: bool
    cpu_offload: bool
    checkpoint: Union[str, Tuple[Tuple[str, int], ...]]
    micro_batch: int
    accumulation: int
    head_dtype: str
    head_offload: str
    chunk_size: int

    @property
    def family(self) -> str:
        """The backend with its sharding: the unit the search's verdicts compare."""
        if self.backend == "deepspeed":
            return f"ZeRO-{self.zero_stage}"
        return "FSDP2 " + ("reshard" if self.reshard else "no reshard") + (" + offload" if self.cpu_offload else "")

    @property
    def checkpoint_value(self) -> CheckpointValue:
        return self.checkpoint if isinstance(self.checkpoint, str) else dict(self.checkpoint)

    def describe_checkpoint(self) -> str:
        if self.checkpoint == "all":
            return "all blocks"
        if not self.checkpoint:
            return "none"
        return ", ".join(f"{stage}/{segs}" for stage, segs in self.checkpoint)

    def describe_head(self) -> str:
        return (f"{self.head_dtype}" + (", host" if self.head_offload == "cpu" else "")
                + (f", chunk {self.chunk_size}" if self.chunk_size else ""))


@dataclass
class Candidate:
    """A setting with its predictions."""

    setting: Setting
    mem_bytes: float
    host_bytes: float
    time: timing.StepTime


@dataclass
class FitResult:
    """What `search` found: every candidate that fits (fastest first), the smallest of all, the inputs."""

    fits: List[Candidate]
    smallest: Candidate
    by_family: Dict[str, Tuple[Optional[Candidate], Candidate]]  # family -> (fastest that fits, smallest)
    budget_bytes: float
    mem_limit_bytes: float
    world_size: int
    global_batch: int
    hardware: timing.Hardware
    base: Setting
    considered: int

    @property
    def best(self) -> Optional[Candidate]:
        return self.fits[0] if self.fits else None


def _setting_of(cfg: RunConfig) -> Setting:
    """The input config's own setting."""
    fs = planner.fsdp_settings(cfg)
    ck = cfg.engine.model.checkpoint
    h = cfg.engine.head
    return Setting(backend=planner.backend_of(cfg), zero_stage=cfg.zero_stage, reshard=fs["reshard_after_forward"],
                   cpu_offload=fs["cpu_offload"], checkpoint=ck if isinstance(ck, str) else tuple(sorted(ck.items())),
                   micro_batch=cfg.micro_batch_size, accumulation=cfg.gradient_accumulation_steps,
                   head_dtype=h.storage_dtype, head_offload=h.offload, chunk_size=h.chunk_size)


def candidate_config(cfg: RunConfig, s: Setting) -> RunConfig:
    """`cfg` with `s` applied, unvalidated (cheap: the search builds thousands); `overrides` gives the keys."""
    ds = dict(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch
    ds["gradient_accumulation_steps"] = s.accumulation
    ds["zero_optimization"] = dict(ds.get("zero_optimization", {}), stage=s.zero_stage if s.backend == "deepspeed"
                                   else 0)
    e = cfg.engine
    if s.backend == "fsdp":
        fsdp = dataclasses.replace(e.fsdp, reshard_after_forward=s.reshard, cpu_offload=s.cpu_offload)
    else:
        fsdp = FSDPConfig()
    engine = dataclasses.replace(
        e, model=dataclasses.replace(e.model, checkpoint=s.checkpoint_value),
        head=dataclasses.replace(e.head, storage_dtype=s.head_dtype, offload=s.head_offload, chunk_size=s.chunk_size),
        train=dataclasses.replace(e.train, backend=s.backend), fsdp=fsdp)
    return RunConfig(deepspeed=ds, engine=engine, source=cfg.source)


def overrides(cfg: RunConfig, s: Setting) -> List[str]:
    """The `--set key=value` overrides that turn `cfg` into `s` (only the keys that change)."""
    base, out = _setting_of(cfg), []

    def put(key: str, value: Any) -> None:
        out.append(f"{key}={json.dumps(value)}")

    if (s.micro_batch, s.accumulation) != (base.micro_batch, base.accumulation):
        put("train_micro_batch_size_per_gpu", s.micro_batch)
        put("gradient_accumulation_steps", s.accumulation)
    if s.backend != base.backend:
        put("engine.train.backend", s.backend)
    if s.backend == "deepspeed":
        if base.backend == "fsdp":
            for key in ("reshard_after_forward", "hybrid", "cpu_offload"):
                put(f"engine.fsdp.{key}", None)
            put("zero_optimization", {"stage": s.zero_stage})
        elif s.zero_stage != base.zero_stage:
            put("zero_optimization.stage", s.zero_stage)
    else:
        if base.backend == "deepspeed" and cfg.deepspeed.get("zero_optimization"):
            put("zero_optimization", {})
        if base.backend == "deepspeed" or s.reshard != base.reshard:
            put("engine.fsdp.reshard_after_forward", s.reshard)
        if base.backend == "deepspeed" or s.cpu_offload != base.cpu_offload:
            put("engine.fsdp.cpu_offload", s.cpu_offload)
    if s.checkpoint != base.checkpoint:
        put("engine.model.checkpoint", s.checkpoint_value)
    if cfg.deepspeed.get("activation_checkpointing") and (s.backend == "fsdp" or not s.checkpoint):
        put("activation_checkpointing", {})
    for key, new, old in (("storage_dtype", s.head_dtype, base.head_dtype),
                          ("offload", s.head_offload, base.head_offload),
                          ("chunk_size", s.chunk_size, base.chunk_size)):
        if new != old:
            put(f"engine.head.{key}", new)
    return out


def apply(cfg: RunConfig, s: Setting) -> RunConfig:
    """`cfg` with `s` applied and validated as any loaded config (engine.config.from_dict)."""
    from engine.config import schema
    from engine.config.files import apply_overrides

    raw = apply_overrides(cfg.to_dict(), overrides(cfg, s))
    return schema.from_dict(raw, source=cfg.source)


# ---- the space ----------------------------------------------------------------------------------------------

def _best_segments(measure: planner.BackboneMeasure, stage: str) -> int:
    """The segment count of `stage` that keeps the fewest elements alive (kept inputs + one recomputed segment)."""
    from engine.parallel.common import segment_ranges

    blocks = measure.units[stage]
    n = len(blocks)
    options = sorted({1, n} | {2 ** k for k in range(n.bit_length()) if 2 ** k <= n}
                     | {max(1, min(n, round(n ** 0.5 * f))) for f in (0.5, 0.7, 1.0, 1.4, 2.0)})

    def live(num: int) -> float:
        segs = segment_ranges(n, num)
        return (sum(blocks[r.start].input for r in segs)
                + max(sum(blocks[i].saved for i in r) - blocks[r.start].input for r in segs))

    return min(options, key=lambda k: (live(k), k))


def checkpoint_options(measure: planner.BackboneMeasure, configured: CheckpointValue) -> List[CheckpointValue]:
    """None, every subset of stages (each at its least-memory segment count), "all", and the configured one."""
    stages = list(measure.units)
    best = {stage: _best_segments(measure, stage) for stage in stages}
    out: List[CheckpointValue] = [{}]
    for r in range(1, len(stages) + 1):
        for subset in itertools.combinations(stages, r):
            out.append({stage: best[stage] for stage in subset})
    out.append("all")
    if configured and configured not in out:
        out.append(configured)
    return out


def micro_batch_options(cfg: RunConfig) -> List[Tuple[int, int]]:
    """(micro-batch, accumulation) pairs with the configured images per rank and step."""
    import backbones

    images = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    low = MIN_MICRO_BN1D if backbones.get_backbone_spec(cfg.engine.model.name).feature_batchnorm1d else 1
    pairs = [(m, images // m) for m in range(1, images + 1) if images % m == 0 and m >= low]
    return pairs or [(cfg.micro_batch_size, cfg.gradient_accumulation_steps)]


def backend_options(cfg: RunConfig, device: str) -> List[Tuple[str, int, bool, bool]]:
    """(backend, ZeRO stage, reshard, cpu_offload) to try: a hybrid FSDP2 config stays FSDP2; FSDP2 only when the
    config has no DeepSpeed-only key besides the sharding ones the search rewrites."""
    from engine.config import fsdp as fsdp_config

    out: List[Tuple[str, int, bool, bool]] = []
    hybrid = planner.backend_of(cfg) == "fsdp" and planner.fsdp_settings(cfg)["hybrid"]
    if not hybrid:
        out += [("deepspeed", stage, True, False) for stage in range(4)]
    ds = {k: v for k, v in cfg.deepspeed.items() if k not in ("zero_optimization", "activation_checkpointing")}
    try:
        fsdp_config.check_fsdp_backend(ds)
    except ValueError:
        return out
    offloads = (False, True) if device == "gpu" else (False,)
    out += [("fsdp", 0, reshard, off) for reshard in (True, False) for off in offloads]
    return out


def head_options(cfg: RunConfig, device: str, num_sampled_hint: int) -> List[Tuple[str, str, int]]:
    """(storage dtype, offload, chunk size) to try."""
    h = cfg.engine.head
    dtypes = sorted({h.storage_dtype, "fp32", "bf16"}, key=["fp32", "bf16", "fp16"].index)
    offloads = ["none", "cpu"] if device == "gpu" else [h.offload]
    chunks = sorted({h.chunk_size, 0} | {c for c in (16384, 131072) if c < num_sampled_hint})
    return [(d, o, c) for d in dtypes for o in offloads for c in chunks]


def complexity(s: Setting, base: Setting) -> float:
    """How much machinery a setting adds, for choosing among candidates whose predicted times are within
    TIE_SHARE (the model's resolution): less sharding, checkpointing and offload, fp32 centres, the configured
    micro-batch (BatchNorm's statistics), then fewer keys changed from the input config."""
    sharding = s.zero_stage if s.backend == "deepspeed" else (3 if s.reshard else 2)
    checkpointed = 0 if not s.checkpoint else (10 if s.checkpoint == "all" else len(s.checkpoint))
    changed = sum(getattr(s, f.name) != getattr(base, f.name) for f in dataclasses.fields(Setting))
    return (sharding + checkpointed + 3 * s.cpu_offload + 2 * (s.head_dtype != "fp32") + 3 * (s.head_offload != "none")
            + (s.micro_batch != base.micro_batch) + 0.5 * (s.chunk_size != base.chunk_size) + 0.1 * changed)


def _pick(cands: List[Candidate], base: Setting) -> Candidate:
    """The fastest candidate, or among those within TIE_SHARE of it the least complex."""
    fastest = min(c.time.total for c in cands)
    ties = [c for c in cands if c.time.total <= fastest * (1 + TIE_SHARE)]
    return min(ties, key=lambda c: (complexity(c.setting, base), c.time.total))


def search(cfg: RunConfig, world_size: int, mem_gb: float, hw: timing.Hardware, *, device: Optional[str] = None,
           margin: float = DEFAULT_MARGIN, ranks_per_node: Optional[int] = None) -> FitResult:
    """Every candidate setting of `cfg` on `world_size` ranks, the ones within (1 - margin) x mem_gb GiB per
    rank ordered fastest first. `device` defaults to hw.device.

    Raises:
        ValueError: a world size, budget or margin out of range.
    """
    from heads.softmax import resolve_chunk_size  # the head's own rule (auto-chunking above a logits size)

    device = device or hw.device
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
    if not mem_gb > 0:
        raise ValueError(f"mem_gb: expected > 0, got {mem_gb!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin: expected in [0, 1), got {margin!r}")
    m = cfg.engine.model
    measure = planner.measure_backbone(m.name, m.embedding_size, tuple(m.freeze))
    cfg = with_class_count(cfg)
    num_classes = cfg.engine.head.num_classes
    if num_classes is None:
        raise ValueError("engine.head.num_classes: not set (the run would take the dataset's count); the search needs "
                         "the head's size: set engine.head.num_classes to the dataset's class count")
    base = _setting_of(cfg)
    limit = mem_gb * GiB
    budget = limit * (1 - margin)
    sample_hint = -(-num_classes // world_size)
    profiles = {json.dumps(ck, sort_keys=True): planner.profile_from(measure, ck)
                for ck in checkpoint_options(measure, m.checkpoint)}
    fits: List[Candidate] = []
    smallest: Optional[Candidate] = None
    families: Dict[str, Tuple[List[Candidate], Candidate]] = {}
    considered = 0
    for (backend, stage, reshard, offload), ck_key, (micro, accum), (dtype, head_off, chunk) in itertools.product(
            backend_options(cfg, device), profiles, micro_batch_options(cfg), head_options(cfg, device, sample_hint)):
        ck = json.loads(ck_key)
        s = Setting(backend=backend, zero_stage=stage, reshard=reshard, cpu_offload=offload,
                    checkpoint=ck if isinstance(ck, str) else tuple(sorted(ck.items())), micro_batch=micro,
                    accumulation=accum, head_dtype=dtype, head_offload=head_off, chunk_size=chunk)
        c_cfg = candidate_config(cfg, s)
        prof = profiles[ck_key]
        rows, num_sampled = planner._rows(c_cfg, world_size, micro, num_classes, device, prof, ranks_per_node)
        mem = sum(r.bytes for r in rows if r.where == "device")
        host = sum(r.bytes for r in rows if r.where == "host")
        resolved = resolve_chunk_size(chunk, micro * world_size, num_sampled, "cuda" if device == "gpu" else "cpu")
        t = timing.step_time(c_cfg, world_size, micro, measure, prof, num_sampled, resolved or 0, hw, ranks_per_node)
        cand = Candidate(s, mem, host, t)
        considered += 1
        if smallest is None or mem < smallest.mem_bytes:
            smallest = cand
        fam_fits, fam_small = families.get(s.family, ([], cand))
        if mem < fam_small.mem_bytes:
            fam_small = cand
        if mem <= budget:
            fits.append(cand)
            fam_fits.append(cand)
        families[s.family] = (fam_fits, fam_small)
    fits.sort(key=lambda c: c.time.total)
    if fits:
        winner = _pick(fits, base)
        fits = [winner] + [c for c in fits if c is not winner]
    by_family = {fam: (_pick(f, base) if f else None, small) for fam, (f, small) in families.items()}
    assert smallest is not None
    return FitResult(fits=fits, smallest=smallest, by_family=by_family, budget_bytes=budget, mem_limit_bytes=limit,
                     world_size=world_size, global_batch=cfg.global_batch_size(world_size), hardware=hw, base=base,
                     considered=considered)


# ---- the answer ---------------------------------------------------------------------------------------------

def _distinct(fits: List[Candidate], top: int) -> List[Candidate]:
    """The fastest `top` candidates that differ in backend, checkpointing or micro-batch (not only in the head)."""
    out, seen = [], set()
    for c in fits:
        key = (c.setting.family, c.setting.checkpoint, c.setting.micro_batch)
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == top:
            break
    return out


def verdict(family: str, result: FitResult) -> str:
    """Why `family` lost to the winner: its fastest fitting setting's extra time and where it goes, or the least
    memory it needs when nothing of it fits."""
    best, smallest = result.by_family[family]
    win = result.best
    if best is None:
        return (f"{family}: does not fit: at least {smallest.mem_bytes / GiB:.1f} GiB per rank "
                f"(checkpointing {smallest.setting.describe_checkpoint()}, micro-batch {smallest.setting.micro_batch})"
                f" > {result.budget_bytes / GiB:.1f}")
    assert win is not None
    extra = best.time.total / win.time.total - 1
    diffs = {k: v - win.time.parts()[k] for k, v in best.time.parts().items()}
    cause, _ = max(diffs.items(), key=lambda kv: kv[1])
    gathers = family == "ZeRO-3" or family.startswith("FSDP2")
    where = {"communication": "in gathers and reductions" if gathers else "in gradient collectives",
             "recomputation": "in recomputation", "host transfers": "in host transfers",
             "optimizer and copies": "in optimizer steps and copies",
             "per-call overhead": "in per-call overhead (kernel calls, sharded units)", "head": "in the head",
             "compute": "in compute"}[cause]
    if extra <= TIE_SHARE:
        return (f"{family}: as fast within {TIE_SHARE:.0%} ({extra:+.1%}); "
                f"{best.mem_bytes / GiB:.1f} GiB per rank; the winner needs less machinery")
    if best.mem_bytes < win.mem_bytes:
        need = f"its {best.mem_bytes / GiB:.1f} GiB not needed at {win.mem_bytes / GiB:.1f} GiB"
    else:
        need = f"and {best.mem_bytes / GiB:.1f} GiB vs {win.mem_bytes / GiB:.1f} GiB"
    return (f"{family}: {extra:+.0%} time {where}, {need} (its best: checkpointing "
            f"{best.setting.describe_checkpoint()}, micro-batch {best.setting.micro_batch})")


def nothing_fits(result: FitResult) -> str:
    """The one-line refusal: the budget, and what the least-memory setting would need."""
    s = result.smallest
    need = math.ceil(s.mem_bytes / (result.budget_bytes / result.mem_limit_bytes) / GiB * 10) / 10  # rounded up
    return (f"nothing fits {result.mem_limit_bytes / GiB:.1f} GiB per rank on {result.world_size} rank(s) "
            f"({result.budget_bytes / GiB:.1f} GiB after the safety margin) among {result.considered:,} settings; "
            f"the smallest is {s.setting.family}, checkpointing {s.setting.describe_checkpoint()}, micro-batch "
            f"{s.setting.micro_batch} x {s.setting.accumulation}, head {s.setting.describe_head()}: "
            f"{s.mem_bytes / GiB:.2f} GiB per rank; it would fit with {need:.1f} GiB per rank, or on more ranks")


def with_class_count(cfg: RunConfig) -> RunConfig:
    """`cfg` with `engine.head.num_classes` filled in when it is left to the data (a copy): the count of the
    data's property file, or of the public set engine.data.path names (engine.config.dataset.num_classes_hint)."""
    from engine.config.dataset import num_classes_hint

    if cfg.engine.head.num_classes is not None or num_classes_hint(cfg) is None:
        return cfg
    head = dataclasses.replace(cfg.engine.head, num_classes=num_classes_hint(cfg))
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, head=head))


def format_fit(result: FitResult, cfg: RunConfig, top: int = 3) -> str:
    """The search's answer as text: the fastest few side by side, one verdict per losing family, the keys."""
    cfg = with_class_count(cfg)
    m = cfg.engine.model
    b = planner.measure_backbone(m.name, m.embedding_size, tuple(m.freeze))
    out = [f"ArcScale fit: {b.name} ({b.num_params / 1e6:.1f} M params), {cfg.engine.head.num_classes:,} classes, "
           f"world {result.world_size}, global batch {result.global_batch}, {cfg.precision}, "
           f"{result.hardware.device} {result.mem_limit_bytes / GiB:.1f} GiB per rank "
           f"(budget {result.budget_bytes / GiB:.1f} GiB after the {1 - result.budget_bytes / result.mem_limit_bytes:.0%}"
           f" margin); {result.considered:,} settings, {len(result.fits):,} fit",
           f"time model: {result.hardware.source}"]
    if not result.fits:
        out.append(nothing_fits(result))
        return "\n".join(out)
    shown = _distinct(result.fits, top)
    base_cfg_cand = next((c for c in result.fits if c.setting == result.base), None)
    cols = [f"#{i + 1}" for i in range(len(shown))]
    rows: List[Tuple[str, List[str]]] = [
        ("backend", [c.setting.family for c in shown]),
        ("checkpointing", [c.setting.describe_checkpoint() for c in shown]),
        ("micro-batch x accumulation", [f"{c.setting.micro_batch} x {c.setting.accumulation}" for c in shown]),
        ("head centres", [c.setting.describe_head() for c in shown]),
        ("memory GiB/rank", [f"{c.mem_bytes / GiB:.2f}" for c in shown]),
        ("step s (predicted)", [f"{c.time.total:.3f}" for c in shown]),
    ]
    for part in shown[0].time.parts():
        if any(c.time.parts()[part] > 0.005 * c.time.total for c in shown):
            rows.append((f"  {part}", [f"{c.time.parts()[part]:.3f}" for c in shown]))
    rows.append(("samples/s (all ranks)", [f"{result.global_batch / c.time.total:,.1f}" for c in shown]))
    width = max(20, max(len(v) for _, vals in rows for v in vals) + 2)
    out.append("fastest that fit:")
    out.append(f"{'':<30}" + "".join(f"{c:>{width}}" for c in cols))
    for name, vals in rows:
        out.append(f"{name:<30}" + "".join(f"{v:>{width}}" for v in vals))
    win = result.best
    assert win is not None
    if base_cfg_cand is not None and base_cfg_cand.setting != win.setting:
        out.append(f"the input config as it is: {base_cfg_cand.mem_bytes / GiB:.2f} GiB, step "
                   f"{base_cfg_cand.time.total:.3f} s ({base_cfg_cand.time.total / win.time.total - 1:+.0%})")
    elif base_cfg_cand is None:
        out.append("the input config as it is: does not fit the budget")
    out.append("other backends:")
    for family in result.by_family:
        if family != win.setting.family:
            out.append("  " + verdict(family, result))
    keys = overrides(cfg, win.setting)
    out.append("chosen keys: " + (" ".join(f"--set {k}" for k in keys) if keys else "none (the input config is the "
                                                                                   "fastest that fits)"))
    notes = []
    if win.setting.micro_batch != result.base.micro_batch:
        notes.append(f"BatchNorm normalises over {win.setting.micro_batch} images per rank instead of "
                     f"{result.base.micro_batch} (same global batch)")
    if win.setting.head_dtype != result.base.head_dtype:
        notes.append(f"class centres stored in {win.setting.head_dtype} (rounded on storage; math in fp32)")
    if notes:
        out.append("note: " + "; ".join(notes))
    return "\n".join(out)


def write_config(path: str, source: str, user_overrides: List[str], cfg: RunConfig, s: Setting) -> None:
    """Write `source` (with the user's --set overrides) with only the keys of `s` changed, as JSON.

    Raises:
        ConfigError: the written file does not load (it is checked before it is kept).
    """
    from pathlib import Path

    from engine.config import schema
    from engine.config.files import apply_overrides, read_file

    raw = apply_overrides(apply_overrides(read_file(source), user_overrides), overrides(cfg, s))
    schema.from_dict(raw, source=path)  # refuse to write what would not load
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(out)
