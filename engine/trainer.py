"""The Trainer: builds model, head, optimizers and data from a RunConfig, and runs optimizer steps.

The backbone is data-parallel (DeepSpeed engine); the Partial FC head is model-parallel and stays outside
DeepSpeed with its own row-sparse optimizer (DESIGN.md §2). One LR schedule drives both, stepping once per
optimizer step. Logging, summaries and other side work are hooks (engine/hooks.py).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import heads
from engine import checkpoint, dist, parallel
from engine.config import RunConfig
from engine.hooks import Hook, LoggerHook, SummaryHook, VerificationHook, resolve_bin_path


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str, power: float = 2.0,
              milestones: Optional[List[int]] = None, gamma: float = 0.1) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Warm-up is linear from 0 (arcface_torch's PolyScheduler: step t < warmup uses t / warmup); then poly
    (1 - progress) ** power, cosine, step decay at `milestones`, or constant.
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(1 for m in (milestones or []) if step >= m)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"engine.optim.schedule: unknown schedule {schedule!r}")


class Trainer:
    """Train a backbone with a Partial FC head as configured by `cfg`.

    Call `engine.dist.init()` first (run.py does); the trainer uses the default process group.
    """

    def __init__(self, cfg: RunConfig, hooks: Optional[List[Hook]] = None, data: Any = None):
        self.cfg = cfg
        self.device = dist.get_device()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        e = cfg.engine
        self.max_steps = e.train.max_steps
        self.output_dir = Path(e.train.output_dir)
        self.step = 0  # optimizer steps done
        self.data_wait_s = 0.0  # seconds this rank's training loop spent blocked on the loader
        self.epoch = 0
        self.current_lr = 0.0
        self.global_batch_size = cfg.global_batch_size(self.world_size)
        self.ds_config = parallel.deepspeed_config_for_engine(cfg.deepspeed, self.world_size)
        logger = LoggerHook(e.train.log_every, self.output_dir, tensorboard=e.train.tensorboard)
        # Before the model: a missing or corrupt .bin stops the run in seconds, not after a giant model is built.
        self.eval_hook = self.build_eval_hook(logger)
        with parallel.freed_host_memory_returned(lean_after=cfg.zero_stage == 3 and self.device.type == "cpu"):
            self.model_engine = self.build_backbone()
        self.head = self.build_head()
        self.head_optimizer = self.build_head_optimizer()
        self.data = data if data is not None else self.build_data()
        # The eval hook runs before the summary hook so the final evaluation is in summary.json.
        self.hooks: List[Hook] = ([logger] + ([self.eval_hook] if self.eval_hook else [])
                                  + [SummaryHook(self.output_dir, logger)] + list(hooks or []))
        if self.rank == 0:
            cfg.dump(self.output_dir / "config.json")
        c = e.checkpoint
        self.hooks.insert(len(self.hooks) - len(hooks or []), checkpoint.CheckpointHook(c.every, c.keep, c.export))
        self.resumed_from = checkpoint.resolve_resume(c.resume, self.output_dir)
        if self.resumed_from is not None:
            checkpoint.load(self, self.resumed_from)  # any world size / ZeRO stage; continues at its step

    # -- building ------------------------------------------------------------------------------------------

    def build_backbone(self):
        e = self.cfg.engine
        model = parallel.build_model(
            e.model.name, embedding_size=e.model.embedding_size, dropout=e.model.dropout,
            zero_stage=self.cfg.zero_stage, ds_config=self.ds_config, device=self.device, seed=e.train.seed)
        # channels_last: only the input images are converted (train_step). Converting the parameters would
        # break DeepSpeed, which views each parameter as bytes to broadcast it ("stride(-1) must be 1") and,
        # under ZeRO-1/2, keeps them as views into its flat buffers; a channels_last input alone makes the
        # convolutions run channels_last (PyTorch follows the input's memory format).
        use_ds_ckpt = "activation_checkpointing" in self.ds_config
        if use_ds_ckpt and e.model.checkpoint:
            parallel.configure_deepspeed_checkpointing(self.ds_config, self.device)
        parallel.apply_activation_checkpointing(model, e.model.checkpoint, use_deepspeed=use_ds_ckpt)
        o = e.optim
        groups = parallel.backbone_param_groups(model, o.weight_decay)
        if o.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay)
        return parallel.wrap_deepspeed(model, optimizer, self.ds_config)

    def build_head(self) -> torch.nn.Module:
        h = self.cfg.engine.head
        margin = heads.CombinedMarginLoss(h.scale, *h.margin, interclass_filtering_threshold=h.interclass_filtering_threshold,
                                          margin_grad=h.margin_grad)
        return heads.PartialFC(margin, self.cfg.engine.model.embedding_size, h.num_classes, h.sample_rate,
                               device=self.device, seed=self.cfg.engine.train.seed, chunk_size=h.chunk_size,
                               offload=h.offload, storage_dtype=h.storage_dtype)

    def build_head_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.engine.optim
        return heads.build_head_optimizer(o.name, [self.head.weight], lr=o.lr * self.cfg.engine.head.lr_scale,
                                          momentum=o.momentum, weight_decay=o.weight_decay,
                                          betas=tuple(o.betas), eps=o.eps)

    def build_eval_hook(self, logger: LoggerHook) -> Optional[VerificationHook]:
        """The verification hook for `engine.eval.bins` (None when there are none)."""
        ev, d = self.cfg.engine.eval, self.cfg.engine.data
        if not ev.bins:
            return None
        paths = [resolve_bin_path(entry, d.source, d.path) for entry in ev.bins]
        return VerificationHook(paths, every=ev.every, batch_size=ev.batch_size, logger=logger,
                                at_start=ev.at_start)

    def build_data(self):
        d = self.cfg.engine.data
        if d.source != "synthetic":
            from dali_pipes.loader import build_loader

            return build_loader(d.source, d.path, batch_size=self.cfg.micro_batch_size, rank=self.rank,
                                world_size=self.world_size, device=self.device, seed=self.cfg.engine.train.seed,
                                num_workers=d.num_workers, dali=d.dali, augment=d.augment,
                                on_corrupt=d.on_corrupt, num_classes=self.cfg.engine.head.num_classes)
        from dali_pipes.synthetic import SlotIterator, SyntheticSource

        source = SyntheticSource(self.cfg.micro_batch_size, self.cfg.engine.head.num_classes, self.device,
                                 seed=self.cfg.engine.train.seed, mode=d.synthetic)
        return SlotIterator(source, self.rank, self.world_size, self.cfg.gradient_accumulation_steps)

    # -- training ------------------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        o = self.cfg.engine.optim
        factor = lr_factor(self.step, max_steps=self.max_steps, warmup_steps=o.warmup_steps, schedule=o.schedule,
                           power=o.poly_power, milestones=o.step_milestones, gamma=o.step_gamma)
        self.current_lr = o.lr * factor
        for group in self.model_engine.optimizer.param_groups:
            group["lr"] = self.current_lr
        for group in self.head_optimizer.param_groups:
            group["lr"] = self.current_lr * self.cfg.engine.head.lr_scale

    def _loss_scale(self) -> float:
        """The loss scale DeepSpeed applied in this step's backward (1.0 unless fp16)."""
        opt = self.model_engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(opt, attr, None)
            if isinstance(value, (int, float)) or torch.is_tensor(value):
                return float(value)
        return 1.0

    def train_step(self) -> torch.Tensor:
        """One optimizer step: `gradient_accumulation_steps` micro-batches, then backbone and head steps.

        Returns the step's loss (mean over the global batch of all micro-batches), a device tensor.
        """
        engine = self.model_engine
        self._set_lr()
        total = torch.zeros((), device=self.device)
        num_micro = self.cfg.gradient_accumulation_steps
        for _ in range(num_micro):
            t_wait = time.perf_counter()
            images, labels = next(self.data)
            self.data_wait_s += time.perf_counter() - t_wait
            if self.cfg.engine.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.cfg.engine.head.offload != "none":
                self.head.prefetch(labels)  # host->device copy of the sampled rows overlaps the backbone
            embeddings = engine(images)
            loss = self.head(embeddings.float(), labels)
            engine.backward(loss)  # divides by the accumulation steps; the head's grads get the same scaling
            total += loss.detach()
            if engine.is_gradient_accumulation_boundary():
                scale = self._loss_scale()
                engine.step()
                self._head_step(scale)
            else:
                engine.step()  # DeepSpeed counts the micro-step; no update happens here
        self.step += 1
        return total / num_micro

    def _head_step(self, loss_scale: float) -> None:
        """Update the head with the same loss scale as the backbone; skip it when the backbone skipped."""
        overflow = bool(getattr(self.model_engine.optimizer, "overflow", False))
        if not overflow and loss_scale != 1.0:  # .grad or .sampled_grad, dense or sparse: O(rows present)
            heads.scale_head_grad_(self.head.weight, 1.0 / loss_scale)
        if not overflow:
            self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        if hasattr(self.data, "epoch"):
            self.epoch = self.data.epoch
        for hook in self.hooks:
            hook.on_train_start(self)
        self.model_engine.train()
        self.head.train()
        while self.step < self.max_steps:
            loss = self.train_step()
            self.epoch = getattr(self.data, "epoch", 0)
            for hook in self.hooks:
                hook.on_step_end(self, self.step, loss)
        for hook in self.hooks:
            hook.on_train_end(self)

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Full backbone weights (gathered on every rank) and this rank's head shard with its class range."""
        return {
            "backbone": parallel.full_state_dict(self.model_engine),
            "head": {"weight": self.head.weight.detach().cpu().clone(), "class_start": self.head.class_start,
                     "num_local": self.head.num_local, "num_classes": self.head.num_classes},
            "step": self.step,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict()` returned: backbone weights, this rank's head shard, step, loader position.

        The loader continues at the saved batch, so the batches after a restore are the ones the saved run
        would have drawn next. Optimizer state (momentum, Adam moments) is not part of this dict; restoring it
        is engine.checkpoint's business. Every rank calls this (ZeRO-3 gathers parameters collectively).
        """
        if state.get("backbone") is not None:
            parallel.load_full_state_dict(self.model_engine, state["backbone"])
        head = state.get("head")
        if head is not None:
            mine = (self.head.class_start, self.head.num_local, self.head.num_classes)
            saved = (head["class_start"], head["num_local"], head["num_classes"])
            if saved != mine:
                raise ValueError(f"head shard in the state is (class_start, num_local, num_classes) = {saved}; "
                                 f"this rank's is {mine} (a different world size needs engine.checkpoint)")
            with torch.no_grad():
                self.head.weight.copy_(head["weight"].to(self.head.weight.device, self.head.weight.dtype))
        self.step = int(state["step"])
        if state.get("data") is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise ValueError(f"the state holds a data position but this trainer's data "
                                 f"({type(self.data).__name__}) cannot be repositioned")
            self.data.load_state_dict(state["data"])
            self.epoch = getattr(self.data, "epoch", self.epoch)

    def close(self) -> None:
        dist.barrier()
