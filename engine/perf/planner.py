"""Memory and speed planner: what one rank holds for a run config, before anything is launched.

    python -m engine.plan --config ds_configs/r2060.json --world-size 64 [--num-classes 10000000]  (engine/perf/plan_cli.py)
        [--gpu-mem-gb 80] [--micro-batch N] [--peak-tflops X] [--device gpu|cpu] [--ranks-per-node N]
        [--set key.path=value ...]

Why a planner: a 10 M-class head or a 1.1 B-parameter backbone fails minutes into a launch (after data
loading, ZeRO partitioning and the first forward), so the useful answer -- "does it fit, and how far can the
class count or batch grow" -- should come from arithmetic in a second. Every row is a formula over the
config (ZeRO stage, precision, optimizer, checkpointing, Partial FC settings) and one measurement of the
backbone: a training-mode forward on the `meta` device (no memory, no FLOPs spent) with autograd's
saved-tensor hooks sums what backward keeps per image, and Conv2d/Linear forward hooks count the
multiply-accumulates. Nothing is fitted to a run.

Rows are per rank, in bytes, at the step's peak. Formulas follow what the code does (see each row's note):
DeepSpeed ZeRO 1-3 always keep an fp32 copy of the rank's parameter partition (and its gradient) next to the
model's own parameters, also for fp32 models; torch autocast keeps 16-bit copies of the weights for the
step. FSDP2 (`engine.train.backend: fsdp`) keeps only fp32 shards (the optimizer's masters: no second copy),
fp32 gradient shards and sharded optimizer state, plus the units being computed, gathered in the compute dtype
(see `_fsdp_rows`); its gradient shards fill what the backward frees, so a negative "backward frees" row makes
the total the larger side, not the sum (the DeepSpeed rows keep summing gradients and activations). The head
follows `heads.PartialFC`: rank-unique shard of ceil(C / W) rows, row-sparse optimizer state, sampled rows
gathered in fp32, logits [global micro-batch, sampled or chunk] in fp32.

Accuracy (checked in tests/unit/test_plan.py, tests/launch/test_plan.py and BENCHMARKS.md): within 20% of the
peak RSS of measured 2-rank CPU runs, and within 25% of arcface_torch's published V100 Partial FC memory table.
"""
from __future__ import annotations

import functools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from engine.runtime import compat
from heads.class_store import pinned_host_bytes
from engine.parallel import common as parallel
from engine.config.schema import RunConfig

GiB = 2 ** 30
IMAGE_ELEMS = 3 * 112 * 112

