"""Verification .bin loading (safe unpickling) and the insightface 10-fold protocol."""
import os
import pickle

import numpy as np
import pytest
import torch

from engine.eval.verification import (
    decode_bin,
    embedding_norm_stats,
    evaluate,
    extract_embeddings,
    kfold_splits,
    l2_normalize,
    load_bin,
    verify_bin,
)

THRESHOLDS = np.arange(0, 4, 0.01)


# ---------------------------------------------------------------------------------------------- loading


def test_load_golden_pairs(shared_data):
    path = shared_data / "recordio_golden" / "pairs.bin"
    bins, issame = load_bin(path)
    assert len(bins) == 40 and len(issame) == 20
    assert all(type(b) is bytes and b[:2] == b"\xff\xd8" for b in bins)
    assert all(type(s) is bool for s in issame)
    images = decode_bin(bins, (112, 112), source=path)
    assert images.shape == (40, 112, 112, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="image 0 of 2: image is 112x112, expected 64x56"):  # never silently
        decode_bin(bins[:2], (56, 64))
    small = decode_bin(bins[:2], (56, 64), resize="stretch")
    assert small.shape == (2, 56, 64, 3)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    for protocol in (0, 2, 5):
        path.write_bytes(pickle.dumps(([b"\xff\xd8", _Evil(marker)], [True]), protocol=protocol))
        with pytest.raises(ValueError, match=rf"evil\.bin: refusing to load forbidden object '{os.system.__module__}\.system'"):
            load_bin(path)
        assert not marker.exists()
    # a hand-written protocol-0 pickle naming os.system directly
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(ValueError, match=r"evil\.bin: .*forbidden object 'os\.system'"):
        load_bin(path)
    assert not marker.exists()
    # the same bytes really are dangerous with the stock unpickler (so the check above means something)
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_other_globals_rejected(tmp_path):
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([np.zeros(3)] * 2, [True])))
    with pytest.raises(ValueError, match=r"np\.bin: .*forbidden object 'numpy"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], {True}), protocol=2))  # protocol 2 builds sets by a global
    with pytest.raises(ValueError, match=r"forbidden object '__builtin__\.set'"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [eval]), protocol=5))  # STACK_GLOBAL
    with pytest.raises(ValueError, match=r"forbidden object 'builtins\.eval'"):
        load_bin(path)


def test_python3_low_protocol_bytes(tmp_path):
    path = tmp_path / "p2.bin"
    for protocol in (0, 1, 2, 3, 4, 5):  # 0-2 write bytes as _codecs.encode(str, 'latin1')
        path.write_bytes(pickle.dumps(([b"\xff\xd8\x00", b"\x80ab"], [False]), protocol=protocol))
        assert load_bin(path) == ([b"\xff\xd8\x00", b"\x80ab"], [False])
    # only the latin1 form is allowed: anything else through _codecs.encode is refused
    path.write_bytes(b"\x80\x02]q\x00(c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86Rq\x01e]\x86.")
    with pytest.raises(ValueError, match=r"p2\.bin: refusing _codecs\.encode\(str, 'zlib'\)"):
        load_bin(path)


def test_python2_pickles(tmp_path):
    path = tmp_path / "py2.bin"
    # protocol 2 as Python 2 writes str: SHORT_BINSTRING, loaded as bytes (encoding='bytes')
    path.write_bytes(b"\x80\x02]q\x00(U\x03abcq\x01U\x03defq\x02e]q\x03\x88a\x86q\x04.")
    assert load_bin(path) == ([b"abc", b"def"], [True])
    # protocol 0: STRING opcodes and I01/I00 bools
    path.write_bytes(b"((lp0\nS'abc'\np1\naS'def'\np2\naS'ghi'\np3\naS'jkl'\np4\na(lp5\nI01\naI00\natp6\n.")
    bins, issame = load_bin(path)
    assert bins == [b"abc", b"def", b"ghi", b"jkl"] and issame == [True, False]
    assert all(type(s) is bool for s in issame)


@pytest.mark.parametrize(
    "obj, message",
    [
        (([b"a", b"b", b"c"], [True]), r"3 images for 1 pairs"),
        (([b"a", "b"], [True]), r"image 1 is str"),
        (([b"a", b"b"], [2]), r"issame\[0\] is 2"),
        (([b"a", b"b"],), r"expected a pickled pair"),
        (({"a": 1}, [True]), r"expected \(list, list\)"),
    ],
)
def test_bad_structure(tmp_path, obj, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match=rf"bad\.bin: {message}"):
        load_bin(path)


