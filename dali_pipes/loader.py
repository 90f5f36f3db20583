"""Training data loaders over insightface RecordIO datasets, image folders and the demo set.

``build_loader`` is the one entry point. It returns a ``Loader``: an infinite iterator of
``(images float32 [B, 3, 112, 112] in [-1, 1] (CHW, on device), labels int64 [B] on device)``, backed by
a DALI pipeline (``dali_pipes.dali_pipe``) or, without DALI, by torch DataLoader workers decoding with Pillow
(``dali_pipes.torch_loader``). Both backends take their samples from the same plan, so they yield the same
images in the same order.

Sampling: ``dali_pipes.source.ShardPlan`` (shared by both backends; its module docstring has the rules).

State: ``state_dict() == {"epoch", "position", ...}`` names the NEXT batch to yield (``position`` batches of
``epoch`` are done). It is the same on every rank, so rank 0's copy resumes all ranks. Loading it restarts
the pipeline at exactly that batch: the subsequent batches equal those of an uninterrupted run.

Bad input: missing files raise FileNotFoundError naming them; a dataset of fewer than 2 classes raises
ValueError; a label that is not finite, or outside ``[0, num_classes)`` or the dataset's declared class count,
raises ValueError naming the file and key; a corrupt image (unreadable record, unknown format, undecodable JPEG)
raises ValueError naming the file and key, or with ``on_corrupt="skip"`` is replaced by the next good sample
in dataset order (so the batch stays full) and counted in ``num_corrupt_skipped`` (replacements made on this
rank; a corrupt image is counted again each epoch it comes up).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from dali_pipes.augment import RESIZE_MODES, parse_augment
from dali_pipes.options import FILE_SOURCES, check_data_options
from dali_pipes.source import RecordSource, ShardPlan

__all__ = ["build_loader", "Loader", "dali_available", "default_demo_dir", "ensure_demo"]

SOURCES = FILE_SOURCES  # the sources this loader reads (synthetic data is engine.train.build's)


# ----------------------------------------------------------------------------------------------------------
# the loader


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class Loader:
    """Infinite iterator of full, normalised, sharded training batches on ``device`` (see module docstring).

    Attributes:
        num_images, num_classes, batch_size, batches_per_epoch: dataset and plan sizes.
        epoch, position: the next batch to yield.
        num_corrupt_skipped: corrupt samples replaced so far on this rank.
        backend: ``"dali"`` or ``"torch"``.
    """

    def __init__(self, source: Any, *, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, backend: str, augment: Sequence[str], on_corrupt: str,
                 num_classes: int, resize: str = "none") -> None:
        self.source = source
        self.num_images = int(source.num_images)
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.backend = backend
        self.augment = parse_augment(augment)
        self.on_corrupt = on_corrupt
        self.resize = resize  # images that are not 112x112: augment.fit_image (none: an error naming the file)
        self.plan = ShardPlan(self.num_images, batch_size, rank, world_size, seed)
        self.batch_size = self.plan.batch_size
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.epoch = 0
        self.position = 0
        self.num_corrupt_skipped = 0
        self._stream: Any = None

    # -- iteration ------------------------------------------------------------------------------------------
    def __iter__(self) -> "Loader":
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _open_stream(self) -> Any:
        if self.backend == "dali":
            from dali_pipes.dali_pipe import DaliStream

            return DaliStream(self, self.epoch, self.position)
        from dali_pipes.torch_loader import TorchStream

        return TorchStream(self, self.epoch, self.position)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stream is None:
            self._stream = self._open_stream()
        images, labels, num_skipped = next(self._stream)
        self.num_corrupt_skipped += int(num_skipped)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return images, labels

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_images": self.num_images,
            "global_batch_size": self.plan.global_batch_size,
            "seed": self.seed,
            "num_corrupt_skipped": self.num_corrupt_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s batch. Exact when the dataset, seed and global batch are unchanged.

        With another global batch size (e.g. a different world size) the position is converted by samples
        consumed, rounded up: at most one global batch of the epoch is skipped, none repeated.
        """
        num_images = int(state.get("num_images", self.num_images))
        if num_images != self.num_images:
            raise ValueError(
                f"loader state is for a dataset of {num_images} images; this one ({self.source.describe()}) "
                f"has {self.num_images}"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        old_global = int(state.get("global_batch_size", self.plan.global_batch_size))
        if old_global != self.plan.global_batch_size:
            consumed = position * old_global
            position = -(-consumed // self.plan.global_batch_size)
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid loader state epoch={epoch} position={position}")
        self._close_stream()
        self.epoch, self.position = epoch, position
        self.num_corrupt_skipped = int(state.get("num_corrupt_skipped", self.num_corrupt_skipped))

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._close_stream()
        self.source.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._close_stream()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Loader({self.backend}, {self.source.describe()!r}, {self.num_images} images, "
                f"{self.num_classes} classes, batch {self.batch_size}, epoch {self.epoch}, "
                f"position {self.position}/{self.batches_per_epoch})")


# ----------------------------------------------------------------------------------------------------------
# entry point


def default_demo_dir() -> Path:
    """``$ARCSCALE_CACHE/demo`` or ``~/.cache/arcscale/demo``."""
    base = os.environ.get("ARCSCALE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "arcscale") / "demo"


def ensure_demo(path: str | os.PathLike | None = None) -> Path:
    """Generate the default demo dataset into ``path`` unless it is already there; return the directory.

    Several processes (ranks) may call this at once: one generates under a file lock, the others wait and
    then find it complete (generation writes into a temporary directory and renames it into place).
    """
    from dali_pipes import make_demo

    out = Path(path) if path is not None else default_demo_dir()
    if make_demo.is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not make_demo.is_complete(out):
                make_demo.make_demo(out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def build_loader(
    source: str,
    path: str | os.PathLike | None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_workers: int = 2,
    dali: str = "auto",
    augment: Sequence[str] | None = ("flip",),
    on_corrupt: str = "error",
    num_classes: int | None = None,
    resize: str = "none",
) -> Loader:
    """Build the training loader for ``engine.data``.

    Args:
        source: ``"recordio"`` (insightface dir or ``.rec``), ``"folder"`` (one folder per identity) or
            ``"demo"`` (``make_demo``'s dataset, generated into ``path`` or ``default_demo_dir()`` on first use).
        path: dataset location (see ``source``).
        batch_size: per-rank micro-batch size.
        rank, world_size: data-parallel shard.
        device: where the batches go (DALI decodes on the GPU, ``"mixed"``, when this is CUDA).
        seed: shuffling and augmentation seed.
        num_workers: DALI threads, or torch DataLoader worker processes (0 = in-process).
        dali: ``"auto"`` (DALI when importable), ``"on"`` (DALI or an error), ``"off"`` (torch fallback).
        augment: augmentation names (``dali_pipes.augment``); ``None``/``[]`` for none.
        on_corrupt: ``"error"`` or ``"skip"``.
        num_classes: classes of the head; labels must be below it. Defaults to the dataset's count; a smaller
            value than the dataset declares is an error.
        resize: ``"none"`` (an image that is not 112x112 is an error naming it), ``"pad"``, ``"center_crop"``
            or ``"stretch"`` (``augment.fit_image``).
    """
    check_data_options(source, dali, on_corrupt, num_workers, path, sources=SOURCES)
    augment = parse_augment(augment)
    if source == "demo":
        path = ensure_demo(path)
    if source == "folder":
        from dali_pipes.folder import FolderSource

        src: Any = FolderSource(path)
    else:
        src = RecordSource(path)
    try:
        if src.num_classes < 2:
            raise ValueError(f"{src.describe()} has {src.num_classes} class(es); face recognition training needs "
                             f"at least 2 identities (with one, the softmax loss is exactly 0 and nothing trains)")
        if num_classes is None:
            num_classes = src.num_classes
        elif num_classes < src.num_classes:
            raise ValueError(
                f"{src.describe()} has {src.num_classes} classes but num_classes={num_classes}; "
                f"set engine.head.num_classes >= {src.num_classes}"
            )
        if resize not in RESIZE_MODES:
            raise ValueError(f"engine.data.resize: expected one of {list(RESIZE_MODES)}, got {resize!r}")
        if dali == "off":
            backend = "torch"
        elif dali_available():
            backend = "dali"
        elif dali == "on":
            raise RuntimeError(
                "engine.data.dali=on but NVIDIA DALI is not installed (pip install nvidia-dali-cuda120); "
                "use dali=auto or off for the torch fallback"
            )
        else:
            backend = "torch"
        return Loader(src, batch_size=batch_size, rank=rank, world_size=world_size, device=torch.device(device),
                      seed=seed, num_workers=num_workers, backend=backend, augment=augment,
                      on_corrupt=on_corrupt, num_classes=int(num_classes), resize=resize)
    except BaseException:
        src.close()
        raise

