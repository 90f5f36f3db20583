"""Every private API of torch and DeepSpeed the engine relies on, one function each, so that a version bump
shows in one place which of them changed.

Each function says why the public API does not serve. tests/unit/test_compat.py and
tests/distributed/test_compat.py call every one of them against the installed versions, so a version bump that
renames or removes one fails there, naming the API, instead of surfacing as an AttributeError deep inside a
training step (or, worse, as a silent fallback).

The Partial FC head's private tensor APIs live in heads/compat.py: heads/ must not import engine/ (layering),
and engine/ has no need of them.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch


class PrivateAPIError(RuntimeError):
    """A private API this engine relies on is missing or changed in the installed torch/DeepSpeed."""


def _missing(api: str, why: str) -> PrivateAPIError:
    return PrivateAPIError(f"{api} is missing or changed in the installed version ({why}); "
                           f"engine/runtime/compat.py must be updated for it")


# ---------------------------------------------------------------------------------------------------------------
# torch versions: the pinned 2.13 (CPU machines, CI) and 2.11 (the GPU machines' image) differ where it matters
# here in: the pinned-memory allocator's rounding knob (2.13 only, `pinned_round_threshold_bytes`) and
# c10d.default_pg_nccl_timeout (a timedelta in CUDA builds, None in CPU builds: `set_default_group_timeout`).
# The rest the engine calls (FSDP2's fully_shard / MixedPrecisionPolicy / CPUOffloadPolicy / FSDPModule methods
# used, DTensor, init_device_mesh, torch.load's weights_only and mmap, torch.utils.checkpoint, GradScaler,
# new_group, the private APIs below) is the same in both.
# ---------------------------------------------------------------------------------------------------------------

def torch_version(version: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of the installed torch (or of `version`, e.g. "2.11.0+cu130")."""
    parts = (version or torch.__version__).split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


# The first version whose CachingHostAllocator takes `pinned_max_round_threshold_mb` (c10/core/AllocatorConfig.h
# in 2.13; 2.11's allocate() rounds every pinned request up to a power of two, unconditionally).
PINNED_ROUND_THRESHOLD_SINCE = (2, 13)


def pinned_round_threshold_bytes(env: Optional[Dict[str, str]] = None,
                                 version: Optional[str] = None) -> Optional[int]:
    """Size above which PyTorch's caching host allocator pins exactly what is asked, or None: every pinned
    allocation is rounded up to a power of two (the default in every version, and all 2.11 can do).

    Read from PYTORCH_ALLOC_CONF (else its older name PYTORCH_CUDA_ALLOC_CONF), key
    `pinned_max_round_threshold_mb`, on a torch that has it (PINNED_ROUND_THRESHOLD_SINCE). Set it together with
    `pinned_max_cached_size_mb` of the same value: a threshold below the cached size let a cached block be
    handed to a larger request in the versions before PyTorch fixed it (pull request 192722).
    """
    env = os.environ if env is None else env
    if torch_version(version) < PINNED_ROUND_THRESHOLD_SINCE:
        return None
    conf = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip() == "pinned_max_round_threshold_mb":
            try:
                return int(float(value)) * 2 ** 20
            except ValueError:
                raise ValueError(f"PYTORCH_ALLOC_CONF: pinned_max_round_threshold_mb expects a number of MiB, "
                                 f"got {value.strip()!r}") from None
    return None


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


def autocast_grad_scaler(engine):
    """The `torch.amp.GradScaler` DeepSpeed scales the loss with under `torch_autocast` float16, or None.

    Private: DeepSpeedEngine.torch_autocast_z0_gradscaler (ZeRO-0) and the ZeRO optimizers'
    `torch_autocast_gradscaler` (stages 1-3). DeepSpeed creates the scaler itself and exposes no getter; its
    scale is not the ZeRO optimizers' `loss_scale` (their own scaler stays static at 1.0), so without this the
    head, which must be unscaled by the same factor as the backbone, would step with a gradient 65536x too large.
    """
    if not hasattr(engine, "torch_autocast_z0_gradscaler"):
        raise _missing("DeepSpeedEngine.torch_autocast_z0_gradscaler", "used to read torch_autocast fp16's loss scale")
    scaler = engine.torch_autocast_z0_gradscaler
    if scaler is None:
        scaler = getattr(engine.optimizer, "torch_autocast_gradscaler", None)
    return scaler


