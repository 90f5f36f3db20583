"""What the loader backends share: the records (``RecordSource``), the batch reader (``SampleFetcher``) and
the sampling plan (``ShardPlan``).

Both backends (``dali_pipes.dali_pipe``, ``dali_pipes.torch_loader``) and ``dali_pipes.loader`` import this
module; it imports none of them, so the loader and its backends do not import each other.

Sampling (``ShardPlan``):

- Every epoch is a fresh permutation of all image indices, drawn from ``numpy.random.default_rng([seed,
  epoch])``: identical on every rank, no communication, and the rec is never rewritten (records are read
  by key in permuted order; header and identity records are never among the image keys).
- The permutation is cut into global batches of ``batch_size * world_size``; rank ``r`` takes slice ``r`` of
  each global batch. Ranks therefore see disjoint, equal shards whose union is the epoch's kept samples.
- Tail: the last ``num_images % (batch_size * world_size)`` samples of each epoch's permutation are DROPPED,
  never padded or wrapped, so every batch is full and every sample appears at most once per epoch. Because
  the permutation changes every epoch, a different (random) remainder is dropped each time.
- Augmentation decisions come from ``default_rng([seed, epoch, position, rank, 1])`` (see ``augment``).
"""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dali_pipes.augment import ImageSizeError, dali_payload, payload_problem
from dali_pipes.recordio import RecordIOReader, read_insightface_layout, unpack

__all__ = ["RecordSource", "SampleFetcher", "ShardPlan", "sample_image_sizes"]


# ----------------------------------------------------------------------------------------------------------
# sample sources


class RecordSource:
    """The image records of an insightface RecordIO dataset (``train.rec`` + ``train.idx`` [+ ``property``]).

    Args:
        path: a directory holding ``train.rec``/``train.idx`` or the path of a ``.rec`` file (its ``.idx``
            beside it).
    """

    kind = "recordio"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "RecordIO dataset not found", str(path))
        rec = path / "train.rec" if path.is_dir() else path
        self.reader = RecordIOReader(rec)
        layout = read_insightface_layout(self.reader, read_identities=False)
        self.image_keys: np.ndarray = layout["image_keys"]
        self.num_images = int(layout["num_images"])
        self.num_classes = int(layout["num_classes"])
        self.has_header = bool(layout["has_header"])
        self.rec_path = self.reader.rec_path

    def read(self, index: int) -> tuple[bytes, Any]:
        """``(payload, raw label)`` of image ``index``; ValueError naming file and key on a broken record."""
        key = int(self.image_keys[index])
        record = self.reader.read_idx(key)  # framing errors already name the file and key
        try:
            header, payload = unpack(record)
        except ValueError as e:
            raise ValueError(f"{self.where(index)}: {e}") from None
        return payload, header.label

    def where(self, index: int) -> str:
        return f"{self.rec_path}: key {int(self.image_keys[index])}"

    def describe(self) -> str:
        return str(self.rec_path)

    def close(self) -> None:
        self.reader.close()


def sample_image_sizes(source: Any, max_samples: int = 64) -> dict[tuple[int, int], list[int]]:
    """{(width, height): sample indices} of up to `max_samples` images spread evenly over `source`, read from
    their headers (no decode): what a run reports at start, and how a wrong size is caught before any model
    is built. Unreadable samples are left out (the loader reports them when it reaches them)."""
    from dali_pipes.augment import image_size

    n = int(source.num_images)
    found: dict[tuple[int, int], list[int]] = {}
    for index in sorted({int(i) for i in np.linspace(0, n - 1, min(n, max_samples))}):
        try:
            payload, _ = source.read(index)
            size = image_size(payload)
        except Exception:
            continue
        found.setdefault(tuple(size), []).append(index)
    return found


def _label_value(raw: Any) -> float:
    if isinstance(raw, np.ndarray):
        if raw.size == 0:
            return float("nan")
        return float(raw.ravel()[0])
    return float(raw)


class _Corrupt(Exception):
    pass


