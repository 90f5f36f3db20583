"""A tiny IJB-C-shaped test set: the layout, files and protocol of insightface's IJB release (engine.eval.ijb),
with generated faces, to try `python -m engine.eval_ijb` end to end without the real set (the README's
arcface_torch walkthrough) and to test it against a hand-computed reference (tests/).

Identities are smooth random colour patterns; each face is a noisy 112x112 crop of its identity pasted into a
larger random "loose crop" at a random offset (or none), with the five landmarks of arcface's template moved by
that offset, so the aligner must undo the shift. Media id 7 recurs in every template (insightface pools faces
per media within a template); every template pair is listed, labelled 1 for the same identity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from engine.eval import ijb

__all__ = ["NUM_IDS", "TEMPLATES_PER_ID", "MEDIA_PER_TEMPLATE", "write_ijbc"]

NUM_IDS, TEMPLATES_PER_ID, MEDIA_PER_TEMPLATE = 5, 3, 2


def write_ijbc(root: Union[str, Path], seed: int = 0) -> Dict[str, Any]:
    """Write the IJB-C layout under `root` (meta/ijbc_*.txt, loose_crop/*.png); `root` must not hold one yet.

    Returns:
        ``faces`` (per face: its aligned ``crop`` uint8 [112, 112, 3], ``template``, ``media``, ``faceness``,
        ``identity``) and ``pairs`` ([(template, template, label)]), what a reference computation needs.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, tid_lines, pts_lines = [], [], []
    for identity in range(NUM_IDS):
        low = rng.uniform(0, 255, (7, 7, 3))  # an identity: a smooth colour pattern
        base = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((112, 112), Image.BILINEAR), np.float64)
        for j in range(TEMPLATES_PER_ID):
            tid = 10 * identity + j + 1
            for k in range(MEDIA_PER_TEMPLATE):
                mid = 7 if k == 0 else 100 * tid + k  # media id 7 recurs in every template: pooled per template
                for _ in range(int(rng.integers(1, 3))):
                    crop = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                    dx, dy = (0, 0) if rng.random() < 0.4 else (int(rng.integers(1, 20)), int(rng.integers(1, 15)))
                    canvas = rng.integers(0, 256, (112 + dy + int(rng.integers(0, 9)), 112 + dx + 5, 3), np.uint8)
                    canvas[dy:dy + 112, dx:dx + 112] = crop
                    name = f"{len(faces) + 1}.png"
                    Image.fromarray(canvas).save(root / "loose_crop" / name)
                    landmarks = ijb.ARCFACE_TEMPLATE.astype(np.float64) + [dx, dy]
                    faceness = round(float(rng.uniform(0.3, 1.0)), 4)
                    tid_lines.append(f"{name} {tid} {mid}")
                    pts_lines.append(" ".join([name, *(f"{v:.4f}" for v in landmarks.ravel()), f"{faceness}"]))
                    faces.append(dict(crop=crop, template=tid, media=mid, faceness=np.float32(faceness),
                                      identity=identity))
    template_ids = sorted({f["template"] for f in faces})
    pairs = [(a, b, int(a // 10 == b // 10)) for i, a in enumerate(template_ids) for b in template_ids[i + 1:]]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(f"{a} {b} {y}" for a, b, y in pairs) + "\n")
    return dict(faces=faces, pairs=pairs)
