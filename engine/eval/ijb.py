"""The IJB-B / IJB-C 1:1 verification protocol as insightface's ``recognition/arcface_torch/eval_ijbc.py`` runs it.

Numpy only (plus Pillow to read images); ``engine.eval_ijb`` runs a model over the images and calls these.

Layout of a dataset root (insightface's IJB release)::

    <root>/meta/<target>_face_tid_mid.txt        image template_id media_id        (one line per face)
    <root>/meta/<target>_name_5pts_score.txt     image x1 y1 ... x5 y5 faceness   (same faces, same order)
    <root>/meta/<target>_template_pair_label.txt template_id template_id label (1 same identity, 0 not)
    <root>/loose_crop/<image>

with ``<target>`` = ``ijbc`` or ``ijbb``. The protocol:

1. Each face is aligned to arcface's 112x112 five-point template (insightface's ``src`` + 8 px in x) by the
   least-squares similarity transform of its landmarks (Umeyama, as ``skimage.transform.SimilarityTransform``
   estimates it) and a bilinear warp with black borders (``cv2.warpAffine``'s sampling: pixel centres at
   integer coordinates). cv2 interpolates in 1/32-pixel fixed point; this warp is exact float, so a pixel can
   differ from insightface's by one grey level.
2. The embedding of a face is model(image) + model(flipped image) (``use_flip_test``), kept un-normalised so
   its norm weights the face (``use_norm_score``), times the detector's faceness score (``use_detector_score``).
3. A template's feature is the sum over its media of the mean feature of that media's faces, L2-normalised.
4. A pair's score is the cosine of its two templates' features.
5. ROC as ``sklearn.metrics.roc_curve(labels, scores)`` (with ``drop_intermediate``) and TAR at each FAR in
   1e-6 ... 1e-1 as the TPR of the ROC point whose FPR is closest to it (ties: the point with the larger TPR).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "FAR_TARGETS", "IJBMeta", "meta_paths", "read_meta", "similarity_transform",
           "warp_affine", "align_face", "load_aligned", "face_features", "template_features", "pair_scores",
           "roc_curve", "tar_at_far", "auc"]

# arcface's five landmarks (eyes, nose tip, mouth corners) in a 112x112 crop: insightface's src with x + 8.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IMAGE_SIZE = 112


@dataclass
class IJBMeta:
    """The three meta files of one target, checked against each other."""

    names: List[str]            # image file names under loose_crop, in file order
    templates: np.ndarray       # int64 [M]: template of each face
    medias: np.ndarray          # int64 [M]: media (photo or video) of each face
    landmarks: np.ndarray       # float32 [M, 5, 2]
    faceness: np.ndarray        # float32 [M]: detector score
    pair_t1: np.ndarray         # int64 [P]
    pair_t2: np.ndarray         # int64 [P]
    labels: np.ndarray          # int64 [P]: 1 same identity, 0 not


def meta_paths(root: Union[str, Path], target: str) -> Dict[str, Path]:
    """The meta files of `target` (``IJBC``/``IJBB``, any case) under ``<root>/meta``."""
    meta = Path(root) / "meta"
    t = target.lower()
    return {"tid_mid": meta / f"{t}_face_tid_mid.txt", "pairs": meta / f"{t}_template_pair_label.txt",
            "faces": meta / f"{t}_name_5pts_score.txt"}


def _lines(path: Path):
    """(line number, fields) of every non-blank line; FileNotFoundError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB meta file not found")
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                yield number, line.rstrip("\n"), fields


def _ints(path: Path, number: int, line: str, fields: Sequence[str], expected: str) -> List[int]:
    try:
        return [int(x) for x in fields]
    except ValueError:
        raise ValueError(f"{path}:{number}: expected '{expected}', got {line!r}") from None


