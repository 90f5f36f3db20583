"""python -m engine.eval_ijb on a tiny IJB-C-shaped dataset, against a brute-force computation of the protocol.

The generated faces sit in their images at integer offsets from arcface's landmark template, so the test knows
every aligned crop without the tool's alignment (a plain slice); the test then embeds them with the same model,
pools templates with loops and counts TAR at each FAR over every threshold. Alignment itself is checked on
images whose content is a linear function of position, where bilinear sampling is exact. (Faces split across
spawned ranks: tests/distributed/test_eval_ijb.py.)
"""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

import backbones
from engine.eval import ijb
from engine.eval import ijb_eval as eval_ijb
from tests.support.data import NUM_IDS, TEMPLATES_PER_ID, ijb_reference, make_ijb_dataset

FARS = ijb.FAR_TARGETS


def brute_force_roc(labels: np.ndarray, scores: np.ndarray):
    """Every threshold counted directly; sklearn's dropping of collinear points done point by point."""
    thresholds = sorted(set(scores.tolist()), reverse=True)
    pos, neg = labels.sum(), (1 - labels).sum()
    points = [(0, 0)] + [(int(np.sum((scores >= t) & (labels == 0))), int(np.sum((scores >= t) & (labels == 1))))
                         for t in thresholds]
    keep = [0, 1]
    for i in range(2, len(points) - 1):  # sklearn keeps a point unless fp and tp both change evenly around it
        (f0, t0), (f1, t1), (f2, t2) = points[i - 1], points[i], points[i + 1]
        if (f1 - f0, t1 - t0) != (f2 - f1, t2 - t1):
            keep.append(i)
    keep.append(len(points) - 1)
    fpr = np.array([points[i][0] / neg for i in sorted(set(keep))])
    tpr = np.array([points[i][1] / pos for i in sorted(set(keep))])
    return fpr, tpr


def brute_force_tar(fpr: np.ndarray, tpr: np.ndarray) -> dict:
    out = {}
    for far in FARS:
        best = min(range(len(fpr)), key=lambda i: (abs(fpr[i] - far), -i))  # closest; ties: later (higher TPR)
        out[far] = float(tpr[best])
    return out


