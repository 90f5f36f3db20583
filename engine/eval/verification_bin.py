"""Verification pairs of your own faces as an insightface ``.bin`` (the file `engine.eval.bins`, arcface_torch's
``val_targets`` and engine.verification read).

    python -m engine.make_bin --images DIR --pairs PAIRS.txt --out X.bin
    python -m engine.make_bin --images DIR --num-pairs N --seed S --out X.bin

**The format.** A pickle (protocol 4) of ``(list_of_image_bytes, issame_list)``: two encoded images per pair,
consecutive, and one bool per pair (same identity), as insightface's LFW, CFP-FP and AgeDB-30 files are. A
plain ``pickle.load`` reads it back.

**The images** are handled as training handles them (`engine.data`): any format Pillow reads; a 112x112 JPEG
is stored byte for byte, anything else is decoded, converted to RGB and stored as a JPEG (``--quality``); an
image that is not 112x112 is an error naming it unless ``--resize`` (``pad``, ``center_crop``, ``stretch``:
the same rule as ``engine.data.resize``, dali_pipes.augment.fit_image) says how to bring it to that size.

**The pairs** come from a pair list or are drawn from an identity folder:

- ``--pairs PAIRS.txt``: one pair per line, ``<image> <image> <0|1>`` (1: the same identity), the images as
  paths relative to ``--images``; blank lines and lines starting with ``#`` are skipped. A path containing
  spaces is written in double quotes.
- ``--num-pairs N --seed S``: ``--images`` holds one sub-folder per identity (as training's folder source).
  Half the pairs (rounded up) are positives (two different images of one identity, the identity drawn
  uniformly among those with at least two images), half negatives (one image of each of two different
  identities), no pair twice, all drawn with ``numpy.random.default_rng(S)`` and then shuffled together, so
  each of the 10 consecutive folds of the protocol holds both kinds. The same folder and seed give the same
  file.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.runtime.fileio import WriteError, atomic_write
from engine.runtime.progress import progress

__all__ = ["Pair", "read_pairs", "draw_pairs", "encode_pairs", "write_bin", "main"]

Pair = Tuple[Path, Path, bool]  # (image, image, same identity), paths under the images folder
MIN_PAIRS = 10  # the 10-fold protocol needs at least one pair per fold


def _image(root: Path, rel: str, where: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise ValueError(f"{where}: image {rel!r} not found under {root}")
    return path


def read_pairs(pairs_file: os.PathLike, images_dir: os.PathLike) -> List[Pair]:
    """The pairs of a pair list (see the module docstring), each image checked to exist.

    Raises:
        FileNotFoundError: no such pair list or images folder.
        ValueError: a malformed line or a missing image (``<file>:<line>: ...``), or no pair at all.
    """
    pairs_file, root = Path(pairs_file), Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--images: folder {root} not found")
    if not pairs_file.is_file():
        raise FileNotFoundError(f"--pairs: pair list {pairs_file} not found")
    pairs: List[Pair] = []
    for number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{pairs_file}:{number}"
        try:
            fields = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ValueError(f"{where}: expected '<image> <image> <0|1>' (paths relative to {root}), got {line!r}")
        pairs.append((_image(root, fields[0], where), _image(root, fields[1], where), fields[2] == "1"))
    if not pairs:
        raise ValueError(f"{pairs_file}: no pairs (one '<image> <image> <0|1>' per line)")
    return pairs


def draw_pairs(images_dir: os.PathLike, num_pairs: int, seed: int) -> List[Pair]:
    """`num_pairs` balanced pairs drawn from an identity folder with `seed` (see the module docstring).

    Raises:
        ValueError: too few identities or images for that many distinct pairs (the counts are named).
    """
    from dali_pipes.folder import scan_image_folder

    if num_pairs < 1:
        raise ValueError(f"--num-pairs: expected >= 1, got {num_pairs}")
    files, labels, identities = scan_image_folder(images_dir)
    by_identity: List[List[Path]] = [[] for _ in identities]
    for f, label in zip(files, labels):
        by_identity[label].append(f)
    num_pos, num_neg = (num_pairs + 1) // 2, num_pairs // 2
    multi = [i for i, imgs in enumerate(by_identity) if len(imgs) >= 2]
    max_pos = sum(len(by_identity[i]) * (len(by_identity[i]) - 1) // 2 for i in multi)
    counts = [len(imgs) for imgs in by_identity]
    max_neg = (sum(counts) ** 2 - sum(c * c for c in counts)) // 2
    if num_pos > max_pos or num_neg > max_neg:
        raise ValueError(f"--num-pairs {num_pairs}: {images_dir} ({len(files)} images of {len(identities)} "
                         f"identities) holds at most {max_pos} distinct same-identity and {max_neg} "
                         f"different-identity pairs; {num_pos} and {num_neg} were asked for")
    rng = np.random.default_rng(seed)
    seen = set()
    pos: List[Pair] = []
    while len(pos) < num_pos:
        imgs = by_identity[multi[rng.integers(len(multi))]]
        a, b = sorted(rng.choice(len(imgs), size=2, replace=False).tolist())
        if (imgs[a], imgs[b]) not in seen:
            seen.add((imgs[a], imgs[b]))
            pos.append((imgs[a], imgs[b], True))
    neg: List[Pair] = []
    while len(neg) < num_neg:
        i, j = sorted(rng.choice(len(identities), size=2, replace=False).tolist())
        a, b = by_identity[i][rng.integers(counts[i])], by_identity[j][rng.integers(counts[j])]
        if (a, b) not in seen:
            seen.add((a, b))
            neg.append((a, b, False))
    pairs = pos + neg
    return [pairs[k] for k in rng.permutation(len(pairs))]


def encode_pairs(pairs: Sequence[Pair], *, resize: str = "none", quality: int = 95,
                 show_progress: bool = True) -> Tuple[List[bytes], List[bool]]:
    """The .bin's two lists: each pair's two images encoded as training reads them (dali_pipes.pack's
    encode_image: a 112x112 JPEG as it is, anything else re-encoded, another size as `resize` says), and the
    pairs' labels. An image in several pairs is encoded once."""
    from dali_pipes.pack import encode_image

    cache = {}
    images: List[bytes] = []
    for path in progress([f for a, b, _ in pairs for f in (a, b)], desc="images", unit="img",
                         enabled=show_progress):
        if path not in cache:
            cache[path] = encode_image(path.read_bytes(), quality, where=str(path), resize=resize)
        images.append(cache[path])
    return images, [bool(same) for _, _, same in pairs]


