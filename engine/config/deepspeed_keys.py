"""DeepSpeed's configuration schema as DeepSpeed itself declares it, for checking a run config before start-up.

DeepSpeed validates its config only inside ``deepspeed.initialize``, after the process group exists, and not
everywhere: sections it reads key by key ignore any other key (``torch_autocast.enabeld`` ran in fp32 with exit
0). This module asks DeepSpeed's own declarations (pydantic config models, key constants, ``DtypeEnum``) without
initialising anything, so ``engine.config`` refuses a mistake before ``dist.init``. Nothing here is a copied key
list except ``DEEPSPEED_KEYS``, which DeepSpeed does not expose (see there). deepspeed is imported where used:
its import takes seconds.

Each check raises ``ValueError`` whose message starts with the dotted key; ``engine.config`` turns it into a
``ConfigError``.
"""
from __future__ import annotations

import importlib
import typing
from typing import Any, Dict, Tuple

from engine.config.files import Documented, closest

__all__ = ["DEEPSPEED_KEYS", "MODEL_SECTIONS", "CONSTANT_SECTIONS", "PRECISION_ROUTES", "DOCUMENTED", "closest",
           "constant_keys", "check_sections", "autocast_dtype"]

# DeepSpeed's top-level keys (0.19.8). DeepSpeedConfig reads them one by one (get_scalar_param and per-section
# parsers in deepspeed/runtime/config.py) and exposes no set of them, hence this list. Keys 0.19 removed (amp,
# sparse_gradients, nebula, elasticity, curriculum_learning, ...: deepspeed.initialize refuses them) are left out.
DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
fp16 bf16 torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor
zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing
steps_per_print wall_clock_breakdown dump_state flops_profiler tensorboard wandb csv_monitor comet
communication_data_type seq_parallel_communication_data_type memory_breakdown checkpoint data_types aio
autotuning data_efficiency pipeline timers comms_logger disable_allgather dataloader_drop_last
gradient_allreduce_op managed_gradient_accumulation use_data_before_expert_parallelism compile
weight_quantization hybrid_engine disable_python_gc log_level
""".split())

# Sections DeepSpeed parses with a pydantic model (extra keys forbidden): checked against that model, so keys,
# types, ranges and DeepSpeed's own validators are DeepSpeed's.
MODEL_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
}
# Sections DeepSpeed reads key by key with get_scalar_param and no model: their keys are the string constants
# DeepSpeed declares for them (module, name prefix: TORCH_AUTOCAST_DTYPE = "dtype", ...); a value must have the
# type of the key's `<NAME>_DEFAULT` constant where one exists.
CONSTANT_SECTIONS = {
    "torch_autocast": ("deepspeed.runtime.constants", "TORCH_AUTOCAST"),
    "activation_checkpointing": ("deepspeed.runtime.activation_checkpointing.config", "ACT_CHKPT"),
    "flops_profiler": ("deepspeed.profiling.constants", "FLOPS_PROFILER"),
}
# Every other top-level section (aio, checkpoint, data_types, timers, autotuning, pipeline, data_efficiency,
# hybrid_engine, weight_quantization, ...) is handed to DeepSpeed as written and checked by deepspeed.initialize,
# after start-up: no ArcScale recipe or code path uses them.


def constant_keys(section: str) -> Dict[str, Any]:
    """{key: DeepSpeed's default or None} of a section in `CONSTANT_SECTIONS`, read from DeepSpeed's constants."""
    module, prefix = CONSTANT_SECTIONS[section]
    names = vars(importlib.import_module(module))
    return {value: names.get(f"{name}_DEFAULT") for name, value in names.items()
            if name.startswith(prefix + "_") and isinstance(value, str) and not name.endswith(("_DEFAULT", "_FORMAT"))}


def _nested_model(annotation: Any):
    """The pydantic model inside a field's annotation (SubConfig, Optional[SubConfig]), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _check_model_keys(data: Dict[str, Any], model, where: str) -> None:
    """Every key of `data` is a field or alias of pydantic `model`, recursively; else name the closest one."""
    fields: Dict[str, Any] = {}
    for name, info in model.model_fields.items():
        fields[name] = fields[info.alias or name] = _nested_model(info.annotation)
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown key '{where}.{key}'{closest(key, fields)} "
                             f"(checked against DeepSpeed's {model.__name__})")
        if fields[key] is not None and isinstance(value, dict):
            _check_model_keys(value, fields[key], f"{where}.{key}")


