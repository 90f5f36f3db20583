"""Typed run configuration: load JSON/YAML, apply `--set` overrides, validate, dump the resolved form.

One file describes one run. DeepSpeed's own keys stay at the top level exactly as DeepSpeed documents them;
the engine's settings live under `engine` in typed sections (DESIGN.md §3). Every unknown key is an error
naming the key and the closest valid one, every wrong type or impossible value an error naming the field,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union


class ConfigError(ValueError):
    """A user error in the run configuration (unknown key, wrong type, impossible value)."""


# DeepSpeed's documented top-level keys (0.19). Sections inside them are validated by DeepSpeed itself.
DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
fp16 bf16 torch_autocast amp gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients
zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing
steps_per_print wall_clock_breakdown dump_state flops_profiler tensorboard wandb csv_monitor comet
communication_data_type seq_parallel_communication_data_type memory_breakdown checkpoint data_types aio
elasticity autotuning compression_training data_efficiency curriculum_learning pipeline timers comms_logger
disable_allgather dataloader_drop_last eigenvalue progressive_layer_drop sparse_attention nebula
gradient_allreduce_op managed_gradient_accumulation use_data_before_expert_parallelism compile
graph_harvesting weight_quantization hybrid_engine mics_shard_size mics_hierarchical_params_gather
disable_python_gc log_level zero_quantized_weights zero_quantized_gradients
""".split())

# Keys we own and therefore refuse in the DeepSpeed part: the head shares our optimizer and schedule.
OWNED_ELSEWHERE = {
    "optimizer": "engine.optim (the head and the backbone share one optimizer choice and one LR schedule)",
    "scheduler": "engine.optim.schedule (one schedule drives backbone and head)",
    "train_batch_size": "train_micro_batch_size_per_gpu and gradient_accumulation_steps (derived from them)",
}


@dataclass
class ModelConfig:
    name: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    channels_last: bool = False
    # Activation checkpointing: stage name -> number of segments (arcface_torch r2060: layer2 20, layer3 100);
    # "all" checkpoints every block of every stage. Empty: off.
    checkpoint: Union[str, Dict[str, int]] = field(default_factory=dict)


@dataclass
class HeadConfig:
    num_classes: int = 1000
    sample_rate: float = 1.0
    margin: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])
    scale: float = 64.0
    interclass_filtering_threshold: float = 0.0
    margin_grad: str = "straight_through"
    lr_scale: float = 1.0
    # softmax column chunk (online softmax, recomputed in backward); 0 = auto: chunked when global batch x
    # sampled classes per rank > 2**23 logits (heads.softmax.AUTO_CHUNK_MIN_LOGITS)
    chunk_size: int = 0
    offload: str = "none"  # "cpu": class centres and their optimizer state in (pinned) host memory
    storage_dtype: str = "fp32"  # class centres stored as fp32 | bf16 | fp16; loss/grads/update math in fp32


@dataclass
class DataConfig:
    source: str = "synthetic"
    path: Optional[str] = None
    num_workers: int = 2
    dali: str = "auto"
    augment: List[str] = field(default_factory=lambda: ["flip"])
    # synthetic source: "prototypes" makes each class a fixed pattern plus noise (learnable); "noise" is pure noise
    synthetic: str = "prototypes"
    on_corrupt: str = "error"


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "poly"
    poly_power: float = 2.0
    step_milestones: List[int] = field(default_factory=list)
    step_gamma: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 100
    output_dir: str = "outputs/run"
    log_every: int = 10
    seed: int = 0
    backend: str = "deepspeed"
    tensorboard: bool = False
    dist_timeout_s: float = 1800.0


