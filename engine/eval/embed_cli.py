"""Embeddings of your own images, or of a rec's, from a trained backbone.

    python -m engine.embed --model outputs/run/model.pt --images DIR --out embeddings.npz
    python -m engine.embed --model backbone.pth --backbone r50 --embedding-size 512 --rec DIR --out e.npz
    torchrun --nproc_per_node 2 -m engine.embed --model ... --images DIR --out embeddings.npz   # 2 processes

**Model.** ArcScale's ``model.pt``, an arcface_torch ``.pth`` or a ``checkpoint_gpu_*.pt`` (read weights-only:
nothing in the file can run code), in eval mode, fp32. When ``--backbone`` / ``--embedding-size`` are left
out they are read from the run's ``config.json`` beside the model (engine.train writes it next to ``model.pt``).

**Images.** ``--images DIR``: every image file under DIR, in sub-folders too (any format Pillow reads; hidden
files and folders skipped), in the order of their relative paths; ``--rec``: the image records of an
insightface RecordIO set in key order. Each is decoded as training decodes it (RGB, 112x112, another size an
error naming the file unless ``--resize`` says how: ``engine.data.resize``'s rule) and normalised as arcface_torch
does, ``(pixel / 255 - 0.5) / 0.5``. No flip, no L2 normalisation: the model's output as it is.

**Output** (an ``.npz``, written atomically by rank 0): ``embeddings`` float32 [N, E] in that order; ``paths``
the relative file names (``--images``), or ``<rec>#<key>`` per record (``--rec``, with ``labels`` beside).

Under a launcher (``WORLD_SIZE`` > 1, one process per GPU or CPU share) each rank embeds one contiguous slice
of the images and the slices are all-gathered in order (engine.eval.embed), so the file is the same as one
process writes.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.eval import embed
from engine.runtime import dist
from engine.runtime.progress import progress

__all__ = ["list_images", "embed_images", "main"]


def list_images(root: Path) -> List[Path]:
    """Every image file under `root` (any depth; hidden files and folders skipped), sorted by relative path."""
    from dali_pipes.folder import image_extensions

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images: folder {root} not found")
    extensions = image_extensions()
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not found:
        raise ValueError(f"--images: {root} holds no image file Pillow can open (e.g. .jpg, .png)")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _preprocess(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device).permute(0, 3, 1, 2).float()
    return ((x / 255) - 0.5) / 0.5


def embed_images(model: torch.nn.Module, read: Callable[[int], bytes], where: Callable[[int], str],
                 num_images: int, *, batch_size: int, device: torch.device, resize: str = "none",
                 show_progress: bool = True) -> np.ndarray:
    """Embeddings [num_images, E] float32 of images 0 .. num_images-1 (`read(i)`: the encoded image), on every
    rank: each embeds its slice (engine.eval.embed.rank_slice) and the slices are gathered in order. A bad
    image on any rank is raised on every rank (naming it, by `where(i)`), never left for the gather to hang on.
    """
    from dali_pipes.augment import IMAGE_SIZE, decode_rgb

    start, stop, _ = embed.rank_slice(num_images, dist.get_rank(), dist.get_world_size())
    parts: List[np.ndarray] = []
    failure: Optional[str] = None
    model.eval()
    bar = progress(total=stop - start, desc="embed", unit="img", enabled=show_progress)
    try:
        with torch.no_grad():
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                batch = np.empty((hi - lo, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                for i in range(lo, hi):
                    try:
                        batch[i - lo] = decode_rgb(read(i), IMAGE_SIZE, resize)
                    except Exception as exc:  # noqa: BLE001 - named, and raised on every rank below
                        text = str(exc).replace("engine.data.resize", "--resize")
                        raise ValueError(f"{where(i)}: {text or type(exc).__name__}") from None
                parts.append(model(_preprocess(batch, device)).float().cpu().numpy())
                bar.update(hi - lo)
    except ValueError as exc:
        failure = str(exc)
    finally:
        bar.close()
    if dist.is_initialized():
        errors = [e for e in dist.all_gather_object(failure) if e]
        if errors:
            raise ValueError(errors[0])
    elif failure:
        raise ValueError(failure)
    local = np.concatenate(parts) if parts else None
    if not dist.is_initialized():
        return local
    # a rank with an empty slice (more ranks than images) learns the width from the others
    dims = [d for d in dist.all_gather_object(None if local is None else local.shape[1]) if d is not None]
    local = local if local is not None else np.zeros((0, dims[0]), np.float32)
    return embed.gather_slices(local.astype(np.float32), num_images, device)


def _folder(root: str) -> Tuple[Callable[[int], bytes], Callable[[int], str], int, dict]:
    files = list_images(Path(root))
    rel = [p.relative_to(root).as_posix() for p in files]
    return (lambda i: files[i].read_bytes()), (lambda i: str(files[i])), len(files), {"paths": np.array(rel)}


def _rec(path: str) -> Tuple[Callable[[int], bytes], Callable[[int], str], int, dict]:
    from dali_pipes.source import RecordSource

    source = RecordSource(path)
    keys = [int(k) for k in source.image_keys]
    labels = np.array([float(np.ravel(source.read(i)[1])[0]) for i in range(source.num_images)], np.float32)
    name = Path(source.rec_path).name
    extra = {"paths": np.array([f"{name}#{k}" for k in keys]), "labels": labels}
    return (lambda i: source.read(i)[0]), source.where, source.num_images, extra


def _write_npz(path: Path, arrays: dict) -> None:
    from engine.runtime.fileio import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dali_pipes.augment import RESIZE_MODES

    parser = argparse.ArgumentParser(prog="python -m engine.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt (ArcScale) or an arcface_torch .pth")
    parser.add_argument("--backbone", default=None, help="backbone name (default: from config.json beside "
                                                         "--model)")
    parser.add_argument("--embedding-size", type=int, default=None, help="output width (default: from "
                                                                         "config.json beside --model, else 512)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (any depth)")
    source.add_argument("--rec", help="an insightface rec: its folder or .rec")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward call on each rank")
    parser.add_argument("--resize", default="none", choices=RESIZE_MODES,
                        help="images that are not 112x112: none (an error), pad, center_crop or stretch")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected >= 1, got {args.batch_size}")
    from engine.state.weights import load_backbone, model_settings

    owns_group = dist.join_launcher_group()
    try:
        name, size, origin = model_settings(args.model, args.backbone, args.embedding_size)
        read, where, num, extra = _folder(args.images) if args.images else _rec(args.rec)
        device = dist.get_device()
        model = load_backbone(args.model, name, embedding_size=size).to(device)
        embeddings = embed_images(model, read, where, num, batch_size=args.batch_size, device=device,
                                  resize=args.resize)
        if dist.get_rank() == 0:
            out = Path(args.out)
            _write_npz(out, {"embeddings": embeddings, **extra})
            print(f"wrote {out}: embeddings [{embeddings.shape[0]}, {embeddings.shape[1]}] float32 of "
                  f"{args.images or args.rec} by {name} (embedding size {size}; {origin}) on "
                  f"{dist.get_world_size()} rank(s)")
    except (ValueError, FileNotFoundError) as exc:  # the same message on every rank: rank 0 says it
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            dist.destroy()
    return 0
