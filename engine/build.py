"""Free functions that turn a RunConfig into the Trainer's parts, and the Trainer itself.

This is the one place that knows which class implements what: the backbone's backend (DeepSpeed or FSDP2,
`engine.train.backend`), the Partial FC head and its row-sparse optimizer, the data source and the hooks.
Tests and tools that need other parts (a loader of known latency, a fake backbone) build a Trainer from
ready parts instead; nothing patches a half-built Trainer.

Order of `build_trainer` is chosen so that cheap failures come first: verification files are checked before
the model is built (a missing .bin stops a 1.1 B-parameter job in seconds, not after minutes of building).
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional

import torch

import heads
from engine import dist, hardware
from engine.backend import ParallelBackbone
from engine.config import RunConfig
from engine.hooks import Hook, LoggerHook, SummaryHook, VerificationHook, resolve_bin_path
from engine.trainer import Trainer


def build_backbone(cfg: RunConfig, device: torch.device) -> ParallelBackbone:
    """The data-parallel backbone with its optimizer, on the backend `engine.train.backend` names."""
    backend = cfg.engine.train.backend
    if backend == "deepspeed":
        from engine.ds_backend import build_deepspeed_backbone

        return build_deepspeed_backbone(cfg, device, dist.get_world_size())
    if backend == "fsdp":
        from engine.fsdp_backend import build_fsdp_backbone_from_config

        return build_fsdp_backbone_from_config(cfg, device)
    raise ValueError(f"engine.train.backend: expected 'deepspeed' or 'fsdp', got {backend!r}")


def build_head(cfg: RunConfig, device: torch.device) -> heads.PartialFC:
    """This rank's Partial FC shard with its margin (model-parallel over the default process group)."""
    h = cfg.engine.head
    margin = heads.CombinedMarginLoss(h.scale, *h.margin, interclass_filtering_threshold=h.interclass_filtering_threshold,
                                      margin_grad=h.margin_grad)
    return heads.PartialFC(margin, cfg.engine.model.embedding_size, h.num_classes, h.sample_rate, device=device,
                           seed=cfg.engine.train.seed, chunk_size=h.chunk_size, offload=h.offload,
                           storage_dtype=h.storage_dtype)


def build_head_optimizer(cfg: RunConfig, head: heads.PartialFC) -> torch.optim.Optimizer:
    """The head's row-sparse optimizer: the same choice and settings as the backbone's, LR times lr_scale."""
    o = cfg.engine.optim
    return heads.build_head_optimizer(o.name, [head.weight], lr=o.lr * cfg.engine.head.lr_scale,
                                      momentum=o.momentum, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                      eps=o.eps)


def build_data(cfg: RunConfig, device: torch.device) -> Any:
    """This rank's iterator of (images, labels) micro-batches for `engine.data`."""
    d = cfg.engine.data
    rank, world = dist.get_rank(), dist.get_world_size()
    if d.source != "synthetic":
        from dali_pipes.loader import build_loader

        return build_loader(d.source, d.path, batch_size=cfg.micro_batch_size, rank=rank, world_size=world,
                            device=device, seed=cfg.engine.train.seed, num_workers=d.num_workers, dali=d.dali,
                            augment=d.augment, on_corrupt=d.on_corrupt, num_classes=cfg.engine.head.num_classes)
    from dali_pipes.synthetic import SlotIterator, SyntheticSource

    source = SyntheticSource(cfg.micro_batch_size, cfg.engine.head.num_classes, device, seed=cfg.engine.train.seed,
                             mode=d.synthetic)
    return SlotIterator(source, rank, world, cfg.gradient_accumulation_steps)


def build_eval_hook(cfg: RunConfig, logger: Optional[LoggerHook]) -> Optional[VerificationHook]:
    """The verification hook for `engine.eval.bins` (None when there are none). Loads and checks every .bin."""
    ev, d = cfg.engine.eval, cfg.engine.data
    if not ev.bins:
        return None
    paths = [resolve_bin_path(entry, d.source, d.path) for entry in ev.bins]
    return VerificationHook(paths, every=ev.every, batch_size=ev.batch_size, logger=logger, at_start=ev.at_start)


def build_hooks(cfg: RunConfig, extra: Optional[List[Hook]] = None) -> List[Hook]:
    """Logging, verification, summary and checkpoint hooks in the order they must run, then `extra`.

    The verification hook runs before the summary hook so the final evaluation is in summary.json.
    """
    from pathlib import Path

    from engine import checkpoint

    e = cfg.engine
    output_dir = Path(e.train.output_dir)
    logger = LoggerHook(e.train.log_every, output_dir, tensorboard=e.train.tensorboard)
    evaluation = build_eval_hook(cfg, logger)
    c = e.checkpoint
    return ([logger] + ([evaluation] if evaluation else []) + [SummaryHook(output_dir, logger),
            checkpoint.CheckpointHook(c.every, c.keep, c.export)] + list(extra or []))


def warn_about_precision(cfg: RunConfig, device: torch.device) -> None:
    """Rank 0, once: bf16 autocast on a CPU without native bf16 is many times slower than fp32."""
    if dist.get_rank() == 0:
        message = hardware.bf16_cpu_warning(cfg.precision, device)
        if message:
            print(message, file=sys.stderr, flush=True)


def build_trainer(cfg: RunConfig, *, hooks: Optional[List[Hook]] = None, data: Any = None,
                  timer: Any = None) -> Trainer:
    """The Trainer for `cfg`, resumed from a checkpoint when `engine.checkpoint.resume` says so.

    Call `engine.dist.init()` first (run.py does). `hooks` run after the built-in ones; `data` replaces the
    configured source (tests: a loader of known latency). `timer` marks the phases of each step (see
    engine.trainer.NullPhaseTimer); with `engine.profile.enabled` and no timer, an engine.profiler.Profiler. A
    timer's own `hooks` (the profiler's) run last.
    """
    from engine import rundir

    run_dir = rundir.claim(cfg)  # before any write: output_dir locked, the same on every node, not another run's
    device = dist.get_device()
    warn_about_precision(cfg, device)
    if timer is None and cfg.engine.profile.enabled:
        from engine.profiler import Profiler

        timer = Profiler(cfg)
    extra = list(hooks or []) + list(getattr(timer, "hooks", []))
    all_hooks = build_hooks(cfg, extra)  # before the model: a missing or corrupt .bin stops the run in seconds
    backbone = build_backbone(cfg, device)
    head = build_head(cfg, device)
    head_optimizer = build_head_optimizer(cfg, head)
    if data is None:
        data = build_data(cfg, device)
    trainer = Trainer(cfg, backbone=backbone, head=head, head_optimizer=head_optimizer, data=data, hooks=all_hooks,
                      timer=timer, run_dir=run_dir)
    if dist.get_rank() == 0:
        cfg.dump(trainer.output_dir / "config.json")
    from engine import checkpoint

    checkpoint.resume(trainer)
    return trainer