@dataclass
class EvalConfig:
    # insightface verification .bin files; "{demo}/val.bin" is the demo dataset's held-out set (the demo
    # directory: engine.data.path when engine.data.source is "demo", else dali_pipes.loader.default_demo_dir())
    bins: List[str] = field(default_factory=list)
    every: int = 0  # evaluate every N optimizer steps; 0: only at the end of training (when bins are set)
    batch_size: int = 64  # per rank, per forward call
    at_start: bool = False  # also evaluate before the first step (shows the untrained baseline)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (and at the end); 0: no checkpoints
    keep: int = 2  # newest complete checkpoints kept; 0: all
    resume: Optional[str] = None  # "auto" (newest under output_dir, else fresh), a checkpoint path, or None
    export: bool = True  # write <output_dir>/model.pt (backbone, arcface_torch keys) at the end


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


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
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def precision(self) -> str:
        """'bf16', 'fp16' or 'fp32', from whichever DeepSpeed block is enabled."""
        ds = self.deepspeed
        if ds.get("torch_autocast", {}).get("enabled"):
            dtype = str(ds["torch_autocast"].get("dtype", "bfloat16"))
            return "fp16" if "16" in dtype and "b" not in dtype else "bf16"
        if ds.get("fp16", {}).get("enabled"):
            return "fp16"
        if ds.get("bf16", {}).get("enabled"):
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
        """Write the resolved config (defaults filled in) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        errors = []
        for alt in args:
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, alt, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise AssertionError(f"unhandled annotation {tp} at {where}")


def _build_dataclass(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{where}.{key}'{_closest(key, names)} "
                              f"(valid keys of {where}: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_dataclass(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def _choice(where: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{where}: expected one of {sorted(options)}, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Check values that are well-typed but impossible; each error names the field."""
    e, ds = cfg.engine, cfg.deepspeed
    m, h, d, o, t = e.model, e.head, e.data, e.optim, e.train
    if m.embedding_size <= 0:
        raise ConfigError(f"engine.model.embedding_size: expected > 0, got {m.embedding_size}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"engine.model.dropout: expected in [0, 1), got {m.dropout}")
    if isinstance(m.checkpoint, str) and m.checkpoint != "all":
        raise ConfigError(f"engine.model.checkpoint: expected 'all' or a mapping stage -> segments, "
                          f"got {m.checkpoint!r}")
    if isinstance(m.checkpoint, dict):
        for stage, segs in m.checkpoint.items():
            if segs < 1:
                raise ConfigError(f"engine.model.checkpoint.{stage}: expected >= 1 segments, got {segs}")
    if h.num_classes < 1:
        raise ConfigError(f"engine.head.num_classes: expected >= 1, got {h.num_classes}")
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
    if h.scale <= 0:
        raise ConfigError(f"engine.head.scale: expected > 0, got {h.scale}")
    if not 0.0 <= h.interclass_filtering_threshold < 1.0:
        raise ConfigError(f"engine.head.interclass_filtering_threshold: expected in [0, 1), "
                          f"got {h.interclass_filtering_threshold}")
    _choice("engine.head.margin_grad", h.margin_grad, {"straight_through", "exact"})
    if h.lr_scale <= 0:
        raise ConfigError(f"engine.head.lr_scale: expected > 0, got {h.lr_scale}")
    if h.chunk_size < 0:
        raise ConfigError(f"engine.head.chunk_size: expected an int >= 0 (0 = auto), got {h.chunk_size}")
    _choice("engine.head.offload", h.offload, {"none", "cpu"})
    _choice("engine.head.storage_dtype", h.storage_dtype, {"fp32", "bf16", "fp16"})
    _choice("engine.data.source", d.source, {"synthetic", "recordio", "demo", "folder"})
    _choice("engine.data.dali", d.dali, {"auto", "on", "off"})
    _choice("engine.data.synthetic", d.synthetic, {"prototypes", "noise"})
    _choice("engine.data.on_corrupt", d.on_corrupt, {"error", "skip"})
    if d.source in ("recordio", "folder") and not d.path:
        raise ConfigError(f"engine.data.path: required for source {d.source!r}")
    if d.num_workers < 0:
        raise ConfigError(f"engine.data.num_workers: expected >= 0, got {d.num_workers}")
    ev = e.eval
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
    _choice("engine.optim.name", o.name, {"sgd", "adamw"})
    _choice("engine.optim.schedule", o.schedule, {"poly", "cosine", "step", "constant"})
    if o.lr <= 0:
        raise ConfigError(f"engine.optim.lr: expected > 0, got {o.lr}")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"engine.optim.momentum: expected in [0, 1), got {o.momentum}")
    if o.weight_decay < 0:
        raise ConfigError(f"engine.optim.weight_decay: expected >= 0, got {o.weight_decay}")
    if o.warmup_steps < 0:
        raise ConfigError(f"engine.optim.warmup_steps: expected >= 0, got {o.warmup_steps}")
    if t.max_steps < 1:
        raise ConfigError(f"engine.train.max_steps: expected >= 1, got {t.max_steps}")
    if o.warmup_steps >= t.max_steps and o.warmup_steps > 0:
        raise ConfigError(f"engine.optim.warmup_steps: expected < engine.train.max_steps ({t.max_steps}), "
                          f"got {o.warmup_steps}")
    if t.log_every < 1:
        raise ConfigError(f"engine.train.log_every: expected >= 1, got {t.log_every}")
    _choice("engine.train.backend", t.backend, {"deepspeed"})
    c = e.checkpoint
    if c.every < 0:
        raise ConfigError(f"engine.checkpoint.every: expected >= 0 (0: no checkpoints), got {c.every}")
    if c.keep < 0:
        raise ConfigError(f"engine.checkpoint.keep: expected >= 0 (0: keep all), got {c.keep}")
    if c.resume is not None and not str(c.resume).strip():
        raise ConfigError("engine.checkpoint.resume: expected 'auto', a checkpoint path or null, got ''")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds and (isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 1):
            raise ConfigError(f"{key}: expected an integer >= 1, got {ds[key]!r}")
    if "gradient_clipping" in ds and (not isinstance(ds["gradient_clipping"], (int, float))
                                      or ds["gradient_clipping"] < 0):
        raise ConfigError(f"gradient_clipping: expected a number >= 0, got {ds['gradient_clipping']!r}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: expected a mapping, got {zero!r}")
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: expected 0, 1, 2 or 3, got {zero.get('stage')!r}")
    enabled = [k for k in ("fp16", "bf16", "torch_autocast") if ds.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        raise ConfigError(f"precision: enable only one of fp16, bf16, torch_autocast; got {enabled}")


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
    engine = _build_dataclass(EngineConfig, engine_raw, "engine")
    cfg = RunConfig(deepspeed=data, engine=engine, source=source)
    validate(cfg)
    return cfg


def parse_value(text: str) -> Any:
    """`--set` values parse as JSON when they can (numbers, booleans, lists, null), else stay strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; intermediate mappings are created as needed."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, text = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key path")
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is a value, not a section")
            node = nxt
        node[keys[-1]] = parse_value(text)
    return data


def read_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a JSON or YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load(path: Union[str, Path], overrides: Optional[List[str]] = None) -> RunConfig:
    """Load a config file, apply `--set` overrides and validate."""
    data = apply_overrides(read_file(path), overrides or [])
    return from_dict(data, source=str(path))
