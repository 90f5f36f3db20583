"""Wrap the backbone for data-parallel training: DeepSpeed ZeRO 0-3 and activation checkpointing.

Only the backbone goes through here. The Partial FC head is model-parallel (rank-unique class shards) and
must never be averaged, partitioned or wrapped (DESIGN.md §2); the trainer keeps it outside.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from torch import nn

import backbones


# ---------------------------------------------------------------------------------------------------------------
# Building the backbone
# ---------------------------------------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_SET_UP_MMAP_THRESHOLD = 1 << 20  # while building: blocks >= 1 MiB are mmapped, so freeing returns them
_TRAIN_MMAP_THRESHOLD = 32 << 20  # afterwards: glibc's own dynamic ceiling, so per-step buffers stay in the heap


@contextlib.contextmanager
def freed_host_memory_returned(lean_after: bool = False):
    """Make host memory freed while the model is built and partitioned go back to the OS (glibc only).

    Building under ZeRO-3 allocates each full parameter, keeps a 1/W partition and frees the rest; DeepSpeed's
    set-up then copies the partitions into flat buffers and frees the originals. Below glibc's mmap threshold
    (which grows up to 32 MiB) those blocks come from the heap, and the freed ones stay in the process,
    fragmented between live partitions: r2060 on 2 CPU ranks peaked ~2.3 GB per rank higher than its live
    tensors. Inside this block, blocks of 1 MiB and more are mmapped, so freeing them returns the pages.
    Afterwards the threshold is set to 32 MiB (the value glibc's dynamic threshold reaches on its own) so the
    training step's buffers are reused from the heap rather than mapped and zeroed each step -- unless
    `lean_after`: ZeRO-3 on the CPU gathers and frees every parameter each pass, and from the heap those
    blocks fragmented r2060's ranks by ~2 GB; mmapped, each gather costs a page-zeroing pass (about 1 s per
    r2060 pass here) but frees exactly.
    """
    libc = None
    try:
        import ctypes
        import platform

        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, _SET_UP_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            if not lean_after:
                libc.mallopt(_M_MMAP_THRESHOLD, _TRAIN_MMAP_THRESHOLD)


def build_model(name: str, *, embedding_size: int, dropout: float, zero_stage: int, ds_config: Dict[str, Any],
                device: torch.device, seed: int) -> nn.Module:
    """Build the backbone, initialised identically on every rank.

    Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, so each parameter is partitioned the moment
    its module finishes construction and no rank ever holds the whole fp32 model. Each module is initialised
    (the backbone's own `init_module` rule, same seed on every rank) just before it is partitioned.
    """
    torch.manual_seed(seed)
    if zero_stage < 3:
        model = backbones.build_backbone(name, embedding_size=embedding_size, dropout=dropout)
        return model.to(device)
    import deepspeed

    from engine import dist

    dist.prepare_deepspeed(device)

    init_module = backbones.get_init_fn(name)

    class _InitThenPartition(deepspeed.zero.Init):
        def _post_init_method(self, module):  # called once per module, after its own __init__
            init_module(module)
            super()._post_init_method(module)

    with _InitThenPartition(config_dict_or_path=ds_config, remote_device=None, enabled=True):
        model = backbones.build_backbone(name, embedding_size=embedding_size, dropout=dropout, init=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------------

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _in_backward() -> bool:
    """True while the autograd engine is executing a backward pass (i.e. during checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Run a training-mode forward without leaving any trace in BatchNorm running statistics.

    Recomputation under activation checkpointing repeats a forward that already updated the running mean,
    variance and batch counter; without this they would be updated twice per step. The batch statistics
    used for the output are unaffected, so the recomputed activations equal the original ones.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, [getattr(m, k) for k in _BN_STATS]))
            for k in _BN_STATS:  # the recompute updates throw-away copies; the originals are never written,
                setattr(m, k, getattr(m, k).clone())  # so tensors saved by autograd keep their versions
    try:
        yield
    finally:
        for m, values in saved:
            for k, v in zip(_BN_STATS, values):
                setattr(m, k, v)


def _segments(seq: nn.Sequential, num_segments: int) -> List[nn.Sequential]:
    """Split `seq` into at most `num_segments` contiguous, nearly equal runs of blocks."""
    blocks = list(seq)
    num = max(1, min(num_segments, len(blocks)))
    base, extra = divmod(len(blocks), num)
    out, start = [], 0
    for i in range(num):
        size = base + (1 if i < extra else 0)
        out.append(blocks[start:start + size])
        start += size
    return [nn.Sequential(*b) for b in out]


