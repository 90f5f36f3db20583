"""Every private API of torch and DeepSpeed the engine relies on, one function each (issue 9 §6).

Each function says why the public API does not serve. tests/test_compat.py calls every one of them against
the installed versions, so a version bump that renames or removes one fails there, naming the API, instead
of surfacing as an AttributeError deep inside a training step (or, worse, as a silent fallback).

The Partial FC head's private tensor APIs live in heads/compat.py: heads/ must not import engine/ (layering),
and engine/ has no need of them.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch


class PrivateAPIError(RuntimeError):
    """A private API this engine relies on is missing or changed in the installed torch/DeepSpeed."""


def _missing(api: str, why: str) -> PrivateAPIError:
    return PrivateAPIError(f"{api} is missing or changed in the installed version ({why}); "
                           f"engine/compat.py must be updated for it")


# ---------------------------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------------------------

def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (i.e. while a checkpointed segment recomputes).

    Private: torch._C._current_graph_task_id. No public API tells a forward run by the autograd engine
    (checkpoint recompute) from a user's forward; activation checkpointing needs it so BatchNorm running
    statistics are updated once per real forward, not again on recompute.
    """
    fn = getattr(torch._C, "_current_graph_task_id", None)
    if fn is None:
        raise _missing("torch._C._current_graph_task_id", "used to detect checkpoint recomputation")
    return fn() != -1


def storage_id(tensor: torch.Tensor) -> int:
    """An identity of the storage under `tensor`, shared by all its views.

    Private: UntypedStorage._cdata. data_ptr() differs between views at an offset; the planner needs to count
    each storage once (parameters and their transposed views).
    """
    storage = tensor.untyped_storage()
    value = getattr(storage, "_cdata", None)
    if value is None:
        raise _missing("torch.UntypedStorage._cdata", "used to count shared storages once")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------------

def disable_deepspeed_op(name: str) -> None:
    """Mark a DeepSpeed op incompatible, so DeepSpeed never JIT-builds it.

    Private: deepspeed.ops.__compatible_ops__. DeepSpeed has no switch for its CPU shared-memory all-reduce
    op, which it compiles when its comm layer starts (minutes on a fresh machine, under a file lock).
    """
    import deepspeed

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(table, dict):
        raise _missing("deepspeed.ops.__compatible_ops__", "used to keep DeepSpeed from JIT-building its shm op")
    table[name] = False


def disable_backward_allreduce(engine) -> None:
    """Leave out DeepSpeed's gradient all-reduce in backward (ZeRO-0 at one data-parallel rank only).

    Private: DeepSpeedEngine.enable_backward_allreduce. There is no config key for it; at one rank the
    all-reduce is the identity but flattens and copies every gradient each step.
    """
    if not hasattr(engine, "enable_backward_allreduce"):
        raise _missing("DeepSpeedEngine.enable_backward_allreduce", "used to skip a 1-rank identity all-reduce")
    engine.enable_backward_allreduce = False


def loss_scale(optimizer) -> float:
    """The dynamic loss scale DeepSpeed's wrapped optimizer applies (1.0 when it does no loss scaling).

    Private: DeepSpeed exposes no public getter; ZeRO 1-3 optimizers have a `loss_scale` property and the
    fp16 optimizers keep `cur_scale` (FP16_Optimizer: loss_scale_config.cur_scale). Non-fp16 optimizers
    (fp32, bf16 autocast) have neither and apply no scale.
    """
    for owner, attr in ((optimizer, "loss_scale"), (optimizer, "cur_scale"),
                        (getattr(optimizer, "loss_scale_config", None), "cur_scale")):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return 1.0


def step_overflowed(optimizer) -> bool:
    """Whether DeepSpeed's last optimizer step was skipped for an fp16 gradient overflow.

    Private: the `overflow` attribute of DeepSpeed's fp16 / ZeRO optimizers; DeepSpeedEngine has
    `was_step_applied()` only for some paths, and the flag is what every one of them sets.
    """
    return bool(getattr(optimizer, "overflow", False))


def loss_scaler_state(optimizer) -> dict:
    """The dynamic loss scaler's state ({} when the optimizer has none): current scale and its counters.

    Private: DeepSpeed saves the scaler only inside its own (world-size dependent) checkpoints; the ZeRO and
    fp16 optimizers keep it in `loss_scaler` (DynamicLossScaler: cur_scale, cur_iter, last_overflow_iter).
    """
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return {}
    return {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
            if hasattr(scaler, k)}


def load_loss_scaler_state(optimizer, state: dict) -> bool:
    """Restore `loss_scaler_state`'s dict; False when this optimizer has no dynamic scaler to restore into."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False) or not state:
        return False
    for key, value in state.items():
        setattr(scaler, key, value)
    return True


def zero_flat_fp32_partitions(optimizer) -> List[torch.Tensor]:
    """ZeRO-3's flat fp32 partitions, which it puts into the inner optimizer's param groups only during step.

    Private: DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat. The optimizer state lives on these
    tensors, so materialising zero state before a restore needs them.
    """
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])


def link_zero_optimizer_state(optimizer) -> None:
    """Make ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter onto its optimizer state now.

    Private: `_lazy_init_hp_params_optimizer_state`. They do it lazily at the first step, and
    deepspeed.utils.safe_set_full_optimizer_state needs the mapping to restore state before that step.
    Optimizers without the method (ZeRO-0's plain torch optimizer, ZeRO-3) need nothing.
    """
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def refresh_fp32_params(optimizer) -> None:
    """Copy the model's (just loaded) parameters into DeepSpeed's fp32 master copies.

    Public on the optimizers that have masters (refresh_fp32_params), but not on all: a plain torch optimizer
    under ZeRO-0 has none, hence the lookup.
    """
    refresh = getattr(optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def zero_local_grads(engine) -> Iterable[Optional[torch.Tensor]]:
    """This rank's share of the reduced backbone gradients, between the boundary backward and step.

    Private: ZeRO keeps reduced gradient partitions in `averaged_gradients` (stages 1-2, a dict group ->
    flat tensor or list) and `grad_partitions_flat_buffer` (stage 3); DeepSpeed has no public accessor for
    local gradients of stages 1-2 (safe_get_local_grad serves stage 3 per parameter only). Stage 0: the
    parameters' own .grad.
    """
    stage = int(engine.zero_optimization_stage())
    opt = engine.optimizer
    if stage == 0:
        return [p.grad for p in engine.module.parameters() if p.requires_grad]
    if stage in (1, 2):
        grads = getattr(opt, "averaged_gradients", None)
        if grads is None:
            raise _missing("DeepSpeedZeroOptimizer.averaged_gradients", "used to check gradients are finite")
        out: List[Optional[torch.Tensor]] = []
        for value in grads.values():
            out.extend(value if isinstance(value, (list, tuple)) else [value])
        return out
    buffer = getattr(opt, "grad_partitions_flat_buffer", None)
    if buffer is None:
        raise _missing("DeepSpeedZeroOptimizer_Stage3.grad_partitions_flat_buffer",
                       "used to check gradients are finite")
    return [buffer]