# What a rank of a 2-rank CPU job holds beyond the rows below (counted on CPU only; on a GPU it is host memory):
# Python + torch + DeepSpeed + gloo + our code resident before the first step (0.39 GiB, measured) and what the
# allocator keeps while backward swaps activations for gradients. Calibrated once on this repo's 2-core x86_64
# machine (torch 2.13 CPU, DeepSpeed 0.19): 2 ranks of mbf (embedding 128, 64 classes, micro-batch 16, ZeRO-1,
# fp32, synthetic data; quickstart.json as of a7e183a) peak at 1.46 GiB of RSS per rank against 0.76 GiB of
# rows. Other runs then test the formulas (tests/launch/test_plan.py's 1M-class launcher run; BENCHMARKS.md).
CPU_RUNTIME_BYTES = int(0.70 * GiB)
# CUDA context + cuBLAS/cuDNN handles and workspaces: resident on the device but outside the caching
# allocator's counters (nvidia-smi / gpustat see it, torch.cuda.max_memory_allocated does not).
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# The caching allocator reserves more than it hands out (block rounding, fragmentation) on GPUs.
CUDA_ALLOCATOR_SLACK = 0.05
# DeepSpeed defaults (0.19) for the bucket sizes the planner counts when the config leaves them out.
DS_REDUCE_BUCKET = int(5e8)
DS_MAX_LIVE_PARAMETERS = int(1e9)
DS_PREFETCH_BUCKET = int(5e7)
# Live [global batch, columns] fp32 buffers in the head's step: cosine logits, margin output, softmax
# probabilities (saved for backward) and their gradient -- per chunk when the softmax is chunked.
HEAD_LOGIT_COPIES = 4
# Live [sampled rows, E] fp32 buffers at the head step's peak, measured (RSS above steady state of a 1-process
# heads.PartialFC + RowSparseSGD step, E=128, batch 32, rate 0.1, glibc mmap threshold 1 MiB): unchunked 5.96 at
# 1 M classes (gathered rows, normalised rows, their gradients and F.normalize's backward temporaries), chunked
# 2.43 at 4 M classes (gathered rows and their gradient; centres are normalised chunk by chunk and the optimizer
# reuses the gathered rows and updates in 512 KiB blocks).
HEAD_ROW_COPIES = {"unchunked": 6, "chunked": 2.5}
# Gradient accumulation with sampling: every micro-batch samples its own rows, and their gradients are kept until
# the optimizer step, concatenated (heads.class_store.RowGrad.accumulate; a sparse .grad sums the same way). Per
# earlier micro-batch, held through the last one's backward: its row gradient, and with fp32 centres on the device
# ("direct": autograd's sparse .grad) nothing else, else also the fetched fp32 rows the RowGrad keeps for the
# optimizer. Joining the last one: the A gradients (and rows) and their concatenation, A x ROW_GRAD_JOIN copies.
# Measured on 2 CPU ranks, 10M classes, E 128, rate 0.1, micro-batch 8 x 2, chunk 16384: bf16 centres +0.79 GiB
# (3.3 rows' worth) over micro-batch 16 x 1's figure, fp32 centres +0.52 GiB; modelled +3.5 and +1.5 copies.
ROW_GRAD_HELD = {True: 1, False: 2}
ROW_GRAD_JOIN = {True: 2, False: 3}
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class BackboneProfile:
    """What a backbone costs per image, measured once on the meta device.

    Attributes:
        num_params: parameters (trainable and frozen; all are held and partitioned by ZeRO).
        trainable_params: those `engine.model.freeze` leaves trainable: only they get gradients, optimizer
            state and DeepSpeed's fp32 partitions (a frozen parameter is in no optimizer group).
        act_elems: elements saved for backward per image without checkpointing.
        ckpt_act_elems: elements live per image at the backward peak with the configured checkpointing:
            the kept segment inputs plus the largest recomputed segment plus everything not checkpointed.
        largest_elems: the largest single saved tensor per image (sizes the activation-gradient buffers).
        macs: forward conv + linear multiply-accumulates per image (arcface_torch's "FLOPs" column).
        recompute_macs: forward MACs per image of the checkpointed blocks, recomputed in backward (a frozen block
            the gradient never reaches is not recomputed).
        backward_macs: conv + linear MACs per image of the backward, as autograd runs it: for each layer the
            gradient reaches, its forward MACs once for its input's gradient (not for the image's) and once for
            its weight's (not for a frozen weight). About 2 x `macs` when everything is trained; frozen layers
            before every trained one cost nothing. None: 2 x `macs`.
        largest_unit_params: parameters of the largest block of `checkpoint_units()`: FSDP's largest unit,
            all-gathered whole while it computes.
        root_params: parameters outside every block (stem, final BatchNorm, fc, features): FSDP's root unit.
        largest_segment_params: parameters of the largest checkpointed segment: FSDP2 does not reshard after a
            recomputing forward, so a segment's blocks stay gathered until their backward (0: no checkpointing).
        num_units: blocks of `checkpoint_units()` (FSDP's units besides the root: one gather each).
        norm_act_elems: output elements per image of the normalisation and activation layers (BatchNorm,
            LayerNorm, PReLU, ReLU, GELU, ...) in one forward: work that scales with the activations, not the
            FLOPs; norm_act_backward_elems: those the gradient reaches; recompute_norm_act_elems: those of the
            recomputed blocks.
        num_ops: leaf modules called per forward; num_backward_ops: those the gradient reaches (None: all);
            num_param_modules: modules holding parameters (the time model's per-call overheads: kernels launched,
            ZeRO-3's per-module fetches).
        held: per block of `checkpoint_units()` in forward order, (elements per image it keeps for backward with
            the configured checkpointing, its parameters): the backward frees them block by block from the last,
            while the gradient shards arrive in the same order (the FSDP rows' timeline, see `_backward_overlap`).
    """

    name: str
    embedding_size: int
    num_params: int
    act_elems: float
    ckpt_act_elems: float
    largest_elems: float
    macs: float
    recompute_macs: float
    largest_unit_params: int = 0
    root_params: int = 0
    largest_segment_params: int = 0
    num_units: int = 0
    num_ops: int = 0
    num_param_modules: int = 0
    held: Tuple[Tuple[float, int], ...] = ()
    trainable_params: Optional[int] = None  # None: all (profile_from sets it from the measurement)
    backward_macs: Optional[float] = None
    num_backward_ops: Optional[int] = None
    norm_act_elems: float = 0.0
    norm_act_backward_elems: float = 0.0
    recompute_norm_act_elems: float = 0.0

    @property
    def trained(self) -> int:
        return self.num_params if self.trainable_params is None else self.trainable_params

    @property
    def train_macs(self) -> float:
        """Forward + backward MACs per image, recomputation not included."""
        return self.macs + (2 * self.macs if self.backward_macs is None else self.backward_macs)

    @property
    def backward_ops(self) -> int:
        return self.num_ops if self.num_backward_ops is None else self.num_backward_ops

    def trained_note(self) -> str:
        """" (N M trained, the rest frozen)" for the gradient rows' notes when engine.model.freeze leaves any."""
        T = self.trained
        return f" ({T / 1e6:.1f} M trained, the rest frozen)" if T < self.num_params else ""


@dataclass(frozen=True)
class BlockCost:
    """One block of `checkpoint_units()`, per image: what backward keeps, its input, MACs and parameters;
    `grad`: whether the gradient reaches it (a frozen block before every trained one is not back-propagated, so
    checkpointing it recomputes nothing)."""

    saved: float
    input: float
    macs: float
    params: int
    grad: bool = True
    norm_act: float = 0.0  # output elements of its normalisation and activation layers


@dataclass(frozen=True)
class BackboneMeasure:
    """A backbone measured once on the meta device (per image), from which every checkpointing is derived.

    Attributes:
        units: stage -> its blocks, in order.
        saved_total: elements saved for backward without checkpointing, all modules.
        macs_total: forward multiply-accumulates, all modules.
        backward_macs: multiply-accumulates of the backward (see BackboneProfile.backward_macs).
        num_ops: leaf modules called in one forward (a kernel-count proxy for the per-call overhead);
            num_backward_ops: those the gradient reaches.
        norm_act_elems / norm_act_backward_elems: see BackboneProfile.
        module_params: parameters held directly by each module that holds any (DeepSpeed ZeRO-3 fetches each
            module above its persistence threshold on its own).
        trainable_params: parameters that require a gradient once `freeze` is applied.
    """

    name: str
    embedding_size: int
    num_params: int
    units: Dict[str, Tuple[BlockCost, ...]]
    saved_total: float
    largest_elems: float
    macs_total: float
    root_params: int
    num_ops: int
    module_params: Tuple[int, ...]
    trainable_params: int
    backward_macs: float
    num_backward_ops: int
    norm_act_elems: float = 0.0
    norm_act_backward_elems: float = 0.0