def test_corrupt_and_missing(tmp_path, shared_data):
    path = tmp_path / "cut.bin"
    path.write_bytes((shared_data / "recordio_golden" / "pairs.bin").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.bin: not a readable verification pickle"):
        load_bin(path)
    with pytest.raises(FileNotFoundError):
        load_bin(tmp_path / "missing.bin")


def test_decode_corrupt_image(shared_data):
    bins, _ = load_bin(shared_data / "recordio_golden" / "pairs.bin")
    bad = list(bins[:4])
    bad[3] = bins[3][:300]  # truncated JPEG
    with pytest.raises(ValueError, match=r"lfw\.bin: cannot decode image 3 of 4"):
        decode_bin(bad, source="lfw.bin")
    bad[3] = b"not an image"
    with pytest.raises(ValueError, match=r"cannot decode image 3 of 4"):
        decode_bin(bad)


# ---------------------------------------------------------------------------------------------- protocol


def _pairs_at(dists_sq):
    """Unit 2-D embeddings whose pairs have the given squared L2 distances."""
    cos = 1.0 - np.asarray(dists_sq, dtype=np.float64) / 2.0
    emb = np.zeros((2 * len(cos), 2))
    emb[0::2, 0] = 1.0
    emb[1::2, 0] = cos
    emb[1::2, 1] = np.sqrt(1.0 - cos**2)
    return emb


def test_kfold_like_sklearn():
    splits = kfold_splits(23, 10)
    sizes = [len(test) for _, test in splits]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.concatenate([test for _, test in splits]).tolist() == list(range(23))
    for train, test in splits:
        assert sorted(train.tolist() + test.tolist()) == list(range(23))
    only = kfold_splits(5, 1)
    assert only[0][0].tolist() == only[0][1].tolist() == list(range(5))
    with pytest.raises(ValueError):
        kfold_splits(5, 6)


def test_perfectly_separable():
    rng = np.random.default_rng(1)
    issame = np.array([True, False] * 30)
    d = np.where(issame, rng.uniform(0.2, 0.9, 60), rng.uniform(1.3, 3.5, 60))
    d[0::6] = 0.905  # every fold holds the largest genuine distance, so every fold picks the same threshold
    res = evaluate(_pairs_at(d) * 7.0, issame)  # scale does not matter: embeddings are normalised
    assert res["acc_mean"] == 1.0 and res["acc_std"] == 0.0 and res["accuracy"] == [1.0] * 10
    # the first maximum: the first threshold above the largest genuine distance
    assert res["best_thresholds"] == [THRESHOLDS[91]] * 10 and res["threshold"] == pytest.approx(0.91)


def test_exactly_computable_accuracy():
    # 100 pairs, 10 folds of 10: 5 genuine at 0.555, 4 impostors at 2.055 and one more impostor that is
    # either far (2.055, even folds) or closer than the genuine pairs (0.255, odd folds). Any threshold in
    # (0.555, 2.055] is best on every training set, so even folds score 1.0 and odd folds 0.9.
    d, issame = [], []
    for fold in range(10):
        d += [0.555] * 5 + [2.055] * 4 + [0.255 if fold % 2 else 2.055]
        issame += [True] * 5 + [False] * 5
    res = evaluate(torch.tensor(_pairs_at(d), dtype=torch.float32), issame)
    assert res["accuracy"] == [1.0, 0.9] * 5
    assert res["acc_mean"] == pytest.approx(0.95, abs=1e-12)
    assert res["acc_std"] == pytest.approx(0.05, abs=1e-12)
    assert res["best_thresholds"] == [THRESHOLDS[56]] * 10 and res["threshold"] == pytest.approx(0.56)
    assert res["tpr"].shape == res["fpr"].shape == (400,)
    # tpr/fpr per threshold, averaged over test folds: at 0.30 only the close impostors are accepted
    assert res["tpr"][0] == 0.0 and res["tpr"][-1] == 1.0
    assert res["tpr"][30] == 0.0 and res["fpr"][30] == pytest.approx(0.1)
    assert res["tpr"][100] == 1.0 and res["fpr"][100] == pytest.approx(0.1)
    assert res["fpr"][300] == 1.0


def _reference_evaluate(embeddings, issame, nrof_folds=10):
    """Straight transcription of insightface verification.py (calculate_roc / calculate_accuracy)."""
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    e1, e2 = emb[0::2], emb[1::2]
    actual = np.asarray(issame)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    folds = np.array_split(np.arange(len(actual)), nrof_folds)
    accuracy, best_t, tprs, fprs = [], [], [], []

    def acc_at(threshold, dist, actual):
        predict = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict, actual))
        fp = np.sum(np.logical_and(predict, np.logical_not(actual)))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
        fn = np.sum(np.logical_and(np.logical_not(predict), actual))
        tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
        fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / dist.size

    for test in folds:
        train = np.setdiff1d(np.arange(len(actual)), test)
        acc_train = np.zeros(len(THRESHOLDS))
        for i, t in enumerate(THRESHOLDS):
            acc_train[i] = acc_at(t, dist[train], actual[train])[2]
        best = np.argmax(acc_train)
        tprs.append([acc_at(t, dist[test], actual[test])[0] for t in THRESHOLDS])
        fprs.append([acc_at(t, dist[test], actual[test])[1] for t in THRESHOLDS])
        accuracy.append(acc_at(THRESHOLDS[best], dist[test], actual[test])[2])
        best_t.append(THRESHOLDS[best])
    return accuracy, best_t, np.mean(tprs, 0), np.mean(fprs, 0)


