"""IJB-B / IJB-C 1:1 verification (TAR at FAR 1e-6 ... 1e-1) of a trained backbone, insightface's protocol.

    python -m engine.eval_ijb --model outputs/r50/model.pt --backbone r50 --root /data/IJBC --target IJBC
    torchrun --nproc_per_node 8 -m engine.eval_ijb --model ... --root /data/IJBC --target IJBC  # 8 GPUs

The protocol is insightface's ``recognition/arcface_torch/eval_ijbc.py`` (see ``engine.eval.ijb`` for the steps and
the dataset layout); its defaults are kept: flip test-time augmentation (plain + flipped embeddings summed),
face-norm and detector-score weighting (``--no-use-norm-score``, ``--no-use-detector-score``,
``--no-use-flip-test`` turn them off, as its ``use_*`` flags do).

Under a launcher (``WORLD_SIZE`` > 1) the faces are split as the verification hook splits a ``.bin``
(engine.eval.embed): each rank aligns and embeds one slice of the faces, and the embeddings are all-gathered.
Rank 0 computes the scores and writes, under ``--output`` (default: ``ijb/`` beside the model):

    <target>_roc.json    TAR@FAR table, AUC, counts, settings and the ROC curve (fpr, tpr, thresholds;
                         the first threshold, +inf in sklearn, is written as null)
    <target>_scores.npy  the score of every template pair, in pair-file order (as eval_ijbc.py saves it)
    <target>_roc.png     the ROC plot, when matplotlib is installed (otherwise a note says it was skipped)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from engine.eval import embed, ijb
from engine.runtime.fileio import atomic_write_text
from engine.runtime import dist
from engine.runtime.progress import progress

__all__ = ["AlignedFaces", "embed_faces", "evaluate", "write_results", "main"]


class AlignedFaces(torch.utils.data.Dataset):
    """Faces [start, stop) of the meta files, read with Pillow and aligned: uint8 [112, 112, 3] RGB each."""

    def __init__(self, image_dir: Path, meta: ijb.IJBMeta, start: int, stop: int):
        self.image_dir, self.meta, self.start, self.stop = image_dir, meta, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> np.ndarray:
        index = self.start + i
        return ijb.load_aligned(self.image_dir / self.meta.names[index], self.meta.landmarks[index])


def _collate(batch: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def _message(exc: BaseException) -> str:
    """One line naming the file: a DataLoader worker's exception carries its whole traceback in the message."""
    text = str(exc)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if text.startswith(("ValueError: ", "FileNotFoundError: ", "OSError: ")) \
            else text
    return text