# Layers whose cost follows their activations' size rather than FLOPs (the time model's normalisation/activation term)
NORM_ACT = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.ReLU, nn.GELU, nn.SiLU,
            nn.Sigmoid, nn.Hardswish, nn.Tanh)


@functools.lru_cache(maxsize=16)
def measure_backbone(name: str, embedding_size: int = 512, freeze: Tuple[str, ...] = ()) -> BackboneMeasure:
    """Measure `name` once on the meta device (cached): per block saved elements, inputs, MACs, parameters.

    `freeze` (`engine.model.freeze`) is applied first: a frozen layer whose input needs no gradient saves nothing
    for the backward (autograd records no graph there), which the saved-tensor count below sees as it is, and
    costs no backward MACs; a frozen layer after a trained one still passes its input's gradient back."""
    import backbones

    batch = 2  # BatchNorm1d needs > 1 sample in training mode; everything saved scales with the batch
    model = backbones.build_backbone(name, embedding_size=embedding_size, device="meta").train()
    if freeze:
        parallel.apply_finetune(model, list(freeze))
    units = model.checkpoint_units()
    params = {compat.storage_id(p) for p in model.parameters()}  # also catches views (fc.weight.t())
    current: List[Optional[Tuple[str, int]]] = [None]
    saved: Dict[Optional[Tuple[str, int]], int] = defaultdict(int)
    inputs: Dict[Tuple[str, int], int] = {}
    macs: Dict[Optional[Tuple[str, int]], int] = defaultdict(int)
    backward_macs, reached = [0], {}
    norm_act: Dict[Optional[Tuple[str, int]], int] = defaultdict(int)
    norm_act_backward = [0]
    seen, largest, ops, backward_ops = set(), [0], [0], [0]
    handles = []

    def enter(key):
        def pre(module, args):
            current[0] = key
            inputs[key] = args[0].numel()
        return pre

    def leave(key):
        def post(module, args, out):
            current[0] = None
            reached[key] = out.requires_grad
        return post

    def count_macs(module, args, out):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        else:
            k = module.in_features
        n = out.numel() * k
        macs[current[0]] += n
        if out.requires_grad:  # the gradient reaches this layer: its input's gradient, its weight's
            backward_macs[0] += n * (int(args[0].requires_grad) + int(module.weight.requires_grad))

    def count_op(module, args, out):
        ops[0] += 1
        backward_ops[0] += int(torch.is_tensor(out) and out.requires_grad)
        if isinstance(module, NORM_ACT) and torch.is_tensor(out):
            norm_act[current[0]] += out.numel()
            norm_act_backward[0] += out.numel() if out.requires_grad else 0

    for stage, seq in units.items():
        for i, block in enumerate(seq):
            handles.append(block.register_forward_pre_hook(enter((stage, i))))
            handles.append(block.register_forward_hook(leave((stage, i))))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(count_macs))
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(count_op))

    def pack(t: torch.Tensor):
        storage, key = t.untyped_storage(), compat.storage_id(t)
        if key in params or key in seen:  # weights are counted as parameters; once each
            return t
        seen.add(key)
        elems = storage.nbytes() // t.element_size()
        saved[current[0]] += elems
        largest[0] = max(largest[0], elems)
        return t

    x = torch.empty(batch, 3, 112, 112, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in handles:
        h.remove()
    blocks = {stage: tuple(BlockCost(saved=saved[(stage, i)] / batch, input=inputs[(stage, i)] / batch,
                                     macs=macs[(stage, i)] / batch, params=sum(p.numel() for p in block.parameters()),
                                     grad=reached[(stage, i)], norm_act=norm_act[(stage, i)] / batch)
                           for i, block in enumerate(seq)) for stage, seq in units.items()}
    in_units = {id(p) for seq in units.values() for block in seq for p in block.parameters()}
    return BackboneMeasure(
        name=name, embedding_size=embedding_size, num_params=sum(p.numel() for p in model.parameters()),
        units=blocks, saved_total=sum(saved.values()) / batch, largest_elems=largest[0] / batch,
        macs_total=sum(macs.values()) / batch,
        root_params=sum(p.numel() for p in model.parameters() if id(p) not in in_units), num_ops=ops[0],
        module_params=tuple(n for n in (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
                            if n),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        backward_macs=backward_macs[0] / batch, num_backward_ops=backward_ops[0],
        norm_act_elems=sum(norm_act.values()) / batch, norm_act_backward_elems=norm_act_backward[0] / batch)


def checkpoint_spec(measure: BackboneMeasure, checkpoint: Union[str, Dict[str, int], None]) -> Dict[str, int]:
    """engine.model.checkpoint as stage -> segments ("all": every block of every stage its own segment)."""
    if checkpoint == "all":
        return {s: len(blocks) for s, blocks in measure.units.items()}
    spec = dict(checkpoint or {})
    unknown = sorted(set(spec) - set(measure.units))
    if unknown:
        raise ValueError(f"engine.model.checkpoint: unknown stage(s) {unknown} for {measure.name}; stages are "
                         f"{list(measure.units)}")
    return spec


def profile_from(measure: BackboneMeasure, checkpoint: Union[str, Dict[str, int], None] = None) -> BackboneProfile:
    """The profile of `measure` under one checkpointing (arithmetic on the per-block measurement)."""
    spec = checkpoint_spec(measure, checkpoint)
    kept, peak_segment, recompute, segment_params, recompute_norm_act = 0.0, 0.0, 0.0, 0, 0.0
    held = {stage: [b.saved for b in blocks] for stage, blocks in measure.units.items()}
    for stage, num_segments in spec.items():
        blocks = measure.units[stage]
        kept -= sum(b.saved for b in blocks)
        for seg in parallel.segment_ranges(len(blocks), num_segments):
            kept += blocks[seg.start].input
            for i in seg:  # a segment keeps only its input until its backward recomputes the rest
                held[stage][i] = blocks[seg.start].input if i == seg.start else 0.0
            # the segment's first op saves its input too (BN or conv first): that storage is the kept input
            recomputed = sum(blocks[i].saved for i in seg) - blocks[seg.start].input
            peak_segment = max(peak_segment, recomputed)
            segment_params = max(segment_params, sum(blocks[i].params for i in seg))
        recompute += sum(b.macs for b in blocks if b.grad)
        recompute_norm_act += sum(b.norm_act for b in blocks if b.grad)
    all_blocks = [b for blocks in measure.units.values() for b in blocks]
    return BackboneProfile(
        name=measure.name, embedding_size=measure.embedding_size, num_params=measure.num_params,
        act_elems=measure.saved_total, ckpt_act_elems=measure.saved_total + kept + peak_segment,
        largest_elems=measure.largest_elems, macs=measure.macs_total, recompute_macs=recompute,
        largest_unit_params=max((b.params for b in all_blocks), default=0), largest_segment_params=segment_params,
        root_params=measure.root_params, num_units=len(all_blocks), num_ops=measure.num_ops,
        num_param_modules=len(measure.module_params),
        held=tuple((h, b.params) for stage, blocks in measure.units.items() for h, b in zip(held[stage], blocks)),
        trainable_params=measure.trainable_params, backward_macs=measure.backward_macs,
        num_backward_ops=measure.num_backward_ops, norm_act_elems=measure.norm_act_elems,
        norm_act_backward_elems=measure.norm_act_backward_elems, recompute_norm_act_elems=recompute_norm_act)


def profile_backbone(name: str, embedding_size: int = 512,
                     checkpoint: Union[str, Dict[str, int], None] = None,
                     freeze: Sequence[str] = ()) -> BackboneProfile:
    """Measure `name` once on the meta device (cached): parameters, saved activations, MACs per image."""
    return profile_from(measure_backbone(name, int(embedding_size), tuple(freeze)), checkpoint)


@dataclass
class Row:
    """One line of the table: `where` is "device", "host" (offloaded) or "info" (shown, not counted)."""

    name: str
    bytes: float
    where: str = "device"
    note: str = ""


@dataclass
class Plan:
    """The planner's answer for one rank. Byte totals are per rank; FLOPs per image; throughput global."""

    rows: List[Row]
    device: str
    world_size: int
    micro_batch: int
    num_classes: int
    mem_limit_bytes: float
    backbone: BackboneProfile
    num_sampled: int
    train_flops_per_image: float
    best_samples_per_sec: Optional[float] = None
    max_num_classes: Optional[int] = None
    max_micro_batch: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        """Bytes on the device (the number to compare with its memory)."""
        return sum(r.bytes for r in self.rows if r.where == "device")

    @property
    def host_bytes(self) -> float:
        return sum(r.bytes for r in self.rows if r.where == "host")

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.mem_limit_bytes

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows are {[r.name for r in self.rows]}")


def _precision_bytes(cfg: RunConfig) -> Dict[str, float]:
    """Bytes per element of parameters, gradients, the extra fp32 master, activations, autocast weight cache."""
    ds = cfg.deepspeed
    if ds.get("torch_autocast", {}).get("enabled"):  # fp32 parameters, 16-bit compute
        return dict(param=4, grad=4, master=0, act=2, cast_cache=2)
    if ds.get("fp16", {}).get("enabled") or ds.get("bf16", {}).get("enabled"):  # 16-bit params + fp32 master
        return dict(param=2, grad=2, master=4, act=2, cast_cache=0)
    return dict(param=4, grad=4, master=0, act=4, cast_cache=0)


def _head_setting(cfg: RunConfig, key: str, default, options=None):
    """engine.head.<key> when this engine version has it (chunk_size, offload, storage_dtype), else `default`."""
    value = getattr(cfg.engine.head, key, default)
    if options is not None and value not in options:
        raise ValueError(f"engine.head.{key}: expected one of {sorted(options)}, got {value!r}")
    return value


BACKENDS = ("deepspeed", "fsdp")
FSDP_DEFAULTS = {"reshard_after_forward": True, "hybrid": False, "cpu_offload": False}
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOCAL_WORLD_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")  # torchrun's, then DeepSpeed's launcher's


def backend_of(cfg: RunConfig) -> str:
    """engine.train.backend ("deepspeed" when this engine version has no such key)."""
    backend = getattr(cfg.engine.train, "backend", "deepspeed")
    if backend not in BACKENDS:
        raise ValueError(f"engine.train.backend: the planner knows {list(BACKENDS)}, got {backend!r}")
    return backend


def fsdp_settings(cfg: RunConfig) -> Dict[str, bool]:
    """engine.fsdp's reshard_after_forward / hybrid / cpu_offload; a key left null (or a config without the
    section) takes engine/parallel/fsdp_backend.py's default."""
    section, out = getattr(cfg.engine, "fsdp", None), {}
    for key, default in FSDP_DEFAULTS.items():
        value = section.get(key) if isinstance(section, dict) else getattr(section, key, None)
        out[key] = default if value is None else value
        if not isinstance(out[key], bool):
            raise ValueError(f"engine.fsdp.{key}: expected true or false, got {value!r}")
    return out


def _optimizer_state(cfg: RunConfig) -> Tuple[int, str]:
    """fp32 optimizer values per parameter and their name."""
    o = cfg.engine.optim
    return {"sgd": 1 if o.momentum > 0 else 0, "adamw": 2}[o.name], "SGD momentum" if o.name == "sgd" else "AdamW m+v"


def _deepspeed_rows(cfg: RunConfig, n: int, prof: BackboneProfile, pb: Dict[str, float]) -> Tuple[List[Row], float]:
    """The backbone under DeepSpeed ZeRO 0-3: its rows and its communication buffers (bytes, for the workspace)."""
    P, T, stage = prof.num_params, prof.trained, cfg.zero_stage
    zero = cfg.deepspeed.get("zero_optimization", {})
    state_per_param, opt_name = _optimizer_state(cfg)
    rows = [
        Row("backbone parameters", P * pb["param"] / (n if stage == 3 else 1),
            note=f"{P / 1e6:.1f} M x {pb['param']} B" + (f" / {n} (ZeRO-3)" if stage == 3 else "")),
        Row("backbone gradients", T * pb["grad"] / (n if stage >= 2 else 1),
            note=f"x {pb['grad']} B" + (f" / {n} (ZeRO-{stage})" if stage >= 2 else "") + prof.trained_note()),
    ]
    if stage >= 1:
        rows.append(Row("ZeRO fp32 partition + grad", 8 * T / n,
                        note=f"DeepSpeed's fp32 copy of this rank's 1/{n} and its gradient"))
    elif pb["master"]:
        rows.append(Row("fp32 master weights", T * pb["master"], note="16-bit DeepSpeed block"))
    rows.append(Row("backbone optimizer state", state_per_param * 4 * T / (n if stage >= 1 else 1),
                    note=f"{opt_name}, fp32" + (f" / {n}" if stage >= 1 else "")))
    if pb["cast_cache"] and stage < 3:
        rows.append(Row("autocast weight copies", P * pb["cast_cache"],
                        note="16-bit casts autograd saves for backward"))
    buckets = 0.0
    if stage in (1, 2):
        buckets = min(int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)), T) * pb["grad"]
    elif stage == 3:
        live = min(int(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS)), P)
        prefetch = min(int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)), P)
        buckets = (live + prefetch) * pb["param"] + min(int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
                                                        P) * pb["grad"]
    return rows, buckets


