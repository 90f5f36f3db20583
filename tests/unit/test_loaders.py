"""Training loaders (dali_pipes.loader): outputs, sampling, resume, DALI vs torch fallback, bad input.

DALI tests call ``build_loader(dali="on")``, so they FAIL (not skip) when DALI is missing; only the CUDA
decode test is GPU-only.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from dali_pipes import loader as loader_mod
from dali_pipes.augment import KNOWN_AUGMENTATIONS, hsv_matrix, parse_augment, payload_problem
from dali_pipes.folder import FolderSource
from dali_pipes.loader import build_loader
from dali_pipes.pack import pack_folder, write_insightface_rec
from dali_pipes.recordio import IRHeader, RecordIOWriter, pack
from dali_pipes.source import ShardPlan

BACKENDS = ["on", "off"]  # dali="on" (DALI) and "off" (torch fallback)


def _jpeg(rng: np.random.Generator, size: int = 112, quality: int = 90) -> bytes:
    from PIL import Image

    base = rng.uniform(0, 255, 3)
    ramp = np.linspace(-40, 40, size)[None, :, None] * rng.uniform(-1, 1, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    arr = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _make_folder(root, num_ids: int, per_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(num_ids):
        d = root / f"id{i:03d}"
        d.mkdir(parents=True)
        for k in range(per_id):
            (d / f"{k:03d}.jpg").write_bytes(_jpeg(rng))
    return root


@pytest.fixture(scope="module")
def sorted_rec(tmp_path_factory):
    """An identity-sorted insightface rec: 64 identities x 8 images, plus the folder it was packed from."""
    base = tmp_path_factory.mktemp("sorted")
    folder = _make_folder(base / "images", 64, 8)
    pack_folder(folder, base / "rec", workers=1, progress=False)
    return base / "rec", folder


@pytest.fixture()
def golden(shared_data):
    return shared_data / "recordio_golden"


def _take(loader, n):
    xs, ys = [], []
    for _ in range(n):
        x, y = next(loader)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _build(path, dali, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("num_workers", 0 if dali == "off" else 2)
    kw.setdefault("augment", [])
    kw.setdefault("seed", 1)
    return build_loader(kw.pop("source", "recordio"), str(path), dali=dali, **kw)


# ----------------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("dali", BACKENDS)
def test_golden_full_batches_images_and_labels(golden, dali):
    expected = json.loads((golden / "expected.json").read_text())["images"]
    mean_by_key = {e["key"]: e["decoded_mean"] for e in expected}
    with _build(golden, dali, augment=[]) as loader:
        assert loader.backend == ("dali" if dali == "on" else "torch")
        assert (loader.num_images, loader.num_classes, loader.batches_per_epoch) == (40, 8, 5)
        images, labels = _take(loader, 12)  # crosses two epoch boundaries
        assert loader.epoch == 2 and loader.position == 2
        keys = loader.source.image_keys
        plan = loader.plan
    assert images.shape == (12, 8, 3, 112, 112) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.device.type == "cpu"
    assert images.min() >= -1 and images.max() <= 1
    # only image records reach the model: labels 0..7, five of each per epoch (no header/identity records)
    assert labels.min() >= 0 and labels.max() <= 7
    assert torch.bincount(labels[:5].flatten(), minlength=8).tolist() == [5] * 8
    # each sample is the record the plan says, decoded like Pillow (expected.json's means)
    for b in range(5):
        for i, index in enumerate(plan.batch_indices(0, b)):
            key = int(keys[index])
            pixel_mean = float((images[b, i] * 127.5 + 127.5).mean())
            assert abs(pixel_mean - mean_by_key[key]) < 0.05, key
            assert labels[b, i] == next(e["label"] for e in expected if e["key"] == key)


def test_dali_and_fallback_equal(sorted_rec):
    rec, _ = sorted_rec
    for augment, tol_max, tol_mean in (([], 0.0, 0.0), (["flip", "hsv", "gray", "blur"], 1.0, 0.01),
                                       (["arcface"], 4.0, 0.1)):
        with _build(rec, "on", augment=augment, batch_size=16) as a, _build(rec, "off", augment=augment,
                                                                              batch_size=16) as b:
            xa, ya = _take(a, 6)
            xb, yb = _take(b, 6)
        assert torch.equal(ya, yb), augment
        diff = (xa - xb).abs() * 127.5  # in 8-bit pixel levels
        # same libjpeg-turbo decode; colour/flip/blur match exactly up to rounding; resize is resampler-close
        assert diff.max() <= tol_max + 1e-3, (augment, diff.max())
        assert diff.mean() <= tol_mean + 1e-6, (augment, diff.mean())
        if augment:
            plain = _take(_build(rec, "off", augment=[], batch_size=16), 6)[0]
            assert not torch.equal(plain, xb)  # augmentation did something


@pytest.mark.parametrize("dali", BACKENDS)
def test_resume_mid_epoch_gives_same_batches(sorted_rec, dali):
    rec, _ = sorted_rec
    kw = dict(batch_size=48, augment=["arcface"], seed=7)  # 10 batches per epoch
    with _build(rec, dali, **kw) as full:
        ref_x, ref_y = _take(full, 14)
    with _build(rec, dali, **kw) as first:
        _take(first, 8)
        state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 8
    with _build(rec, dali, **kw) as resumed:
        resumed.load_state_dict(state)
        x, y = _take(resumed, 6)  # 2 more of epoch 0, then 4 of epoch 1
        assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 4
    assert torch.equal(y, ref_y[8:]) and torch.equal(x, ref_x[8:])


def test_resume_after_iterating_and_worker_processes(sorted_rec):
    rec, _ = sorted_rec
    with _build(rec, "off", batch_size=32, num_workers=2, augment=["flip"]) as a:
        ref = _take(a, 5)
        a.load_state_dict({"epoch": 0, "position": 2})  # rewind a running loader
        again = _take(a, 3)
    assert torch.equal(again[0], ref[0][2:]) and torch.equal(again[1], ref[1][2:])


def test_load_state_converts_other_global_batch(sorted_rec):
    rec, _ = sorted_rec
    with _build(rec, "off", batch_size=16) as loader:
        loader.load_state_dict({"epoch": 3, "position": 5, "num_images": 512, "global_batch_size": 40})
        assert (loader.epoch, loader.position) == (3, 13)  # 200 samples consumed -> ceil(200 / 16)
        with pytest.raises(ValueError, match="512"):
            loader.load_state_dict({"epoch": 0, "position": 0, "num_images": 100})


# ----------------------------------------------------------------------------------------------------------
# sampling


def _expected_distinct(class_sizes, n, b):
    """E[#distinct labels] in b samples drawn without replacement from n (hypergeometric, exact)."""
    def log_comb(a, k):
        return math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) if 0 <= k <= a else -math.inf
    return sum(1 - math.exp(log_comb(n - c, b) - log_comb(n, b)) for c in class_sizes)


