"""What every data-parallel backend shares: building the plain backbone and its optimizer, host memory during
set-up, and activation checkpointing (with BatchNorm and autocast safety).

The backends themselves (DeepSpeed: engine/parallel/deepspeed_backend.py, FSDP2: engine/parallel/fsdp_backend.py) implement the seam in
engine/parallel/backend.py. The Partial FC head never goes through them (docs/architecture.md, "The one subtle
rule").
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

import backbones
from engine.config import finetune
from engine.runtime import compat


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
    `lean_after`: ZeRO-3 and FSDP with reshard_after_forward on the CPU gather and free every parameter each
    pass, and from the heap those blocks fragmented r2060's ranks by ~2 GB (ZeRO-3) and ~4.8 GB (FSDP2, bf16:
    10.05 -> 5.24 GiB per rank); mmapped, each gather costs a page-zeroing pass (FSDP2 r2060 bf16 steps 60 ->
    97 s on 2 CPU ranks) but frees exactly.
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


def build_plain_model(name: str, *, embedding_size: int, dropout: float, device: torch.device,
                      seed: int) -> nn.Module:
    """Build the whole backbone on `device`, initialised identically on every rank (same seed).

    Backends that shard at construction (DeepSpeed ZeRO-3, FSDP2) build on their own terms and draw the same
    numbers in the same order (engine/parallel/deepspeed_backend.py, engine/parallel/fsdp_backend.py).
    """
    torch.manual_seed(seed)
    model = backbones.build_backbone(name, embedding_size=embedding_size, dropout=dropout)
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Initialising a sharded build exactly as the plain build (FSDP2 on the meta device, DeepSpeed ZeRO-3)
# ---------------------------------------------------------------------------------------------------------------

# write_module(module, [(sharded tensor, whole value), ...]): store the whole values into this rank's shards of
# `module`'s own tensors (every rank passes the same values).
WriteModule = Callable[[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]], None]


@contextlib.contextmanager
def recording_construction_order() -> Iterator[List[nn.Module]]:
    """Record the modules built inside the block in the order they register their first parameter.

    A plain build draws each leaf module's default initialisation (`reset_parameters`) at the end of that
    module's __init__, which is when it registers its parameters; this order is therefore the order of those
    draws, which `init_as_plain_build` replays. The list is filled when the block ends.
    """
    order: Dict[int, nn.Module] = {}

    def record(module: nn.Module, _name: str, _param) -> None:
        order.setdefault(id(module), module)

    modules: List[nn.Module] = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(record)
    try:
        yield modules
    finally:
        handle.remove()
        modules.extend(order.values())


@contextlib.contextmanager
def _whole(module: nn.Module, full_shape: Callable[[torch.Tensor], torch.Size], write_module: WriteModule,
           written: Dict[int, bool]) -> Iterator[None]:
    """Give `module` whole CPU copies of its own (not its children's) parameters and buffers for the duration,
    NaN-filled; afterwards the copies that were written (version counter moved) go to the shards.

    Initialisation code then runs unchanged and draws from the CPU generator exactly as it does in a plain
    build on one process (DTensor's or a GPU's random ops would draw differently). A rule that reads a value
    before writing it reads NaN, which `init_as_plain_build` refuses.
    """
    saved = {}
    for kind in ("_parameters", "_buffers"):
        table = getattr(module, kind)
        for key, t in table.items():
            if t is None:
                continue
            shape = full_shape(t)
            whole = (torch.full(shape, float("nan"), dtype=t.dtype) if t.is_floating_point()
                     else torch.zeros(shape, dtype=t.dtype))
            table[key] = nn.Parameter(whole, t.requires_grad) if kind == "_parameters" else whole
            saved[(kind, key)] = (t, table[key], table[key]._version)
    try:
        yield
    finally:
        writes = []
        for (kind, key), (t, placed, version) in saved.items():
            table = getattr(module, kind)
            now = table[key]
            table[key] = t
            if now is not placed or now._version != version:
                if now.is_floating_point() and not torch.isfinite(now).all():
                    raise RuntimeError(f"{type(module).__name__}.{key}: initialisation produced a non-finite "
                                       f"value (it read the tensor before writing it, or drew inf/NaN)")
                writes.append((t, now.detach()))
                written[id(t)] = True
        if writes:
            write_module(module, writes)


def init_as_plain_build(model: nn.Module, name: str, construction_order: List[nn.Module], seed: int, *,
                        full_shape: Callable[[torch.Tensor], torch.Size], write_module: WriteModule) -> None:
    """Initialise a sharded (or not yet initialised) backbone exactly as ``torch.manual_seed(seed);
    backbones.build_backbone(name, ...)`` would on one process, one module at a time.

    A plain build draws (1) every leaf module's `reset_parameters` during construction, then (2) runs
    `init_weights()` (registry contract: `reset_parameters` of every module, then the backbone's per-module
    `init_module` rule). Both are replayed here in the same order, each call on whole CPU copies of one module's
    own tensors (`_whole`), so the CPU generator advances exactly as in the plain build, and the values reach
    the shards through `write_module`. Interleaving the two (each module's rule right after its construction,
    as a ``zero.Init._post_init_method`` would) draws the same numbers for different tensors.

    Args:
        model: built with ``init=False`` (meta device and FSDP2, or inside ``deepspeed.zero.Init``).
        name: its registry name (for the `init_module` rule).
        construction_order: from `recording_construction_order` around the build.
        seed: the run's seed; the global CPU generator is re-seeded with it.
        full_shape: a tensor's whole shape (ZeRO-3's partitioned parameters are empty: ``ds_shape``).
        write_module: stores one module's whole values into its shards.

    Raises:
        RuntimeError: init_weights left a tensor unwritten, or read one before writing it.
    """
    import backbones

    rule = backbones.get_init_fn(name)
    written: Dict[int, bool] = {}

    def on_whole(m: nn.Module, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with _whole(m, full_shape, write_module, written):
                fn()
        return run

    torch.manual_seed(seed)
    with torch.no_grad():
        for m in construction_order:  # (1) construction-time defaults
            if callable(getattr(type(m), "reset_parameters", None)):
                on_whole(m, m.reset_parameters)()
        patched = []
        for m in model.modules():
            if callable(getattr(type(m), "reset_parameters", None)):
                m.reset_parameters = on_whole(m, m.reset_parameters)
                patched.append((m, "reset_parameters"))
        model.init_module = lambda m: on_whole(m, lambda: rule(m))()
        patched.append((model, "init_module"))
        try:
            model.init_weights()  # (2): the backbone's own code; every tensor write goes through _whole
        finally:
            for m, attr in patched:
                del m.__dict__[attr]
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in written]
    if unset:
        raise RuntimeError(f"{type(model).__name__}: init_weights left {unset[:5]} unset; the sharded "
                           f"initialisation replays reset_parameters and init_module only")


def check_state_keys(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless `state` has exactly `module`'s state_dict keys (naming a few of each side)."""
    expected = set(module.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"backbone state_dict does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")


