"""Typed run configuration: the checks of the sections, `load` and the resolved dump (the sections with their
documentation live in engine/config/sections.py; reading files, `--set` overrides, typed building and the
self-documenting `setting` in engine/config/files.py).

One file describes one run. DeepSpeed's own keys stay at the top level exactly as DeepSpeed documents them;
the engine's settings live under `engine` in typed sections. Every unknown key is an error
naming the key and the closest valid one, every wrong type or impossible value an error naming the field,
so a typo never silently falls back to a default.

`load` checks everything that can be checked from the config alone, before `dist.init` and before any model is
built (a mistake must stop a job in seconds, not after minutes of start-up), with no process group: backbone names, checkpoint stages and BatchNorm facts come from the
backbone registry's static table, every enumerated key against the choices its section declares (one generic check,
`files.check_choices`), augment names from dali_pipes.augment's parser, and DeepSpeed's own sections from
DeepSpeed's config models (engine.config.deepspeed_keys). Each check is written once, where
its concept lives; this module only names the key. Heavy imports (torch via backbones/heads, deepspeed) happen
inside the checks, so importing this module stays cheap.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from engine.config import deepspeed_keys as ds_schema
from engine.config import dataset, finetune, length, tracking
from engine.config import fsdp as fsdp_config
from engine.config.files import (ConfigError, Documented, apply_overrides, build_dataclass, check_choices, documented,
                                 read_file)
from engine.config.deepspeed_keys import DEEPSPEED_KEYS
from engine.config.deepspeed_keys import closest as _closest
from engine.config.fsdp import FSDPConfig  # noqa: F401  (re-exported: the sections' home is engine.config.sections)
from engine.config.sections import (BACKENDS, CheckpointConfig, DataConfig, EngineConfig, EvalConfig,  # noqa: F401
                                    HeadConfig, ModelConfig, OptimConfig, ProfileConfig, TrainConfig)


# Keys we own and therefore refuse in the DeepSpeed part: the head shares our optimizer and schedule.
OWNED_ELSEWHERE = {
    "optimizer": "engine.optim (the head and the backbone share one optimizer choice and one LR schedule)",
    "scheduler": "engine.optim.schedule (one schedule drives backbone and head)",
    "train_batch_size": "train_micro_batch_size_per_gpu and gradient_accumulation_steps (derived from them)",
}


@dataclass
class RunConfig:
    """The whole run: DeepSpeed's dict (top-level keys, untouched) plus the typed engine settings."""

    deepspeed: Dict[str, Any]
    engine: EngineConfig
    source: Optional[str] = None

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed.get("train_micro_batch_size_per_gpu", 1))

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    @property
    def gradient_clipping(self) -> float:
        """The backbone's gradient-norm limit (0: off). Absent means DeepSpeed's default (1.0 in 0.19), which
        DeepSpeed applies; the fsdp backend reads this too, so one config clips the same under both."""
        if "gradient_clipping" in self.deepspeed:
            return float(self.deepspeed["gradient_clipping"])
        return float(ds_schema.deepspeed_default("gradient_clipping"))

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def precision(self) -> str:
        """'bf16', 'fp16' or 'fp32', from whichever DeepSpeed block is enabled (torch_autocast: its dtype)."""
        ds = self.deepspeed
        if _enabled(ds, "torch_autocast"):
            return autocast_precision(ds["torch_autocast"])
        if _enabled(ds, "fp16"):
            return "fp16"
        if _enabled(ds, "bf16"):
            return "bf16"
        return "fp32"

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    def to_dict(self) -> Dict[str, Any]:
        out = copy.deepcopy(self.deepspeed)
        out["engine"] = dataclasses.asdict(self.engine)
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def dump(self, path: Union[str, Path]) -> None:
        """Write the resolved config (defaults filled in) atomically (engine.runtime.fileio)."""
        from engine.runtime.fileio import atomic_write_text  # torch: not at import time

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", path)


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: expected > 0, got {value}")


def _enabled(ds: Dict[str, Any], section: str) -> bool:
    block = ds.get(section)
    return isinstance(block, dict) and block.get("enabled") is True


