"""Free functions that turn a RunConfig into the Trainer's parts, and the Trainer itself.

This is the one place that knows which class implements what: the backbone's backend (DeepSpeed or FSDP2,
`engine.train.backend`), the Partial FC head and its row-sparse optimizer, the data source and the hooks.
Tests and tools that need other parts (a loader of known latency, a fake backbone) build a Trainer from
ready parts instead; nothing patches a half-built Trainer.

Order of `build_trainer` is chosen so that cheap failures come first: the data source is opened (an index
read, a folder listed, a few image headers checked) and the `engine.model.init_from` file checked against the
backbone's shapes on the meta device, and verification files are loaded, all before the model is built (a
missing .bin, a wrong image size or a wrong weights file stops a 1.1 B-parameter job in seconds, not after
minutes of building). The data goes first for another reason too: without `engine.head.num_classes` the head
is sized by the dataset's class count.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

import heads
from engine.config.schema import RunConfig
from engine.parallel.backend import ParallelBackbone
from engine.perf import hardware
from engine.runtime import dist
from engine.runtime import log as run_log
from engine.train import trackers
from engine.train.hooks import (
    Hook,
    LoggerHook,
    ProfilerHook,
    SummaryHook,
    VerificationHook,
    resolve_bin_path,
)
from engine.train.saving import BestModelHook, CheckpointHook
from engine.train.trainer import Trainer

log = run_log.get_logger(__name__)


def build_backbone(cfg: RunConfig, device: torch.device) -> ParallelBackbone:
    """The data-parallel backbone with its optimizer, on the backend `engine.train.backend` names."""
    backend = cfg.engine.train.backend
    if backend == "deepspeed":
        from engine.parallel.deepspeed_backend import build_deepspeed_backbone

        return build_deepspeed_backbone(cfg, device, dist.get_world_size())
    if backend == "fsdp":
        from engine.parallel.fsdp_backend import build_fsdp_backbone_from_config

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
    """This rank's iterator of (images, labels) micro-batches for `engine.data`.

    A dataset is opened, not read: its index or folder listing, and the headers of up to 64 images spread over
    it, whose sizes rank 0 reports with the counts (see `check_image_sizes`). Its class count must equal
    `engine.head.num_classes` when that is set (a larger head only with `engine.head.allow_unused_classes`).
    """
    d = cfg.engine.data
    rank, world = dist.get_rank(), dist.get_world_size()
    if d.source != "synthetic":
        from dali_pipes.loader import build_loader

        h = cfg.engine.head
        loader = build_loader(d.source, d.path, batch_size=cfg.micro_batch_size, rank=rank, world_size=world,
                              device=device, seed=cfg.engine.train.seed, num_workers=d.num_workers, dali=d.dali,
                              augment=d.augment, on_corrupt=d.on_corrupt, resize=d.resize,
                              num_classes=h.num_classes if h.allow_unused_classes else None)
        try:
            check_class_count(loader.source, h)
            check_image_sizes(loader, d.resize, given_classes=h.num_classes)
        except BaseException:
            loader.close()
            raise
        return loader
    from dali_pipes.synthetic import SlotIterator, SyntheticSource

    source = SyntheticSource(cfg.micro_batch_size, cfg.engine.head.num_classes, device, seed=cfg.engine.train.seed,
                             mode=d.synthetic)
    return SlotIterator(source, rank, world, cfg.gradient_accumulation_steps)


def check_class_count(source: Any, head) -> None:
    """`engine.head.num_classes`, when set, must be the dataset's class count: a larger head would train classes no
    image has (silently, as negatives only), unless `engine.head.allow_unused_classes` says that is the point."""
    given, found = head.num_classes, int(source.num_classes)
    if given is None or given == found or (given > found and head.allow_unused_classes):
        return
    hint = ("; a larger head on purpose (a scale test): engine.head.allow_unused_classes=true"
            if given > found else "")
    raise ValueError(f"{source.describe()} has {found:,} classes but engine.head.num_classes={given:,}; set it to "
                     f"{found}, or leave it out to take the dataset's count{hint}")


def check_image_sizes(loader: Any, resize: str, *, given_classes: Optional[int] = None,
                      num_samples: int = 64) -> None:
    """Read the headers of up to `num_samples` images spread over the dataset; log what the run found
    (images, identities, image sizes). With `resize` "none", an image that is not 112x112 is a ValueError naming
    its file, raised on every rank alike (each samples the same images) before any model is built; the loader
    checks every image again as it reads it."""
    from dali_pipes.augment import IMAGE_SIZE, size_error
    from dali_pipes.source import sample_image_sizes

    source = loader.source
    sizes = sample_image_sizes(source, num_samples)
    if resize == "none":
        for (width, height), indices in sorted(sizes.items()):
            if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{source.where(indices[0])}: {size_error(width, height)}")
    counted = sum(len(v) for v in sizes.values())
    found = ", ".join(f"{w}x{h}" + (f" ({len(v)})" if len(sizes) > 1 else "")
                      for (w, h), v in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
    kind = "identity folders" if source.kind == "folder" else "classes"
    note = "" if given_classes is not None else " (engine.head.num_classes taken from the data)"
    log.info(f"data: {source.describe()}: {loader.num_images:,} images, {source.num_classes:,} {kind}{note}; image "
             f"sizes {found or '?'} in {counted} sampled{'' if resize == 'none' else f', resize {resize}'}; "
             f"{loader.backend} loader")


def with_data_classes(cfg: RunConfig, data: Any) -> RunConfig:
    """`cfg` with `engine.head.num_classes` filled in from the data when the config leaves it out.

    A copy: the caller's config is not changed. The trainer and everything after it (head, checkpoints, the
    resolved config.json, summary.json) see the count the run trains with.
    """
    h = cfg.engine.head
    if h.num_classes is not None:
        return cfg
    found = getattr(data, "num_classes", None)
    if found is None:
        raise ValueError("engine.head.num_classes: not set, and the data source does not report a class count; "
                         "set engine.head.num_classes")
    head = dataclasses.replace(h, num_classes=int(found))
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, head=head))


def build_eval_hook(cfg: RunConfig, logger: Optional[LoggerHook]) -> Optional[VerificationHook]:
    """The verification hook for `engine.eval.bins` and the `engine.eval.targets` found beside the training data
    (None when there are none). Loads and checks every .bin; a target that is not there is named in one line and
    skipped (as arcface_torch skips a val_target it does not find)."""
    from engine.config import dataset

    ev, d = cfg.engine.eval, cfg.engine.data
    targets, missing = dataset.resolve_targets(cfg)
    for name in missing:
        log.warning(f"engine.eval.targets: {name}.bin not found in {dataset.target_folder(cfg)}: {name} is not "
                    f"evaluated (insightface's {name}.bin belongs beside train.rec)", once=True)
    paths = [resolve_bin_path(entry, d.source, d.path) for entry in ev.bins]
    paths += [t for t in targets if t not in paths]
    if not paths:
        return None
    return VerificationHook(paths, every=ev.every, batch_size=ev.batch_size, logger=logger, at_start=ev.at_start,
                            resize=d.resize)


def build_hooks(cfg: RunConfig, extra: Optional[List[Hook]] = None) -> List[Hook]:
    """Logging, verification, best-model, summary and checkpoint hooks in the order they must run, then `extra`.

    The verification hook runs before the summary hook so the final evaluation is in summary.json, and before
    the best-model hook, which exports the model it found best (engine/train/saving.py).
    """
    e = cfg.engine
    output_dir = Path(e.train.output_dir)
    logger = LoggerHook(e.train.log_every, output_dir, tensorboard=e.train.tensorboard,
                        trackers=lambda: trackers.build_trackers(e.train, output_dir, cfg.to_dict()))
    evaluation = build_eval_hook(cfg, logger)
    c = e.checkpoint
    best = [BestModelHook(evaluation, output_dir)] if evaluation and c.export else []
    return ([logger] + ([evaluation] if evaluation else []) + best + [SummaryHook(output_dir, logger),
            CheckpointHook(c.every, c.keep, c.export, every_minutes=c.every_minutes)] + list(extra or []))


def warn_about_precision(cfg: RunConfig, device: torch.device) -> None:
    """Once for the job: bf16 autocast on a CPU without native bf16 is many times slower than fp32."""
    if dist.get_rank() == 0:  # the warning measures a matmul: only the rank that says it
        message = hardware.bf16_cpu_warning(cfg.precision, device)
        if message:
            log.warning(message, once=True)


def build_trainer(cfg: RunConfig, *, hooks: Optional[List[Hook]] = None, data: Any = None,
                  timer: Any = None, write_run_log: bool = False) -> Trainer:
    """The Trainer for `cfg`: resumed from a checkpoint when `engine.checkpoint.resume` finds one, else started
    from `engine.model.init_from` / `engine.head.init_from` when set (engine/state/pretrained.py).

    Call `engine.runtime.dist.init()` first (run.py does). `hooks` run after the built-in ones; `data` replaces the
    configured source (tests: a loader of known latency). `timer` marks the phases of each step (see
    engine.train.trainer.NullPhaseTimer); with `engine.profile.enabled` and no timer, an engine.perf.profiler.Profiler. A
    timer's own `hooks` (the profiler's) run last. Without `engine.head.num_classes` the trainer's config
    (`trainer.cfg`) carries the data's class count.

    The output directory is claimed first (engine.state.rundir: lock, no other run's checkpoints) and the run
    is accepted once a resumed checkpoint has passed its identity check; only then is anything of the run
    written there: config.json and, with `write_run_log` (the job lifecycle, `run_job`), the log file, which
    starts with the messages held since the job began (engine.runtime.log).
    """
    from engine.state import checkpoint, pretrained, rundir

    run_dir = rundir.claim(cfg)  # before any write: output_dir locked, the same on every node, not another run's
    device = dist.get_device()
    warn_about_precision(cfg, device)
    if data is None:
        data = build_data(cfg, device)  # first, and cheap: its class count sizes the head
    cfg = with_data_classes(cfg, data)
    m = cfg.engine.model
    resuming = checkpoint.resolve_resume(cfg.engine.checkpoint.resume, cfg.engine.train.output_dir)
    model_init = None
    if resuming is not None:
        pretrained.say_resume_wins(resuming, m.init_from, cfg.engine.head.init_from)
    elif m.init_from:  # checked against the backbone's shapes before it is built
        model_init = pretrained.plan_backbone_init(m.init_from, m.name, m.embedding_size, strict=m.init_strict)
    if timer is None and cfg.engine.profile.enabled:
        from engine.perf.profiler import Profiler

        timer = Profiler(cfg)
    extra = list(hooks or []) + ([ProfilerHook(timer)] if hasattr(timer, "end_of_step_hooks") else [])
    all_hooks = build_hooks(cfg, extra)  # before the model: a missing or corrupt .bin stops the run in seconds
    backbone = build_backbone(cfg, device)
    if model_init is not None:
        pretrained.load_backbone_init(backbone, model_init)
        del model_init
    head = build_head(cfg, device)
    head_optimizer = build_head_optimizer(cfg, head)
    trainer = Trainer(cfg, backbone=backbone, head=head, head_optimizer=head_optimizer, data=data, hooks=all_hooks,
                      timer=timer, run_dir=run_dir)
    if resuming is None and cfg.engine.head.init_from:
        pretrained.load_head_init(trainer, cfg.engine.head.init_from)
    checkpoint.resume(trainer)  # refuses another run's checkpoint: nothing of this run is written before it
    if write_run_log:
        run_log.attach_run_log(trainer.output_dir)
    if dist.get_rank() == 0:
        cfg.dump(trainer.output_dir / "config.json")
    return trainer


def run_job(cfg: RunConfig, *, make_timer: Optional[Callable[[RunConfig], Any]] = None) -> int:
    """This rank's whole job for a checked config: stop handlers, process group, trainer, training, close.

    Any exception on any rank ends the whole job at once with that rank's message (engine.runtime.dist.fail_fast),
    never in a barrier. `make_timer(cfg)`, called once the process group is up, gives the trainer's phase timer
    (engine.profile's profiler). Returns the exit status: 0 finished, 3 (engine.runtime.faults.EXIT_PREEMPTED) stopped by
    SIGTERM/SIGINT or a dead launcher after writing a checkpoint of the step every rank stopped at.
    """
    from engine.config import CONFIG_ERROR_EXIT, ConfigError, dataset
    from engine.config.schema import check_device
    from engine.runtime import faults

    try:  # the last config checks: what the config asks of this machine's device and disk, before the process group
        check_device(cfg, dist.get_device().type)
        dataset.check_present(cfg)  # a missing dataset folder: one line, before anything heavy
        if cfg.engine.auto:  # some setting fits this device's memory (engine/train/auto.py)
            from engine.train import auto

            auto.check_fits(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT
    except ValueError as exc:  # the launch, not the config: e.g. LOCAL_RANK past the visible GPUs (dist.get_device)
        print(f"[rank {dist.get_rank()}] error: {exc}", file=sys.stderr, flush=True)
        return 1
    run_log.hold_run_log()  # this job's messages, for train.log once the run is accepted
    faults.enable_crash_stacks()  # a rank killed by SIGSEGV/SIGABRT prints its Python stacks
    handlers = faults.install_stop_handlers()  # a signal asks for a checkpoint at the next step boundary
    watch = faults.LauncherWatch().start()  # DeepSpeed's one-node runner dies on SIGTERM without telling ranks
    owns_group = not dist.is_initialized()
    try:
        device = dist.init(timeout_s=cfg.engine.train.dist_timeout_s)
        log.info(f"job: {' '.join(sys.argv)} ({dist.get_world_size()} rank(s), {device.type})")
        hooks = []
        if cfg.engine.auto:  # measured on this job's ranks, rank 0's choice applied on every rank
            cfg, record = auto.choose(cfg, device)
            hooks.append(record)
        trainer = build_trainer(cfg, hooks=hooks, timer=make_timer(cfg) if make_timer else None, write_run_log=True)
        trainer.train()
        trainer.close()
    except BaseException as exc:  # noqa: BLE001 - every failure ends every rank, with its message
        dist.fail_fast(exc)
    status = faults.EXIT_PREEMPTED if trainer.stopped_early else 0
    faults.exit_on_signal(status)  # the work is saved; a signal from here on ends the teardown with this status
    watch.stop()
    run_log.detach_run_log()
    if owns_group:
        dist.destroy()
    faults.restore_handlers(handlers)
    return status

