"""Synthetic training data made directly on the training device.

Every micro-batch is a pure function of (seed, global micro-batch slot), where the slot counts micro-batches
over the whole job in the order (optimizer step, micro-step, rank). So the data a job sees does not depend
on how it is split: 2 ranks x 1 micro-step read slots 2s and 2s+1 at step s, exactly what 1 rank with 2
accumulation micro-steps reads. That makes runs of different world sizes comparable and resumable.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F

SYNTHETIC_MODES = ("prototypes", "noise")  # engine.data.synthetic (checked by engine.config against this)
_NUM_PROTOTYPES = 4096  # classes beyond this share patterns (labels stay uniform over all classes)
_PROTO_SIZE = 7


class SyntheticSource:
    """Random images [B,3,112,112] in [-1, 1] and int64 labels uniform over `num_classes`, on `device`.

    mode "prototypes": each class is a fixed low-frequency colour pattern plus per-image noise, so a model
    can learn the classes (loss falls); mode "noise": pure noise (throughput measurements).
    """

    def __init__(self, batch_size: int, num_classes: int, device: torch.device, *, seed: int = 0,
                 mode: str = "prototypes", image_size: int = 112, noise: float = 0.5):
        if mode not in SYNTHETIC_MODES:
            raise ValueError(f"synthetic mode: expected one of {list(SYNTHETIC_MODES)}, got {mode!r}")
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.device = device
        self.seed = seed
        self.mode = mode
        self.image_size = image_size
        self.noise = noise
        self._prototypes = None
        if mode == "prototypes":
            g = torch.Generator().manual_seed(seed + 7919)
            num = min(num_classes, _NUM_PROTOTYPES)
            self._prototypes = torch.rand(num, 3, _PROTO_SIZE, _PROTO_SIZE, generator=g).mul_(2).sub_(1).to(device)

    def batch(self, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch of global slot `slot` (deterministic)."""
        g = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + slot) % (2 ** 63))
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g, device=self.device)
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        noise = torch.randn(shape, generator=g, device=self.device)
        if self._prototypes is None:
            return noise.clamp_(-1, 1), labels
        proto = self._prototypes[labels % self._prototypes.shape[0]]
        images = F.interpolate(proto, size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False)
        return images.add_(noise, alpha=self.noise).clamp_(-1, 1), labels


class SlotIterator:
    """Iterates a slot-addressed source for one rank: slot = (step * accumulation + micro) * world + rank."""

    def __init__(self, source: SyntheticSource, rank: int, world_size: int, accumulation: int, start_step: int = 0):
        self.source = source
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.position = start_step * accumulation  # micro-steps taken by this rank

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        slot = self.position * self.world_size + self.rank
        self.position += 1
        return self.source.batch(slot)

    def state_dict(self) -> Dict[str, int]:
        """``global_slots``: micro-batches drawn by all ranks together, which is what a resume at another
        world size needs; ``position``: this rank's micro-steps."""
        return {"position": self.position, "epoch": 0, "global_slots": self.position * self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue after the saved slots; exact for any world size whose ranks divide them (else rounded up:
        no slot is drawn twice)."""
        if "global_slots" in state:
            self.position = -(-int(state["global_slots"]) // self.world_size)
        else:
            self.position = int(state["position"])