def _fsdp_rows(cfg: RunConfig, world: int, prof: BackboneProfile, device: str,
               ranks_per_node: Optional[int]) -> Tuple[List[Row], float]:
    """The backbone under FSDP2 (engine/parallel/fsdp_backend.py): one unit per block of `checkpoint_units()` plus the root.

    Sharded over the shard group (all ranks; with `hybrid` the ranks of one node, the shards replicated across
    nodes). Resident all step: the fp32 parameter shards, which are the optimizer's masters (no second fp32
    copy, unlike DeepSpeed's ZeRO partition), their fp32 gradient shards (reduced in fp32) and the optimizer
    state -- in host memory with `cpu_offload` on a GPU. While computing, FSDP all-gathers a unit's parameters
    in the compute dtype: with reshard_after_forward the root (kept from forward to backward) plus the running
    block and the one prefetched in backward (or a recomputed checkpoint segment's blocks, kept until their
    backward, plus one); without it every unit from the forward to its backward. Each unit's unsharded
    gradient lives until its reduce-scatter, next to an fp32 reduce-scatter input; with gradient accumulation,
    no-sync micro-batches keep every unit's unsharded gradient, in fp32.

    Also returns the gathered bytes the backward frees unit by unit (reshard_after_forward false: all but the
    root and one block), which `_rows` lets the arriving gradient shards reuse (see "backward frees").
    """
    fs, P, T, n = fsdp_settings(cfg), prof.num_params, prof.trained, world
    if fs["hybrid"]:
        n = ranks_per_node or next((int(os.environ[k]) for k in LOCAL_WORLD_ENV if os.environ.get(k)), world)
        if n < 1 or world % n:
            raise ValueError(f"ranks_per_node: expected a divisor of the world size {world} for engine.fsdp.hybrid, "
                             f"got {ranks_per_node!r}")
    c = COMPUTE_BYTES[cfg.precision]
    state_per_param, opt_name = _optimizer_state(cfg)
    where = "host" if fs["cpu_offload"] and device == "gpu" else "device"
    tag = " (offloaded)" if where == "host" else ""
    group = f"/ {n}" + (f" (hybrid: {n} per node, replicated x {world // n})" if fs["hybrid"] else "")
    rows = [
        Row("backbone parameters", 4 * P / n, where=where,
            note=f"fp32 shards, the optimizer's masters: {P / 1e6:.1f} M x 4 B {group}{tag}"),
        Row("backbone gradients", 4 * T / n, where=where,
            note=f"fp32 shards (reduced in fp32) {group}{tag}{prof.trained_note()}"),
        Row("backbone optimizer state", state_per_param * 4 * T / n, where=where,
            note=f"{opt_name}, fp32 {group}{tag}"),
    ]
    unit, root, seg = prof.largest_unit_params, prof.root_params, prof.largest_segment_params
    if fs["reshard_after_forward"]:
        gathered = root + max(2 * unit, seg + unit)
        how = f"root {root / 1e6:.1f} M + " + (f"2 x largest block {unit / 1e6:.1f} M (running + prefetched)"
                                                if unit >= seg else f"a recomputed segment {seg / 1e6:.1f} M + a block")
    else:
        gathered = P
        how = "every unit, forward to backward (reshard_after_forward false)"
    rows.append(Row("gathered parameters", gathered * c, note=f"{how}, x {c} B ({cfg.precision})"))
    freed_in_backward = 0.0 if fs["reshard_after_forward"] else (P - root - unit) * c
    if cfg.gradient_accumulation_steps > 1:
        rows.append(Row("unsharded gradients (no-sync)", 4 * T + unit * (c + 4 + 4 / n),
                        note="accumulated in fp32 over the micro-batches without reduce-scatter"))
    else:
        rows.append(Row("unsharded gradients", unit * (c + 4 + 4 / n),
                        note=f"largest block: its gradient ({c} B), fp32 reduce-scatter input and output"))
    if device == "gpu" and where == "device" and ((o := cfg.engine.optim).name == "adamw" or o.weight_decay > 0):
        # torch's optimizers take the foreach path for (DTensor) parameters on CUDA: SGD's weight decay adds
        # into a new list of gradients, AdamW divides by a new sqrt(v) list; on the CPU they loop per tensor.
        rows.append(Row("optimizer step temporaries", 4 * T / n,
                        note=f"foreach {'sqrt(v)' if o.name == 'adamw' else 'gradient + weight decay'}, one per "
                             f"shard, during the step"))
    return rows, freed_in_backward


