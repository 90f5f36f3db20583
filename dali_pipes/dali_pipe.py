"""The DALI loader backend: records read in the plan's order, fed to DALI by ``fn.external_source``.

DALI's own ``readers.mxnet`` sorts the index by offset and only shuffles within a buffer, so a rec sorted by
identity gives batches of few identities unless the rec is rewritten. Here the main process reads the
records itself (memory-mapped, by key, in the epoch's global permutation: ``ShardPlan``) and feeds the raw
encoded bytes plus per-sample augmentation parameters to a pipeline that decodes (``device="mixed"``, i.e. on
the GPU, when training on CUDA; on the CPU otherwise), brings images that are not 112x112 to that size as
``engine.data.resize`` says (``augment.fit_image``; under ``"none"`` the pipeline also returns each image's
decoded shape and the stream raises a ValueError naming the first wrong-sized file), augments and
normalises to float32 CHW in [-1, 1]. Formats DALI does not decode are re-encoded by the reader
(``augment.dali_payload``).

Corrupt images: a payload that is not an image is caught while reading (``payload_problem``). One that only
the decoder rejects fails the whole DALI iteration and leaves the pipeline unusable; the stream then finds the
culprit (Pillow, then DALI one image at a time), raises a ValueError naming file and key, or with
``on_corrupt="skip"`` remembers it as bad and rebuilds the pipeline at the same batch, so the replayed batch
replaces it like any other corrupt sample.
"""
from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch

from dali_pipes.augment import BLUR_SIGMA, BLUR_WINDOW, IMAGE_SIZE, decode_rgb, sample_params, size_error
from dali_pipes.source import SampleFetcher

__all__ = ["DaliStream", "dali_decodes", "dali_device_id", "decoder_device", "define_pipeline", "feed_names"]

_NORM = 127.5  # (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5


def feed_names(augment: tuple[str, ...]) -> tuple[str, ...]:
    """The per-sample parameters the pipeline for ``augment`` consumes (after the encoded images)."""
    names = ["flip"]
    if "resize" in augment:
        names += ["resize", "resize_size"]
    if "blur" in augment:
        names += ["blur"]
    if "hsv" in augment or "gray" in augment:
        names += ["color", "hue", "saturation"]
    return tuple(names)


def _fit(images: Any, resize: str) -> Any:
    """DALI's form of ``augment.fit_image`` for a decoded image that is not IMAGE_SIZE x IMAGE_SIZE."""
    from nvidia.dali import fn

    if resize == "center_crop":
        return fn.crop(fn.resize(images, resize_shorter=float(IMAGE_SIZE)), crop=(IMAGE_SIZE, IMAGE_SIZE))
    if resize == "pad":  # a crop larger than the image, centred, pads with zeros (black)
        return fn.crop(fn.resize(images, resize_longer=float(IMAGE_SIZE)), crop=(IMAGE_SIZE, IMAGE_SIZE),
                       out_of_bounds_policy="pad", fill_values=0)
    # "stretch", and "none" (whose wrong sizes the stream reports from the shapes; stretched to keep the batch
    # uniform until then)
    return fn.resize(images, size=(IMAGE_SIZE * 1.0, IMAGE_SIZE * 1.0))


def dali_device_id(device: torch.device) -> int | None:
    """DALI's ``device_id`` for the torch device the batches go to: the GPU's number under CUDA (``cuda`` alone:
    the current device), None on the CPU, which makes a CPU-only pipeline (no CUDA needed)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def decoder_device(device_id: int | None) -> str:
    """Where the pipeline decodes: ``"mixed"`` (nvJPEG on GPU `device_id`, everything after it on that GPU) or
    ``"cpu"``. The only difference between the GPU pipeline and the CPU one the tests run."""
    return "cpu" if device_id is None else "mixed"


def define_pipeline(batch_size: int, num_threads: int, device_id: int | None, augment: tuple[str, ...],
                    source: Any, prefetch: int = 2, resize: str = "none") -> Any:
    """The pipeline for GPU `device_id` (None: the CPU), its graph not yet built: building it needs that device.

    One graph for both: read the fed bytes and parameters, decode (`decoder_device`), fit, augment, normalise.
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_on = decoder_device(device_id)
    names = feed_names(augment)
    full = (IMAGE_SIZE * 1.0, IMAGE_SIZE * 1.0)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=True, enable_conditionals=True)
    def pipe():
        encoded, *fed = fn.external_source(source=source, num_outputs=1 + len(names), batch=True)
        arg = dict(zip(names, fed))
        shape = fn.peek_image_shape(encoded)
        wrong_size = (shape[0] != IMAGE_SIZE) | (shape[1] != IMAGE_SIZE)
        images = fn.decoders.image(encoded, device=decode_on, output_type=types.RGB)
        if wrong_size:
            images = _fit(images, resize)
        if "resize" in arg:
            if arg["resize"]:
                images = fn.resize(images, size=arg["resize_size"])
                images = fn.resize(images, size=full)
        if "blur" in arg:
            if arg["blur"]:
                images = fn.gaussian_blur(images, window_size=BLUR_WINDOW, sigma=BLUR_SIGMA)
        if "color" in arg:
            if arg["color"]:
                images = fn.hsv(images, hue=arg["hue"], saturation=arg["saturation"])
        out = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[_NORM] * 3,
                                       std=[_NORM] * 3, mirror=arg["flip"])
        return (out, shape) if resize == "none" else out

    return pipe()