class SampleFetcher:
    """Reads a batch of samples: validates labels, detects corrupt images, replaces them when skipping.

    ``decode`` turns a payload into the item handed on (the torch fallback decodes here, so its decode errors
    count as corruption); without it the item is the payload as a uint8 array (DALI decodes later).
    Replacement for a corrupt sample ``i`` is the first good sample among ``i+1, i+2, ...`` (mod N), so it
    depends only on which samples are corrupt, never on timing or worker layout.
    """

    def __init__(self, source: Any, num_classes: int, on_corrupt: str,
                 decode: Callable[[bytes], Any] | None = None) -> None:
        self.source = source
        self.num_classes = num_classes
        self.on_corrupt = on_corrupt
        self.decode = decode
        self.bad: set[int] = set()

    def _one(self, index: int) -> tuple[Any, int]:
        try:
            payload, raw_label = self.source.read(index)
        except ValueError as e:
            raise _Corrupt(str(e)) from None
        problem = payload_problem(payload)
        if problem is not None:
            raise _Corrupt(f"{self.source.where(index)}: corrupt image: {problem}")
        label = _label_value(raw_label)
        if not math.isfinite(label):
            raise ValueError(f"{self.source.where(index)}: label {label} is not a finite number")
        # The dataset's declared class count (property file / header record / folder count) bounds its labels,
        # even when the head has more classes: a label beyond it is a broken record, not a new identity.
        declared = int(getattr(self.source, "num_classes", self.num_classes))
        bound = min(self.num_classes, declared)
        if not (label == int(label) and 0 <= label < bound):
            raise ValueError(
                f"{self.source.where(index)}: label {label:g} is outside [0, {bound}) (the dataset declares "
                f"{declared} classes; num_classes={self.num_classes})"
            )
        try:
            if self.decode is None:  # DALI decodes later; formats it does not read are re-encoded here
                return np.frombuffer(dali_payload(payload), dtype=np.uint8), int(label)
            return self.decode(payload), int(label)
        except ImageSizeError as e:  # a setting (engine.data.resize), not a corrupt image: never skipped
            raise ValueError(f"{self.source.where(index)}: {e}") from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ... on bad data
            raise _Corrupt(f"{self.source.where(index)}: corrupt image: {type(e).__name__}: {e}") from None

    def corrupt_error(self, reason: str) -> ValueError:
        return ValueError(f"{reason} (set engine.data.on_corrupt=skip to skip and count corrupt images)")

    def fetch(self, indices: Sequence[int], return_used: bool = False) -> tuple:
        """Items, int64 labels and the number of replaced (corrupt) samples for ``indices``.

        With ``return_used``, also the sample index each item really came from (after replacement).
        """
        n = self.source.num_images
        items: list[Any] = []
        used: list[int] = []
        labels = np.empty(len(indices), dtype=np.int64)
        num_skipped = 0
        for slot, index in enumerate(indices):
            index = int(index)
            replaced = False
            for step in range(n):
                candidate = (index + step) % n
                if candidate in self.bad:
                    replaced = True
                    continue
                try:
                    item, label = self._one(candidate)
                except _Corrupt as e:
                    if self.on_corrupt != "skip":
                        raise self.corrupt_error(str(e)) from None
                    self.bad.add(candidate)
                    replaced = True
                    continue
                break
            else:
                raise ValueError(f"{self.source.describe()}: every image is corrupt; nothing to train on")
            items.append(item)
            used.append(candidate)
            labels[slot] = label
            num_skipped += int(replaced)
        return (items, labels, num_skipped, used) if return_used else (items, labels, num_skipped)


# ----------------------------------------------------------------------------------------------------------
# sampling plan


class ShardPlan:
    """Which samples rank ``rank`` gets at (epoch, position): see the module docstring."""

    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.global_batch_size = self.batch_size * self.world_size
        self.batches_per_epoch = self.num_images // self.global_batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"dataset has {self.num_images} images, fewer than one global batch "
                f"(batch_size {batch_size} x world_size {world_size} = {self.global_batch_size})"
            )
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def num_kept(self) -> int:
        """Samples used per epoch (all ranks together); the rest of the permutation is dropped."""
        return self.batches_per_epoch * self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of epoch ``epoch`` (cached: the same array object for repeated calls)."""
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_images)
            self._cached = (int(epoch), perm)
        return self._cached[1]

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """Sample indices of this rank's batch ``position`` of ``epoch``."""
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"position {position} is not in [0, {self.batches_per_epoch})")
        start = (position * self.world_size + self.rank) * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]

    def shard(self, epoch: int) -> np.ndarray:
        """All of this rank's samples of ``epoch`` in the order it sees them."""
        kept = self.permutation(epoch)[: self.num_kept]
        return kept.reshape(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank].ravel()

    def augment_rng(self, epoch: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(position), self.rank, 1])

    def steps(self, epoch: int, position: int):
        """(epoch, position) of every batch from the given one on, forever."""
        while True:
            yield epoch, position
            position += 1
            if position == self.batches_per_epoch:
                epoch, position = epoch + 1, 0
