"""DeepSpeed (ZeRO 0-3) behind the backend seam (engine/parallel/backend.py).

Only the backbone goes through here. The Partial FC head is model-parallel (rank-unique class shards) and is
never averaged, partitioned or wrapped (docs/architecture.md, "The one subtle rule").
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import backbones
from engine.runtime import compat
from engine.runtime.log import get_logger
from engine.parallel import common as parallel
from engine.parallel.backend import OptimizerState, ParallelBackbone

log = get_logger(__name__)


def deepspeed_config_for_engine(ds: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    """DeepSpeed's dict as the engine hands it over: our optimizer is a client optimizer."""
    cfg = dict(ds)
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["train_batch_size"] = (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
                               * world_size)
    cfg.setdefault("steps_per_print", 10 ** 9)  # our own logger reports; keep DeepSpeed's quiet
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if cfg.get("zero_optimization", {}).get("stage", 0) > 0:
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def configure_deepspeed_checkpointing(ds_config: Dict[str, Any], device: torch.device) -> None:
    """Hand DeepSpeed's `activation_checkpointing` section to deepspeed.checkpointing.

    `cpu_checkpointing` moves saved activations from the accelerator to host memory. When training on the
    CPU they are already there, and DeepSpeed 0.19's offload path then restores empty tensors, so it is
    turned off for CPU devices (the log says so); on GPUs it is honoured as written.
    """
    import deepspeed

    section = dict(ds_config.get("activation_checkpointing", {}))
    if device.type == "cpu" and section.get("cpu_checkpointing"):
        log.info("activation_checkpointing.cpu_checkpointing is a no-op when training on the CPU; disabled")
        section["cpu_checkpointing"] = False
    deepspeed.checkpointing.configure(None, deepspeed_config={**ds_config, "activation_checkpointing": section})


# Whole initial values held on each rank before they are written into ZeRO-3's partitions in one gather (the
# gathered parameters take as much again while it lasts).
INIT_WRITE_BATCH_BYTES = 256 * 2 ** 20


def build_partitioned_model(name: str, *, embedding_size: int, dropout: float, ds_config: Dict[str, Any],
                            device: torch.device, seed: int) -> nn.Module:
    """Build the backbone inside `deepspeed.zero.Init` (ZeRO-3), initialised bitwise as the plain build.

    Each parameter is partitioned the moment its module finishes construction, so no rank ever holds the whole
    fp32 model. The initialisation is then replayed module by module (engine.parallel.init_as_plain_build, as
    under FSDP2): whole CPU copies are initialised module by module as `torch.manual_seed(seed);
    backbones.build_backbone(name)` draws them, then written in batches of INIT_WRITE_BATCH_BYTES (gathered, set,
    partitioned again), so at most a batch of parameters is whole at a time.
    """
    import deepspeed

    from engine.runtime import dist

    dist.prepare_deepspeed(device)

    pending: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (partitioned parameter, whole value)
    held = [0]  # bytes of the whole values in `pending`

    def flush() -> None:
        """Write the pending values: one gather and re-partition for the lot (every rank holds the same values;
        rank 0's are partitioned)."""
        if not pending:
            return
        writes = list(pending.values())
        pending.clear()
        held[0] = 0
        with deepspeed.zero.GatheredParameters([t for t, _ in writes], modifier_rank=0), torch.no_grad():
            for t, value in writes:
                t.data.copy_(value)

    def write_module(_module: nn.Module, writes) -> None:
        # A partitioned parameter's value waits in `pending` (a later write of the same tensor replaces it) and
        # goes in batches of INIT_WRITE_BATCH_BYTES: r2060 has ~2,000 modules, and a gather and re-partition per
        # module and per initialisation call took most of its 2-minute build on 2 CPU ranks. Buffers are local.
        with torch.no_grad():
            for t, value in writes:
                if not hasattr(t, "ds_id"):
                    t.data.copy_(value)
                    continue
                old = pending.pop(id(t), None)
                held[0] += value.numel() * value.element_size() - (old[1].numel() * old[1].element_size()
                                                                   if old is not None else 0)
                pending[id(t)] = (t, value)
        if held[0] >= INIT_WRITE_BATCH_BYTES:
            flush()

    with parallel.recording_construction_order() as order:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None, enabled=True):
            model = backbones.build_backbone(name, embedding_size=embedding_size, dropout=dropout, init=False)
    parallel.init_as_plain_build(model, name, order, seed, full_shape=lambda t: getattr(t, "ds_shape", t.shape),
                                 write_module=write_module)
    flush()
    return model


