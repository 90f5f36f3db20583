"""The `engine.fsdp` section and which DeepSpeed keys mean something under `engine.train.backend: fsdp`.

One config format serves both backends: DeepSpeed's keys stay at the top level, and the FSDP2
backend (engine/parallel/fsdp_backend.py) reads the few of them that describe the run rather than DeepSpeed's engine:
the micro-batch, gradient accumulation, gradient clipping and the precision blocks. Every other DeepSpeed key
would silently do nothing under fsdp, and every `engine.fsdp` key nothing under deepspeed: both are errors that
name the key and the setting of the other backend that does the same (recipes are written per backend:
ds_configs/r2060.json and ds_configs/r2060_fsdp.json). `engine.config` calls the checks here from its
`BACKEND_CHECKS`; nothing here imports torch or deepspeed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from engine.config.files import setting

# The values an unset (null) engine.fsdp key takes under the fsdp backend.
FSDP_DEFAULTS = {"reshard_after_forward": True, "hybrid": False, "cpu_offload": False}

# The top-level DeepSpeed keys the fsdp backend reads (the rest configure DeepSpeed's engine).
FSDP_READS = frozenset({"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                        "fp16", "bf16", "torch_autocast", "zero_optimization", "activation_checkpointing"})

# DeepSpeed key -> what does its job under fsdp.
_FSDP_INSTEAD = {
    "zero_optimization.stage": "FSDP2 always shards parameters, gradients and optimizer state: "
                               "engine.fsdp.reshard_after_forward=true behaves as ZeRO-3, false as ZeRO-2",
    "zero_optimization.offload_optimizer": "engine.fsdp.cpu_offload=true (parameters, gradients and optimizer "
                                           "state in host memory; the optimizer steps there)",
    "zero_optimization.offload_param": "engine.fsdp.cpu_offload=true (parameters, gradients and optimizer state "
                                       "in host memory; the optimizer steps there)",
    "activation_checkpointing": "engine.model.checkpoint alone (torch's non-reentrant checkpointing, BatchNorm "
                                "statistics updated once); partition_activations and cpu_checkpointing have no "
                                "fsdp equivalent",
    "flops_profiler": "engine.profile (FLOPs, MFU, phases, memory)",
    "steps_per_print": "engine.train.log_every",
    "tensorboard": "engine.train.tensorboard",
    "communication_data_type": "nothing to set: FSDP2 reduces gradients in fp32 under bf16/fp16",
    "prescale_gradients": "nothing to set: FSDP2 averages gradients in its reduce-scatter",
    "gradient_predivide_factor": "nothing to set: FSDP2 averages gradients in its reduce-scatter",
}
# Keys of the precision blocks the fsdp backend honours; the rest tune DeepSpeed's own mixed-precision optimizer.
_PRECISION_KEYS = {
    "bf16": {"enabled"},
    "torch_autocast": {"enabled", "dtype"},
    "fp16": {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
             "consecutive_hysteresis"},
}
# engine.fsdp key -> the DeepSpeed setting that does its job.
_DEEPSPEED_INSTEAD = {
    "reshard_after_forward": "set zero_optimization.stage instead (3 frees gathered parameters after forward, as "
                             "true does; 2 keeps parameters whole, as false does)",
    "hybrid": "DeepSpeed has no such setting: it shards over all ranks (ZeRO++'s "
              "zero_optimization.zero_hpz_partition_size is the closest)",
    "cpu_offload": "set zero_optimization.offload_optimizer / offload_param with device 'cpu' instead",
}


@dataclass
class FSDPConfig:
    """`engine.fsdp`: read only under `engine.train.backend: fsdp`. A key left null takes FSDP_DEFAULTS; a key
    set under the deepspeed backend is an error (it would do nothing there)."""

    reshard_after_forward: Optional[bool] = setting(
        None, doc="true (default): free each block's gathered parameters after its forward, gather again in "
                  "backward (as ZeRO-3); false: keep them until the backward is done (as ZeRO-2)",
        values=(True, False))
    hybrid: Optional[bool] = setting(None, doc="true: HSDP, shards within a node, replicas across nodes (node "
                                               "size: the launcher's local world size)", values=(None, True))
    cpu_offload: Optional[bool] = setting(None, doc="true: sharded parameters, gradients and optimizer state in "
                                                    "host memory (CPUOffloadPolicy)", values=(None, True))

    def resolved(self) -> Dict[str, bool]:
        """Every setting with FSDP_DEFAULTS filled in for the unset ones."""
        return {f.name: FSDP_DEFAULTS[f.name] if getattr(self, f.name) is None else bool(getattr(self, f.name))
                for f in fields(self)}

    def given(self) -> Dict[str, Any]:
        """The settings the config sets (not null)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and block.get("enabled") is True