@pytest.mark.parametrize("seed, num_pairs, dim", [(0, 300, 16), (1, 123, 8), (2, 57, 32)])
def test_matches_reference_on_random_embeddings(seed, num_pairs, dim):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(num_pairs, dim))
    issame = rng.random(num_pairs) < 0.5
    noise = np.where(issame[:, None], 0.6, 1.6) * rng.normal(size=(num_pairs, dim))
    emb = np.empty((2 * num_pairs, dim))
    emb[0::2] = base
    emb[1::2] = base + noise
    accuracy, best_t, tpr, fpr = _reference_evaluate(emb, issame)
    res = evaluate(emb, issame.tolist())
    assert res["accuracy"] == accuracy
    assert res["best_thresholds"] == best_t
    assert res["acc_mean"] == np.mean(accuracy) and res["acc_std"] == np.std(accuracy)
    assert res["threshold"] == np.mean(best_t)
    np.testing.assert_array_equal(res["tpr"], tpr)
    np.testing.assert_array_equal(res["fpr"], fpr)
    assert 0.5 < res["acc_mean"] < 1.0  # a non-trivial case


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2 \\* len\\(issame\\)"):
        evaluate(np.ones((6, 4)), [True, False])


def test_l2_normalize_and_norm_stats():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    y = l2_normalize(x)
    assert y.dtype == np.float32 and x[0, 0] == 3.0  # dtype kept, input untouched
    np.testing.assert_array_equal(y, np.array([[0.6, 0.8], [0.0, 0.0]], dtype=np.float32))
    stats = embedding_norm_stats(np.array([[3.0, 4.0], [0.0, 1.0]]))
    assert stats == {"norm_mean": 3.0, "norm_std": 2.0}
    assert embedding_norm_stats(torch.ones(2, 3, 4))["norm_mean"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- model


class _Corners(torch.nn.Module):
    """Embeds an image as its top-left pixel (3 values)."""

    def forward(self, x):
        return x[:, :, 0, 0]


def test_extract_embeddings_flip_and_scaling():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 4, 6, 3), dtype=np.uint8)
    scaled = (images.astype(np.float32) / 255 - 0.5) / 0.5
    emb, raw = extract_embeddings(_Corners(), images, batch_size=3, device="cpu", flip=False, return_raw=True)
    assert raw.shape == (1, 7, 3)
    np.testing.assert_allclose(raw[0], scaled[:, 0, 0, :], rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb, l2_normalize(scaled[:, 0, 0, :]), atol=1e-6)
    emb, raw = extract_embeddings(_Corners(), images, batch_size=3, device="cpu", flip=True, return_raw=True)
    assert raw.shape == (2, 7, 3)
    np.testing.assert_allclose(raw[1], scaled[:, 0, -1, :], atol=1e-6)  # flipped: top-right pixel
    np.testing.assert_allclose(emb, l2_normalize(scaled[:, 0, 0, :] + scaled[:, 0, -1, :]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_extract_embeddings_eval_mode_and_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 5 * 4, 8))
    model.train()
    images = np.random.default_rng(1).integers(0, 256, size=(5, 5, 4, 3), dtype=np.uint8)
    a = extract_embeddings(model, images, batch_size=2, device="cpu")
    b = extract_embeddings(model, images, batch_size=5, device="cpu")
    assert model.training  # mode restored
    np.testing.assert_allclose(a, b, atol=1e-6)  # eval mode: dropout off, batching irrelevant
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    lin = model[2]
    with torch.no_grad():
        want = lin(x.flatten(1)) + lin(torch.flip(x, dims=[3]).flatten(1))
    np.testing.assert_allclose(a, l2_normalize(want.numpy()), atol=1e-6)


def test_verify_bin_end_to_end(shared_data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 16))
    path = shared_data / "recordio_golden" / "pairs.bin"
    res = verify_bin(model, path, batch_size=16, device="cpu")
    bins, issame = load_bin(path)
    emb = extract_embeddings(model, decode_bin(bins), 16, "cpu")
    ref = evaluate(emb, issame)
    assert res["acc_mean"] == pytest.approx(ref["acc_mean"]) and 0.0 <= res["acc_mean"] <= 1.0
    assert res["norm_mean"] > 0 and len(res["accuracy"]) == 10
