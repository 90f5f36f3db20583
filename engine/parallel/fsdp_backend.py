"""torch FSDP2 (`fully_shard`, DTensor) behind the backend seam (engine/parallel/backend.py; docs/architecture.md,
"The backend seam").

`build_fsdp_backbone` builds the backbone on the meta device, shards it (one FSDP unit per block of
`checkpoint_units()`, plus the root), allocates only this rank's shards and initialises them so the weights are
exactly those of ``torch.manual_seed(seed); backbones.build_backbone(name, ...)`` on one process, although no
rank ever holds the whole model. The parallel layout follows torchtitan's `parallelize_*` functions:

* ``reshard_after_forward=True`` frees each block's gathered parameters after its forward and gathers them
  again in backward (parameters, gradients and optimizer state all sharded: like ZeRO-3); ``False`` keeps them
  until the backward is done (like ZeRO-2: one all-gather per step, more memory).
* ``hybrid=True`` is HSDP on a 2-D mesh (replicas across nodes x shards within a node): gradients are
  reduce-scattered within a node and all-reduced across nodes; the node size is the launcher's local world size.
* ``cpu_offload=True`` keeps the sharded parameters, gradients and optimizer state in host memory
  (CPUOffloadPolicy; the optimizer steps there).
* ``precision="bf16"`` / ``"fp16"``: parameters are all-gathered in that dtype and compute in it, gradients are
  reduced in fp32 and the optimizer steps the sharded fp32 parameters (the fp32 master weights; FSDP2 keeps no
  second copy). fp16 adds a dynamic loss scale with DeepSpeed's semantics (`DynamicLossScale`).

`build_fsdp_backbone_from_config` is what engine.train.build calls under ``engine.train.backend: fsdp``; the
`engine.fsdp` section and the DeepSpeed keys refused under fsdp are engine/config/fsdp.py's.

Requires an initialised default process group (gloo on the CPU, nccl on GPUs; FSDP2's all-gather and
reduce-scatter, AVG included, run on gloo in torch 2.13). engine.runtime.dist.init starts it through
``deepspeed.init_distributed`` for both backends: that reads the environment of either launcher (deepspeed or
torchrun) and wraps torch.distributed's default group, which FSDP2's mesh then uses. The Partial FC head never
comes here: its class centres are rank-unique shards (docs/architecture.md, "The one subtle rule").
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as tdist
from torch import nn

import backbones
from engine.parallel import common as parallel
from engine.parallel.backend import OptimizerState, ParallelBackbone
from engine.runtime.log import get_logger

log = get_logger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOCAL_WORLD_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")  # torchrun, then DeepSpeed's launcher


# ---------------------------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------------------------

def local_world_size_from_env() -> int:
    """Processes per node as the launcher says (torchrun: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE)."""
    for key in _LOCAL_WORLD_ENV:
        if os.environ.get(key):
            return int(os.environ[key])
    raise ValueError(f"engine.fsdp.hybrid needs the processes per node: none of {list(_LOCAL_WORLD_ENV)} is set "
                     f"(launch with torchrun or deepspeed, or pass local_world_size)")


def build_mesh(device: torch.device, hybrid: bool, local_world_size: Optional[int] = None):
    """The data-parallel DeviceMesh: 1-D ("shard",) over all ranks, or with `hybrid` 2-D ("replicate", "shard")
    = (nodes, processes per node). Launchers number ranks node by node, so the shard groups are the nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    world = tdist.get_world_size()
    if not hybrid:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    local = local_world_size if local_world_size is not None else local_world_size_from_env()
    if local < 1 or world % local:
        raise ValueError(f"engine.fsdp.hybrid: world size {world} is not a multiple of the processes per node "
                         f"{local}")
    return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))


# ---------------------------------------------------------------------------------------------------------------
# Shards <-> full tensors (no rank holds more than one full tensor at a time)
# ---------------------------------------------------------------------------------------------------------------

def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded (DTensor) parameter or optimizer state on every rank (a collective), on the
    mesh's device; a plain tensor is returned as it is. Offloaded shards (host memory under a GPU mesh) are
    moved to the device for the gather, since nccl gathers device memory only."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    device_type = t.device_mesh.device_type
    if local.device.type != device_type:
        local = DTensor.from_local(local.to(device_type), t.device_mesh, t.placements, shape=t.shape,
                                   stride=t.stride())
        return local.full_tensor()
    return t.full_tensor()