def skip_single_rank_allreduce(engine) -> bool:
    """Whether the backward all-reduce can be left out: ZeRO stage 0 with one data-parallel rank.

    Averaging over one rank is the identity, but DeepSpeed still flattens every gradient into a fresh buffer,
    all-reduces it and copies it back on every step: on the CPU that was most of the engine's overhead over
    a bare loop at 1 rank (r50: engine/bare 0.944 with it, BENCHMARKS.md section 1). ZeRO stages 1-3 move
    gradients into their partitions in that path, so it stays for them.
    """
    return int(engine.zero_optimization_stage()) == 0 and int(engine.dp_world_size) == 1


def keeps_parameters_as_they_are(engine) -> bool:
    """Whether DeepSpeed leaves the module's parameters as separate tensors the optimizer updates in place: ZeRO
    stage 0 without DeepSpeed's bf16/fp16 block (fp32 or torch_autocast). Stages 1-3 and those blocks make the
    parameters views into flat buffers (or partitions), whose layout must stay as DeepSpeed made it; there
    `engine.model.channels_last` lays out the images and activations NHWC and leaves the weights contiguous."""
    return int(engine.zero_optimization_stage()) == 0 and module_dtype(engine) is None


def overlapped_allreduce(engine) -> bool:
    """Whether ZeRO-0's gradient all-reduce runs in engine.parallel.reducer.GradReducer (started during the
    backward, bucket by bucket) instead of DeepSpeed's (after it, on a fresh concatenation of every gradient):
    ZeRO stage 0 on more than one rank with fp32 parameters (fp32 or torch_autocast: DeepSpeed's bf16/fp16
    blocks reduce their own fp32 copies) and DeepSpeed's default averaging (no prescale, predivide factor or
    communication dtype, which GradReducer does not implement). The result is DeepSpeed's, bitwise on two ranks.
    """
    if int(engine.zero_optimization_stage()) != 0 or int(engine.dp_world_size) <= 1 or not USE_GRAD_REDUCER:
        return False
    if module_dtype(engine) is not None or getattr(engine, "has_moe_layers", False):
        return False
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return (bool(params) and all(p.dtype == torch.float32 for p in params) and bool(engine.postscale_gradients())
            and engine.gradient_predivide_factor() == 1.0 and engine.communication_data_type == torch.float32
            and getattr(engine, "gradient_average", True))