def backbone_param_groups(model: nn.Module, weight_decay: float,
                          param_groups: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """The backbone optimizer's groups: without `param_groups` one group with every trainable parameter
    (arcface_torch decays all of them, BN and PReLU included); with them (`engine.optim.param_groups`), one
    group per entry holding the trainable parameters it takes first, each with its ``lr_scale`` (the trainer
    sets ``lr`` = the schedule's LR x ``lr_scale`` before every step) and weight decay, then the base group
    with the rest (left out when empty). Frozen parameters (requires_grad False) are in none."""
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    groups = finetune.check_param_groups(param_groups)
    assignment = finetune.assign([n for n, _ in named], [], groups, trainable=trainable)
    by_name = dict(named)
    out = [{"params": [by_name[n] for n in members], "lr_scale": g.lr_scale,
            "weight_decay": weight_decay if g.weight_decay is None else g.weight_decay}
           for g, members in zip(groups, assignment.groups)]
    if assignment.base or not out:
        out.append({"params": [by_name[n] for n in assignment.base], "lr_scale": 1.0, "weight_decay": weight_decay})
    return out


def apply_finetune(model: nn.Module, freeze: Sequence[str] = (), freeze_bn_stats: bool = False) -> List[str]:
    """Freeze the parameters matching `freeze` (`engine.model.freeze`) and, with `freeze_bn_stats`, every
    BatchNorm's running statistics, in place, before the optimizer and the backend see the model. Returns the
    frozen parameter names. Works on a plain, a ZeRO-3 (partitioned) or a meta-device model (before FSDP2
    shards it: fully_shard copies requires_grad into the sharded parameters).

    A frozen parameter is in no optimizer group, so it gets no update and no weight decay, and no gradient is
    computed or reduced for it."""
    names = [n for n, _ in model.named_parameters()]
    frozen = finetune.assign(names, list(freeze), []).frozen if freeze else []
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train = _EvalOnly(m)
                m.train(False)
    return frozen


class _EvalOnly:
    """`bn.train` for a BatchNorm whose statistics are frozen: whatever mode is asked for (the trainer's
    ``backbone.train()`` reaches every module through nn.Module.train), the layer stays in eval mode, so it
    normalises with its running statistics and never updates them. Its affine weight and bias still train
    unless `engine.model.freeze` names them. An instance attribute: module tree and state_dict keys unchanged."""

    def __init__(self, bn: nn.Module):
        self.bn = bn

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.bn, False)