def test_cli_matches_brute_force(tmp_path, capsys):
    data = make_ijb_dataset(tmp_path / "IJBC")
    torch.manual_seed(0)
    model = backbones.build_backbone("mbf", embedding_size=16).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rc = eval_ijb.main(["--model", str(tmp_path / "model.pt"), "--backbone", "mbf", "--embedding-size", "16",
                        "--root", str(tmp_path / "IJBC"), "--target", "IJBC", "--batch-size", "16",
                        "--workers", "0", "--output", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    ref = ijb_reference(model, data)
    scores = np.load(tmp_path / "out" / "ijbc_scores.npy")
    np.testing.assert_allclose(scores, ref["scores"], rtol=0, atol=1e-12)  # pooling order aside, the same sums
    assert np.diff(np.sort(ref["scores"])).min() > 1e-9  # so no two pairs can swap places between the two

    record = json.loads((tmp_path / "out" / "ijbc_roc.json").read_text())
    fpr, tpr = brute_force_roc(ref["labels"], ref["scores"])
    expected = brute_force_tar(fpr, tpr)
    assert record["tar_at_far"] == {f"{far:g}": expected[far] for far in FARS}
    assert 0 < expected[1e-1] < 1  # the table is not trivially all 0 or all 1
    np.testing.assert_allclose(record["roc"]["fpr"], fpr, rtol=0, atol=0)
    np.testing.assert_allclose(record["roc"]["tpr"], tpr, rtol=0, atol=0)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert record["auc"] == pytest.approx(area, abs=1e-12)
    n = len(data["faces"])
    assert (record["num_faces"], record["num_templates"], record["num_pairs"]) == (
        n, NUM_IDS * TEMPLATES_PER_ID, len(data["pairs"]))
    assert record["num_genuine"] == NUM_IDS * math.comb(TEMPLATES_PER_ID, 2)
    assert record["roc"]["thresholds"][0] is None and record["settings"]["use_flip_test"] is True
    assert "TAR %" in out.out and f"{100 * expected[1e-1]:.2f}" in out.out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "ijbc_roc.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed: no ROC plot" in out.out

    # The use_* switches, on the same embeddings: unit-norm faces, no detector weights.
    meta = ijb.read_meta(tmp_path / "IJBC", "ijbc")
    plain = eval_ijb.evaluate(ref["embeddings"], meta, use_norm_score=False, use_detector_score=False)
    unit = ref["embeddings"] / np.linalg.norm(ref["embeddings"], axis=1, keepdims=True)
    unweighted = reference_from_features(unit, data)
    np.testing.assert_allclose(plain["scores"], unweighted, rtol=0, atol=1e-12)


def reference_from_features(feats: np.ndarray, data: dict) -> np.ndarray:
    by_template: dict = {}
    for f, e in zip(data["faces"], feats):
        by_template.setdefault(f["template"], {}).setdefault(f["media"], []).append(e)
    templates = {t: sum(np.mean(v, axis=0) for v in m.values()) for t, m in by_template.items()}
    templates = {t: v / np.linalg.norm(v) for t, v in templates.items()}
    return np.array([templates[a] @ templates[b] for a, b, _ in data["pairs"]])


def test_roc_curve_against_brute_force():
    # sklearn.metrics.roc_curve's docstring example.
    fpr, tpr, thr = ijb.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1), int(rng.integers(0, 3)))  # many ties
        fpr, tpr, _ = ijb.roc_curve(labels, scores)
        ref_fpr, ref_tpr = brute_force_roc(labels, scores)
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
        assert ijb.tar_at_far(fpr, tpr) == brute_force_tar(ref_fpr, ref_tpr)
        full_fpr, full_tpr, full_thr = ijb.roc_curve(labels, scores, drop_intermediate=False)
        for f, t, th in zip(full_fpr[1:], full_tpr[1:], full_thr[1:]):  # each point is its threshold's counts
            assert f == np.sum((scores >= th) & (labels == 0)) / np.sum(labels == 0)
            assert t == np.sum((scores >= th) & (labels == 1)) / np.sum(labels == 1)
    with pytest.raises(ValueError, match="at least one pair of each"):
        ijb.roc_curve(np.ones(3, int), np.arange(3.0))


def test_alignment():
    rng = np.random.default_rng(0)
    # Umeyama vs the linear least-squares similarity x' = a x - b y + tx, y' = b x + a y + ty (same minimiser).
    src = ijb.ARCFACE_TEMPLATE * 1.7 + rng.normal(0, 2, (5, 2)) + [30, 12]
    m = ijb.similarity_transform(src, ijb.ARCFACE_TEMPLATE)
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.r_[ijb.ARCFACE_TEMPLATE[:, 0], ijb.ARCFACE_TEMPLATE[:, 1]],
                                   rcond=None)[0]
    np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty], [0, 0, 1]], atol=1e-9)

    # A face rotated by 20 degrees, scaled 1.6x and shifted in a 260x240 image whose pixel values are linear in
    # position: aligned pixel (u, v) must hold the value at T(u, v), T the transform used to place it.
    theta, scale, shift = math.radians(20), 1.6, np.array([70.0, 10.0])
    rot = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    landmarks = ijb.ARCFACE_TEMPLATE @ rot.T + shift
    yy, xx = np.mgrid[0:260, 0:240].astype(np.float64)
    coef = np.array([[0.5, 0.3, 10], [0.2, 0.6, 5], [0.7, 0.1, 0]])  # channel c = a x + b y + c0, < 255
    image = np.stack([c[0] * xx + c[1] * yy + c[2] for c in coef], -1)
    aligned = ijb.align_face(np.round(image).astype(np.uint8), landmarks)
    v, u = np.mgrid[0:112, 0:112].astype(np.float64)
    pos = np.stack([u, v], -1) @ rot.T + shift
    assert pos.min() >= 0 and pos[..., 0].max() <= 239 and pos[..., 1].max() <= 259  # every tap inside
    expected = np.stack([c[0] * pos[..., 0] + c[1] * pos[..., 1] + c[2] for c in coef], -1)
    # Bilinear interpolation of the rounded image: within 0.5 (input rounding) + 0.5 (output rounding).
    assert np.abs(aligned - expected).max() <= 1.0 + 1e-6
    # Landmarks outside the image: black (zero) taps, as cv2's borderValue=0.
    assert ijb.align_face(np.full((50, 50, 3), 200, np.uint8), landmarks).max() == 0