def _backward_overlap(prof: BackboneProfile, act: float, activations: float, gathered_freed: float, grads: float,
                      temps: float) -> float:
    """Bytes FSDP's backward gives back to what it allocates, on the timeline of one backward.

    The backward runs the blocks last to first. When block i's backward is done, its gradient shard exists (and
    those of the later blocks and of the root, whose head layers run first) while the activations and, without
    reshard after forward, the gathered parameters of the blocks before i are still held; the step's
    temporaries come after all of it is freed. The peak is the largest of these moments, not the sum of both
    sides, and not the larger side either: a ResNet keeps most of its activations in its early, high-resolution
    blocks (freed last) and most of its parameters in its late ones (gradients first), so little is reused.
    Activations outside the blocks (the stem, the recomputed segment) count as held throughout.

    Args:
        act: bytes per saved element times the micro-batch; activations: all activation bytes of the rows.
        gathered_freed: gathered parameter bytes the backward frees block by block; grads: gradient shard bytes;
        temps: the optimizer step's temporaries.
    Returns:
        static total - peak (>= 0): what the "backward frees" row subtracts.
    """
    blocks = [(h * act, p) for h, p in prof.held]
    block_params = sum(p for _, p in blocks) or 1
    held = [a + gathered_freed * p / block_params for a, p in blocks]
    made = [grads * p / prof.num_params for _, p in blocks]
    outside = max(0.0, activations - sum(a for a, _ in blocks))
    live_held, live_made = sum(held), grads * prof.root_params / prof.num_params
    peak = outside + live_held + live_made
    for i in reversed(range(len(blocks))):
        live_held -= held[i]
        live_made += made[i]
        peak = max(peak, outside + live_held + live_made)
    peak = max(peak, grads + temps)
    return max(0.0, activations + gathered_freed + grads + temps - peak)


