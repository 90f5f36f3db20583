"""insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...) and the 10-fold accuracy protocol.

A ``.bin`` file is a pickle of ``(bins, issame)``: ``2N`` JPEG byte strings (pairs are consecutive) and
``N`` booleans. Pickles can run arbitrary code, and these files are downloaded from third-party mirrors, so
``load_bin`` uses an unpickler that refuses every global reference: only the containers and scalars that
pickle opcodes build by themselves (lists, tuples, bytes, str, bools, ints...) can come out of it.

``evaluate`` reproduces insightface's ``verification.py`` (``calculate_roc`` / ``calculate_accuracy`` with
``LFold``/``KFold(shuffle=False)``) number for number, so accuracies are comparable with published ones.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "load_bin",
    "decode_bin",
    "kfold_splits",
    "l2_normalize",
    "evaluate",
    "embedding_norm_stats",
    "extract_embeddings",
    "verify_bin",
]

_THRESHOLDS = np.arange(0, 4, 0.01)


# ----------------------------------------------------------------------------------------------------------
# loading


class _ForbiddenGlobal(ValueError):
    pass


def _latin1_encode(text: Any, encoding: Any = None) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _ForbiddenGlobal(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only (str, 'latin1') is allowed"
        )
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build only what pickle opcodes build natively; every import is refused.

    ``find_class`` is the single door through which a pickle reaches Python objects (GLOBAL, STACK_GLOBAL,
    INST, OBJ and the EXT* opcodes all go through it); REDUCE/NEWOBJ/BUILD need such an object first, so
    refusing it here makes ``__reduce__`` payloads inert. The one exception is a local stand-in for
    ``_codecs.encode(str, 'latin1')``, which is how Python 3 pickles bytes at protocols 0-2.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as insightface loads them

    def find_class(self, module: str, name: str) -> Any:
        if isinstance(module, bytes):
            module = module.decode("latin-1")
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes at protocols 0-2 as _codecs.encode(str, 'latin1'). Hand out a stand-in
            # that does only that, never the real codec machinery.
            return _latin1_encode
        raise _ForbiddenGlobal(
            f"refusing to load forbidden object '{module}.{name}' referenced by the pickle; "
            f"a verification .bin holds only a list of JPEG bytes and a list of bools"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _ForbiddenGlobal(f"refusing persistent id {pid!r} in the pickle")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Load an insightface verification ``.bin`` safely.

    Returns:
        ``(bins, issame)``: ``2N`` encoded images as bytes and ``N`` bools (pair i is ``bins[2i], bins[2i+1]``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid pickle, references any global (named in the message), or does not
            have the ``(list of bytes, list of bool)`` structure with ``len(bins) == 2 * len(issame)``.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except _ForbiddenGlobal as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # UnpicklingError, EOFError, struct errors, ... from a corrupt file
        raise ValueError(f"{path}: not a readable verification pickle ({type(e).__name__}: {e})") from None

    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled pair (bins, issame), got {type(obj).__name__}")
    raw_bins, raw_issame = obj
    if not isinstance(raw_bins, (list, tuple)) or not isinstance(raw_issame, (list, tuple)):
        raise ValueError(
            f"{path}: expected (list, list), got ({type(raw_bins).__name__}, {type(raw_issame).__name__})"
        )
    bins = []
    for i, b in enumerate(raw_bins):
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(b).__name__}, expected encoded image bytes")
        bins.append(bytes(b))
    issame = []
    for i, s in enumerate(raw_issame):
        if isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):  # py2 protocol-0 bools load as ints
            issame.append(bool(s))
        else:
            raise ValueError(f"{path}: issame[{i}] is {s!r}, expected a bool")
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs; expected len(bins) == 2 * len(issame)"
        )
    return bins, issame


def decode_bin(
    bins: Sequence[bytes], image_size: tuple[int, int] = (112, 112), *, source: str | os.PathLike | None = None,
    resize: str = "none",
) -> np.ndarray:
    """Decode encoded images to a uint8 RGB array ``[len(bins), H, W, 3]`` with Pillow.

    Images of another size than ``image_size = (H, W)`` are never stretched silently: an error naming the image
    unless `resize` says how (``pad``, ``center_crop``, ``stretch``: ``dali_pipes.augment.fit_image``, the same
    rule as training's ``engine.data.resize``). insightface's own .bin files are 112x112.

    Args:
        bins: encoded images (from ``load_bin``).
        image_size: ``(height, width)``.
        source: file name used in error messages.
        resize: ``none`` (the default), ``pad``, ``center_crop`` or ``stretch``.

    Raises:
        ValueError: an image that cannot be decoded, or of another size under ``resize="none"`` (both name the
            file and the image's index).
    """
    from PIL import Image

    from dali_pipes.augment import ImageSizeError, fit_image

    h, w = image_size
    out = np.empty((len(bins), h, w, 3), dtype=np.uint8)
    where = f"{source}: " if source is not None else ""
    for i, b in enumerate(bins):
        try:
            with Image.open(io.BytesIO(b)) as im:
                out[i] = np.asarray(fit_image(im.convert("RGB"), (h, w), resize))
        except ImageSizeError as e:
            raise ValueError(f"{where}image {i} of {len(bins)}: {e}") from None
        except Exception as e:
            raise ValueError(f"{where}cannot decode image {i} of {len(bins)} ({type(e).__name__}: {e})") from None
    return out


# ----------------------------------------------------------------------------------------------------------
# the protocol


def kfold_splits(num_samples: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index arrays exactly as ``sklearn.model_selection.KFold(num_folds, shuffle=False)``.

    The first ``num_samples % num_folds`` folds get one extra sample. ``num_folds == 1`` follows insightface's
    ``LFold``: train and test are both every sample.
    """
    if num_folds < 1:
        raise ValueError(f"nrof_folds must be >= 1, got {num_folds}")
    indices = np.arange(num_samples)
    if num_folds == 1:
        return [(indices, indices)]
    if num_folds > num_samples:
        raise ValueError(f"cannot split {num_samples} pairs into nrof_folds={num_folds} folds")
    fold_sizes = np.full(num_folds, num_samples // num_folds, dtype=int)
    fold_sizes[: num_samples % num_folds] += 1
    splits = []
    start = 0
    for size in fold_sizes:
        test_mask = np.zeros(num_samples, dtype=bool)
        test_mask[start : start + size] = True
        splits.append((indices[~test_mask], indices[test_mask]))
        start += size
    return splits


def _to_numpy(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
                x = x.float()  # bf16 and friends have no numpy dtype
            return x.numpy()
    except ImportError:
        pass
    return np.asarray(x)


def l2_normalize(x: Any) -> np.ndarray:
    """Row-wise L2 normalisation, the same arithmetic as ``sklearn.preprocessing.normalize`` (dense, l2).

    float16/32/64 keep their dtype, anything else becomes float64; rows with (near) zero norm are left as is.
    """
    x = _to_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D [num, dim] array, got shape {x.shape}")
    x = np.array(x, dtype=x.dtype if x.dtype in (np.float16, np.float32, np.float64) else np.float64, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    x /= norms[:, np.newaxis]
    return x


def _confusion(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """tpr, fpr, acc for every threshold at once (insightface's calculate_accuracy, vectorised)."""
    predict = dist[np.newaxis, :] < thresholds[:, np.newaxis]
    same = issame[np.newaxis, :]
    tp = np.sum(predict & same, axis=1)
    fp = np.sum(predict & ~same, axis=1)
    tn = np.sum(~predict & ~same, axis=1)
    fn = np.sum(~predict & same, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1).astype(np.float64))
        fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1).astype(np.float64))
    acc = (tp + tn).astype(np.float64) / dist.size
    return tpr, fpr, acc


def evaluate(embeddings: Any, issame: Sequence[bool], nrof_folds: int = 10) -> dict:
    """insightface's verification accuracy: best-threshold selection on 9 folds, accuracy on the 10th.

    Embeddings are L2-normalised (as insightface's ``test()`` does before ``evaluate``); row ``2i`` and
    ``2i+1`` form pair ``i``; distance is squared L2; thresholds ``np.arange(0, 4, 0.01)``; a pair is
    predicted "same" when ``dist < threshold``; the best training threshold is the first maximum.

    Args:
        embeddings: ``[2N, E]`` numpy array or torch tensor.
        issame: ``N`` bools.
        nrof_folds: number of consecutive (unshuffled) folds.

    Returns:
        dict with ``acc_mean`` and ``acc_std`` (mean and population std over folds, floats), ``threshold``
        (mean best threshold), ``best_thresholds`` and ``accuracy`` (per fold, lists), ``tpr`` and ``fpr``
        (numpy, per threshold, averaged over the test folds), ``thresholds`` and ``num_pairs``.
    """
    emb = l2_normalize(embeddings)
    actual = np.asarray(issame, dtype=bool).ravel()
    if emb.shape[0] != 2 * actual.size:
        raise ValueError(f"{emb.shape[0]} embeddings for {actual.size} pairs; expected 2 * len(issame) rows")
    if actual.size == 0:
        raise ValueError("no pairs to evaluate")
    embeddings1, embeddings2 = emb[0::2], emb[1::2]
    # insightface: np.sum(np.square(np.subtract(e1, e2)), 1), compared (numpy >= 2 promotion) in float64
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1).astype(np.float64)
    thresholds = _THRESHOLDS
    splits = kfold_splits(actual.size, nrof_folds)
    tprs = np.zeros((len(splits), thresholds.size))
    fprs = np.zeros((len(splits), thresholds.size))
    accuracy = np.zeros(len(splits))
    best_thresholds = np.zeros(len(splits))
    for fold, (train, test) in enumerate(splits):
        _, _, acc_train = _confusion(dist[train], actual[train], thresholds)
        best = int(np.argmax(acc_train))
        tprs[fold], fprs[fold], acc_test = _confusion(dist[test], actual[test], thresholds)
        accuracy[fold] = acc_test[best]
        best_thresholds[fold] = thresholds[best]
    return dict(
        acc_mean=float(np.mean(accuracy)),
        acc_std=float(np.std(accuracy)),
        threshold=float(np.mean(best_thresholds)),
        best_thresholds=best_thresholds.tolist(),
        accuracy=accuracy.tolist(),
        tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0),
        thresholds=thresholds,
        num_pairs=int(actual.size),
    )


def embedding_norm_stats(raw_embeddings: Any) -> dict:
    """Mean and (population) std of the L2 norms of un-normalised embeddings (insightface's ``XNorm``).

    Accepts ``[M, E]`` or any ``[..., E]`` stack (e.g. plain and flipped embeddings together).
    """
    x = _to_numpy(raw_embeddings).astype(np.float64)
    norms = np.linalg.norm(x.reshape(-1, x.shape[-1]), axis=1)
    return dict(norm_mean=float(norms.mean()), norm_std=float(norms.std()))


# ----------------------------------------------------------------------------------------------------------
# running a model


def extract_embeddings(
    model: Any,
    images_uint8: np.ndarray,
    batch_size: int,
    device: Any,
    flip: bool = True,
    *,
    return_raw: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embed ``[M, H, W, 3]`` uint8 RGB images the way arcface_torch's verification callback does.

    Pixels go to ``((x / 255) - 0.5) / 0.5`` in NCHW float32. The model runs in eval mode under
    ``torch.no_grad`` (its previous train/eval mode is restored afterwards). With ``flip``, the embedding of
    the horizontally flipped image is added to the plain one before L2 normalisation (insightface sums them).

    Returns:
        ``[M, E]`` L2-normalised float embeddings; with ``return_raw`` also the un-normalised outputs
        ``[1 or 2, M, E]`` (plain, flipped) for ``embedding_norm_stats``.
    """
    import torch

    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected [M, H, W, 3] images, got shape {images_uint8.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs: list[list[np.ndarray]] = [[], []] if flip else [[]]
    try:
        with torch.no_grad():
            for start in range(0, images_uint8.shape[0], batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images_uint8[start : start + batch_size]))
                x = batch.to(device).permute(0, 3, 1, 2).float()
                x = ((x / 255) - 0.5) / 0.5
                views = [x, torch.flip(x, dims=[3])] if flip else [x]
                for out, view in zip(outputs, views):
                    out.append(_to_numpy(model(view).float()))
    finally:
        model.train(was_training)
    raw = np.stack([np.concatenate(o, axis=0) for o in outputs])
    embeddings = l2_normalize(raw.sum(axis=0) if flip else raw[0])
    return (embeddings, raw) if return_raw else embeddings


def verify_bin(
    model: Any,
    path: str | os.PathLike,
    batch_size: int,
    device: Any,
    *,
    image_size: tuple[int, int] = (112, 112),
    nrof_folds: int = 10,
    flip: bool = True,
    resize: str = "none",
) -> dict:
    """Load, decode, embed and evaluate one ``.bin``: ``evaluate``'s dict plus ``norm_mean``/``norm_std``.

    `resize`: what to do with images that are not `image_size` (see ``decode_bin``)."""
    bins, issame = load_bin(path)
    images = decode_bin(bins, image_size, source=path, resize=resize)
    _, raw = extract_embeddings(model, images, batch_size, device, flip=flip, return_raw=True)
    # evaluate normalises the summed embeddings itself: normalising once, like insightface, keeps every bit
    result = evaluate(raw.sum(axis=0), issame, nrof_folds=nrof_folds)
    result.update(embedding_norm_stats(raw))
    return result