def write_bin(images: Sequence[bytes], issame: Sequence[bool], out: os.PathLike) -> Path:
    """Write insightface's pickle ``(images, issame)`` atomically (a crash leaves no half file)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected two per pair")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps((list(images), list(issame)), protocol=4)
    atomic_write(out, lambda f: f.write(data))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dali_pipes.augment import RESIZE_MODES

    parser = argparse.ArgumentParser(prog="python -m engine.make_bin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="the images folder (with --num-pairs: one sub-folder "
                                                        "per identity)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="pair list: '<image> <image> <0|1>' per line, paths relative to --images")
    source.add_argument("--num-pairs", type=int, help="draw this many balanced pairs from the identity folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn pairs (default 0)")
    parser.add_argument("--out", required=True, help="the .bin file to write")
    parser.add_argument("--resize", default="none", choices=RESIZE_MODES,
                        help="images that are not 112x112: none (an error), pad, center_crop or stretch")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    args = parser.parse_args(argv)
    try:
        if args.pairs is not None:
            pairs = read_pairs(args.pairs, args.images)
        else:
            pairs = draw_pairs(args.images, args.num_pairs, args.seed)
        images, issame = encode_pairs(pairs, resize=args.resize, quality=args.quality)
        out = write_bin(images, issame, args.out)
    except (ValueError, FileNotFoundError, WriteError) as exc:
        print(f"error: {str(exc).replace('engine.data.resize', '--resize')}", file=sys.stderr)
        return 2
    same = sum(issame)
    note = (f"; the 10-fold protocol needs at least {MIN_PAIRS} pairs" if len(issame) < MIN_PAIRS else "")
    print(f"wrote {out}: {len(issame)} pairs ({same} same identity, {len(issame) - same} different) of "
          f"{len(set(f for a, b, _ in pairs for f in (a, b)))} images{note}")
    return 0