def _write_meta(root, tid="a.png 1 1\nb.png 2 1\n", pts=None, pairs="1 2 0\n"):
    pts = pts if pts is not None else "".join(f"{n} " + " ".join(["50"] * 10) + " 0.9\n" for n in ("a.png", "b.png"))
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(tid)
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text(pts)
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(pairs)


def test_meta_errors_name_file_and_line(tmp_path, capsys):
    _write_meta(tmp_path)
    meta = ijb.read_meta(tmp_path, "IJBC")
    assert meta.names == ["a.png", "b.png"] and meta.landmarks.shape == (2, 5, 2)
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ijbc_template_pair_label.txt: IJB meta file not found"):
        ijb.read_meta(tmp_path, "IJBC")
    rc = eval_ijb.main(["--model", "x.pt", "--backbone", "mbf", "--root", str(tmp_path), "--workers", "0"])
    assert rc == 2 and "ijbc_template_pair_label.txt: IJB meta file not found" in capsys.readouterr().err

    cases = [
        (dict(tid="a.png 1 1\n\nb.png two 1\n"),
         r"ijbc_face_tid_mid.txt:3: expected '<image> <template id> <media id>'"),
        (dict(tid="a.png 1 1 9\n"), r"ijbc_face_tid_mid.txt:1: expected"),
        (dict(pts="a.png 1 2 3\n"), r"ijbc_name_5pts_score.txt:1: expected '<image> x1 y1"),
        (dict(pts="a.png " + " ".join(["50"] * 10) + " nan\n"), r"ijbc_name_5pts_score.txt:1: expected"),
        (dict(pts="b.png " + " ".join(["50"] * 10) + " 0.9\n"),
         r"ijbc_name_5pts_score.txt:1: image 'b.png', but face 1 of .*ijbc_face_tid_mid.txt is 'a.png'"),
        (dict(pts="a.png " + " ".join(["50"] * 10) + " 0.9\n"), r"lists 1 faces, .* 2"),
        (dict(pairs="1 2 0\n1 3 1\n"), r"ijbc_template_pair_label.txt:2: template 3 has no face"),
        (dict(pairs="1 2 0\n2 1 yes\n"), r"ijbc_template_pair_label.txt:2: expected '<template id>"),
        (dict(pairs="1 2 2\n"), r"ijbc_template_pair_label.txt:1: label 2, expected 0 or 1"),
    ]
    for kwargs, pattern in cases:
        _write_meta(tmp_path, **kwargs)
        with pytest.raises(ValueError, match=pattern):
            ijb.read_meta(tmp_path, "IJBC")

    # An image that is not there or not an image: named, with the same one-line message through the CLI.
    _write_meta(tmp_path)
    (tmp_path / "loose_crop").mkdir()
    (tmp_path / "loose_crop" / "a.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    torch.save(backbones.build_backbone("mbf", embedding_size=8).state_dict(), tmp_path / "mbf.pt")
    rc = eval_ijb.main(["--model", str(tmp_path / "mbf.pt"), "--backbone", "mbf", "--embedding-size", "8",
                        "--root", str(tmp_path), "--workers", "1", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.png: cannot read the image" in err and len(err.strip().splitlines()) == 1, err