@torch.no_grad()
def write_full(t: torch.Tensor, value: torch.Tensor) -> None:
    """Set a (sharded) tensor from its whole value, given identically on every rank: each rank copies its own
    shard, no communication."""
    if not _is_dtensor(t):
        t.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(value.detach(), t.device_mesh, t.placements, src_data_rank=None).to_local()
    t.to_local().copy_(mine)


# ---------------------------------------------------------------------------------------------------------------
# Building: meta model -> shards -> exact initialisation, one module at a time
# ---------------------------------------------------------------------------------------------------------------

def _write_shards(_module: nn.Module, writes: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """engine.parallel.init_as_plain_build's writer: each rank copies its shard of each whole value."""
    for t, value in writes:
        write_full(t, value)


def _shard(model: nn.Module, mesh, *, reshard_after_forward: bool, precision: str, cpu_offload: bool,
           device: torch.device) -> None:
    """fully_shard each block of `checkpoint_units()` (one all-gather / reduce-scatter per block), then the
    root (stem, final BN, fc, features)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = PRECISIONS[precision]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for seq in model.checkpoint_units().values():
        for block in seq:
            if any(True for _ in block.parameters()):
                fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    # The root is needed first in backward: FSDP's default (None) keeps it gathered after forward then.
    fully_shard(model, reshard_after_forward=None if reshard_after_forward else False, **kw)


# ---------------------------------------------------------------------------------------------------------------
# fp16 loss scaling
# ---------------------------------------------------------------------------------------------------------------

class DynamicLossScale:
    """DeepSpeed's dynamic loss scaler (the keys of its `fp16` section, the semantics of its DynamicLossScaler),
    for precision "fp16", so a recipe behaves the same under either backend.

    An overflowing step is skipped; the scale is halved, unless `hysteresis` > 1 overflows are still allowed
    (each spends one; a good window refills them). After `loss_scale_window` steps in a row without overflow
    the scale doubles. An overflow at `min_loss_scale` raises, as DeepSpeed does: training cannot go on.
    """

    def __init__(self, initial_scale_power: int = 16, loss_scale_window: int = 1000, hysteresis: int = 2,
                 min_loss_scale: float = 1.0, consecutive_hysteresis: bool = False):
        self.scale = float(2 ** initial_scale_power)
        self.window, self.hysteresis, self.min_scale = int(loss_scale_window), int(hysteresis), float(min_loss_scale)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.cur_hysteresis, self.iter, self.last_overflow_iter = self.hysteresis, 0, -1

    def update(self, overflow: bool) -> None:
        """After each optimizer step: `overflow` says whether its gradients were non-finite on any rank."""
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale == self.min_scale:
                    raise RuntimeError(f"fp16 gradients overflow at the minimum loss scale {self.min_scale}: "
                                       f"training diverged (fp16.min_loss_scale)")
                self.scale = max(self.scale / 2.0, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            stable = self.iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.scale *= 2.0
        self.iter += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "cur_hysteresis": self.cur_hysteresis, "iter": self.iter,
                "last_overflow_iter": self.last_overflow_iter}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale, self.cur_hysteresis = float(state["scale"]), int(state["cur_hysteresis"])
        self.iter, self.last_overflow_iter = int(state["iter"]), int(state["last_overflow_iter"])


# ---------------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------------

class FSDPBackbone(ParallelBackbone):
    """The backbone under FSDP2 with its optimizer (built by `build_fsdp_backbone`).

    Attributes:
        module: the sharded backbone (arcface_torch's parameter names; its parameters are DTensor shards).
        optimizer: steps the sharded fp32 parameters.
        mesh: the data-parallel DeviceMesh.
        scaler: the fp16 DynamicLossScale (None in fp32/bf16).
        last_grad_norm: the global gradient norm of the last step before clipping (None without clipping).
    """

    name = "fsdp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, mesh, device: torch.device, *,
                 gradient_accumulation_steps: int = 1, gradient_clipping: float = 0.0,
                 loss_scaler: Optional[DynamicLossScale] = None):
        self.module, self.optimizer, self.mesh, self.device = module, optimizer, mesh, device
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.gradient_clipping = float(gradient_clipping)
        self.scaler = loss_scaler
        self.last_grad_norm: Optional[float] = None
        self._sync = True  # FSDP's default: reduce gradients after every backward

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def train(self, mode: bool = True) -> "FSDPBackbone":
        """Also frees what evaluation forwards left gathered: without a backward, FSDP keeps the root's (and,
        with reshard_after_forward=False, every block's) gathered parameters until the next one."""
        self._resharded()
        self.module.train(mode)
        return self

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        if boundary != self._sync:  # no reduce-scatter (nor HSDP all-reduce) until the last micro-batch
            self.module.set_requires_gradient_sync(boundary)
            self._sync = boundary
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        loss.backward()

    def _local_grads(self) -> List[torch.Tensor]:
        return [p.grad.to_local() if _is_dtensor(p.grad) else p.grad
                for p in self.module.parameters() if p.grad is not None]

    def local_grads_finite(self) -> bool:
        return bool(parallel.all_finite(self._local_grads()))  # one sum per shard, one device sync

    def global_grad_norm(self) -> float:
        """The 2-norm of the whole (reduced) gradient: this rank's shards' squared norms, summed over the shard
        group (HSDP replicas hold equal shards). Plain tensor arithmetic plus one all-reduce, also for offloaded
        (host) shards under nccl, where DTensor's own reduction would hand a host tensor to nccl. A collective.

        Accumulated in fp64 (squares of fp32 values are exact there), so the norm no longer depends on how the
        gradient is cut into shards beyond fp64 rounding, and the clip coefficient, rounded to fp32 where it
        multiplies the gradients, is the same for any world size or mesh (HSDP 2 x 1 equals FSDP 1 x 2 bit for
        bit with clipping on; in fp32 the sums differed in the last bit and mbf's ill-conditioned steps
        amplified that to 4% of the loss within 8 steps)."""
        grads = self._local_grads()
        sq = torch.zeros((), dtype=torch.float64, device=self.mesh.device_type)
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
            sq = torch.stack(norms).square().sum().to(self.mesh.device_type)
        tdist.all_reduce(sq, group=self.mesh.get_group("shard"))  # HSDP: not across the replicas
        return math.sqrt(float(sq))

    def step(self) -> bool:
        if self.scaler is not None:
            scale = self.scaler.scale  # the one this step's backward used
            finite = torch.tensor(1.0 if self.local_grads_finite() else 0.0, device=self.mesh.device_type)
            tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
            overflow = not bool(finite)
            self.scaler.update(overflow)
            if overflow:
                self.optimizer.zero_grad(set_to_none=True)
                return False
            torch._foreach_mul_(self._local_grads(), 1.0 / scale)
        if self.gradient_clipping > 0:
            self.last_grad_norm = self.global_grad_norm()
            coef = self.gradient_clipping / (self.last_grad_norm + 1e-6)  # as torch's clip_grad_norm_ and DeepSpeed
            if coef < 1.0:
                torch._foreach_mul_(self._local_grads(), coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def scaler_state(self) -> Dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_scaler_state(self, state: Dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    # -- state ------------------------------------------------------------------------------------------

    def _resharded(self) -> None:
        """Register the sharded parameters everywhere. After a forward without backward (evaluation) FSDP
        leaves the root's gathered parameters registered (the root keeps them after forward), and its
        state_dict hook frees them later: reading one then read freed memory (a segfault here)."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _state_keys_in_order(self) -> List[str]:
        self._resharded()
        return list(self.module.state_dict(keep_vars=True).keys())

    def full_state_dict(self, everywhere: bool = True) -> Dict[str, torch.Tensor]:
        """Parameters are the sharded fp32 ones gathered one at a time (FSDP keeps no other master copy);
        buffers (BatchNorm statistics) are this rank's."""
        keep = everywhere or tdist.get_rank() == 0
        keys = self._state_keys_in_order()
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        out = {}
        for key in keys:
            if key in params:
                value = full_tensor(params[key].detach())
                value = value.to("cpu", torch.float32, copy=True) if keep else None
            else:
                value = buffers[key].detach().to("cpu", copy=True) if keep else None
            if keep:
                out[key] = value
        return out

    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Each rank keeps its shard of every parameter: the sharded fp32 parameters are the masters, so the
        values are exact under any precision."""
        keys = self._state_keys_in_order()
        parallel.check_state_keys(self.module, state)
        tensors = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        for key in keys:
            t = tensors[key]
            write_full(t, state[key].to(t.dtype))

    def optimizer_state(self, everywhere: bool = False) -> OptimizerState:
        """Each tensor gathered whole, one at a time; kept on rank 0 only unless `everywhere`."""
        keys = parallel.optimizer_state_keys(self.optimizer)
        out: OptimizerState = {"keys": [], "state": {}, "adam_step": None}
        states = self.optimizer.state
        if not keys or not any(keys[0] in s for s in states.values()):
            return out  # before the first step, or SGD without momentum
        out["keys"] = keys
        out["adam_step"] = next((float(s["step"]) for s in states.values() if "step" in s), None)
        self._resharded()
        keep = everywhere or tdist.get_rank() == 0
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            entry = {}
            for key in keys:
                value = states.get(p, {}).get(key)
                entry[key] = None if value is None else full_tensor(value).to("cpu", torch.float32, copy=True)
            if keep:
                out["state"][name] = entry
        return out

    def load_optimizer_state(self, state: OptimizerState) -> None:
        """Every rank passes the full state (as read from a checkpoint); each keeps its shards. An empty state
        (saved before the first step) clears this optimizer's: the next step then starts as a first step does
        (SGD: buffer = gradient; AdamW: zero moments at step 0)."""
        if not state or not state.get("keys"):
            self.optimizer.state.clear()
            return
        keys = parallel.optimizer_state_keys(self.optimizer)
        if keys != list(state["keys"]):
            raise ValueError(f"checkpoint's backbone optimizer state has {state['keys']}, but this run's optimizer "
                             f"keeps {keys}: engine.optim.name or momentum differ from the saved run")
        self._resharded()
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if name not in state["state"]:
                raise ValueError(f"backbone optimizer state has no entry for parameter {name!r}; "
                                 f"load_optimizer_state needs the full state on every rank")
            s = self.optimizer.state[p]
            for key in keys:
                value = state["state"][name][key]
                if value is None:
                    continue
                if key not in s:  # zeros are what a first step starts from (SGD: buf = grad; Adam: 0 moments)
                    s[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                write_full(s[key], value.to(s[key].dtype))
            if state.get("adam_step") is not None:
                if torch.is_tensor(s.get("step")):
                    s["step"].fill_(state["adam_step"])
                else:
                    s["step"] = torch.tensor(float(state["adam_step"]), dtype=torch.float32)

    def close(self) -> None:
        """Drop gradients and optimizer state; the module and process group stay the caller's."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()


# ---------------------------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------------------------

def build_fsdp_backbone(name: str, *, embedding_size: int, dropout: float = 0.0, seed: int,
                        device: torch.device, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                        precision: str = "fp32", reshard_after_forward: bool = True, hybrid: bool = False,
                        cpu_offload: bool = False, checkpoint: Union[str, Dict[str, int], None] = None,
                        gradient_accumulation_steps: int = 1, gradient_clipping: float = 0.0,
                        fp16: Optional[Dict[str, Any]] = None,
                        local_world_size: Optional[int] = None, freeze: Sequence[str] = (),
                        freeze_bn_stats: bool = False) -> FSDPBackbone:
    """Build backbone `name` sharded by FSDP2, initialised exactly as ``torch.manual_seed(seed);
    backbones.build_backbone(name, embedding_size=..., dropout=...)`` on one process.

    Args:
        name, embedding_size, dropout: the backbone (engine.model).
        seed: the initialisation seed (engine.train.seed); the global CPU generator is re-seeded with it.
        device: this rank's compute device.
        make_optimizer: ``fn(sharded_module) -> optimizer`` over its parameters, e.g. ``lambda m:
            parallel.make_optimizer(cfg.engine.optim, parallel.backbone_param_groups(m, weight_decay))``; it
            steps the sharded fp32 parameters.
        precision: "fp32", "bf16" or "fp16": the dtype parameters are gathered and computed in.
        reshard_after_forward: True frees gathered block parameters after forward (ZeRO-3-like); False keeps them
            to the backward (ZeRO-2-like).
        hybrid: HSDP on a (nodes x processes per node) mesh; the node size is `local_world_size` or the
            launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE.
        cpu_offload: keep shards, gradients and optimizer state in host memory.
        checkpoint: activation checkpointing spec (engine.model.checkpoint: {stage: segments} or "all"), applied
            with torch's non-reentrant checkpoint by engine.parallel.apply_activation_checkpointing.
        gradient_accumulation_steps: micro-batches per optimizer step; `backward` divides the loss by it.
        gradient_clipping: clip to this global gradient norm (0: off).
        fp16: loss-scaler settings for precision "fp16", named as in DeepSpeed's `fp16` section
            (initial_scale_power, loss_scale_window, hysteresis, min_loss_scale, consecutive_hysteresis).
        freeze, freeze_bn_stats: fine-tuning (engine.model.freeze / freeze_bn_stats): applied to the meta model
            before sharding (engine.parallel.apply_finetune), so frozen parameters are sharded without gradients.

    Raises:
        ValueError: an unknown precision or fp16 key, accumulation steps < 1, negative clipping, or a bad
            hybrid layout.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if int(gradient_accumulation_steps) < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps!r}")
    if gradient_clipping < 0:
        raise ValueError(f"gradient_clipping must be >= 0 (0: off), got {gradient_clipping!r}")
    known = list(inspect.signature(DynamicLossScale).parameters)
    unknown = sorted(set(fp16 or {}) - set(known))
    if unknown:
        raise ValueError(f"fp16 loss scaling under fsdp: unknown setting(s) {unknown}; known: {known} "
                         f"(a static loss_scale is not supported)")
    mesh = build_mesh(device, hybrid, local_world_size)
    with parallel.recording_construction_order() as construction_order:
        model = backbones.build_backbone(name, device="meta", embedding_size=embedding_size, dropout=dropout)
    parallel.apply_finetune(model, freeze, freeze_bn_stats)
    if checkpoint:
        parallel.apply_activation_checkpointing(model, checkpoint)
    if precision != "fp32":
        parallel.fp32_batchnorm(model)
    _shard(model, mesh, reshard_after_forward=reshard_after_forward, precision=precision,
           cpu_offload=cpu_offload, device=device)
    model.to_empty(device="cpu" if cpu_offload else device)
    parallel.init_as_plain_build(model, name, construction_order, seed, full_shape=lambda t: t.shape,
                                 write_module=_write_shards)
    if cpu_offload and device.type != "cpu":
        for m in model.modules():  # buffers are not FSDP's: they compute where the activations are
            for key, buf in m._buffers.items():
                if buf is not None:
                    m._buffers[key] = buf.to(device)
    scaler = DynamicLossScale(**(fp16 or {})) if precision == "fp16" else None
    return FSDPBackbone(model, make_optimizer(model), mesh, device,
                        gradient_accumulation_steps=gradient_accumulation_steps,
                        gradient_clipping=gradient_clipping, loss_scaler=scaler)


def build_fsdp_backbone_from_config(cfg, device: torch.device) -> FSDPBackbone:
    """`build_fsdp_backbone` as a run config says (engine.train.build.build_backbone under engine.train.backend fsdp).

    The precision is the run's (`RunConfig.precision`: whichever of DeepSpeed's bf16, fp16 or torch_autocast
    blocks is enabled), applied as FSDP2 mixed precision: nothing autocasts the forward; parameters are gathered
    and computed in 16 bits, gradients reduced in fp32 into fp32 sharded masters. fp16's loss scale follows the
    `fp16` block's dynamic-scaler keys (engine.config refuses a static one). Checkpointing, accumulation and
    clipping read the same keys as under deepspeed; `engine.fsdp` the rest (engine/config/fsdp.py).
    """
    from engine.parallel import common as parallel

    e = cfg.engine
    settings = e.fsdp.resolved()
    fp16 = None
    if cfg.precision == "fp16":
        block = cfg.deepspeed.get("fp16") or {}
        fp16 = {k: v for k, v in block.items() if k not in ("enabled", "loss_scale")}

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return parallel.make_optimizer(e.optim, parallel.backbone_param_groups(module, e.optim.weight_decay,
                                                                                e.optim.param_groups))

    world = tdist.get_world_size()  # the layout the launcher's environment produced, stated once
    local = local_world_size_from_env() if settings["hybrid"] else world
    mesh = f"{world // local} nodes x {local} (replicate x shard)" if settings["hybrid"] else f"{world} (shard)"
    flags = ", ".join(f"{k} {str(v).lower()}" for k, v in settings.items() if k != "hybrid")
    log.info(f"fsdp: mesh {mesh}, {flags}, precision {cfg.precision}")
    lean = settings["reshard_after_forward"] and device.type == "cpu"  # as ZeRO-3: see the function
    with parallel.freed_host_memory_returned(lean_after=lean):
        return build_fsdp_backbone(
            e.model.name, embedding_size=e.model.embedding_size, dropout=e.model.dropout, seed=e.train.seed,
            device=device, make_optimizer=make_optimizer, precision=cfg.precision,
            reshard_after_forward=settings["reshard_after_forward"], hybrid=settings["hybrid"],
            cpu_offload=settings["cpu_offload"], checkpoint=e.model.checkpoint or None,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            gradient_clipping=cfg.gradient_clipping, fp16=fp16, freeze=e.model.freeze,
            freeze_bn_stats=e.model.freeze_bn_stats)