def make_optimizer(optim_cfg, groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """The backbone optimizer `engine.optim` names (SGD with momentum, or AdamW), over `groups`."""
    o = optim_cfg
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"engine.optim.name: expected 'sgd' or 'adamw', got {o.name!r}")


def optimizer_state_keys(optimizer: torch.optim.Optimizer) -> List[str]:
    """The per-parameter state tensors a checkpoint carries for `optimizer` (docs/checkpoint_format.md,
    ``backbone_optim.pt``): AdamW's two moments, SGD's momentum buffer (none without momentum)."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        return ["exp_avg", "exp_avg_sq"]
    if any(g.get("momentum", 0) for g in optimizer.param_groups):
        return ["momentum_buffer"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------------

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


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


def segment_ranges(num_blocks: int, num_segments: int) -> List[range]:
    """The block index ranges of at most `num_segments` contiguous, nearly equal segments of `num_blocks`
    blocks. The one rule for where checkpoint segments start: the planner counts with it too."""
    num = max(1, min(num_segments, num_blocks))
    base, extra = divmod(num_blocks, num)
    out, start = [], 0
    for i in range(num):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def split_segments(seq: nn.Sequential, num_segments: int) -> List[nn.Sequential]:
    """`seq` split into the segments `segment_ranges` gives."""
    blocks = list(seq)
    return [nn.Sequential(*blocks[r.start:r.stop]) for r in segment_ranges(len(blocks), num_segments)]


AutocastState = Dict[str, Tuple[bool, torch.dtype, bool]]


def autocast_state(device_type: str) -> AutocastState:
    """The autocast settings in force now for `device_type` and for the CPU: {device type: (enabled, dtype,
    cache_enabled)}, as torch.utils.checkpoint records them."""
    state = {}
    for kind in dict.fromkeys((device_type, "cpu")):
        state[kind] = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
                       torch.is_autocast_cache_enabled())
    return state


@contextlib.contextmanager
def autocast_as(state: AutocastState) -> Iterator[None]:
    """Enter exactly the autocast settings `state` recorded (enabled or not, for each device type)."""
    with contextlib.ExitStack() as stack:
        for kind, (enabled, dtype, cache) in state.items():
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield


def without_autocast_weight_cache(model: nn.Module) -> None:
    """Run `model`'s forward with autocast's weight-cast cache off, whoever entered the autocast.

    Inside an autocast region torch caches the 16-bit cast of every fp32 leaf parameter it casts, until the
    outermost region exits. A backbone uses each weight once per forward, so the cache never saves a cast; it
    only keeps a 16-bit copy of every weight alive to the end of the forward, and under ZeRO-3 those are copies
    of the gathered full weights that ZeRO-3 has already released (r2060: 2.1 GiB per rank). DeepSpeed enters
    its `torch_autocast` region itself with the cache on, so the flag is turned off inside the module's own
    call (the region's exit restores it); checkpoint recomputes record and re-enter it (`autocast_state`).
    """
    saved: List[bool] = []

    def pre(module, args):
        saved.append(torch.is_autocast_cache_enabled())
        torch.set_autocast_cache_enabled(False)

    def post(module, args, output):
        if saved:
            torch.set_autocast_cache_enabled(saved.pop())

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post, always_call=True)


def _run_segment(segment: nn.Sequential, autocast: AutocastState, x: torch.Tensor) -> torch.Tensor:
    """Run a checkpointed segment: in the forward, and again when backward recomputes it.

    The recompute runs in the autocast state of the original forward (`autocast`, recorded then). DeepSpeed's
    CheckpointFunction restores only RNG state: without this, a bf16 forward's saved bf16 activation met fp32
    weights in the recompute ("Input type (CPUBFloat16Type) and weight type (torch.FloatTensor) should be the
    same"). torch.utils.checkpoint restores autocast itself; entering the same state again changes nothing.
    """
    with autocast_as(autocast):
        if compat.in_backward():
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
        segments = split_segments(stage, num_segments)

        def forward(x: torch.Tensor, _segments=segments, _stage=stage) -> torch.Tensor:
            if not (_stage.training and torch.is_grad_enabled()):
                for seg in _segments:
                    x = seg(x)
                return x
            autocast = autocast_state(x.device.type)  # the forward's, for the recompute in backward
            if use_deepspeed and not x.requires_grad:
                # DeepSpeed's checkpoint is reentrant: a segment whose input needs no gradient (the layers before
                # it frozen, engine.model.freeze) would return an output without one, and its own parameters
                # would silently get no gradient. torch's non-reentrant checkpoint has no such limit.
                x = x.detach().requires_grad_()
            for seg in _segments:
                x = ckpt_fn(functools.partial(_run_segment, seg, autocast), x)  # tensors only as arguments
            return x

        stage.forward = forward  # instance attribute: module tree and state_dict keys stay as they are
    return list(spec)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm in fp32 under 16-bit parameters
# ---------------------------------------------------------------------------------------------------------------

def fp32_batchnorm(model: nn.Module) -> None:
    """Make every BatchNorm of `model` normalise in fp32 and keep fp32 running statistics, whatever dtype its
    parameters are handed to it in (DeepSpeed's `bf16`/`fp16` blocks cast the whole module to 16 bits; FSDP2's
    mixed precision casts the gathered parameters).

    The running statistics are made fp32 buffers here (a 16-bit running variance loses the small per-step
    updates: bf16 has 8 bits of mantissa), and each call runs with fp32 affine parameters (`_Fp32AffineForward`),
    so torch's batch_norm takes its mixed-type path: 16-bit input and output, batch statistics, normalisation
    and running statistics in fp32, as under autocast. Without the cast torch rejects 16-bit weight/bias with
    fp32 statistics ("expected scalar type BFloat16 but found Float"). The upstream alternative under FSDP2, a
    separate fp32 unit per BatchNorm (pytorch/torchtitan#674), costs one more all-gather and reduce-scatter
    per BatchNorm: ~3,100 small, latency-bound collectives per r2060 step. The affine values are the 16-bit
    copies of the fp32 masters (as every conv weight is); their gradients flow back through the cast.
    """
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        for key in ("running_mean", "running_var"):
            buf = m._buffers.get(key)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                m._buffers[key] = buf.float()
        if m.affine and not isinstance(m.__dict__.get("forward"), _Fp32AffineForward):
            m.forward = _Fp32AffineForward(m)


class _Fp32AffineForward:
    """`bn.forward` with the affine parameters cast to fp32 for the call (instance attribute: the module tree
    and state_dict keys stay as they are)."""

    def __init__(self, bn: nn.Module):
        self.bn = bn
        self.forward = type(bn).forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        table = self.bn._parameters
        saved = dict(table)
        try:
            for key, p in saved.items():
                if p is not None and p.dtype != torch.float32:
                    table[key] = p.float()  # differentiable: the gradient flows back to the 16-bit parameter
            return self.forward(self.bn, x)
        finally:
            table.update(saved)


def all_finite(tensors) -> torch.Tensor:
    """Whether every tensor in `tensors` is all finite: a device bool tensor (no host sync).

    One sum per tensor instead of `isfinite(t).all()`: inf and NaN propagate through a sum, and the sum reads
    the tensor once without writing a bool tensor of its size (an r18 gradient: ~2 ms against ~40 ms for the
    element-wise test; the guard runs every step). A finite tensor's sum overflows only beyond 3.4e38, a
    gradient far past anything that still trains; it then counts as non-finite, the safe side of the check.
    """
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors if t is not None and t.numel()]
    if not sums:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum())