def check_fsdp_backend(ds: Dict[str, Any]) -> None:
    """DeepSpeed keys that would do nothing under `engine.train.backend: fsdp` (`ds`: the top-level keys).

    Allowed: the micro-batch, gradient accumulation and clipping; `zero_optimization` only as `{}` or
    `{"stage": 0}` (a switched-off offload, device "none", passes too); an empty `activation_checkpointing`
    (how `--set activation_checkpointing={}` switches a recipe's section off); the precision blocks' own
    switches (`bf16.enabled`, `torch_autocast.enabled`/`dtype`, `fp16.enabled` and DeepSpeed's dynamic
    loss-scale keys, which the fsdp backend follows with DeepSpeed's semantics). A block with enabled false may
    keep any settings (recipes toggle precision with --set).

    Raises:
        ValueError: naming the first such key and what does its job under fsdp.
    """
    where = "under engine.train.backend='fsdp'"
    for key in sorted(set(ds) - FSDP_READS):
        instead = _FSDP_INSTEAD.get(key, "remove it: it configures DeepSpeed's engine, which fsdp does not build")
        raise ValueError(f"{key}: has no effect {where}; {instead}")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage != 0:
        raise ValueError(f"zero_optimization.stage: {stage} is DeepSpeed ZeRO, which is not used {where}; "
                         f"{_FSDP_INSTEAD['zero_optimization.stage']} (set zero_optimization.stage=0)")
    for key in sorted(set(zero) - {"stage"}):
        value = zero[key]
        if key in ("offload_optimizer", "offload_param") and (value or {}).get("device", "none") == "none":
            continue
        instead = _FSDP_INSTEAD.get(f"zero_optimization.{key}",
                                    "remove it: it tunes DeepSpeed ZeRO (FSDP2 gathers one block at a time)")
        raise ValueError(f"zero_optimization.{key}: has no effect {where}; {instead}")
    if ds.get("activation_checkpointing"):
        raise ValueError(f"activation_checkpointing: has no effect {where}; {_FSDP_INSTEAD['activation_checkpointing']}"
                         f" (empty the section: --set activation_checkpointing={{}})")
    for section, known in _PRECISION_KEYS.items():
        block = ds.get(section)
        if not _enabled(block):
            continue
        for key in sorted(set(block) - known):
            raise ValueError(f"{section}.{key}: has no effect {where} (it tunes DeepSpeed's mixed-precision "
                             f"engine); fsdp's precision is FSDP2 mixed precision: parameters gathered and computed "
                             f"in 16 bits, gradients reduced in fp32, fp32 sharded master weights; keep only "
                             f"{sorted(known)}")
        if section == "fp16" and block.get("loss_scale", 0) != 0:
            raise ValueError(f"fp16.loss_scale: {block['loss_scale']!r} is a static loss scale, which fsdp does not "
                             f"support {where}; use 0 (dynamic: initial_scale_power, loss_scale_window, "
                             f"hysteresis, min_loss_scale, consecutive_hysteresis, as DeepSpeed)")


def check_deepspeed_backend(section: FSDPConfig) -> None:
    """`engine.fsdp` keys set under `engine.train.backend: deepspeed` (they would do nothing there).

    Raises:
        ValueError: naming the key and the DeepSpeed setting that does its job (set it to null, or leave it out).
    """
    for key, value in section.given().items():
        raise ValueError(f"engine.fsdp.{key}: has no effect under engine.train.backend='deepspeed' (set to "
                         f"{json.dumps(value)}); {_DEEPSPEED_INSTEAD[key]}; or run with engine.train.backend=fsdp, "
                         f"or leave engine.fsdp out (null)")