def read_meta(root: Union[str, Path], target: str) -> IJBMeta:
    """Read and cross-check the three meta files of `target`.

    Raises:
        FileNotFoundError: a meta file is missing (named).
        ValueError: a malformed line (file and line number named), the face lists disagree, or a pair names a
            template no face belongs to.
    """
    paths = meta_paths(root, target)
    names, templates, medias = [], [], []
    tid_expected = "<image> <template id> <media id>"
    for number, line, fields in _lines(paths["tid_mid"]):
        if len(fields) != 3:
            raise ValueError(f"{paths['tid_mid']}:{number}: expected '{tid_expected}', got {line!r}")
        tid, mid = _ints(paths["tid_mid"], number, line, fields[1:], tid_expected)
        names.append(fields[0])
        templates.append(tid)
        medias.append(mid)
    face_names, landmarks, faceness = [], [], []
    face_expected = "<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <faceness score>"
    for number, line, fields in _lines(paths["faces"]):
        try:
            if len(fields) != 12:
                raise ValueError
            values = [float(x) for x in fields[1:]]
            if not np.all(np.isfinite(values)):
                raise ValueError
        except ValueError:
            raise ValueError(f"{paths['faces']}:{number}: expected '{face_expected}', got {line!r}") from None
        if len(face_names) < len(names) and fields[0] != names[len(face_names)]:
            raise ValueError(f"{paths['faces']}:{number}: image {fields[0]!r}, but face {len(face_names) + 1} of "
                             f"{paths['tid_mid']} is {names[len(face_names)]!r}; the two files must list the same "
                             "faces in the same order")
        face_names.append(fields[0])
        landmarks.append(values[:10])
        faceness.append(values[10])
    if len(face_names) != len(names):
        raise ValueError(f"{paths['faces']} lists {len(face_names)} faces, {paths['tid_mid']} {len(names)}; "
                         "expected the same faces in the same order")
    if not names:
        raise ValueError(f"{paths['tid_mid']}: no faces")
    known = set(templates)
    t1, t2, labels = [], [], []
    pair_expected = "<template id> <template id> <label 0|1>"
    for number, line, fields in _lines(paths["pairs"]):
        if len(fields) != 3:
            raise ValueError(f"{paths['pairs']}:{number}: expected '{pair_expected}', got {line!r}")
        a, b, label = _ints(paths["pairs"], number, line, fields, pair_expected)
        if label not in (0, 1):
            raise ValueError(f"{paths['pairs']}:{number}: label {label}, expected 0 or 1")
        for t in (a, b):
            if t not in known:
                raise ValueError(f"{paths['pairs']}:{number}: template {t} has no face in {paths['tid_mid']}")
        t1.append(a)
        t2.append(b)
        labels.append(label)
    if not labels:
        raise ValueError(f"{paths['pairs']}: no pairs")
    return IJBMeta(names=names, templates=np.asarray(templates, np.int64), medias=np.asarray(medias, np.int64),
                   landmarks=np.asarray(landmarks, np.float32).reshape(-1, 5, 2),
                   faceness=np.asarray(faceness, np.float32), pair_t1=np.asarray(t1, np.int64),
                   pair_t2=np.asarray(t2, np.int64), labels=np.asarray(labels, np.int64))