def reset_deepspeed_autocast_state() -> None:
    """Forget the torch_autocast settings of an earlier DeepSpeed engine in this process.

    Private: deepspeed.runtime.torch_autocast's module globals TORCH_AUTOCAST_INITIALIZED / TORCH_AUTOCAST_DTYPE,
    which deepspeed.initialize sets for a torch_autocast config and never clears. The ZeRO optimizers of every later
    engine read them: after a float16 autocast engine, a ZeRO-2 bf16 engine built in the same process scaled its
    loss with a GradScaler and clipped the scaled gradients (its weights hardly moved). One engine per process never
    sees it; tests and tools that build several do.
    """
    from deepspeed.runtime import torch_autocast

    for name, value in (("TORCH_AUTOCAST_INITIALIZED", False), ("TORCH_AUTOCAST_DTYPE", None)):
        if not hasattr(torch_autocast, name):
            raise _missing(f"deepspeed.runtime.torch_autocast.{name}", "reset between DeepSpeed engines")
        setattr(torch_autocast, name, value)


def loss_scale(optimizer) -> float:
    """The dynamic loss scale DeepSpeed's wrapped optimizer applies (1.0 when it does no loss scaling).

    Private: DeepSpeed exposes no public getter; ZeRO 1-3 optimizers have a `loss_scale` property and the
    fp16 optimizers keep `cur_scale` (FP16_Optimizer: loss_scale_config.cur_scale). Non-fp16 optimizers
    (fp32, bf16) have neither and apply no scale. A ZeRO optimizer's `torch_autocast_gradscaler` (torch_autocast
    float16) wins over its static `loss_scale`; at ZeRO-0 the GradScaler is the engine's (`autocast_grad_scaler`).
    """
    scaler = getattr(optimizer, "torch_autocast_gradscaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
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
    """Make ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter onto its optimizer state now, again.

    Private: `_lazy_init_hp_params_optimizer_state` and its `_hp_optimizer_states_linked` flag. They link lazily,
    once, right after the first parameter group's first step: with several groups (engine.optim.param_groups) the
    later groups have no state yet then, so their parameters stay mapped to nothing and
    deepspeed.utils.safe_get_full_optimizer_state raised "momentum_buffer not found in optimizer state fragment"
    at the first checkpoint. Clearing the flag re-links every group to the state as it is now; restoring state
    before the first step needs the mapping too. Optimizers without the method (ZeRO-0's plain torch optimizer,
    ZeRO-3) need nothing.
    """
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        if not hasattr(optimizer, "_hp_optimizer_states_linked"):
            raise _missing(f"{type(optimizer).__name__}._hp_optimizer_states_linked", "used to re-link the optimizer "
                           "state of every parameter group")
        optimizer._hp_optimizer_states_linked = False
        link()


def refresh_fp32_params(optimizer) -> None:
    """Copy the model's (just loaded) parameters into DeepSpeed's fp32 master copies.

    Public on the optimizers that have masters (refresh_fp32_params), but not on all: a plain torch optimizer
    under ZeRO-0 has none, hence the lookup.
    """
    refresh = getattr(optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


def zero0_fp32_masters(optimizer) -> Dict[int, torch.Tensor]:
    """{id(model parameter): its fp32 master} of DeepSpeed's ZeRO-0 16-bit optimizer ({} for any other).

    Private: FP16_UnfusedOptimizer's (and FP16_Optimizer's) `fp16_groups` / `fp32_groups`, parallel lists of the
    module's 16-bit parameters and their fp32 copies, which are what the torch optimizer steps. DeepSpeed uses it
    at ZeRO-0 for its `fp16` block and for `bf16` with 16-bit gradient accumulation (its default); it is neither
    ZeRO's nor the bf16 optimizer's, so deepspeed.utils.safe_get_full_fp32_param does not serve it. Without this,
    checkpoints and model.pt would hold the 16-bit-rounded weights and a resume would round the masters.
    """
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(p): m for group_low, group_high in zip(low, high) for p, m in zip(group_low, group_high)}


def zero_local_grads(engine) -> Iterable[Optional[torch.Tensor]]:
    """This rank's share of the reduced backbone gradients, between the boundary backward and step.

    Private: ZeRO keeps reduced gradient partitions in `averaged_gradients` (stages 1-2, a dict group ->
    flat tensor or list; with offload_optimizer the host fp32 partitions' .grad) and
    `grad_partitions_flat_buffer` (stage 3), where DeepSpeed's own overflow checks read them; DeepSpeed has no
    public accessor for local gradients of stages 1-2 (safe_get_local_grad serves stage 3 per parameter only).
    Stage 0: the parameters' own .grad.
    """
    stage = int(engine.zero_optimization_stage())
    opt = engine.optimizer
    if stage == 0:
        return [p.grad for p in engine.module.parameters() if p.requires_grad]
    if stage in (1, 2):
        if getattr(opt, "cpu_offload", False):  # reduced into the host fp32 partitions' .grad instead
            return [getattr(p, "grad", None) for p in getattr(opt, "single_partition_of_fp32_groups", [])]
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


@contextlib.contextmanager
def optimizer_update_skipped(engine) -> Iterator[None]:
    """Within this context, `engine.step()` drops the step's gradients without updating anything.

    Private: the torch optimizer DeepSpeed wraps (`engine.optimizer` at ZeRO-0, its `.optimizer` at ZeRO 1-3,
    and stage 3's `backup_optimizer` when it has one) gets a no-op `step` instance attribute for the duration.
    DeepSpeed has no public "discard this step" call: its own skip exists only for fp16 overflow, decided
    inside step() from its own check. Zeroing the gradients and stepping is not a skip (weight decay and
    momentum would still move the weights, AdamW's step count would advance). With only the inner update
    disabled, everything else of `engine.step()` runs as usual: the accumulation counters advance (the next
    micro-batch is a fresh step), ZeRO clears its gradient partitions and buffers, and the fp32 masters, which
    did not change, are copied back onto the model's parameters unchanged. Works the same at ZeRO 0-3 (stage 3,
    and 1-2 with clipping, may see the non-finite norm themselves and take their own overflow exit: also no
    update).
    """
    opt = engine.optimizer
    inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise _missing("DeepSpeed optimizer wrapper's .optimizer", "used to skip a step with non-finite gradients")
    targets = [inner] + [o for o in (getattr(opt, "backup_optimizer", None),) if isinstance(o, torch.optim.Optimizer)]
    saved = [(t, t.__dict__.get("step")) for t in targets]

    def no_update(*args, **kwargs):
        return None

    for t in targets:
        t.step = no_update
    try:
        yield
    finally:
        for t, own in saved:
            if own is None:
                del t.step
            else:
                t.step = own


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make every process group created without an explicit timeout use `timeout`.

    Private: torch.distributed.distributed_c10d.default_pg_timeout / default_pg_nccl_timeout, the module globals
    `new_group(timeout=None)` reads. DeepSpeed creates its data-parallel (and other) groups through
    deepspeed.comm.new_group(ranks), which passes no timeout (deepspeed/comm/torch.py, utils/groups.py), so
    they got torch's 30-minute default whatever the default group's timeout: a rank frozen before ZeRO's
    gradient reduction hung the job for 30 minutes. There is no public setter.
    """
    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if not hasattr(c10d, name):
            raise _missing(f"torch.distributed.distributed_c10d.{name}", "used to give every process group the "
                                                                         "run's collective timeout")
        if name == "default_pg_nccl_timeout" and getattr(c10d, name) is None:
            continue  # torch built without NCCL (the CPU builds); CUDA builds hold NCCL's own default there
        setattr(c10d, name, timeout)


def group_timeout(group) -> datetime.timedelta:
    """The collective timeout of a process group (for tests and diagnostics).

    Private: the backend's `options._timeout`; ProcessGroup has no public getter.
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    backend = group._get_backend(device)
    options = getattr(backend, "options", None)
    value = getattr(options, "_timeout", None)
    if value is None:
        raise _missing("ProcessGroup backend options._timeout", "used to read a group's collective timeout")
    return value
