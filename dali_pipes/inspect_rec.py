"""Describe and check an insightface RecordIO dataset.

    python -m dali_pipes.inspect_rec PATH [--limit N] [--workers N]

``PATH`` is a dataset directory (``train.rec``/``train.idx``/``property``) or a ``.rec`` file. Prints the
record counts, the header record, the ``property`` file, the classes (images per class), the image-size
histogram, and every corrupt record (unreadable framing, bad IRHeader, non-image payload, image that does not
decode, label out of range or disagreeing with its identity record) with its key. Every image is fully decoded
(``--limit`` checks only the first N). Exit status: 0 clean, 1 corrupt records found, 2 unreadable dataset.
"""
from __future__ import annotations

import argparse
import collections
import io
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dali_pipes.recordio import RecordIOReader, read_insightface_layout, unpack

__all__ = ["inspect_dataset", "format_report", "main"]

_MAX_LISTED = 50
_reader: RecordIOReader | None = None  # per worker process


def _check(args: tuple[int, int]) -> tuple[int, Any, Any, str | None]:
    """(key, label, (w, h) or None, problem or None) for one image record."""
    from PIL import Image

    from dali_pipes.augment import payload_problem

    key, num_classes = args
    assert _reader is not None
    try:
        header, payload = unpack(_reader.read_idx(key))
    except (ValueError, KeyError) as e:
        return key, None, None, str(e)
    label_arr = np.asarray(header.label, dtype=np.float64).ravel()
    label = float(label_arr[0]) if label_arr.size else float("nan")
    if not (label == int(label) and 0 <= label < num_classes):
        return key, label, None, f"label {label:g} outside [0, {num_classes})"
    problem = payload_problem(payload)
    if problem is not None:
        return key, int(label), None, problem
    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()
            size = im.size
    except Exception as e:
        return key, int(label), None, f"image does not decode ({type(e).__name__}: {e})"
    return key, int(label), size, None


def _init_worker(reader: RecordIOReader) -> None:
    global _reader
    _reader = reader


def inspect_dataset(path: str | os.PathLike, *, limit: int | None = None, workers: int = 1) -> dict:
    """Scan a dataset; return a dict report (see ``format_report``). Raises on an unreadable index/header."""
    path = Path(path)
    rec = path / "train.rec" if path.is_dir() else path
    reader = RecordIOReader(rec)
    layout = read_insightface_layout(reader, read_identities=True)
    keys = [int(k) for k in layout["image_keys"]]
    checked = keys if limit is None else keys[:limit]
    num_classes = layout["num_classes"]
    header = None
    if layout["has_header"]:
        h, _ = unpack(reader.read_idx(0))
        header = dict(flag=int(h.flag), label=[float(v) for v in np.asarray(h.label).ravel()], id=h.id, id2=h.id2)
    identity_of = {}
    if layout["identity_ranges"]:
        for cls, (start, end) in enumerate(layout["identity_ranges"]):
            for k in range(start, end):
                identity_of[k] = cls
    jobs = [(k, num_classes) for k in checked]
    if workers > 1 and len(jobs) > 256:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
            results = list(pool.imap(_check, jobs, chunksize=256))
    else:
        _init_worker(reader)
        results = [_check(j) for j in jobs]
    sizes: collections.Counter = collections.Counter()
    per_class: collections.Counter = collections.Counter()
    corrupt = []
    for key, label, size, problem in results:
        if problem is None and identity_of and identity_of.get(key) != label:
            problem = f"label {label} but identity record says {identity_of.get(key)}"
        if problem is not None:
            corrupt.append((key, problem))
            continue
        sizes[f"{size[0]}x{size[1]}"] += 1
        per_class[label] += 1
    counts = np.array([per_class.get(c, 0) for c in range(num_classes)]) if num_classes else np.zeros(0)
    prop = rec.parent / "property"
    report = dict(
        rec=str(rec), idx=str(reader.idx_path), rec_bytes=rec.stat().st_size, num_records=len(reader.keys),
        has_header=layout["has_header"], header=header, num_images=layout["num_images"],
        num_identity_records=len(layout["identity_ranges"] or []), num_classes=num_classes,
        property=prop.read_text().strip() if prop.is_file() else None, num_checked=len(checked),
        images_per_class=dict(min=int(counts.min()) if counts.size else 0,
                              mean=float(counts.mean()) if counts.size else 0.0,
                              max=int(counts.max()) if counts.size else 0,
                              empty=int((counts == 0).sum())),
        image_sizes=dict(sizes.most_common()), corrupt=corrupt,
    )
    reader.close()
    return report


def format_report(r: dict) -> str:
    lines = [
        f"dataset: {r['rec']} ({r['rec_bytes']} bytes), index {r['idx']}",
        f"records: {r['num_records']} (header {int(r['has_header'])}, images {r['num_images']}, "
        f"identity records {r['num_identity_records']})",
    ]
    if r["header"] is not None:
        h = r["header"]
        lines.append(f"header: key 0 flag={h['flag']} label={[int(v) for v in h['label']]} id={h['id']} id2={h['id2']}")
    else:
        lines.append("header: none (every record is an image)")
    lines.append(f"property: {r['property'] if r['property'] is not None else 'missing'}")
    c = r["images_per_class"]
    lines.append(f"classes: {r['num_classes']} (images per class: min {c['min']}, mean {c['mean']:.1f}, "
                 f"max {c['max']}; classes without a good image: {c['empty']})")
    lines.append(f"checked: {r['num_checked']} of {r['num_images']} images (fully decoded)")
    lines.append("image sizes:")
    for size, n in r["image_sizes"].items():
        lines.append(f"  {size:>9}  {n}")
    lines.append(f"corrupt records: {len(r['corrupt'])}")
    for key, problem in r["corrupt"][:_MAX_LISTED]:
        lines.append(f"  key {key}: {problem}")
    if len(r["corrupt"]) > _MAX_LISTED:
        lines.append(f"  ... and {len(r['corrupt']) - _MAX_LISTED} more")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dali_pipes.inspect_rec", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="dataset directory or .rec file")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoder processes")
    args = parser.parse_args(argv)
    try:
        report = inspect_dataset(args.path, limit=args.limit, workers=args.workers)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 1 if report["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