def _build_pipeline(*args: Any, **kwargs: Any) -> Any:
    """`define_pipeline`, built (on its GPU when it has one)."""
    p = define_pipeline(*args, **kwargs)
    p.build()
    return p


def dali_decodes(payload: bytes) -> bool:
    """Whether DALI's CPU decoder accepts one encoded image (used to find the culprit of a failed batch)."""
    from nvidia.dali import fn, pipeline_def, types

    arr = np.frombuffer(payload, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(source=lambda: [arr], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = None
    try:
        p = pipe()
        p.build()
        p.run()
        return True
    except RuntimeError:
        return False
    finally:
        del p


def _is_decode_failure(err: BaseException) -> bool:
    text = str(err)
    return "decoders.image" in text or "decode" in text.lower() or "peek_image_shape" in text


class DaliStream:
    """Iterator of ``(images, labels, num_skipped)`` on the loader's device from ``(epoch, position)`` on."""

    def __init__(self, loader: Any, epoch: int, position: int) -> None:
        self.loader = loader
        self.plan = loader.plan
        self.device_id = dali_device_id(loader.device)  # the GPU DALI decodes on is the one batches go to
        self.device = loader.device if self.device_id is None else torch.device("cuda", self.device_id)
        # the bad-sample set lives on the loader so it survives pipeline rebuilds and load_state_dict
        if not hasattr(loader, "_dali_fetcher"):
            loader._dali_fetcher = SampleFetcher(loader.source, loader.num_classes, loader.on_corrupt)
        self.fetcher = loader._dali_fetcher
        self._pipe: Any = None
        self._start(epoch, position)

    # -- feeding --------------------------------------------------------------------------------------------
    def _start(self, epoch: int, position: int) -> None:
        self._close_pipe()
        self._steps = self.plan.steps(epoch, position)
        self._pending: collections.deque = collections.deque()
        self._names = feed_names(self.loader.augment)
        self._pipe = _build_pipeline(self.plan.batch_size, max(1, self.loader.num_workers), self.device_id,
                                     self.loader.augment, self._feed, resize=self.loader.resize)

    def _feed(self) -> list:
        epoch, position = next(self._steps)
        indices = self.plan.batch_indices(epoch, position)
        items, labels, num_skipped, used = self.fetcher.fetch(indices, return_used=True)
        self._pending.append((epoch, position, used, items, labels, num_skipped))
        params = sample_params(self.loader.augment, self.plan.augment_rng(epoch, position), len(indices))
        return [items] + [list(params[name]) for name in self._names]

    # -- output ---------------------------------------------------------------------------------------------
    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        while True:
            try:
                out, *shapes = self._pipe.run()
                break
            except RuntimeError as err:
                if not self._pending or not _is_decode_failure(err):
                    raise
                self._recover(err)
        epoch, position, indices, items, labels, num_skipped = self._pending.popleft()
        if shapes:  # engine.data.resize "none": every decoded image must already be 112x112
            for index, (height, width) in zip(indices, np.asarray(shapes[0].as_array())[:, :2].tolist()):
                if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
                    raise ValueError(f"{self.loader.source.where(int(index))}: {size_error(width, height)}")
        images = self._to_torch(out)
        non_blocking = self.device.type == "cuda"
        return images, torch.from_numpy(labels).to(self.device, non_blocking=non_blocking), num_skipped

    def _to_torch(self, out: Any) -> torch.Tensor:
        """The batch as a torch tensor on the loader's device. A CPU pipeline's output is host memory; a GPU
        pipeline's lives on GPU `device_id` (the loader's device) and is copied there on the current stream."""
        tensor = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(tensor)).to(self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result

    def _recover(self, err: BaseException) -> None:
        """A decode failed: name the culprit (error mode) or mark it bad and replay from its batch (skip)."""
        epoch, position = self._pending[0][:2]
        found = []
        for batch in list(self._pending):
            for index, item in zip(batch[2], batch[3]):
                payload = item.tobytes()
                reason = None
                try:
                    decode_rgb(payload, resize="stretch")
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
                if reason is None and not dali_decodes(payload):
                    reason = "rejected by the DALI decoder"
                if reason is not None:
                    found.append((int(index), reason))
            if found:
                break
        if not found:
            keys = ", ".join(self.loader.source.where(int(i)) for i in self._pending[0][2])
            raise RuntimeError(f"DALI failed on a batch of {keys} and no single image is to blame: {err}") from err
        if self.fetcher.on_corrupt != "skip":
            index, reason = found[0]
            raise self.fetcher.corrupt_error(
                f"{self.loader.source.where(index)}: corrupt image: {reason}") from None
        self.fetcher.bad.update(index for index, _ in found)
        self._start(epoch, position)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            del pipe

    def close(self) -> None:
        self._close_pipe()
        self._pending = collections.deque()
