"""python -m engine.make_bin (engine.eval.verification_bin): insightface verification .bin files from your own
faces, read back with a plain `pickle.load`, and evaluated by engine.eval exactly as insightface's own
verification code (arcface_torch/eval/verification.py, ported below as the reference) evaluates the same
embeddings."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from engine.eval import verification
from engine.eval.verification_bin import main

IDENTITIES, PER_IDENTITY = 6, 4


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """The demo's faces, one folder per identity (112x112 JPEGs), plus a PNG of another size in id_00001."""
    from dali_pipes.make_demo import make_demo

    root = tmp_path_factory.mktemp("make_bin") / "faces"
    make_demo(root, identities=IDENTITIES, images_per_identity=PER_IDENTITY, eval_identities=2,
              eval_images_per_identity=2, eval_pairs=2, workers=1, layout="folder")
    (root / "val.bin").unlink()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == IDENTITIES
    Image.new("RGB", (120, 100), (200, 30, 30)).save(folders[1] / "zz_wide.png")
    return root


def _read(path):
    with open(path, "rb") as f:
        return pickle.load(f)  # plain pickle, as arcface_torch's load_bin does


def _identity_of(root):
    """Encoded bytes -> identity folder, for every 112x112 JPEG (stored byte for byte)."""
    return {p.read_bytes(): p.parent.name for p in root.rglob("*.jpg")}


def test_drawn_pairs_are_balanced_seeded_and_correct(faces, tmp_path, capsys):
    assert main(["--images", str(faces), "--num-pairs", "21", "--seed", "3", "--resize", "pad",
                 "--out", str(tmp_path / "a.bin")]) == 0
    assert "21 pairs (11 same identity, 10 different)" in capsys.readouterr().out
    images, issame = _read(tmp_path / "a.bin")
    assert len(images) == 42 and issame.count(True) == 11 and issame.count(False) == 10
    assert issame[:11] != [True] * 11  # shuffled together: each fold of the protocol holds both kinds
    owner = _identity_of(faces)
    png = [b for b in images if b not in owner]  # the re-encoded PNG is a 112x112 JPEG now
    for b in png:
        with Image.open(io.BytesIO(b)) as im:
            assert im.format == "JPEG" and im.size == (112, 112)
    for i, same in enumerate(issame):
        a, b = images[2 * i], images[2 * i + 1]
        assert a != b
        if a in owner and b in owner:
            assert (owner[a] == owner[b]) == same
    pairs = {(images[2 * i], images[2 * i + 1]) for i in range(len(issame))}
    assert len(pairs) == len(issame)  # no pair twice
    assert main(["--images", str(faces), "--num-pairs", "21", "--seed", "3", "--resize", "pad",
                 "--out", str(tmp_path / "b.bin")]) == 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert main(["--images", str(faces), "--num-pairs", "21", "--seed", "4", "--resize", "pad",
                 "--out", str(tmp_path / "c.bin")]) == 0
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()


def test_pair_list_and_errors(faces, tmp_path, capsys):
    ids = sorted(p.name for p in faces.iterdir() if p.is_dir())
    lines = ["# image image same", "", f"{ids[0]}/000.jpg {ids[0]}/001.jpg 1",
             f"{ids[0]}/000.jpg \"{ids[1]}/zz_wide.png\" 0", f"{ids[2]}/003.jpg {ids[3]}/000.jpg 0"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.bin"
    assert main(["--images", str(faces), "--pairs", str(tmp_path / "pairs.txt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{ids[1]}/zz_wide.png: image is 120x100, expected 112x112" in err and "--resize" in err
    assert not out.exists()
    assert main(["--images", str(faces), "--pairs", str(tmp_path / "pairs.txt"), "--out", str(out),
                 "--resize", "center_crop"]) == 0
    images, issame = _read(out)
    assert issame == [True, False, False]
    assert images[0] == images[2] == (faces / ids[0] / "000.jpg").read_bytes()  # kept byte for byte
    assert images[1] == (faces / ids[0] / "001.jpg").read_bytes()
    assert images[5] == (faces / ids[3] / "000.jpg").read_bytes()
    (tmp_path / "bad.txt").write_text(f"{ids[0]}/000.jpg {ids[0]}/999.jpg 1\n")
    assert main(["--images", str(faces), "--pairs", str(tmp_path / "bad.txt"), "--out", str(out)]) == 2
    assert f"bad.txt:1: image '{ids[0]}/999.jpg' not found" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text(f"{ids[0]}/000.jpg {ids[0]}/001.jpg yes\n")
    assert main(["--images", str(faces), "--pairs", str(tmp_path / "bad.txt"), "--out", str(out)]) == 2
    assert "bad.txt:1: expected '<image> <image> <0|1>'" in capsys.readouterr().err
    assert main(["--images", str(faces), "--num-pairs", "1000", "--out", str(out)]) == 2
    assert "(25 images of 6 identities) holds at most 40 distinct same-identity and 260 different" in capsys.readouterr().err


# -- insightface's verification, ported as the reference -------------------------------------------------------
# recognition/arcface_torch/eval/verification.py: calculate_roc / calculate_accuracy with LFold (sklearn's
# KFold(n_splits, shuffle=False), transcribed: the first n % k folds one larger), and test()'s embedding:
# the plain and the flipped image's embeddings summed, then sklearn.preprocessing.normalize.

def _kfold(n, k):
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    start, out = 0, []
    for size in sizes:
        test = np.arange(start, start + size)
        out.append((np.setdiff1d(np.arange(n), test), test))
        start += size
    return out


def _calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def _insightface_evaluate(embeddings, actual_issame, nrof_folds=10):
    thresholds = np.arange(0, 4, 0.01)
    embeddings1, embeddings2 = embeddings[0::2], embeddings[1::2]
    actual_issame = np.asarray(actual_issame)
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy = np.zeros(nrof_folds)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    for fold_idx, (train_set, test_set) in enumerate(_kfold(nrof_pairs, nrof_folds)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = _calculate_accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = _calculate_accuracy(thresholds[best_threshold_index], dist[test_set],
                                                       actual_issame[test_set])
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy


def _insightface_embeddings(model, images_uint8):
    """test(): uint8 HWC -> NCHW float, ((x / 255) - 0.5) / 0.5, plain + flipped outputs summed, normalize."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    x = ((x / 255) - 0.5) / 0.5
    with torch.no_grad():
        emb = model(x).numpy() + model(torch.flip(x, dims=[3])).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)  # sklearn.preprocessing.normalize (l2, rows)


def test_evaluation_matches_insightface(faces, tmp_path):
    out = tmp_path / "eval.bin"
    assert main(["--images", str(faces), "--num-pairs", "40", "--seed", "1", "--resize", "pad",
                 "--out", str(out)]) == 0
    images, issame = _read(out)
    torch.manual_seed(0)  # a small stand-in for a backbone (the protocol is under test, not the network)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.PReLU(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 16)).eval()
    decoded = verification.decode_bin(images, (112, 112))
    tpr, fpr, accuracy = _insightface_evaluate(_insightface_embeddings(model, decoded), issame)
    got = verification.verify_bin(model, out, 16, "cpu")
    assert got["accuracy"] == accuracy.tolist()
    np.testing.assert_array_equal(got["tpr"], tpr)
    np.testing.assert_array_equal(got["fpr"], fpr)
    assert got["num_pairs"] == 40 and len(set(accuracy.tolist())) > 1  # folds that differ: a real comparison