# Tests switch it off to compare with DeepSpeed's own all-reduce in the same process.
USE_GRAD_REDUCER = True


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (DeepSpeed's ZeRO/fp16 wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its own .shape is then empty)."""
    return getattr(param, "ds_shape", param.shape)


def module_dtype(engine) -> Optional[torch.dtype]:
    """The dtype DeepSpeed's `bf16` / `fp16` block cast the module's parameters to (None: they stay fp32, as
    in fp32 and under `torch_autocast`)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None


class DeepSpeedBackbone(ParallelBackbone):
    """A DeepSpeedEngine (ZeRO 0-3, its own fp16 loss scaling, torch_autocast) as a `ParallelBackbone`.

    Under DeepSpeed's `bf16` / `fp16` blocks the module's parameters are 16-bit copies of DeepSpeed's fp32
    masters and nothing in DeepSpeed casts the inputs: the forward casts the images to the parameters' dtype
    (BatchNorm computes and keeps its statistics in fp32: engine.parallel.fp32_batchnorm, applied at build).
    """

    name = "deepspeed"

    def __init__(self, engine, device: torch.device, reducer=None):
        self.engine = engine
        self.reducer = reducer  # engine.parallel.reducer.GradReducer when it replaces DeepSpeed's all-reduce
        self.module: nn.Module = engine.module
        self.device = device
        self.zero_stage = int(engine.zero_optimization_stage())
        self.input_dtype = module_dtype(engine)
        # fp32 masters DeepSpeed maps each parameter to (ZeRO 1-3, and its bf16 optimizer at ZeRO-0)
        self.has_masters = self.zero_stage >= 1 or any(hasattr(p, "_hp_mapping") for p in self.module.parameters())
        # ZeRO-0's own 16-bit optimizer: one fp32 master tensor per parameter (engine.runtime.compat)
        self.zero0_masters = compat.zero0_fp32_masters(engine.optimizer)

    def _stepped(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the torch optimizer steps for `param` at ZeRO-0 (its fp32 master, or itself)."""
        return self.zero0_masters.get(id(param), param)

    # -- compute ----------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None and images.is_floating_point():
            images = images.to(self.input_dtype)
        return self.engine(images)

    def train(self, mode: bool = True) -> "DeepSpeedBackbone":
        self.engine.train(mode)
        return self

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        if boundary != bool(self.engine.is_gradient_accumulation_boundary()):
            raise AssertionError(f"micro-step out of sync with DeepSpeed: boundary={boundary}, DeepSpeed says "
                                 f"{self.engine.is_gradient_accumulation_boundary()}")
        if self.reducer is not None and boundary:
            self.reducer.start()
        self.engine.backward(loss)  # divides by the accumulation steps; reduces at the boundary
        if self.reducer is not None and boundary:
            self.reducer.finish()
        if not boundary:
            self.engine.step()  # DeepSpeed counts micro-steps in step(); nothing is updated here

    def step(self) -> bool:
        """DeepSpeed's step; False when it skipped the update for an fp16 overflow: its fp16 / ZeRO optimizer
        says so (`overflow`), and under `torch_autocast` float16 its GradScaler lowered its scale (which it does
        exactly when it found inf/NaN gradients and skipped the inner step)."""
        scaler = compat.autocast_grad_scaler(self.engine)
        before = float(scaler.get_scale()) if scaler is not None else None
        self.engine.step()
        if compat.step_overflowed(self.engine.optimizer):
            return False
        return before is None or float(scaler.get_scale()) >= before

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.engine.optimizer.param_groups

    def loss_scale(self) -> float:
        """The factor this step's backward multiplied the loss by: the fp16 block's dynamic scale, or under
        `torch_autocast` float16 DeepSpeed's GradScaler's (1.0 otherwise)."""
        scaler = compat.autocast_grad_scaler(self.engine)
        if scaler is not None:
            return float(scaler.get_scale())
        return compat.loss_scale(self.engine.optimizer)

    def scaler_state(self) -> Dict[str, Any]:
        return compat.loss_scaler_state(self.engine.optimizer)

    def load_scaler_state(self, state: Dict[str, Any]) -> None:
        compat.load_loss_scaler_state(self.engine.optimizer, state)

    def local_grads_finite(self) -> bool:
        if self.reducer is not None:  # the averaged gradients, as .grad holds them: a sum per bucket, not per tensor
            return bool(parallel.all_finite(self.reducer.buckets))
        return bool(parallel.all_finite(compat.zero_local_grads(self.engine)))  # one device sync

    def skip_step(self) -> None:
        """Drop this step's gradients without an update: DeepSpeed's step with the inner optimizer's update
        disabled (engine.runtime.compat.optimizer_update_skipped), so its counters and ZeRO's buffers move on as
        after any step while weights and optimizer state stay as they were. (Under fp16 DeepSpeed's own
        overflow check may see the non-finite gradients in that step and lower its loss scale, as it would
        have without the guard.)"""
        with compat.optimizer_update_skipped(self.engine):
            self.engine.step()

    # -- state ------------------------------------------------------------------------------------------
    def _full_param(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This parameter's full fp32 value on every rank (the master weights where DeepSpeed keeps them; a
        collective under ZeRO-3)."""
        if self.has_masters and param.requires_grad:
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(param)
            if value is not None:
                return value.detach().to("cpu", torch.float32, copy=True)  # on the CPU .to() alone aliased the master
        if id(param) in self.zero0_masters:
            return self.zero0_masters[id(param)].detach().to("cpu", torch.float32, copy=True)
        gathered = contextlib.nullcontext()
        if self.zero_stage == 3:  # frozen parameters have no master copy: gather the partitioned parameter
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
        with gathered:
            return param.detach().to("cpu", torch.float32).clone()

    def full_state_dict(self, everywhere: bool = True) -> Dict[str, torch.Tensor]:
        """Trained parameters from DeepSpeed's fp32 masters where it keeps them (ZeRO 1-3), so under bf16/fp16
        they are the exact weights, not their rounded model copies; frozen parameters and buffers (BatchNorm
        statistics: this rank's) from the module. Unless `everywhere`, each gathered parameter is dropped at
        once on ranks > 0, so a 1.1 B-parameter model costs its full size on rank 0 only."""
        from engine.runtime import dist

        keep = everywhere or dist.get_rank() == 0
        out = {}
        for name, param in self.module.named_parameters():
            value = self._full_param(param)
            if keep:  # contiguous whatever the training layout (engine.model.channels_last): one file format
                out[name] = value.contiguous()
        if not keep:
            return {}
        for name, buf in self.module.named_buffers():
            out[name] = buf.detach().cpu().clone()
        return {k: out[k] for k in self.module.state_dict().keys() if k in out}

    def full_grads(self) -> Dict[str, torch.Tensor]:
        """The reduced fp32 gradient of every trained parameter, full size on the CPU (all ranks call; between
        the boundary backward and `step`). For inspection and tests: it gathers every gradient."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                grad = safe_get_full_grad(param)
                out[name] = None if grad is None else grad.detach().to("cpu", torch.float32).clone()
        return out

    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Under ZeRO-3 each parameter is gathered, overwritten and re-partitioned. The fp32 masters are then
        set from the given fp32 values exactly (not from the model's possibly bf16/fp16 copy); otherwise
        ZeRO's next step would write the old weights back."""
        parallel.check_state_keys(self.module, state)
        if self.zero_stage == 3:
            import deepspeed

            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        param.copy_(state[name].to(param.device, param.dtype))
                for name, buf in self.module.named_buffers():
                    if name in state:
                        buf.copy_(state[name].to(buf.device, buf.dtype))
        else:
            self.module.load_state_dict(state, strict=True)
        compat.refresh_fp32_params(self.engine.optimizer)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if id(p) in self.zero0_masters:
                    self.zero0_masters[id(p)].copy_(state[name].to(p.device, torch.float32))
        if self.has_masters:  # exact fp32 masters (the refresh copied the model's dtype)
            from deepspeed.utils import safe_set_full_fp32_param

            for name, p in self.module.named_parameters():
                if p.requires_grad:
                    safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))

    def _materialise_state(self, inner: torch.optim.Optimizer) -> None:
        """Create the optimizer's lazily built state as zeros, which is what its first step would do.

        SGD: a zero momentum buffer gives ``buf = 0 * momentum + grad = grad`` on the next step, as a missing
        one does. AdamW: zero moments and step 0. Needed because DeepSpeed's full-state setters write into it.
        """
        keys = parallel.optimizer_state_keys(inner)
        tensors = [p for group in inner.param_groups for p in group["params"]]
        tensors += compat.zero_flat_fp32_partitions(self.engine.optimizer)
        for p in {id(t): t for t in tensors}.values():
            state = inner.state[p]
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "exp_avg" in keys and "step" not in state:
                state["step"] = torch.tensor(0.0)

    def optimizer_state(self, everywhere: bool = False) -> OptimizerState:
        """Empty (``keys == []``) before the first optimizer step or for SGD without momentum."""
        from engine.runtime import dist

        inner = _inner_optimizer(self.engine)
        optim: OptimizerState = {"keys": [], "state": {}, "adam_step": None}
        keys = parallel.optimizer_state_keys(inner)
        if not keys or not any(keys[0] in s for s in inner.state.values()):
            return optim
        optim["keys"] = keys
        optim["adam_step"] = next((float(s["step"]) for s in inner.state.values() if "step" in s), None)
        if self.has_masters:
            from deepspeed.utils import safe_get_full_optimizer_state

            compat.link_zero_optimizer_state(self.engine.optimizer)  # every group's state, not the first one's only
        keep = everywhere or dist.get_rank() == 0
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            entry = {}
            for key in keys:
                value = (safe_get_full_optimizer_state(p, key) if self.has_masters
                         else inner.state[self._stepped(p)].get(key))
                entry[key] = None if value is None else value.detach().to("cpu", torch.float32).clone(
                    memory_format=torch.contiguous_format)
            if keep:  # the others only take part in the gathers
                optim["state"][name] = entry
        return optim

    def load_optimizer_state(self, optim: OptimizerState) -> None:
        """An empty state (saved before the first step) zeroes this optimizer's state: zero momentum and zero
        Adam moments at step 0 update exactly as no state does."""
        inner = _inner_optimizer(self.engine)
        keys = parallel.optimizer_state_keys(inner)
        if not optim or not optim.get("keys"):
            if keys and any(keys[0] in s for s in inner.state.values()):
                self.load_optimizer_state({"keys": keys, "adam_step": 0.0 if "exp_avg" in keys else None,
                                           "state": {n: {k: torch.zeros(_full_shape(p)) for k in keys}
                                                     for n, p in self.module.named_parameters() if p.requires_grad}})
            return
        if keys != list(optim["keys"]):
            raise ValueError(f"the saved backbone optimizer state has {optim['keys']}, but this run's optimizer "
                             f"keeps {keys}: engine.optim.name or momentum differ from the saved run")
        self._materialise_state(inner)
        compat.link_zero_optimizer_state(self.engine.optimizer)
        if self.has_masters:
            from deepspeed.utils import safe_set_full_optimizer_state
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            for key in keys:
                value = optim["state"][name][key]
                if value is None:
                    continue
                if self.has_masters:
                    safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
                else:
                    target = inner.state[self._stepped(p)][key]
                    target.copy_(value.to(target.device, target.dtype))
        if optim.get("adam_step") is not None:
            for s in inner.state.values():
                if "step" in s:
                    if torch.is_tensor(s["step"]):
                        s["step"].fill_(optim["adam_step"])
                    else:
                        s["step"] = optim["adam_step"]

    def close(self) -> None:
        """Remove DeepSpeed's hooks and buffers (ZeRO-3 keeps forward hooks on the module otherwise)."""
        if self.reducer is not None:
            self.reducer.close()
        self.engine.destroy()


def build_deepspeed_backbone(cfg, device: torch.device, world_size: int) -> DeepSpeedBackbone:
    """Build, initialise, checkpoint-wrap and `deepspeed.initialize` the backbone as `cfg` says."""
    import deepspeed

    from engine.runtime import dist

    e = cfg.engine
    ds_config = deepspeed_config_for_engine(cfg.deepspeed, world_size)
    lean = cfg.zero_stage == 3 and device.type == "cpu"
    with parallel.freed_host_memory_returned(lean_after=lean):
        if cfg.zero_stage == 3:
            model = build_partitioned_model(e.model.name, embedding_size=e.model.embedding_size,
                                            dropout=e.model.dropout, ds_config=ds_config, device=device,
                                            seed=e.train.seed)
        else:
            model = parallel.build_plain_model(e.model.name, embedding_size=e.model.embedding_size,
                                               dropout=e.model.dropout, device=device, seed=e.train.seed)
        # DeepSpeed's checkpointing when the config has its section (partitioned / CPU-offloaded activations),
        # torch's otherwise. Both recompute in the forward's autocast state (parallel._run_segment).
        parallel.apply_finetune(model, e.model.freeze, e.model.freeze_bn_stats)  # before the optimizer sees it
        use_ds_ckpt = "activation_checkpointing" in ds_config
        if use_ds_ckpt and e.model.checkpoint:
            configure_deepspeed_checkpointing(ds_config, device)
        parallel.apply_activation_checkpointing(model, e.model.checkpoint, use_deepspeed=use_ds_ckpt)
        parallel.without_autocast_weight_cache(model)
        optimizer = parallel.make_optimizer(e.optim, parallel.backbone_param_groups(model, e.optim.weight_decay,
                                                                                e.optim.param_groups))
        dist.prepare_deepspeed(device)
        compat.reset_deepspeed_autocast_state()  # an earlier engine's torch_autocast must not leak into this one
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if module_dtype(engine) is not None:  # the bf16 / fp16 block cast the module, BatchNorm statistics included
        parallel.fp32_batchnorm(engine.module)
    if e.model.channels_last and keeps_parameters_as_they_are(engine):
        # after DeepSpeed's broadcast of the initial weights (a collective needs contiguous tensors); the same
        # Parameter objects get NHWC storage, so the optimizer and the gradient hooks below see the new layout
        engine.module.to(memory_format=torch.channels_last)
    reducer = None
    if skip_single_rank_allreduce(engine):
        compat.disable_backward_allreduce(engine)
    elif overlapped_allreduce(engine):  # DDP's overlapped buckets in place of DeepSpeed's post-backward concat
        from engine.parallel.reducer import GradReducer

        compat.disable_backward_allreduce(engine)
        reducer = GradReducer(engine.module.parameters())
    return DeepSpeedBackbone(engine, device, reducer=reducer)