@pytest.mark.parametrize("dali", BACKENDS)
def test_shuffle_quality_on_identity_sorted_rec(sorted_rec, dali):
    """Statistic: mean number of distinct labels per batch, over 3 epochs of 16 batches of 32.

    The rec is sorted by identity (64 x 8 images), so reading it in order gives 4 distinct labels per batch.
    A uniform random permutation gives E = sum_c 1 - C(N - n_c, B) / C(N, B) = 25.95 (per-batch std ~1.5,
    so the mean of 48 batches has std ~0.25). Tolerance: within 1.0 of E (4 sigma), far from 4.
    """
    rec, _ = sorted_rec
    with _build(rec, dali, batch_size=32) as loader:
        _, labels = _take(loader, 48)
    distinct = [len(set(batch.tolist())) for batch in labels]
    expected = _expected_distinct([8] * 64, 512, 32)
    assert abs(expected - 25.95) < 0.01
    assert abs(np.mean(distinct) - expected) < 1.0, (np.mean(distinct), expected)
    assert min(distinct) > 16


def test_rank_shards_disjoint_and_cover_kept_samples(sorted_rec):
    rec, _ = sorted_rec
    world, batch = 3, 16  # 512 images: 10 global batches of 48 per epoch, 32 dropped
    plans = [ShardPlan(512, batch, r, world, seed=5) for r in range(world)]
    for epoch in range(3):
        shards = [p.shard(epoch) for p in plans]
        assert all(len(s) == 10 * batch for s in shards)
        union = np.concatenate(shards)
        assert len(set(union.tolist())) == len(union)  # disjoint
        assert set(union.tolist()) == set(plans[0].permutation(epoch)[:480].tolist())  # the epoch's kept samples
    assert not np.array_equal(plans[0].permutation(0), plans[0].permutation(1))  # a fresh order every epoch
    assert set(plans[0].permutation(0)[480:].tolist()) != set(plans[0].permutation(1)[480:].tolist())
    # the loaders really serve their shards: rank r's labels are the labels of plan r's samples
    src_labels = np.repeat(np.arange(64), 8)
    for r in range(world):
        with _build(rec, "on" if r == 0 else "off", batch_size=batch, rank=r, world_size=world, seed=5) as loader:
            assert loader.batches_per_epoch == 10
            _, labels = _take(loader, 10)
            assert loader.epoch == 1
        assert labels.flatten().tolist() == src_labels[plans[r].shard(0)].tolist()


