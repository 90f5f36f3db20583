"""Dataset tools called in-process: dali_pipes.pack, dali_pipes.inspect_rec, dali_pipes.make_demo. (As commands:
tests/launch/test_data_tools.py.)
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from dali_pipes import inspect_rec as inspect_mod
from dali_pipes import make_demo as demo_mod
from dali_pipes import pack as pack_mod
from dali_pipes.recordio import RecordIOReader, read_insightface_layout, unpack
from engine.eval.verification import decode_bin, load_bin

SMALL = dict(identities=6, images_per_identity=4, eval_identities=4, eval_images_per_identity=3, eval_pairs=10)


def _golden_to_folder(golden, out):
    """Unpack the golden rec into one folder per identity (file names keep the key order)."""
    reader = RecordIOReader(golden / "train.rec")
    layout = read_insightface_layout(reader)
    for key in layout["image_keys"]:
        header, payload = unpack(reader.read_idx(int(key)))
        d = out / f"person_{int(header.label):02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{int(key):04d}.jpg").write_bytes(payload)
    reader.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# pack


def test_pack_reproduces_mxnet_golden_layout_and_bytes(shared_data, tmp_path, capsys):
    golden = shared_data / "recordio_golden"
    images = _golden_to_folder(golden, tmp_path / "images")
    assert pack_mod.main(["--images", str(images), "--out", str(tmp_path / "out"), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "pack:" not in err  # the progress bar: only when stderr is a terminal (tests/unit/test_progress.py)
    out = tmp_path / "out"
    ours, ref = RecordIOReader(out / "train.rec"), RecordIOReader(golden / "train.rec")
    lo, lr = read_insightface_layout(ours), read_insightface_layout(ref)
    assert np.array_equal(lo["image_keys"], lr["image_keys"])
    assert (lo["num_classes"], lo["identity_ranges"], lo["has_header"], lo["image_size"]) == \
        (lr["num_classes"], lr["identity_ranges"], lr["has_header"], lr["image_size"])
    assert ours.keys == ref.keys
    for key in ref.keys:  # header, images and identity records: headers and payloads equal
        (ho, po), (hr, pr) = unpack(ours.read_idx(key)), unpack(ref.read_idx(key))
        assert (ho.flag, ho.id, ho.id2, po) == (hr.flag, hr.id, hr.id2, pr), key
        assert np.array_equal(np.asarray(ho.label), np.asarray(hr.label)), key
    # and therefore the very bytes MXNet wrote
    for name in ("train.rec", "train.idx", "property"):
        assert (out / name).read_bytes() == (golden / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]  # no temp files


def test_pack_reencodes_other_images_to_112_jpeg(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ident in ("b", "a"):
        (tmp_path / "img" / ident).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "img" / ident / "x.png")
        Image.fromarray(rng.integers(0, 255, (112, 112), dtype=np.uint8)).save(tmp_path / "img" / ident / "y.jpg")
    (tmp_path / "img" / "a" / "notes.txt").write_text("ignored")
    with pytest.raises(ValueError, match=r"a/x\.png: image is 120x90, expected 112x112.*--resize"):
        pack_mod.pack_folder(tmp_path / "img", tmp_path / "out", workers=1, progress=False)  # never stretched silently
    info = pack_mod.pack_folder(tmp_path / "img", tmp_path / "out", workers=1, progress=False, resize="stretch")
    assert info["identities"] == ["a", "b"] and info["num_images"] == 4
    reader = RecordIOReader(tmp_path / "out" / "train.rec")
    layout = read_insightface_layout(reader)
    assert layout["num_classes"] == 2 and layout["identity_ranges"] == [(1, 3), (3, 5)]
    for key in layout["image_keys"]:
        header, payload = unpack(reader.read_idx(int(key)))
        with Image.open(io.BytesIO(payload)) as im:
            assert im.format == "JPEG" and im.size == (112, 112)
        assert header.label == (0.0 if key <= 2 else 1.0)
    # the 112x112 JPEG was stored byte for byte
    assert unpack(reader.read_idx(2))[1] == (tmp_path / "img" / "a" / "y.jpg").read_bytes()


def test_pack_failure_leaves_no_dataset(tmp_path, capsys):
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert pack_mod.main(["--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.rec").exists()
    assert list((tmp_path / "out").iterdir()) == []  # temp files removed too
    (tmp_path / "img" / "b").mkdir()
    assert pack_mod.main(["--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "empty identity folder" in capsys.readouterr().err


def test_inspect_reports_corrupt_records(tmp_path, shared_data, capsys):
    golden = shared_data / "recordio_golden"
    images = _golden_to_folder(golden, tmp_path / "images")
    pack_mod.pack_folder(images, tmp_path / "rec", progress=False)
    reader = RecordIOReader(tmp_path / "rec" / "train.rec")
    payloads = [unpack(reader.read_idx(k))[1] for k in range(1, 41)]
    payloads[6] = payloads[6][:1000]  # key 7: truncated JPEG
    payloads[20] = b"nonsense" * 20  # key 21: not an image
    pack_mod.write_insightface_rec(tmp_path / "bad", payloads, np.repeat(np.arange(8), 5), 8)
    assert inspect_mod.main([str(tmp_path / "bad" / "train.rec"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "corrupt records: 2" in out
    assert "key 7: image does not decode" in out
    assert "key 21: not an image Pillow can read" in out
    assert "112x112  38" in out
    assert inspect_mod.main([str(tmp_path / "missing")]) == 2


# ----------------------------------------------------------------------------------------------------------
# make_demo


def test_make_demo_is_deterministic_and_well_formed(tmp_path):
    a = demo_mod.make_demo(tmp_path / "a", seed=3, workers=1, **SMALL)
    demo_mod.make_demo(tmp_path / "b", seed=3, workers=2, **SMALL)
    demo_mod.make_demo(tmp_path / "c", seed=4, workers=2, **SMALL)
    for name in ("train.rec", "train.idx", "property", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()
    assert demo_mod.is_complete(tmp_path / "a") and a["num_images"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left

    reader = RecordIOReader(tmp_path / "a" / "train.rec")
    layout = read_insightface_layout(reader)
    assert layout["has_header"] and layout["num_images"] == 24 and layout["num_classes"] == 6
    assert layout["identity_ranges"] == [(1 + 4 * i, 5 + 4 * i) for i in range(6)]
    train_payloads = {unpack(reader.read_idx(int(k)))[1] for k in layout["image_keys"]}

    bins, issame = load_bin(tmp_path / "a" / "val.bin")
    assert len(bins) == 20 and len(issame) == 10 and sum(issame) == 5
    assert not train_payloads & set(bins)  # held-out images
    images = decode_bin(bins)
    assert images.shape == (20, 112, 112, 3)
    for i, same in enumerate(issame):  # same-identity pairs are different images of it
        assert bins[2 * i] != bins[2 * i + 1] or not same


def test_make_demo_identities_are_consistent_and_distinct():
    """Same identity -> same parameters; images of one identity vary (pose, light, background)."""
    p1 = demo_mod.identity_params(np.random.default_rng([0, 1, 0]))
    p1b = demo_mod.identity_params(np.random.default_rng([0, 1, 0]))
    p2 = demo_mod.identity_params(np.random.default_rng([0, 2, 0]))
    assert p1["face_w"] == p1b["face_w"] and p1["face_w"] != p2["face_w"]
    imgs = [demo_mod.render_face(p1, np.random.default_rng([0, 1, 1, k])) for k in range(2)]
    assert imgs[0] != imgs[1]


def test_make_demo_folder_layout_is_the_rec_unpacked(tmp_path):
    """--layout folder writes the same images as the rec layout, one sub-folder per identity (the stand-in for a
    user's own faces in the README): packing the folders gives the rec layout's files byte for byte."""
    demo_mod.make_demo(tmp_path / "rec", seed=3, workers=1, **SMALL)
    meta = demo_mod.make_demo(tmp_path / "faces", seed=3, workers=1, layout="folder", **SMALL)
    assert meta["layout"] == "folder" and not demo_mod.is_complete(tmp_path / "faces")  # not a demo rec
    folders = sorted(p.name for p in (tmp_path / "faces").iterdir() if p.is_dir())
    assert folders == [f"id_{i:05d}" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "faces" / "id_00000").iterdir()) == ["000.jpg", "001.jpg", "002.jpg",
                                                                                    "003.jpg"]
    assert (tmp_path / "faces" / "val.bin").read_bytes() == (tmp_path / "rec" / "val.bin").read_bytes()
    pack_mod.pack_folder(tmp_path / "faces", tmp_path / "packed")
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / "rec" / name).read_bytes(), name
    with pytest.raises(ValueError, match="--layout: expected one of rec, folder, got 'zip'"):
        demo_mod.make_demo(tmp_path / "x", layout="zip", **SMALL)