def autocast_precision(section: Dict[str, Any]) -> str:
    """'bf16' or 'fp16': the compute dtype of an enabled `torch_autocast` section (one parse for the check and for
    `RunConfig.precision`: DeepSpeed's own DtypeEnum, see `ds_schema.autocast_dtype`).

    A missing dtype is refused rather than guessed: DeepSpeed then passes dtype=None to torch.autocast, which
    means float16 on CUDA (without a loss scaler) and bfloat16 on the CPU.

    Raises:
        ConfigError: dtype missing, not 16-bit, or not a spelling DeepSpeed accepts.
    """
    if "dtype" not in section:
        raise ConfigError("torch_autocast.dtype: required when torch_autocast.enabled is true (without it "
                          "torch.autocast picks float16 on CUDA, bfloat16 on the CPU); expected 'bfloat16' or "
                          "'float16'")
    try:
        return ds_schema.autocast_dtype(section["dtype"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_model(m: ModelConfig) -> None:
    import backbones  # imported where used: backbones import torch (the name is checked against its choices)

    if m.embedding_size <= 0:
        raise ConfigError(f"engine.model.embedding_size: expected > 0, got {m.embedding_size}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"engine.model.dropout: expected in [0, 1), got {m.dropout}")
    if m.dropout and not backbones.get_backbone_spec(m.name).dropout:
        raise ConfigError(f"engine.model.dropout: backbone {m.name!r} has no dropout layer (as in arcface_torch); "
                          f"set engine.model.dropout=0 with it, got {m.dropout}")
    if isinstance(m.checkpoint, str) and m.checkpoint != "all":
        raise ConfigError(f"engine.model.checkpoint: expected 'all' or a mapping stage -> segments, "
                          f"got {m.checkpoint!r}")
    if isinstance(m.checkpoint, dict):
        for stage, segs in m.checkpoint.items():
            try:
                backbones.registry.check_checkpoint_stages(m.name, [stage])
            except ValueError as exc:
                raise ConfigError(f"engine.model.checkpoint.{stage}: {exc}") from None
            if segs < 1:
                raise ConfigError(f"engine.model.checkpoint.{stage}: expected >= 1 segments, got {segs}")


def _check_head(h: HeadConfig) -> None:
    if h.num_classes is not None and h.num_classes < 2:
        raise ConfigError(f"engine.head.num_classes: expected >= 2 (with one class the softmax loss is exactly 0 "
                          f"and nothing trains), got {h.num_classes}")
    if not 0.0 < h.sample_rate <= 1.0:
        raise ConfigError(f"engine.head.sample_rate: expected in (0, 1], got {h.sample_rate}")
    if len(h.margin) != 3:
        raise ConfigError(f"engine.head.margin: expected [m1, m2, m3], got {h.margin}")
    m1, m2, m3 = h.margin
    if m1 != 1.0:
        raise ConfigError(f"engine.head.margin: m1 (multiplicative, SphereFace) must be 1.0, got {m1}")
    if m2 < 0 or m3 < 0:
        raise ConfigError(f"engine.head.margin: margins must be >= 0, got {h.margin}")
    if m2 > 0 and m3 > 0:
        raise ConfigError(f"engine.head.margin: m2 (ArcFace) and m3 (CosFace) cannot both be > 0, got {h.margin}")
    if m2 >= math.pi / 2:
        raise ConfigError(f"engine.head.margin: m2 must be < pi/2 radians, got {m2}")
    _positive("engine.head.scale", h.scale)
    if not 0.0 <= h.interclass_filtering_threshold < 1.0:
        raise ConfigError(f"engine.head.interclass_filtering_threshold: expected in [0, 1), "
                          f"got {h.interclass_filtering_threshold}")
    _positive("engine.head.lr_scale", h.lr_scale)
    if h.chunk_size < 0:
        raise ConfigError(f"engine.head.chunk_size: expected an int >= 0 (0 = auto), got {h.chunk_size}")


def _check_data_eval(d: DataConfig, ev: EvalConfig) -> None:
    from dali_pipes.augment import parse_augment  # the one augmentation parser (numpy only)
    from dali_pipes.options import check_data_options

    try:  # the loader runs the same check (dali_pipes.options): written once
        check_data_options(d.source, d.dali, d.on_corrupt, d.num_workers, d.path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        parse_augment(d.augment)
    except ValueError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("engine.data.augment") else f"engine.data.augment: {msg}") from None
    if ev.every < 0:
        raise ConfigError(f"engine.eval.every: expected >= 0 (0: evaluate only at the end), got {ev.every}")
    if ev.batch_size < 1:
        raise ConfigError(f"engine.eval.batch_size: expected >= 1, got {ev.batch_size}")
    for i, entry in enumerate(ev.bins):
        if not entry.strip():
            raise ConfigError(f"engine.eval.bins[{i}]: expected the path of a .bin file, got {entry!r}")
        if "{demo}" in entry and not entry.startswith("{demo}/"):
            raise ConfigError(f"engine.eval.bins[{i}]: '{{demo}}' may only stand at the start, as '{{demo}}/' "
                              f"(e.g. '{{demo}}/val.bin'), got {entry!r}")


def _check_optim_train(o: OptimConfig, t: TrainConfig, c: CheckpointConfig) -> None:
    _positive("engine.optim.lr", o.lr)
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"engine.optim.momentum: expected in [0, 1), got {o.momentum}")
    if o.weight_decay < 0:
        raise ConfigError(f"engine.optim.weight_decay: expected >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"engine.optim.betas: expected [beta1, beta2], each in [0, 1), got {o.betas}")
    _positive("engine.optim.eps", o.eps)
    if t.log_every < 1:
        raise ConfigError(f"engine.train.log_every: expected >= 1, got {t.log_every}")
    if c.every < 0:
        raise ConfigError(f"engine.checkpoint.every: expected >= 0 (0: no checkpoints), got {c.every}")
    if c.every_minutes < 0:
        raise ConfigError(f"engine.checkpoint.every_minutes: expected >= 0 (0: no time interval), got "
                          f"{c.every_minutes}")
    if c.keep < 0:
        raise ConfigError(f"engine.checkpoint.keep: expected >= 0 (0: keep all), got {c.keep}")
    if c.resume is not None and not str(c.resume).strip():
        raise ConfigError("engine.checkpoint.resume: expected 'auto', a checkpoint path or null, got ''")
    if c.overwrite and c.resume not in (None, "auto"):  # auto then finds nothing: the run starts over
        raise ConfigError(f"engine.checkpoint.overwrite: true discards output_dir's checkpoints, but "
                          f"engine.checkpoint.resume={c.resume!r} continues from one; set one of the two")
    if t.max_nonfinite_steps < 1:
        raise ConfigError(f"engine.train.max_nonfinite_steps: expected >= 1, got {t.max_nonfinite_steps}")
    _positive("engine.train.dist_timeout_s", t.dist_timeout_s)
    if t.watchdog_factor != 0 and t.watchdog_factor <= 1:
        raise ConfigError(f"engine.train.watchdog_factor: expected 0 (off) or > 1, got {t.watchdog_factor}")
    if t.watchdog_min_s < 0:
        raise ConfigError(f"engine.train.watchdog_min_s: expected >= 0, got {t.watchdog_min_s}")


def _check_deepspeed(ds: Dict[str, Any]) -> None:
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds and (isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 1):
            raise ConfigError(f"{key}: expected an integer >= 1, got {ds[key]!r}")
    if "gradient_clipping" in ds and (not isinstance(ds["gradient_clipping"], (int, float))
                                      or ds["gradient_clipping"] < 0):
        raise ConfigError(f"gradient_clipping: expected a number >= 0, got {ds['gradient_clipping']!r}")
    try:
        ds_schema.check_sections(ds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if _enabled(ds, "torch_autocast"):
        autocast_precision(ds["torch_autocast"])
    enabled = [k for k in ("fp16", "bf16", "torch_autocast") if _enabled(ds, k)]
    if len(enabled) > 1:
        raise ConfigError(f"precision: enable only one of fp16, bf16, torch_autocast; got {enabled}")


# ---- keys that would do nothing -------------------------------------------------------------------------------

def _check_precision_blocks(cfg: "RunConfig") -> None:
    """A precision block with settings but no `enabled` is off (DeepSpeed's default), yet reads as on.

    `"fp16": {"loss_scale": 0}` or `"torch_autocast": {"dtype": "bfloat16"}` train in fp32 with exit 0, and the
    user believes otherwise: refused. A block that says `enabled: false` is a deliberate switch and may keep its
    settings (recipes toggle precision with --set fp16.enabled=...); so is an empty block.
    """
    for section in ("fp16", "bf16", "torch_autocast"):
        block = cfg.deepspeed.get(section)
        if isinstance(block, dict) and block and "enabled" not in block:
            key = sorted(block)[0]
            raise ConfigError(f"{section}.{key}: has no effect: '{section}' is off because it does not set "
                              f"enabled (DeepSpeed's default is false); set {section}.enabled to true, or to false "
                              "to keep the block switched off")


def _check_deepspeed_backend(cfg: "RunConfig") -> None:
    """Keys that do nothing under engine.train.backend = "deepspeed".

    * a non-empty `activation_checkpointing` without engine.model.checkpoint: the section only chooses
      DeepSpeed's implementation (and its options) for the stages engine.model.checkpoint names; alone it
      checkpoints nothing. An error, not a warning: whoever wrote it expects checkpointed activations and finds
      out from an out-of-memory error minutes into the start-up of a large model, while a warning scrolls by
      once per rank. An empty section passes: it is how `--set activation_checkpointing={}` switches a recipe's
      section off together with `--set engine.model.checkpoint={}` (--set cannot delete a key).
    * offload_param below ZeRO-3 (DeepSpeed offloads parameters only when it partitions them), offload_optimizer
      at ZeRO-0 (no ZeRO optimizer to offload). A device of "none" is the switched-off form and passes.
    """
    ds = cfg.deepspeed
    if ds.get("activation_checkpointing") and not cfg.engine.model.checkpoint:
        raise ConfigError("activation_checkpointing: has no effect without engine.model.checkpoint (it only "
                          "configures DeepSpeed's implementation of the stages named there); set "
                          "engine.model.checkpoint (e.g. 'all'), or empty the section "
                          "(--set activation_checkpointing={}) to train without checkpointing")
    zero = ds.get("zero_optimization", {})
    stage = cfg.zero_stage
    if _enabled(ds, "torch_autocast") and autocast_precision(ds["torch_autocast"]) == "fp16" and stage > 0:
        raise ConfigError(f"torch_autocast.dtype: float16 cannot train at zero_optimization.stage {stage}: "
                          "DeepSpeed's ZeRO optimizers never lower their GradScaler's scale after an overflow (every "
                          "later step is skipped) and clip the still-scaled gradients; use zero_optimization.stage 0, "
                          "torch_autocast.dtype bfloat16, or the fp16 block (fp16.enabled=true, a GPU)")
    for key, needs in (("offload_param", 3), ("offload_optimizer", 1)):
        device = (zero.get(key) or {}).get("device", "none")
        if device != "none" and stage < needs:
            raise ConfigError(f"zero_optimization.{key}: has no effect at ZeRO stage {stage} (needs stage >= "
                              f"{needs}); got device {device!r}")
    try:
        fsdp_config.check_deepspeed_backend(cfg.engine.fsdp)  # engine.fsdp keys do nothing here
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_fsdp_backend(cfg: "RunConfig") -> None:
    """DeepSpeed keys that do nothing under engine.train.backend = "fsdp" (ZeRO stages, offload, DeepSpeed's
    activation checkpointing section, its engine's other settings): see engine.config.fsdp."""
    try:
        fsdp_config.check_fsdp_backend(cfg.deepspeed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# engine.train.backend -> the check of that backend's dead or conflicting keys (fsdp: e.g. zero_optimization.stage
# > 0 or offload_optimizer are errors naming the engine.fsdp setting that does it).
BACKEND_CHECKS: Dict[str, Callable[["RunConfig"], None]] = {"deepspeed": _check_deepspeed_backend,
                                                             "fsdp": _check_fsdp_backend}
assert tuple(BACKEND_CHECKS) == BACKENDS, "every engine.train.backend choice has its check"


def _check_start(cfg: "RunConfig") -> None:
    """Where the run starts from: the init_from files exist, and the class count is known or can be counted."""
    m, h = cfg.engine.model, cfg.engine.head
    if m.init_from is not None and not Path(m.init_from).expanduser().is_file():
        raise ConfigError(f"engine.model.init_from: weights file {m.init_from!r} not found (expected an arcface_torch "
                          ".pth / checkpoint_gpu_*.pt or ArcScale's model.pt)")
    head_init = Path(h.init_from).expanduser() if h.init_from is not None else None
    if head_init is not None and not (head_init.is_dir() or head_init.is_file()):
        raise ConfigError(f"engine.head.init_from: {h.init_from!r} not found (expected an ArcScale checkpoint: a "
                          "step_<N> or checkpoints/ directory; or arcface_torch's checkpoint_gpu_*.pt files: their "
                          "folder or one of them)")
    if h.allow_unused_classes and h.num_classes is None:
        raise ConfigError("engine.head.allow_unused_classes: has no effect without engine.head.num_classes (the head "
                          "then has exactly the dataset's classes)")
    if h.num_classes is None and cfg.engine.data.source == "synthetic":
        raise ConfigError("engine.head.num_classes: required with engine.data.source 'synthetic' (there is no "
                          "dataset to count the identities of, and engine.data.path names no public set)")


def _check_finetune(m: ModelConfig, o: OptimConfig) -> None:
    """engine.model.freeze / freeze_bn_stats and engine.optim.param_groups against the backbone's parameter names
    (built on the meta device only when one of them is set): a pattern matching nothing is named."""
    groups = finetune.check_param_groups(o.param_groups)
    patterns = finetune.check_patterns(m.freeze, "engine.model.freeze") if m.freeze else []
    if patterns or groups:
        names, trainable = finetune.parameter_names(m.name, m.embedding_size)
        assignment = finetune.assign(names, patterns, groups, backbone=m.name, trainable=trainable)
        if not any([assignment.base, *assignment.groups]):
            raise ConfigError(f"engine.model.freeze: {patterns} freeze every parameter of backbone {m.name!r}; "
                              "nothing of the backbone would train")
    if m.freeze_bn_stats and not finetune.has_batchnorm(m.name, m.embedding_size):
        raise ConfigError(f"engine.model.freeze_bn_stats: has no effect: backbone {m.name!r} has no BatchNorm layer")
    if m.freeze_bn_stats and m.init_from is None:
        raise ConfigError("engine.model.freeze_bn_stats: keeps the BatchNorm statistics as loaded, but nothing is "
                          "loaded (engine.model.init_from is not set): an untrained network's initial statistics "
                          "(mean 0, variance 1) do not fit its activations, which then grow layer after layer; set "
                          "engine.model.init_from")


def _check_micro_batch(cfg: "RunConfig") -> None:
    import backbones

    name = cfg.engine.model.name
    if backbones.get_backbone_spec(name).feature_batchnorm1d and cfg.micro_batch_size < 2:
        raise ConfigError(f"train_micro_batch_size_per_gpu: expected >= 2 for backbone {name!r}, whose feature "
                          f"layer is a BatchNorm1d that cannot train on one sample per rank; got "
                          f"{cfg.micro_batch_size}" + ("" if "train_micro_batch_size_per_gpu" in cfg.deepspeed
                                                       else " (the default when the key is absent)"))


def _check_profile(p: ProfileConfig, t: TrainConfig) -> None:
    if p.start_step < 0:
        raise ConfigError(f"engine.profile.start_step: expected >= 0, got {p.start_step}")
    if p.num_steps < 1:
        raise ConfigError(f"engine.profile.num_steps: expected >= 1, got {p.num_steps}")
    if p.peak_tflops < 0:
        raise ConfigError(f"engine.profile.peak_tflops: expected >= 0 (0: GPU table or measured), "
                          f"got {p.peak_tflops}")
    steps = length.config_max_steps(t)  # None: epochs, counted once the data is open
    if p.enabled and steps is not None and p.start_step + p.num_steps > steps:
        raise ConfigError(f"engine.profile: the window (steps {p.start_step}..{p.start_step + p.num_steps}) ends "
                          f"after engine.train.max_steps ({steps}); lower start_step or num_steps")


def _check_auto(e: EngineConfig) -> None:
    if e.auto_mem_gb < 0:
        raise ConfigError(f"engine.auto_mem_gb: expected >= 0 (0: the device's memory), got {e.auto_mem_gb}")
    if e.auto_mem_gb > 0 and not e.auto:
        raise ConfigError(f"engine.auto_mem_gb: has no effect without engine.auto=true (set to {e.auto_mem_gb}); "
                          "set engine.auto=true, or leave engine.auto_mem_gb at 0")


def validate(cfg: RunConfig) -> None:
    """Everything checkable from the config alone; each error names the key.

    Runs in `load`, before `dist.init` and before any model is built, with no process group: backbone facts come
    from the registry's static table, DeepSpeed's sections from its config models (imported, never initialised).
    """
    e = cfg.engine
    check_choices(e, "engine")  # every enumerated key against its declared choices
    _check_auto(e)
    _check_model(e.model)
    _check_head(e.head)
    _check_data_eval(e.data, e.eval)
    _check_optim_train(e.optim, e.train, e.checkpoint)
    length.check(cfg)
    dataset.check_targets(cfg)
    _check_deepspeed(cfg.deepspeed)
    _check_micro_batch(cfg)
    _check_finetune(e.model, e.optim)
    tracking.check_tracking(e.train.wandb, e.train.mlflow)
    _check_start(cfg)
    _check_precision_blocks(cfg)
    BACKEND_CHECKS[e.train.backend](cfg)
    _check_profile(e.profile, e.train)


def check_device(cfg: RunConfig, device_type: str) -> None:
    """What the config asks of the device it is about to run on ("cpu" or "cuda"): checked by the entry points
    just before the process group starts (engine.train.build.run_job), not in `load`, since a config may be
    written or planned (engine.plan) on another machine.

    Raises:
        ConfigError: DeepSpeed's fp16 block on the CPU (DeepSpeed refuses fp16 there, inside initialize).
    """
    if device_type == "cpu" and cfg.engine.train.backend == "deepspeed" and _enabled(cfg.deepspeed, "fp16"):
        raise ConfigError("fp16.enabled: DeepSpeed's fp16 block needs a GPU (DeepSpeed does not support fp16 on the "
                          "CPU); on the CPU use bf16.enabled=true, torch_autocast with dtype bfloat16, or "
                          "engine.train.backend=fsdp")


def documented_settings() -> List[Documented]:
    """Every key ArcScale documents, each with its one-line doc, its choices (enumerations) and the values a
    configuration matrix draws: DeepSpeed's top-level keys (engine.config.deepspeed_keys.DOCUMENTED) and every
    field of the engine sections (engine.config.sections)."""
    return list(ds_schema.DOCUMENTED) + list(documented(EngineConfig, "engine"))


def from_dict(data: Dict[str, Any], source: Optional[str] = None) -> RunConfig:
    """Split and validate a raw config mapping (after overrides)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{f' {source}' if source else ''}: expected a mapping at the top level")
    data = copy.deepcopy(data)
    engine_raw = data.pop("engine", {})
    valid_top = DEEPSPEED_KEYS | {"engine"}
    for key in data:
        if key in OWNED_ELSEWHERE:
            raise ConfigError(f"'{key}' is not used by ArcScale: set {OWNED_ELSEWHERE[key]}")
        if key not in DEEPSPEED_KEYS:
            raise ConfigError(f"unknown key '{key}'{_closest(key, valid_top)} "
                              "(top-level keys are DeepSpeed's own plus 'engine')")
    engine = build_dataclass(EngineConfig, engine_raw, "engine")
    cfg = RunConfig(deepspeed=data, engine=engine, source=source)
    shaped_like = dataset.synthetic_classes(cfg)  # synthetic data shaped like the public set engine.data.path names
    if shaped_like is not None:
        engine.head.num_classes = shaped_like
    validate(cfg)
    return cfg


def load(path: Union[str, Path], overrides: Optional[List[str]] = None) -> RunConfig:
    """Load a config file, apply `--set` overrides and validate.

    A run shortened by ``--set engine.train.max_steps=N`` alone keeps the file's warm-up share when the file's
    warm-up no longer fits (`_scale_warmup`), so every recipe, shipped or converted, shortens with that one key;
    so does one shortened by ``--set engine.train.epochs=N`` (`length.scale_warmup_epochs`).
    """
    raw = read_file(path)
    data = apply_overrides(raw, overrides or [])
    _scale_warmup(raw, data, overrides or [])
    length.scale_warmup_epochs(raw, data, overrides or [])
    return from_dict(data, source=str(path))


def _scale_warmup(raw: Dict[str, Any], data: Dict[str, Any], overrides: List[str]) -> None:
    """`--set engine.train.max_steps=N` without `engine.optim.warmup_steps`, on a file whose warm-up is not shorter
    than N: the warm-up becomes the same share of the N steps as it was of the file's steps (rounded down), with
    a one-line note. A file whose own warm-up does not fit its own max_steps stays an error (`validate`)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    if "engine.train.max_steps" not in keys or "engine.optim.warmup_steps" in keys:
        return
    def section(d: Any, *keys: str) -> Dict[str, Any]:
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, dict) else {}  # a malformed file is validate's to report

    file_train = section(raw, "engine", "train")
    file_steps = file_train.get("max_steps", None if "epochs" in file_train else length.DEFAULT_MAX_STEPS)
    optim = section(data, "engine", "optim")
    warmup, steps = optim.get("warmup_steps"), section(data, "engine", "train").get("max_steps")
    if not all(type(v) is int for v in (warmup, steps, file_steps)) or not 0 < steps <= warmup < file_steps:
        return
    optim["warmup_steps"] = warmup * steps // file_steps
    from engine.runtime import log  # torch: not at import time

    log.get_logger(__name__).info(
        f"note: engine.optim.warmup_steps {warmup} does not fit engine.train.max_steps={steps}: scaled with the run "
        f"to {optim['warmup_steps']} (the file's {warmup} of {file_steps} steps); set engine.optim.warmup_steps "
        "to choose")