def _run_segment(segment: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    if _in_backward():
        with frozen_bn_stats(segment):
            return segment(x)
    return segment(x)


def apply_activation_checkpointing(model: nn.Module, spec: Union[str, Dict[str, int]],
                                   use_deepspeed: bool = False) -> List[str]:
    """Checkpoint the stages named in `spec` ({stage: num_segments} or "all") in place; state_dict unchanged.

    Each named stage (from the backbone's `checkpoint_units()`) is split into contiguous segments; in
    training, only segment inputs are kept and the segment is recomputed in backward. `use_deepspeed`
    selects DeepSpeed's implementation (honours its `activation_checkpointing` section: partitioned or
    CPU-offloaded activations) instead of torch's non-reentrant one. Returns the stage names wrapped.
    """
    units = model.checkpoint_units()
    if spec == "all":
        spec = {name: len(seq) for name, seq in units.items()}
    if not spec:
        return []
    unknown = sorted(set(spec) - set(units))
    if unknown:
        raise ValueError(f"engine.model.checkpoint: unknown stage(s) {unknown} for {type(model).__name__}; "
                         f"stages are {list(units)}")
    if use_deepspeed:
        import deepspeed

        ckpt_fn: Callable = deepspeed.checkpointing.checkpoint
    else:
        ckpt_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    for name, num_segments in spec.items():
        stage = units[name]
        segments = _segments(stage, num_segments)

        def forward(x: torch.Tensor, _segments=segments, _stage=stage) -> torch.Tensor:
            if not (_stage.training and torch.is_grad_enabled()):
                for seg in _segments:
                    x = seg(x)
                return x
            for seg in _segments:
                x = ckpt_fn(functools.partial(_run_segment, seg), x)  # tensors only as arguments
            return x

        stage.forward = forward  # instance attribute: module tree and state_dict keys stay as they are
    return list(spec)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------------

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
    turned off for CPU devices (a note is printed); on GPUs it is honoured as written.
    """
    import deepspeed

    section = dict(ds_config.get("activation_checkpointing", {}))
    if device.type == "cpu" and section.get("cpu_checkpointing"):
        print("note: activation_checkpointing.cpu_checkpointing is a no-op when training on the CPU; disabled",
              flush=True)
        section["cpu_checkpointing"] = False
    deepspeed.checkpointing.configure(None, deepspeed_config={**ds_config, "activation_checkpointing": section})


def wrap_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: Dict[str, Any]):
    """deepspeed.initialize for the backbone alone; returns the engine (which owns the wrapped optimizer)."""
    import deepspeed

    from engine import dist

    dist.prepare_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if skip_single_rank_allreduce(engine):
        engine.enable_backward_allreduce = False
    return engine


def skip_single_rank_allreduce(engine) -> bool:
    """Whether the backward all-reduce can be left out: ZeRO stage 0 with one data-parallel rank.

    Averaging over one rank is the identity, but DeepSpeed still flattens every gradient into a fresh buffer,
    all-reduces it and copies it back on every step: on the CPU that was most of the engine's overhead over
    a bare loop at 1 rank (r50: engine/bare 0.944 with it, BENCHMARKS.md section 1). ZeRO stages 1-3 move
    gradients into their partitions in that path, so it stays for them.
    """
    return int(engine.zero_optimization_stage()) == 0 and int(engine.dp_world_size) == 1


def backbone_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """One group with every trainable parameter (arcface_torch decays all of them, BN and PReLU included)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def _full_param(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """This parameter's full fp32 value on every rank (master weights under ZeRO 1-3; a collective there)."""
    stage = int(engine.zero_optimization_stage())
    if stage >= 1 and param.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is not None:
            return value.detach().to("cpu", torch.float32)
    gathered = contextlib.nullcontext()
    if stage == 3:  # frozen parameters have no master copy: gather the partitioned model parameter itself
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    with gathered:
        return param.detach().to("cpu", torch.float32).clone()


def full_state_dict(engine, everywhere: bool = True) -> Dict[str, torch.Tensor]:
    """The backbone's full fp32 state_dict on the CPU, from any ZeRO stage (all ranks must call: ZeRO gathers
    collectively).

    Trained parameters come from DeepSpeed's fp32 master copies where it keeps them (ZeRO 1-3), so under
    bf16/fp16 they are the exact weights, not their rounded model copies; frozen parameters and buffers
    (BatchNorm statistics: this rank's) come from the module. Keys and order are the module's state_dict.
    Unless `everywhere`, only rank 0 keeps the tensors (the others return {} and drop each gathered
    parameter at once), so a 1.1 B-parameter model costs its full size on rank 0 only.
    """
    from engine import dist

    module = engine.module
    keep = everywhere or dist.get_rank() == 0
    out = {}
    for name, param in module.named_parameters():
        value = _full_param(engine, param)
        if keep:
            out[name] = value
    if not keep:
        return {}
    for name, buf in module.named_buffers():
        out[name] = buf.detach().cpu().clone()
    return {k: out[k] for k in module.state_dict().keys() if k in out}


def load_full_state_dict(engine, state: Dict[str, torch.Tensor]) -> None:
    """Load a full backbone state_dict (as `full_state_dict` returns) into a DeepSpeed engine (all ranks call).

    Keys must match exactly. Under ZeRO-3 each parameter is gathered, overwritten and re-partitioned. The
    optimizer's fp32 master copies are then set from the given fp32 values (exactly, not from the model's
    possibly bf16/fp16 copy); otherwise ZeRO's next step would write the old weights back.
    """
    module = engine.module
    expected = set(module.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"backbone state_dict does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with torch.no_grad():
            for name, param in module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.copy_(state[name].to(param.device, param.dtype))
            for name, buf in module.named_buffers():
                if name in state:
                    buf.copy_(state[name].to(buf.device, buf.dtype))
    else:
        module.load_state_dict(state, strict=True)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    if int(engine.zero_optimization_stage()) >= 1:  # exact fp32 masters (the refresh copied the model's dtype)
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in module.named_parameters():
            if p.requires_grad:
                safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))