def _check_model_section(section: str, data: Dict[str, Any]) -> None:
    from pydantic import ValidationError

    module, name = MODEL_SECTIONS[section]
    model = getattr(importlib.import_module(module), name)
    _check_model_keys(data, model, section)
    try:
        model(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "".join(f".{part}" for part in err["loc"])
        got = f", got {err['input']!r}" if err["loc"] else ""  # a model-level validator's input is the whole model
        raise ValueError(f"{section}{loc}: {err['msg']}{got}") from None
    except (AssertionError, TypeError) as exc:  # e.g. a deprecated key given together with its replacement
        raise ValueError(f"{section}: {exc}") from None


def _check_constant_section(section: str, data: Dict[str, Any]) -> None:
    keys = constant_keys(section)
    for key, value in data.items():
        if key not in keys:
            raise ValueError(f"unknown key '{section}.{key}'{closest(key, keys)} "
                             f"(DeepSpeed's keys of {section}: {', '.join(sorted(keys))})")
        default = keys[key]
        if default is None or value is None:
            continue
        kind = bool if isinstance(default, bool) else (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
            raise ValueError(f"{section}.{key}: expected {type(default).__name__} (DeepSpeed's default is "
                             f"{default!r}), got {value!r}")


def check_sections(ds: Dict[str, Any]) -> None:
    """Keys and values inside DeepSpeed's own sections of `ds`, as DeepSpeed would judge them at initialize.

    Stricter than DeepSpeed in two places, because ArcScale reads these values itself: `enabled` must be a JSON
    bool (pydantic would take "yes" or 1), and `zero_optimization.stage` an integer 0-3, not a bool (pydantic
    takes true as stage 1).

    Raises:
        ValueError: the first wrong key or value, named by its dotted path (with the closest valid key).
    """
    for section in sorted(set(ds) & (set(MODEL_SECTIONS) | set(CONSTANT_SECTIONS))):
        data = ds[section]
        if not isinstance(data, dict):
            raise ValueError(f"{section}: expected a mapping, got {data!r}")
        if "enabled" in data and not isinstance(data["enabled"], bool):
            raise ValueError(f"{section}.enabled: expected true or false, got {data['enabled']!r}")
        stage = data.get("stage", 0) if section == "zero_optimization" else 0
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}"
                             + (" (a bool: true would silently mean stage 1)" if isinstance(stage, bool) else ""))
        if section in CONSTANT_SECTIONS:
            _check_constant_section(section, data)
        else:
            _check_model_section(section, data)
    modules = ds.get("torch_autocast", {}).get("lower_precision_safe_modules")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise ValueError("torch_autocast.lower_precision_safe_modules: expected a list of class paths "
                         f"(e.g. 'torch.nn.Linear'), got {modules!r}")


def deepspeed_default(key: str) -> Any:
    """DeepSpeed's default for top-level `key` (its `<KEY>_DEFAULT` constant), e.g. gradient_clipping: 1.0."""
    constants = importlib.import_module("deepspeed.runtime.constants")
    return getattr(constants, f"{key.upper()}_DEFAULT")


def autocast_dtype(value: Any) -> str:
    """'bf16' or 'fp16' for a `torch_autocast.dtype`, looked up in DeepSpeed's own `DtypeEnum`.

    So every spelling DeepSpeed accepts works ('bfloat16', 'bf16', 'torch.bfloat16', 'float16', 'fp16', 'half',
    ...), and only its 16-bit members: float32 would autocast to fp32, i.e. do nothing.

    Raises:
        ValueError: not a 16-bit DtypeEnum spelling; names the closest one.
    """
    from deepspeed.runtime.config import DtypeEnum

    sixteen = (DtypeEnum.bf16, DtypeEnum.fp16)
    spellings = [m.name for m in sixteen] + [str(m.value).replace("torch.", "") for m in sixteen]
    expected = f"expected one of {spellings} (or another spelling of DeepSpeed's DtypeEnum)"
    try:
        member = DtypeEnum(value) if isinstance(value, str) else None
    except ValueError:
        member = None
    if member in sixteen:
        return member.name
    if member is not None:  # fp32 (would autocast to fp32, i.e. do nothing) or int8
        fp32 = " (for fp32 training set torch_autocast.enabled=false)" if member is DtypeEnum.fp32 else ""
        raise ValueError(f"torch_autocast.dtype: {value!r} is not a 16-bit dtype{fp32}; {expected}")
    hint = closest(value, spellings) if isinstance(value, str) else ""
    raise ValueError(f"torch_autocast.dtype: unknown dtype {value!r}{hint} {expected}")


# ---- the DeepSpeed keys ArcScale documents ---------------------------------------------------------------------

# Every precision route a user can write, as the top-level blocks that select it. Under engine.train.backend fsdp
# the same blocks select FSDP2 mixed precision (engine/config/fsdp.py). README "Precision" says what each keeps in
# which dtype; engine.config refuses the combinations that cannot work (torch_autocast float16 at ZeRO 1-3, the
# fp16 block on a CPU).
PRECISION_ROUTES: Dict[str, Dict[str, Any]] = {
    "fp32": {},
    "autocast_bf16": {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    "autocast_fp16": {"torch_autocast": {"enabled": True, "dtype": "float16"}},
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {"fp16": {"enabled": True}},
}

# The DeepSpeed keys ArcScale documents and tests, as the engine's sections document theirs (files.setting):
# choices for an enumeration, representative values for a key that changes the code path (None: absent). A
# configuration matrix (tests/support/config_matrix.py) draws them; "precision" stands for the blocks of
# PRECISION_ROUTES.
DOCUMENTED: Tuple[Documented, ...] = (
    Documented("train_micro_batch_size_per_gpu", "images per rank per micro-batch (default 1)"),
    Documented("gradient_accumulation_steps", "micro-batches per optimizer step (default 1); the global batch is "
                                              "micro-batch x this x world size", values=(1, 2)),
    Documented("gradient_clipping", "clip the backbone's gradients to this global norm; 0: off; absent: "
                                    "DeepSpeed's default 1.0, under either backend", values=(None, 0.0, 5.0)),
    Documented("zero_optimization.stage", "ZeRO stage under engine.train.backend deepspeed: 0 plain data "
                                          "parallelism, 1 + optimizer state partitioned, 2 + gradients, "
                                          "3 + parameters", choices=(0, 1, 2, 3)),
    Documented("precision", "fp32 (no block), torch_autocast bfloat16 / float16 (fp32 weights, 16-bit matmuls), "
                            "DeepSpeed's bf16 / fp16 blocks (16-bit weights, fp32 masters; fp16 needs a GPU)",
               choices=tuple(PRECISION_ROUTES)),
    Documented("activation_checkpointing", "DeepSpeed's implementation (and options) for the stages "
                                           "engine.model.checkpoint names; absent: torch's",
               values=(None, {"partition_activations": False})),
)
