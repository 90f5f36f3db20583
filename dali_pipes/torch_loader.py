"""The loader backend without DALI: torch DataLoader worker processes, Pillow decode, numpy augmentation.

One DataLoader item is one whole batch: the main process's sampler walks the shared ``ShardPlan`` and hands
each worker ``(epoch, position, sample indices)``; the worker reads the records (mmap, re-opened per
process), decodes, augments with the batch's parameters (``augment.sample_params``) and normalises to
float32 CHW. So the batches do not depend on the number of workers, and equal the DALI backend's up to JPEG
decoder rounding.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np
import torch

from dali_pipes.augment import apply_numpy, decode_rgb, params_row, sample_params
from dali_pipes.source import SampleFetcher

__all__ = ["TorchStream", "BatchDataset"]


class _PlanSampler:
    """Yields ``(epoch, position, indices)`` forever from a start state (runs in the main process)."""

    def __init__(self, plan: Any, epoch: int, position: int) -> None:
        self.plan, self.epoch, self.position = plan, epoch, position

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for epoch, position in self.plan.steps(self.epoch, self.position):
            yield epoch, position, self.plan.batch_indices(epoch, position).copy()


class BatchDataset(torch.utils.data.Dataset):
    """Builds one normalised batch per item: ``(images [B,3,112,112] float32, labels int64 [B], num_skipped)``."""

    def __init__(self, loader: Any) -> None:
        self.plan = loader.plan
        self.augment = loader.augment
        decode = functools.partial(decode_rgb, resize=loader.resize)  # engine.data.resize: augment.fit_image
        self.fetcher = SampleFetcher(loader.source, loader.num_classes, loader.on_corrupt, decode=decode)

    def __len__(self) -> int:  # not used for sampling (the sampler is infinite); DataLoader asks politely
        return self.plan.batches_per_epoch

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, position, indices = item
        images, labels, num_skipped = self.fetcher.fetch(indices)
        params = sample_params(self.augment, self.plan.augment_rng(epoch, position), len(indices))
        batch = np.empty((len(indices), 3, images[0].shape[0], images[0].shape[1]), dtype=np.float32)
        for i, img in enumerate(images):
            img = apply_numpy(img, params_row(params, i))
            # (x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5, the arithmetic DALI's normalise uses
            np.subtract(img.transpose(2, 0, 1), np.float32(127.5), out=batch[i], dtype=np.float32)
        batch *= np.float32(1.0 / 127.5)
        return torch.from_numpy(batch), torch.from_numpy(labels), num_skipped


def worker_error_message(exc: BaseException) -> str:
    """The message a DataLoader worker's exception had. torch re-raises it in the main process with the worker's
    whole traceback in the message ("Caught ValueError in DataLoader worker process 0. Original Traceback ...");
    the last line holds the original "ValueError: <file>: <what>"."""
    text = str(exc)
    if not text.startswith("Caught "):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TorchStream:
    """Iterator of ``(images, labels, num_skipped)`` on the loader's device from ``(epoch, position)`` on."""

    def __init__(self, loader: Any, epoch: int, position: int) -> None:
        self.device = loader.device
        workers = loader.num_workers
        self._dataloader = torch.utils.data.DataLoader(
            BatchDataset(loader),
            batch_size=None,
            sampler=_PlanSampler(loader.plan, epoch, position),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=_worker_init if workers > 0 else None,
            persistent_workers=False,
        )
        self._it = iter(self._dataloader)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        try:
            images, labels, num_skipped = next(self._it)
        except (ValueError, FileNotFoundError) as exc:  # a data error in a worker: its own one-line message
            raise type(exc)(worker_error_message(exc)) from None
        non_blocking = self.device.type == "cuda"
        return (images.to(self.device, non_blocking=non_blocking),
                labels.to(self.device, non_blocking=non_blocking), int(num_skipped))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