def _rows(cfg: RunConfig, world: int, micro: int, num_classes: int, device: str,
          prof: BackboneProfile, ranks_per_node: Optional[int] = None) -> Tuple[List[Row], int]:
    """Every row of the table for one (micro-batch, class count); also the sampled class count per rank."""
    pb, n, o = _precision_bytes(cfg), world, cfg.engine.optim
    state_per_param, opt_name = _optimizer_state(cfg)
    if fsdp := backend_of(cfg) == "fsdp":
        rows, freed_in_backward = _fsdp_rows(cfg, world, prof, device, ranks_per_node)
        pb = dict(pb, act=COMPUTE_BYTES[cfg.precision])  # FSDP computes in its param dtype (inputs cast to it)
        buckets = 0.0  # FSDP's all-gather outputs and reduce-scatter buffers are rows above
    else:
        rows, buckets = _deepspeed_rows(cfg, n, prof, pb)
    ckpt = cfg.engine.model.checkpoint
    act = micro * pb["act"]
    no_ckpt, with_ckpt = prof.act_elems * act, prof.ckpt_act_elems * act
    if ckpt:
        rows.append(Row("activations (checkpointed)", with_ckpt, note=f"{with_ckpt / micro / 2**20:.1f} MiB/image "
                        f"as configured; {no_ckpt / micro / 2**20:.1f} MiB/image without"))
        rows.append(Row("activations without checkpointing", no_ckpt, where="info", note="not counted"))
    else:
        rows.append(Row("activations", no_ckpt, note=f"{no_ckpt / micro / 2**20:.1f} MiB/image, no checkpointing"))
    if fsdp:
        # FSDP's gradient shards appear unit by unit during the backward (none exist before it: the previous
        # step's were dropped), while the backward frees each unit's activations and, without reshard after
        # forward, its gathered parameters: what the backward frees is reused by what it allocates, as far as the
        # order allows (`_backward_overlap`). The optimizer's temporaries come after the backward.
        grads = sum(r.bytes for r in rows if r.where == "device" and r.name == "backbone gradients")
        temps = sum(r.bytes for r in rows if r.where == "device" and r.name == "optimizer step temporaries")
        # On a CPU nothing is reused: glibc's malloc keeps the freed activations (many small heap blocks) for
        # small requests, while each gradient shard is a fresh mmap (measured: r2060, FSDP2 reshard, no
        # checkpointing, micro-batch 2, bf16: 6.50 GiB per rank, the rows' sum 6.31, with reuse 5.2).
        if grads + temps > 0 and device == "gpu":  # cpu_offload on a GPU: the gradient shards are on the host
            reused = _backward_overlap(prof, act, with_ckpt if ckpt else no_ckpt, freed_in_backward, grads, temps)
            rows.append(Row("backward frees", -reused,
                            note="gradient shards reuse what the backward has freed by the time they arrive "
                                 "(activations, gathered units; last block first), the step's temporaries all "
                                 "of it"))

    # Partial FC: this rank's shard (the largest one), sampled rows, logits.
    h = cfg.engine.head
    E = cfg.engine.model.embedding_size
    storage = _head_setting(cfg, "storage_dtype", "fp32", STORAGE_BYTES)
    offload = _head_setting(cfg, "offload", "none", {"none", "cpu"})
    chunk = int(_head_setting(cfg, "chunk_size", 0))
    where = "host" if offload == "cpu" and device == "gpu" else "device"
    num_local = -(-num_classes // n)
    global_batch = micro * n
    if h.sample_rate < 1.0:
        num_sampled = max(int(h.sample_rate * num_local), min(global_batch, num_local))
    else:
        num_sampled = num_local
    # Offloaded to a GPU's host: the weight and each optimizer-state table are pinned, and PyTorch's caching host
    # allocator rounds every pinned allocation up to a power of two (heads.class_store.pinned_host_bytes).
    pin_threshold = compat.pinned_round_threshold_bytes() if where == "host" else None
    pinned = (lambda b: pinned_host_bytes(b, pin_threshold)) if where == "host" else (lambda b: b)

    def pin_note(raw: float, held: float) -> str:
        return f"; pinned: {raw / GiB:.2f} GiB rounded up to {held / GiB:.2f} GiB" if held != raw else ""

    weight_raw = num_local * E * STORAGE_BYTES[storage]
    weight = pinned(int(weight_raw))
    rows.append(Row("head weights", weight, where=where,
                    note=f"{num_local:,} rows x {E} x {storage}" + (" (offloaded)" if where == "host" else "")
                    + pin_note(weight_raw, weight)))
    adam_steps = num_local * 8 if o.name == "adamw" else 0  # RowSparseAdamW's per-row int64 step count (unpinned)
    state_raw = state_per_param * num_local * E * 4
    state = state_per_param * pinned(num_local * E * 4) if state_per_param else 0
    rows.append(Row("head optimizer state", state + adam_steps, where=where,
                    note=f"{opt_name}, fp32, row-sparse updates" + pin_note(state_raw, state)))
    from heads.softmax import resolve_chunk_size  # the head's own rule (auto-chunking above a logits size)

    chunk = resolve_chunk_size(chunk, global_batch, num_sampled, "cuda" if device == "gpu" else "cpu")
    direct_rows = storage == "fp32" and offload == "none"  # heads.PartialFC: autograd writes .weight.grad itself
    accum = cfg.gradient_accumulation_steps
    if h.sample_rate < 1.0:
        row_copies = HEAD_ROW_COPIES["chunked" if chunk else "unchunked"]
        if accum > 1:  # each micro-batch samples its own rows: their gradients pile up until the step
            row_copies = max(row_copies + (accum - 1) * ROW_GRAD_HELD[direct_rows],
                             accum * ROW_GRAD_JOIN[direct_rows])
    else:  # the stored weight is used directly: its dense gradient, plus a normalised copy when unchunked
        row_copies = 1 if chunk else 2
    rows.append(Row("head sampled rows", int(row_copies * num_sampled * E * 4),
                    note=f"{num_sampled:,} rows used per step, {row_copies:g} fp32 working copies"
                    + (f" (gradients of {accum} micro-batches)" if accum > 1 and h.sample_rate < 1.0 else "")))
    if h.sample_rate < 1.0:
        rows.append(Row("head sampling", num_local * 4 + 2 * num_sampled * 8, note="scores + index"))
    cols = chunk or num_sampled
    rows.append(Row("head logits", HEAD_LOGIT_COPIES * global_batch * cols * 4,
                    note=f"[{global_batch} x {cols:,}] fp32" + (f" per chunk of {chunk:,}" if chunk else "")))

    # Workspace: activation gradients, the input batch, DeepSpeed's communication buckets.
    work = 2 * prof.largest_elems * act + 2 * micro * IMAGE_ELEMS * 4 + buckets
    rows.append(Row("workspace", work, note="activation grads, input batch"
                    + (", DeepSpeed buckets" if buckets else "")))
    if device == "cpu":
        rows.append(Row("runtime", CPU_RUNTIME_BYTES, note="Python/torch/DeepSpeed/gloo RSS, measured"))
    else:
        counted = sum(r.bytes for r in rows if r.where == "device")
        rows.append(Row("allocator slack", CUDA_ALLOCATOR_SLACK * counted, note="caching allocator rounding"))
        rows.append(Row("CUDA context", CUDA_CONTEXT_BYTES, note="outside max_memory_allocated"))
    return rows, num_sampled


def _largest(fits, lo: int, hi: int) -> Optional[int]:
    """Largest x in [lo, hi] with fits(x) (fits monotone decreasing); None when not even lo fits."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(cfg: RunConfig, world_size: int, *, num_classes: Optional[int] = None, micro_batch: Optional[int] = None,
         mem_gb: float = 80.0, device: str = "gpu", peak_tflops: Optional[float] = None,
         ranks_per_node: Optional[int] = None) -> Plan:
    """Per-rank memory table, headroom and best-case speed for `cfg` on `world_size` ranks.

    Args:
        cfg: the run config (engine.config.load).
        world_size: ranks (GPUs, or processes on CPU).
        num_classes: overrides engine.head.num_classes.
        micro_batch: overrides train_micro_batch_size_per_gpu.
        mem_gb: memory per rank to plan against (GPU size, or the share of host RAM on CPU), in GiB.
        device: "gpu" (adds CUDA context and allocator slack; offload moves the head to the host) or "cpu"
            (adds the measured runtime RSS; offload changes nothing, the host is the device).
        peak_tflops: the device's peak for the configured precision; gives the best-case samples/s.
        ranks_per_node: processes per node, the shard group of `engine.fsdp.hybrid` (default: the launcher's
            LOCAL_WORLD_SIZE / LOCAL_SIZE when set, as engine/parallel/fsdp_backend.py reads it, else one node of
            `world_size`); unused otherwise.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device: expected 'gpu' or 'cpu', got {device!r}")
    if not mem_gb > 0:
        raise ValueError(f"mem_gb: expected > 0, got {mem_gb!r}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ValueError(f"peak_tflops: expected > 0, got {peak_tflops!r}")
    if num_classes is None:  # left to the data: its property file, or the public set engine.data.path names
        from engine.config.dataset import num_classes_hint

        num_classes = num_classes_hint(cfg)
    micro = cfg.micro_batch_size if micro_batch is None else micro_batch
    if not (isinstance(num_classes, int) and num_classes >= world_size):
        raise ValueError(f"num_classes: expected an integer >= world size ({world_size}), got {num_classes!r}")
    if not (isinstance(micro, int) and micro >= 1):
        raise ValueError(f"micro_batch: expected an integer >= 1, got {micro!r}")
    m = cfg.engine.model
    prof = profile_backbone(m.name, m.embedding_size, m.checkpoint, m.freeze)
    limit = mem_gb * GiB
    rows, num_sampled = _rows(cfg, world_size, micro, num_classes, device, prof, ranks_per_node)

    def total(c: int, b: int) -> float:
        return sum(r.bytes for r in _rows(cfg, world_size, b, c, device, prof, ranks_per_node)[0]
                   if r.where == "device")

    max_classes = _largest(lambda c: total(c, micro) <= limit, world_size, 10 ** 12)
    max_micro = _largest(lambda b: total(num_classes, b) <= limit, 1, 1 << 20)

    E = m.embedding_size
    backbone_flops = 2 * (prof.train_macs + prof.recompute_macs)  # forward, backward, recomputation
    head_flops = 6 * world_size * num_sampled * E  # the global batch against this rank's sampled rows, per image
    train_flops = backbone_flops + head_flops
    sps = peak_tflops * 1e12 / train_flops * world_size if peak_tflops else None
    return Plan(rows=rows, device=device, world_size=world_size, micro_batch=micro, num_classes=num_classes,
                mem_limit_bytes=limit, backbone=prof, num_sampled=num_sampled, train_flops_per_image=train_flops,
                best_samples_per_sec=sps, max_num_classes=max_classes, max_micro_batch=max_micro)


def describe_backend(cfg: RunConfig) -> str:
    """"ZeRO-2", or "FSDP2 (reshard_after_forward, hybrid, cpu_offload)" with the settings that are on."""
    if backend_of(cfg) == "deepspeed":
        return f"ZeRO-{cfg.zero_stage}"
    on = [k for k, v in fsdp_settings(cfg).items() if v]
    return "FSDP2" + (f" ({', '.join(on)})" if on else " (no reshard after forward)")


def format_plan(p: Plan, cfg: RunConfig) -> str:
    """The table as text: one row per component, totals, headroom, FLOPs and best-case speed."""
    b = p.backbone
    out = [f"ArcScale plan: {b.name} (emb {b.embedding_size}, {b.num_params / 1e6:.1f} M params), "
           f"{p.num_classes:,} classes, world {p.world_size}, micro-batch {p.micro_batch}, "
           f"{describe_backend(cfg)}, {cfg.precision}, {cfg.engine.optim.name}, device {p.device}",
           f"{'component':<36}{'GiB/rank':>10}  note", "-" * 100]
    for r in p.rows:
        tag = {"device": "", "host": " [host]", "info": " [not counted]"}[r.where]
        out.append(f"{r.name + tag:<36}{r.bytes / GiB:>10.3f}  {r.note}")
    out.append("-" * 100)
    verdict = "fits" if p.fits else "DOES NOT FIT"
    out.append(f"{'total on device':<36}{p.total_bytes / GiB:>10.3f}  of {p.mem_limit_bytes / GiB:.1f} GiB: {verdict}")
    if p.host_bytes:
        out.append(f"{'total on host':<36}{p.host_bytes / GiB:>10.3f}")
    out.append(f"largest class count that fits: {p.max_num_classes:,}" if p.max_num_classes else
               "largest class count that fits: none (the backbone alone does not fit)")
    out.append(f"largest micro-batch that fits: {p.max_micro_batch}" if p.max_micro_batch else
               "largest micro-batch that fits: none")
    out.append(f"FLOPs per image: forward {2 * b.macs / 1e9:.2f} GFLOP ({b.macs / 1e9:.2f} GMACs); training "
               f"{p.train_flops_per_image / 1e9:.2f} GFLOP (forward, backward{' of the trained part' if b.trained < b.num_params else ''}, "
               "recomputation, head)")
    if p.best_samples_per_sec:
        out.append(f"best-case throughput: {p.best_samples_per_sec:,.0f} samples/s over {p.world_size} ranks "
                   "(peak FLOP/s, no communication or data stalls)")
    return "\n".join(out)