def test_plan_is_rank_and_seed_deterministic():
    a, b = ShardPlan(1000, 10, 1, 4, seed=3), ShardPlan(1000, 10, 1, 4, seed=3)
    assert np.array_equal(a.batch_indices(2, 7), b.batch_indices(2, 7))
    assert not np.array_equal(ShardPlan(1000, 10, 1, 4, seed=4).permutation(0), a.permutation(0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardPlan(30, 8, 0, 4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ShardPlan(100, 8, 4, 4, seed=0)


# ----------------------------------------------------------------------------------------------------------
# sources


def test_folder_source_matches_packed_rec(sorted_rec):
    rec, folder = sorted_rec
    src = FolderSource(folder)
    assert (src.num_images, src.num_classes) == (512, 64)
    for dali in BACKENDS:
        with _build(folder, dali, source="folder", batch_size=16, augment=["flip"]) as f, \
                _build(rec, dali, batch_size=16, augment=["flip"]) as r:
            xf, yf = _take(f, 4)
            xr, yr = _take(r, 4)
        assert torch.equal(xf, xr) and torch.equal(yf, yr)


@pytest.mark.parametrize("dali", BACKENDS)
def test_folder_source_resizes_other_sizes(tmp_path, dali):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        for k in range(4):
            arr = rng.integers(0, 255, (150, 130, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / f"p{i}" / f"{k}.png")
    with _build(tmp_path, dali, source="folder", batch_size=4, resize="stretch") as loader:
        x, y = next(loader)
    assert x.shape == (4, 3, 112, 112) and sorted(set(y.tolist())) <= [0, 1]


def test_empty_identity_folder_is_named(tmp_path):
    _make_folder(tmp_path, 2, 2)
    (tmp_path / "zz_empty").mkdir()
    with pytest.raises(ValueError, match="zz_empty.*empty identity folder"):
        build_loader("folder", str(tmp_path), batch_size=2, dali="off")


def test_demo_source_reads_cached_demo(tmp_path, monkeypatch):
    from dali_pipes import make_demo

    calls = []
    real = make_demo.make_demo

    def small(out, **kw):
        calls.append(out)
        return real(out, identities=6, images_per_identity=4, eval_identities=3, eval_images_per_identity=2,
                    eval_pairs=4, workers=1)

    monkeypatch.setattr(make_demo, "make_demo", small)
    out = tmp_path / "demo"
    with build_loader("demo", str(out), batch_size=8, dali="off", num_workers=0) as loader:
        x, y = next(loader)
        assert (loader.num_images, loader.num_classes) == (24, 6) and x.shape == (8, 3, 112, 112)
    with build_loader("demo", str(out), batch_size=8, dali="off", num_workers=0):
        pass
    assert len(calls) == 1  # generated on first use, then read from the cache
    monkeypatch.setenv("ARCSCALE_CACHE", str(tmp_path / "cache"))
    assert loader_mod.default_demo_dir() == tmp_path / "cache" / "demo"


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_missing_rec_and_idx_are_named(tmp_path, golden):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_loader("recordio", str(tmp_path / "nowhere"), batch_size=4, dali="off")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.rec").write_bytes((golden / "train.rec").read_bytes())
    with pytest.raises(FileNotFoundError, match="train.idx"):
        build_loader("recordio", str(tmp_path / "d"), batch_size=4, dali="off")
    with pytest.raises(ValueError, match="engine.data.path"):
        build_loader("recordio", None, batch_size=4, dali="off")


def _rec_with(tmp_path, payloads, labels, num_classes):
    write_insightface_rec(tmp_path, payloads, labels, num_classes)
    return tmp_path


@pytest.fixture()
def corrupt_rec(tmp_path):
    """16 images of 4 identities; keys 6 and 7 are truncated JPEGs (so the replacement of 6 is corrupt too),
    key 11 is not an image at all."""
    rng = np.random.default_rng(1)
    payloads = [_jpeg(rng) for _ in range(16)]
    for i in (5, 6):
        payloads[i] = payloads[i][: len(payloads[i]) // 2]
    payloads[10] = b"this is not a jpeg" * 10
    return _rec_with(tmp_path, payloads, np.repeat(np.arange(4), 4), 4)


@pytest.mark.parametrize("dali", BACKENDS)
def test_corrupt_jpeg_error_names_file_and_key(corrupt_rec, dali):
    with _build(corrupt_rec, dali, batch_size=16) as loader:
        with pytest.raises(ValueError, match=r"train\.rec: key (6|7|11): corrupt image"):
            next(loader)


def test_corrupt_jpeg_skip_counts_and_keeps_batches_full(corrupt_rec):
    results = {}
    for dali in BACKENDS:
        with _build(corrupt_rec, dali, batch_size=8, on_corrupt="skip") as loader:
            x, y = _take(loader, 4)  # two epochs of 2 batches
            results[dali] = (x, y, loader.num_corrupt_skipped, loader.state_dict()["num_corrupt_skipped"])
    for x, y, skipped, in_state in results.values():
        assert x.shape == (4, 8, 3, 112, 112)
        assert skipped == 6 and in_state == 6  # three corrupt images, once per epoch each
    # the two backends replace the same samples (next good one in dataset order)
    assert torch.equal(results["on"][1], results["off"][1])
    assert (results["on"][0] - results["off"][0]).abs().max() == 0


@pytest.mark.parametrize("dali", BACKENDS)
def test_label_out_of_range_names_file_and_key(tmp_path, dali):
    rng = np.random.default_rng(2)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [9, 11], 0, 0), b""))  # 8 images, 2 classes
        for key in range(1, 9):
            label = 5.0 if key == 7 else float((key - 1) // 4)
            w.write_idx(key, pack(IRHeader(0, label, key, 0), _jpeg(rng)))
        w.write_idx(9, pack(IRHeader(2, [1, 5], 0, 0), b""))
        w.write_idx(10, pack(IRHeader(2, [5, 9], 0, 0), b""))
    with _build(tmp_path, dali, batch_size=8) as loader:
        with pytest.raises(ValueError, match=r"train\.rec: key 7: label 5 is outside \[0, 2\)"):
            next(loader)
    with pytest.raises(ValueError, match="num_classes=1"):
        _build(tmp_path, dali, batch_size=8, num_classes=1)


def test_bad_options():
    with pytest.raises(ValueError, match="known: resize, blur, hsv, gray, flip"):
        parse_augment(["flip", "rotate"])
    assert parse_augment(["arcface"]) == KNOWN_AUGMENTATIONS
    assert parse_augment(None) == () and parse_augment(["flip", "FLIP"]) == ("flip",)
    with pytest.raises(ValueError, match="source"):
        build_loader("lmdb", "x", batch_size=1)
    with pytest.raises(ValueError, match="dali"):
        build_loader("recordio", "x", batch_size=1, dali="maybe")
    with pytest.raises(ValueError, match="on_corrupt"):
        build_loader("recordio", "x", batch_size=1, on_corrupt="ignore")
    assert payload_problem(b"") and payload_problem(b"GIF") and payload_problem(b"\xff\xd8\xff\xe0") is None


def test_dali_on_without_dali_is_a_clear_error(golden, monkeypatch):
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    with pytest.raises(RuntimeError, match="DALI is not installed"):
        build_loader("recordio", str(golden), batch_size=8, dali="on")
    with build_loader("recordio", str(golden), batch_size=8, dali="auto", num_workers=0) as loader:
        assert loader.backend == "torch"


def test_dali_is_installed_and_auto_picks_it(golden):
    import nvidia.dali  # noqa: F401  (CI installs DALI: its absence is a failure, not a skip)

    with build_loader("recordio", str(golden), batch_size=8, dali="auto") as loader:
        assert loader.backend == "dali"


def test_hsv_matrix_matches_dali():
    from nvidia.dali import fn, pipeline_def, types

    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [img], batch=True, layout="HWC")
        return fn.hsv(x, hue=17.0, saturation=0.6, dtype=types.FLOAT)

    p = pipe()
    p.build()
    out = np.array(p.run()[0].as_tensor())[0]
    ours = img.reshape(-1, 3).astype(np.float64) @ hsv_matrix(17.0, 0.6).T
    assert np.abs(ours.reshape(out.shape) - out).max() < 1e-3


@pytest.mark.gpu
def test_dali_gpu_decode_matches_cpu(sorted_rec):
    rec, _ = sorted_rec
    with _build(rec, "on", batch_size=16, device="cuda", augment=["flip", "hsv"]) as g, \
            _build(rec, "on", batch_size=16, augment=["flip", "hsv"]) as c:
        xg, yg = _take(g, 3)
        xc, yc = _take(c, 3)
    assert xg.device.type == "cuda" and yg.device.type == "cuda" and yg.dtype == torch.int64
    assert torch.equal(yg.cpu(), yc)
    diff = (xg.cpu() - xc).abs() * 127.5  # nvJPEG vs libjpeg-turbo: a few levels at most
    assert diff.mean() < 1.5 and diff.max() < 40
