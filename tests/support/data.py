"""Small datasets the tests write: an insightface rec with chosen labels, a training folder laid out as insightface's
(rec, property and verification .bin files), and an IJB-C-shaped test set.

Shared by the tiers (a loader check in tests/unit, the same data through `python run.py` in tests/launch).
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import torch
from PIL import Image

from dali_pipes.recordio import IRHeader, RecordIOWriter, pack
from engine.eval.ijb_synthetic import MEDIA_PER_TEMPLATE, NUM_IDS, TEMPLATES_PER_ID, write_ijbc  # noqa: F401


def jpeg(seed: int) -> bytes:
    """A 112x112 JPEG of random pixels (seeded)."""
    arr = np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=80)
    return out.getvalue()


def write_rec(root, labels, num_classes: int = 2):
    """An insightface rec (header record declaring `num_classes` identities) with one image per label."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            w.write_idx(key, pack(IRHeader(0, label, key, 0), jpeg(key)))
        per = -(-n // num_classes)
        for c in range(num_classes):
            lo, hi = 1 + c * per, min(1 + (c + 1) * per, n + 1)
            w.write_idx(n + 1 + c, pack(IRHeader(2, [lo, hi], 0, 0), b""))
    return root


def write_bin(path, num_pairs: int = 10, seed: int = 0):
    """An insightface verification .bin at `path`: `num_pairs` pairs of random JPEGs, alternately same and not."""
    images = [jpeg(seed * 100_000 + 1_000_000 + i) for i in range(2 * num_pairs)]
    path.write_bytes(pickle.dumps((images, [i % 2 == 0 for i in range(num_pairs)]), protocol=4))
    return path


def write_insightface_folder(root, identities: int = 4, per_identity: int = 2, num_pairs: int = 10,
                             targets=("lfw", "cfp_fp", "agedb_30")):
    """A training folder laid out as insightface distributes MS1MV3 / Glint360K: train.rec, train.idx, property
    (``<identities>,112,112``) and the verification sets `targets` as ``<name>.bin`` beside them."""
    labels = [c for c in range(identities) for _ in range(per_identity)]
    write_rec(root, labels, num_classes=identities)
    (root / "property").write_text(f"{identities},112,112\n")
    for k, name in enumerate(targets):
        write_bin(root / f"{name}.bin", num_pairs, seed=k)
    return root


def make_ijb_dataset(root, seed: int = 0) -> dict:
    """IJB-C layout under `root` (engine.eval.ijb_synthetic); returns the aligned crop, template, media and
    faceness of every face."""
    return write_ijbc(root, seed=seed)


def ijb_reference(model: torch.nn.Module, data: dict, batch_size: int = 16) -> dict:
    """The protocol by hand: crops -> model(x) + model(flip x), x faceness -> media means -> template sums.

    Batches of `batch_size` as the tool forms them, so the float32 model outputs are the same bits on any CPU.
    """
    crops = np.stack([f["crop"] for f in data["faces"]])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        emb = torch.cat([model.eval()(b) + model(torch.flip(b, dims=[3])) for b in x.split(batch_size)])
    emb = emb.double().numpy()
    by_template: dict = {}
    for f, e in zip(data["faces"], emb):
        by_template.setdefault(f["template"], {}).setdefault(f["media"], []).append(e * float(f["faceness"]))
    templates = {}
    for t, media in by_template.items():
        v = sum(np.mean(feats, axis=0) for feats in media.values())
        templates[t] = v / np.linalg.norm(v)
    scores = np.array([templates[a] @ templates[b] for a, b, _ in data["pairs"]])
    labels = np.array([y for _, _, y in data["pairs"]])
    return dict(scores=scores, labels=labels, embeddings=emb)