# -- alignment -----------------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 matrix of the least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama (1991), as ``skimage.transform.SimilarityTransform.estimate`` computes it (``_umeyama`` with
    ``estimate_scale=True``), in float64.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    A = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(A) < 0:
        d[dim - 1] = -1
    T = np.eye(dim + 1, dtype=np.float64)
    U, S, V = np.linalg.svd(A)
    rank = np.linalg.matrix_rank(A)
    if rank == 0:
        return np.nan * T
    if rank == dim - 1:
        if np.linalg.det(U) * np.linalg.det(V) > 0:
            T[:dim, :dim] = U @ V
        else:
            s = d[dim - 1]
            d[dim - 1] = -1
            T[:dim, :dim] = U @ np.diag(d) @ V
            d[dim - 1] = s
    else:
        T[:dim, :dim] = U @ np.diag(d) @ V
    scale = 1.0 / src_demean.var(axis=0).sum() * (S @ d)
    T[:dim, dim] = dst_mean - scale * (T[:dim, :dim] @ src_mean.T)
    T[:dim, :dim] *= scale
    return T


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: Tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """``cv2.warpAffine(image, matrix[:2], (w, h), borderValue=0)`` with bilinear sampling, in float64.

    Output pixel (u, v) samples the input at ``inverse(matrix) @ (u, v, 1)``, pixel centres at integer
    coordinates; taps outside the image count as 0 (black); the result is rounded to uint8.

    Args:
        image: uint8 [H, W, C].
        matrix: 3x3 (or 2x3) affine map from input to output coordinates.
        size: output (height, width).
    """
    h_out, w_out = size
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    inv = np.linalg.inv(m)
    v, u = np.mgrid[0:h_out, 0:w_out].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    h, w = image.shape[:2]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    src = image.astype(np.float64)
    out = np.zeros((h_out, w_out, image.shape[2]), dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            tap = np.zeros_like(out)
            tap[inside] = src[yi[inside], xi[inside]]
            out += wx * wy * tap
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 RGB [112, 112, 3]: `image` warped so its 5 `landmarks` [5, 2] land on ``ARCFACE_TEMPLATE``."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"landmarks {np.asarray(landmarks).tolist()} do not define a similarity transform")
    return warp_affine(image, matrix)


def load_aligned(path: Union[str, Path], landmarks: np.ndarray) -> np.ndarray:
    """Read an image with Pillow (as RGB) and align it; ValueError naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: IJB image not found") from None
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    return align_face(rgb, landmarks)


# -- features and scores -------------------------------------------------------------------------------------

def face_features(embeddings: np.ndarray, faceness: np.ndarray, *, use_norm_score: bool = True,
                  use_detector_score: bool = True) -> np.ndarray:
    """Per-face features before pooling: optionally L2-normalised, optionally weighted by the faceness score."""
    feats = np.asarray(embeddings, dtype=np.float64)
    if not use_norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, axis=-1, keepdims=True))
    if use_detector_score:
        feats = feats * np.asarray(faceness, dtype=np.float64)[:, None]
    return feats


def template_features(features: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """L2-normalised template features [T, E] and the sorted template ids [T].

    Within a template, faces of the same media are averaged, and the media averages summed.
    """
    features = np.asarray(features, dtype=np.float64)
    keys, group = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    counts = np.bincount(group, minlength=len(keys)).astype(np.float64)
    media_means = np.zeros((len(keys), features.shape[1]))
    np.add.at(media_means, group, features)
    media_means /= counts[:, None]
    unique_templates, owner = np.unique(keys[:, 0], return_inverse=True)
    feats = np.zeros((len(unique_templates), features.shape[1]))
    np.add.at(feats, owner.reshape(-1), media_means)
    norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0  # sklearn.preprocessing.normalize leaves zero rows
    return feats / norms[:, None], unique_templates


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, t1: np.ndarray,
                t2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each template pair (float64 [P])."""
    index = {int(t): i for i, t in enumerate(unique_templates)}
    i1 = np.fromiter((index[int(t)] for t in t1), dtype=np.int64, count=len(t1))
    i2 = np.fromiter((index[int(t)] for t in t2), dtype=np.int64, count=len(t2))
    return np.einsum("ij,ij->i", template_feats[i1], template_feats[i2])


# -- ROC -----------------------------------------------------------------------------------------------------

def roc_curve(labels: np.ndarray, scores: np.ndarray,
              drop_intermediate: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` exactly as ``sklearn.metrics.roc_curve(labels, scores)`` returns them.

    One point per distinct score, from the highest (a pair is accepted when its score >= the threshold); with
    `drop_intermediate`, points on a straight segment between their neighbours are dropped (sklearn's default);
    a first point (0, 0) at threshold +inf.
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not np.all((y == 0) | (y == 1)) or not (y == 1).any() or not (y == 0).any():
        raise ValueError("labels must be 0/1 with at least one pair of each")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order].astype(np.float64)
    distinct = np.where(np.diff(s))[0]
    threshold_idxs = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    thresholds = s[threshold_idxs]
    if drop_intermediate and len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FAR_TARGETS) -> Dict[float, float]:
    """insightface's TAR@FAR: the TPR of the ROC point whose FPR is closest to each target FAR.

    eval_ijbc.py flips the curve and takes the first minimum of |fpr - far|, so of equally close points the one
    with the larger TPR (later on the unflipped curve) wins.
    """
    fpr_f, tpr_f = np.flipud(np.asarray(fpr)), np.flipud(np.asarray(tpr))
    return {far: float(tpr_f[int(np.argmin(np.abs(fpr_f - far)))]) for far in fars}


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, as sklearn.metrics.auc)."""
    trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")
    return float(trapezoid(tpr, fpr))