def embed_faces(model: torch.nn.Module, image_dir: Path, meta: ijb.IJBMeta, *, batch_size: int,
                device: torch.device, flip: bool = True, num_workers: int = 0) -> np.ndarray:
    """Embeddings [M, E] float32 of every face (plain + flipped when `flip`), on every rank.

    Each rank embeds its slice (see the module docstring), all ranks taking the same number of batches so that
    a failure on one rank (an unreadable image) is seen by all at the next batch and every rank raises it,
    instead of the others waiting in the final all-gather.
    """
    from engine.eval import verification

    num = len(meta.names)
    start, stop, per_rank = embed.rank_slice(num, dist.get_rank(), dist.get_world_size())
    loader = torch.utils.data.DataLoader(AlignedFaces(image_dir, meta, start, stop), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    batches = iter(loader)
    parts = []
    bar = progress(total=stop - start, desc="IJB faces", unit="face")  # rank 0's share, on a terminal only
    for _ in range(max(1, math.ceil(per_rank / batch_size))):
        failure: Optional[BaseException] = None
        try:
            images = next(batches, None)
            if images is not None:
                _, raw = verification.extract_embeddings(model, images, batch_size, device, flip=flip,
                                                         return_raw=True)
                parts.append(raw.sum(axis=0) if flip else raw[0])
                bar.update(len(images))
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it before the next collective
            failure = exc
        if dist.is_initialized():
            errors = [e for e in dist.all_gather_object(None if failure is None else _message(failure)) if e]
            if errors and (failure is None or isinstance(failure, (OSError, ValueError))):
                raise ValueError(errors[0])
        if failure is not None:
            if isinstance(failure, (OSError, ValueError)):
                raise ValueError(_message(failure)) from None
            raise failure
    bar.close()
    local = np.concatenate(parts).astype(np.float32) if parts else None
    if not dist.is_initialized():
        return local
    # A rank with an empty slice (the last ones, when the faces do not fill every slice) learns the width from others.
    dims = [d for d in dist.all_gather_object(None if local is None else local.shape[1]) if d is not None]
    return embed.gather_slices(local if local is not None else np.zeros((0, dims[0]), np.float32), num, device)


def evaluate(embeddings: np.ndarray, meta: ijb.IJBMeta, *, use_norm_score: bool = True,
             use_detector_score: bool = True) -> Dict[str, Any]:
    """Template features, pair scores, ROC and TAR@FAR from the face embeddings (flip already applied)."""
    feats = ijb.face_features(embeddings, meta.faceness, use_norm_score=use_norm_score,
                              use_detector_score=use_detector_score)
    template_feats, unique_templates = ijb.template_features(feats, meta.templates, meta.medias)
    scores = ijb.pair_scores(template_feats, unique_templates, meta.pair_t1, meta.pair_t2)
    fpr, tpr, thresholds = ijb.roc_curve(meta.labels, scores)
    return dict(scores=scores, fpr=fpr, tpr=tpr, thresholds=thresholds, tar_at_far=ijb.tar_at_far(fpr, tpr),
                auc=ijb.auc(fpr, tpr), num_faces=len(meta.names), num_templates=len(unique_templates),
                num_pairs=len(scores), num_genuine=int(meta.labels.sum()),
                num_impostor=int(len(scores) - meta.labels.sum()))


def _plot(result: Dict[str, Any], target: str, path: Path) -> Optional[str]:
    """The ROC as a PNG like eval_ijbc.py's plot; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no ROC plot (pip install matplotlib); the curve is in the JSON"
    fig = plt.figure()
    plt.plot(result["fpr"], result["tpr"], lw=1, label=f"{target} (AUC = {result['auc'] * 100:.4f} %)")
    plt.xlim([1e-6, 0.1])
    plt.ylim([0.3, 1.0])
    plt.grid(linestyle="--", linewidth=1)
    plt.xticks(list(ijb.FAR_TARGETS))
    plt.xscale("log")
    plt.xlabel("False Positive Rate")
    plt.ylabel("True Positive Rate")
    plt.title(f"ROC on {target}")
    plt.legend(loc="lower right")
    fig.savefig(path)
    plt.close(fig)
    return None


def write_results(result: Dict[str, Any], out_dir: Path, target: str, settings: Dict[str, Any]) -> Dict[str, Path]:
    """Write the JSON, the scores and (if possible) the plot; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t = target.lower()
    paths = {"json": out_dir / f"{t}_roc.json", "scores": out_dir / f"{t}_scores.npy"}
    np.save(paths["scores"], result["scores"])
    record = {
        "target": target, "tar_at_far": {f"{far:g}": tar for far, tar in result["tar_at_far"].items()},
        "auc": result["auc"], **{k: result[k] for k in ("num_faces", "num_templates", "num_pairs", "num_genuine",
                                                         "num_impostor")},
        "settings": settings,
        "roc": {"fpr": result["fpr"].tolist(), "tpr": result["tpr"].tolist(),
                "thresholds": [None if not math.isfinite(x) else x for x in result["thresholds"].tolist()]},
    }
    atomic_write_text(json.dumps(record, indent=1) + "\n", paths["json"])
    note = _plot(result, target, out_dir / f"{t}_roc.png")
    if note is None:
        paths["png"] = out_dir / f"{t}_roc.png"
    else:
        print(f"note: {note}")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ArcScale model.pt or arcface_torch backbone .pth")
    parser.add_argument("--backbone", default=None, help="backbone name, e.g. r50 (default: from the run's "
                                                         "config.json beside --model)")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="output width (default: from config.json beside --model, else 512)")
    parser.add_argument("--root", required=True, help="IJB root with meta/ and loose_crop/")
    parser.add_argument("--target", default="IJBC", type=str.upper, choices=("IJBC", "IJBB"))
    parser.add_argument("--output", default=None, help="result directory (default: ijb/ beside the model)")
    parser.add_argument("--batch-size", type=int, default=128, help="faces per forward call on each rank")
    parser.add_argument("--workers", type=int, default=4, help="image reading/aligning processes per rank")
    parser.add_argument("--use-flip-test", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--use-norm-score", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--use-detector-score", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        parser.error(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
    from engine.state.weights import load_backbone, model_settings

    owns_group = dist.join_launcher_group()
    try:
        args.backbone, args.embedding_size, _ = model_settings(args.model, args.backbone, args.embedding_size)
        t0 = time.perf_counter()
        meta = ijb.read_meta(args.root, args.target)  # every rank reads it: errors surface on all of them
        device = dist.get_device()
        model = load_backbone(args.model, args.backbone, embedding_size=args.embedding_size).to(device)
        embeddings = embed_faces(model, Path(args.root) / "loose_crop", meta, batch_size=args.batch_size,
                                 device=device, flip=args.use_flip_test, num_workers=args.workers)
        t_embed = time.perf_counter() - t0
        if dist.get_rank() == 0:
            result = evaluate(embeddings, meta, use_norm_score=args.use_norm_score,
                              use_detector_score=args.use_detector_score)
            settings = {"model": str(args.model), "backbone": args.backbone, "use_flip_test": args.use_flip_test,
                        "use_norm_score": args.use_norm_score, "use_detector_score": args.use_detector_score,
                        "world_size": dist.get_world_size(), "embed_seconds": round(t_embed, 1)}
            out_dir = Path(args.output) if args.output else Path(args.model).parent / "ijb"
            paths = write_results(result, out_dir, args.target, settings)
            print(f"{args.target}: {result['num_faces']} faces, {result['num_templates']} templates, "
                  f"{result['num_pairs']} pairs ({result['num_genuine']} genuine), embedded in {t_embed:.1f} s "
                  f"on {dist.get_world_size()} rank(s)")
            print("FAR   " + "".join(f"{far:>9g}" for far in ijb.FAR_TARGETS))
            print("TAR % " + "".join(f"{100 * result['tar_at_far'][far]:>9.2f}" for far in ijb.FAR_TARGETS))
            print(f"AUC {100 * result['auc']:.4f} %; wrote {', '.join(str(p) for p in paths.values())}")
    except (ValueError, FileNotFoundError) as exc:  # the same message on every rank: rank 0 says it
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            dist.destroy()
    return 0
