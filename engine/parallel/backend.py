"""The backend seam: one small interface for the data-parallel backbone (docs/architecture.md, "The backend seam").

The trainer, checkpoints, evaluation and the planner talk to the backbone only through `ParallelBackbone`.
DeepSpeed (ZeRO 0-3, engine/parallel/deepspeed_backend.py) and torch's FSDP2 (engine/parallel/fsdp_backend.py) implement it; a new
backend is one more implementation plus its equivalence test against a 1-rank run. The Partial FC head never
goes through here: it is model-parallel (rank-unique class shards), has its own row-sparse optimizer and is
stepped by the trainer next to the backbone (engine.train.trainer.HeadStep).

One optimizer step of the trainer, with A = gradient accumulation steps::

    for i in range(A):
        emb = backbone(images_i)                  # forward (autocast as the run's precision says)
        loss = head(emb.float(), labels_i)
        backbone.backward(loss, boundary=(i == A - 1))   # scaled by 1/A (and by the loss scale under fp16);
                                                         # gradients are reduced across ranks only at the boundary
    scale = backbone.loss_scale()                 # the scale this step's backward used (1.0 unless fp16)
    applied = backbone.step()                     # clip (global norm), optimizer step, zero grads;
                                                  # False when skipped (fp16 overflow)
    head step with the same scale, skipped when `applied` is False
    (or, when some rank's loss or gradients are not finite: backbone.skip_step() and no head step)
"""
from __future__ import annotations

import abc
from typing import Any, Dict, List

import torch
from torch import nn

# Optimizer state by parameter name, as checkpoints store it (independent of world size and backend):
# {"keys": ["momentum_buffer"] or ["exp_avg", "exp_avg_sq"] or [], "adam_step": float | None,
#  "state": {param_name: {key: full fp32 CPU tensor}}}   ("state" is filled on rank 0 only when gathered)
OptimizerState = Dict[str, Any]


class ParallelBackbone(abc.ABC):
    """The backbone wrapped for data-parallel training, with its optimizer.

    Attributes:
        module: the backbone nn.Module itself (arcface_torch's state_dict keys). Under ZeRO-3 / FSDP its
            parameters are shards; use `full_state_dict` for values.
        device: the device this rank computes on.
        name: the backend's name as `engine.train.backend` spells it.
    """

    module: nn.Module
    device: torch.device
    name: str = "?"

    # -- compute ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Forward: embeddings [B, E] under the run's precision (autocast where configured)."""

    def train(self, mode: bool = True) -> "ParallelBackbone":
        self.module.train(mode)
        return self

    def eval(self) -> "ParallelBackbone":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Backward of one micro-batch's loss, divided by the accumulation steps (and multiplied by the loss
        scale under fp16). Gradients are reduced across ranks only when `boundary` (the last micro-batch of
        an optimizer step); earlier micro-batches accumulate locally with no collective."""

    @abc.abstractmethod
    def step(self) -> bool:
        """After the boundary micro-batch: clip to the global gradient norm, step the optimizer, zero the
        gradients. Returns False when the step was skipped (fp16 overflow), else True."""

    @property
    @abc.abstractmethod
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups (the trainer sets "lr" in each before every step)."""

    def loss_scale(self) -> float:
        """The loss scale the current step's backward multiplies by (1.0 unless fp16 loss scaling)."""
        return 1.0

    def scaler_state(self) -> Dict[str, Any]:
        """Dynamic loss-scaler state to checkpoint ({} when there is none)."""
        return {}

    def load_scaler_state(self, state: Dict[str, Any]) -> None:
        """Restore what `scaler_state` returned."""

    @abc.abstractmethod
    def local_grads_finite(self) -> bool:
        """Whether this rank's share of the (reduced) backbone gradients is all finite. Call between the
        boundary backward and `step`; not a collective (the caller all-reduces the flag)."""

    def skip_step(self) -> None:
        """Instead of `step` (every rank, after the boundary micro-batch): drop this step's gradients and update
        nothing (weights, optimizer state), leaving the backend ready for the next step. The
        trainer calls it when some rank saw a non-finite loss or gradient. This default clears the `.grad` of
        the optimizer's parameters, which is all there is to drop when the optimizer steps the parameters
        themselves (FSDP2, a plain module); DeepSpeed overrides it."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # -- state ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def full_state_dict(self, everywhere: bool = True) -> Dict[str, torch.Tensor]:
        """The full fp32 state_dict on the CPU (fp32 master weights where the backend keeps them; buffers
        are this rank's), every tensor contiguous whatever layout training uses (`engine.model.channels_last`):
        checkpoints and model.pt are written from it, in the layout arcface_torch writes and readers of raw
        storage (safetensors) expect. All ranks must call (a collective under sharding). Unless `everywhere`, only
        rank 0 keeps the tensors and the others return {}."""

    @abc.abstractmethod
    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a full state_dict (keys must match exactly) into the model and the fp32 masters (all ranks)."""

    @abc.abstractmethod
    def optimizer_state(self, everywhere: bool = False) -> OptimizerState:
        """The optimizer state by parameter name, full size (all ranks must call). "state" is filled on rank 0
        only unless `everywhere` (an in-memory snapshot that every rank restores from)."""

    @abc.abstractmethod
    def load_optimizer_state(self, state: OptimizerState) -> None:
        """Scatter full per-name optimizer state into this backend's partitions (all ranks must call).

        Every rank needs the full "state" (as `optimizer_state(everywhere=True)` returns it, or as read from a
        checkpoint file): each takes its own partition of each tensor. Raises ValueError when the keys do not
        fit this optimizer or a rank was handed no state."""

    def close(self) -> None:
        """Release what the backend holds (buffers, hooks). The process group is the caller's."""
