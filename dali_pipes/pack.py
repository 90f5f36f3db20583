"""Pack a folder-per-identity image tree into an insightface RecordIO dataset.

    python -m dali_pipes.pack --images DIR --out DIR [--workers N] [--quality Q] [--resize MODE]

writes ``DIR/train.rec``, ``DIR/train.idx`` and ``DIR/property`` in insightface's layout (what MXNet's
``im2rec`` + insightface's scripts produce; the tests compare it byte for byte with files MXNet wrote):

- key 0: header, ``IRHeader(flag=2, label=[first identity key, end key], id=0, id2=0)``, empty payload;
- keys 1..N: images in ``scan_image_folder`` order (sorted identity folders, sorted file names),
  ``IRHeader(flag=0, label=identity, id=key, id2=0)`` + JPEG bytes;
- keys N+1..N+C: one identity record per class, ``IRHeader(flag=2, label=[first image key, end key], id=0,
  id2=0)``, empty payload;
- ``property``: ``C,112,112``.

Images that already are 112x112 JPEGs are stored byte for byte; anything else Pillow reads is decoded,
converted to RGB and encoded as JPEG (``--quality``), in ``--workers`` processes. An image that is not 112x112
is an error naming it unless ``--resize`` (``pad``, ``center_crop``, ``stretch``; ``augment.fit_image``, as
``engine.data.resize`` in training) says how to bring it to that size. Output files
are written under temporary names and renamed into place when complete, so an interrupted pack never leaves
a half-written dataset under the final names.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Sequence

from dali_pipes.augment import IMAGE_SIZE, RESIZE_MODES, ImageSizeError, fit_image
from dali_pipes.folder import scan_image_folder
from dali_pipes.recordio import IRHeader, RecordIOWriter, pack

__all__ = ["encode_image", "pack_folder", "write_insightface_rec", "main"]


def encode_image(payload: bytes, quality: int = 95, *, where: str = "", resize: str = "none") -> bytes:
    """Return ``payload`` itself if it is a 112x112 JPEG, else a 112x112 RGB JPEG re-encoding of it (another
    size: as `resize` says, "none" being an error)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            if im.format == "JPEG" and im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode in ("RGB", "L"):
                im.load()  # a JPEG that does not decode is not packed
                return payload
            im = fit_image(im.convert("RGB"), IMAGE_SIZE, resize)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except ImageSizeError as e:
        raise ValueError(f"{where}: {str(e).replace('engine.data.resize', '--resize')}") from None
    except Exception as e:
        raise ValueError(f"{where}: cannot read image ({type(e).__name__}: {e})") from None


def _encode_file(args: tuple[str, int, str]) -> bytes:
    path, quality, resize = args
    return encode_image(Path(path).read_bytes(), quality, where=path, resize=resize)


def write_insightface_rec(out_dir: str | os.PathLike, images: Sequence[bytes] | object, labels: Sequence[int],
                          num_classes: int) -> None:
    """Write an insightface-layout dataset from encoded images (iterable, in order) and sorted labels.

    Labels must be non-decreasing and cover ``0 .. num_classes-1`` (one contiguous run per identity).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [int(v) for v in labels]
    n = len(labels)
    if any(b < a for a, b in zip(labels, labels[1:])) or (n and (labels[0] != 0 or labels[-1] != num_classes - 1)):
        raise ValueError("labels must be sorted and cover 0..num_classes-1 with no gap")
    starts = {}
    for key, label in enumerate(labels, start=1):
        starts.setdefault(label, key)
    if len(starts) != num_classes:
        raise ValueError(f"labels cover {len(starts)} classes, expected {num_classes}")
    first_id = n + 1
    with RecordIOWriter(out / "train.rec", out / "train.idx") as writer:
        writer.write_idx(0, pack(IRHeader(2, [first_id, first_id + num_classes], 0, 0), b""))
        count = 0
        for key, (payload, label) in enumerate(zip(images, labels), start=1):
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), payload))
            count += 1
        if count != n:
            raise ValueError(f"got {count} images for {n} labels")
        for label in range(num_classes):
            end = starts[label + 1] if label + 1 < num_classes else n + 1
            writer.write_idx(first_id + label, pack(IRHeader(2, [starts[label], end], 0, 0), b""))
    tmp = out / f"property.tmp{os.getpid()}"
    tmp.write_text(f"{num_classes},{IMAGE_SIZE},{IMAGE_SIZE}\n")
    os.replace(tmp, out / "property")


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr, only when stderr is a terminal (a log file or a pipe gets no progress lines)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="pack", unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def pack_folder(images_dir: str | os.PathLike, out_dir: str | os.PathLike, *, workers: int = 1,
                quality: int = 95, progress: bool = True, resize: str = "none") -> dict:
    """Pack ``images_dir`` (one folder per identity) into ``out_dir``; return counts and identity names.

    `resize`: images that are not 112x112 (``none``: an error naming the file; ``pad``, ``center_crop``,
    ``stretch``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"--resize: expected one of {list(RESIZE_MODES)}, got {resize!r}")
    files, labels, identities = scan_image_folder(images_dir)
    bar = _progress_bar(len(files), progress)
    jobs = [(str(f), quality, resize) for f in files]

    def encoded(it):
        for payload in it:
            bar.update()
            yield payload

    try:
        if workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                write_insightface_rec(out_dir, encoded(pool.imap(_encode_file, jobs, chunksize=16)), labels,
                                      len(identities))
        else:
            write_insightface_rec(out_dir, encoded(map(_encode_file, jobs)), labels, len(identities))
    finally:
        bar.close()
    return dict(num_images=len(files), num_classes=len(identities), identities=identities)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_pipes.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder with one sub-folder of images per identity")
    parser.add_argument("--out", required=True, help="output directory for train.rec/train.idx/property")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoder processes")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not "
                                                             "a terminal)")
    parser.add_argument("--resize", default="none", choices=RESIZE_MODES,
                        help="images that are not 112x112: none (an error), pad, center_crop or stretch")
    args = parser.parse_args(argv)
    try:
        info = pack_folder(args.images, args.out, workers=args.workers, quality=args.quality,
                           progress=not args.quiet, resize=args.resize)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {info['num_images']} images, {info['num_classes']} identities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
