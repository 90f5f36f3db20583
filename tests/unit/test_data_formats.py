"""Data as users have it: any image Pillow reads, images of another size than 112x112 never stretched
silently (engine.data.resize: pad, center_crop, stretch; training and .bin decoding alike), the class count taken
from the data, and what the run found printed at start.

References: the pixels written (a lossless format decodes to exactly them), `augment.fit_image`'s geometry
checked on an image whose columns and rows are numbered, and the torch fallback as the reference for DALI (which
re-encodes formats it cannot read and resizes with its own resampler: equal where no resampling happens, close
where it does).
"""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dali_pipes.augment import fit_image
from dali_pipes.loader import build_loader

BACKENDS = ["on", "off"]
FORMATS = {".pgm": "L", ".ppm": "RGB", ".tif": "RGB", ".gif": "P", ".png": "RGB", ".jpg": "RGB"}


def _smooth(rng, width, height):
    """A smooth colour image (resamplers differ little on it), uint8 HxWx3."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3)
    arr = base + 30 * np.sin(x[..., None] / 9.0 + rng.uniform(0, 6, 3)) + 20 * np.cos(y[..., None] / 11.0)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _folder(root, sizes, suffixes, seed=0, per_id=2):
    """One identity per (size, suffix) pair; returns {path: the RGB pixels the file decodes to}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for i, ((w, h), suffix) in enumerate(zip(sizes, suffixes)):
        folder = root / f"id{i:02d}"
        folder.mkdir(parents=True)
        for k in range(per_id):
            arr = _smooth(rng, w, h)
            im = Image.fromarray(arr)
            mode = FORMATS[suffix]
            im = im.convert(mode) if mode != "P" else im.quantize(64)
            path = folder / f"{k}{suffix}"
            im.save(path)
            with Image.open(path) as back:
                pixels[str(path)] = np.asarray(back.convert("RGB"))
    return pixels


def _all_batches(loader):
    """Every image of one epoch (batch = whole dataset), by file, as uint8-scale float HxWx3."""
    images, _ = next(loader)
    order = loader.plan.batch_indices(0, 0)
    out = {}
    for img, index in zip(images, order):
        out[loader.source.where(int(index))] = (img.permute(1, 2, 0).numpy() * 127.5 + 127.5)
    return out


@pytest.mark.parametrize("dali", BACKENDS)
def test_every_format_pillow_reads(tmp_path, dali):
    """PGM (once "an empty identity folder"), PPM, TIFF, GIF, PNG, JPEG at 112x112: decoded to the written pixels
    (JPEG: to Pillow's decode), by either backend."""
    suffixes = list(FORMATS)
    pixels = _folder(tmp_path, [(112, 112)] * len(suffixes), suffixes)
    with build_loader("folder", str(tmp_path), batch_size=len(pixels), dali=dali, num_workers=0 if dali == "off"
                      else 1, augment=[]) as loader:
        assert loader.num_classes == len(suffixes)
        got = _all_batches(loader)
    assert set(got) == set(pixels)
    for path, want in pixels.items():
        tol = 3.0 if path.endswith(".jpg") and dali == "on" else 1e-3  # libjpeg-turbo rounding in DALI
        np.testing.assert_allclose(got[path], want, atol=tol, err_msg=path)


def test_fit_image_geometry():
    """pad: scaled to fit, centred on black; center_crop: scaled to cover, centre cut; stretch: both axes."""
    cols = np.tile(np.arange(96, dtype=np.uint8)[None, :, None], (112, 1, 3))  # 96 wide, 112 high
    im = Image.fromarray(cols)
    padded = np.asarray(fit_image(im, 112, "pad"))
    assert padded.shape == (112, 112, 3)
    assert (padded[:, :8] == 0).all() and (padded[:, -8:] == 0).all()
    assert np.array_equal(padded[:, 8:104], cols)  # already the right height: placed as it is
    rows = np.tile(np.arange(150, dtype=np.uint8)[:, None, None], (1, 112, 3))  # 112 wide, 150 high
    cropped = np.asarray(fit_image(Image.fromarray(rows), 112, "center_crop"))
    assert np.array_equal(cropped, rows[19:131])  # (150 - 112) // 2 = 19 rows cut above
    stretched = fit_image(Image.fromarray(rows), 112, "stretch")
    assert stretched.size == (112, 112)
    with pytest.raises(ValueError, match="image is 112x150, expected 112x112.*engine.data.resize"):
        fit_image(Image.fromarray(rows), 112, "none")
    assert fit_image(im.resize((112, 112)), 112, "none").size == (112, 112)


@pytest.mark.parametrize("dali", BACKENDS)
def test_other_sizes_error_or_resize_as_configured(tmp_path, dali):
    sizes = [(96, 112), (130, 150)]
    pixels = _folder(tmp_path, sizes, [".png", ".pgm"])
    kw = dict(batch_size=len(pixels), dali=dali, num_workers=0 if dali == "off" else 1, augment=[])
    with build_loader("folder", str(tmp_path), **kw) as loader:  # resize "none", the default
        with pytest.raises(ValueError, match=r"id0\d/\d\.p[ng]m: image is (96x112|130x150), expected 112x112"):
            next(loader)
    if dali == "off":  # found in a worker process: still one line naming the file (run.py prints it as is)
        with build_loader("folder", str(tmp_path), **{**kw, "num_workers": 1}) as loader:
            with pytest.raises(ValueError, match=r"^\S+id0\d/\d\.p[ng]m: image is [^\n]*$"):
                next(loader)
    for mode in ("pad", "center_crop", "stretch"):
        with build_loader("folder", str(tmp_path), resize=mode, **kw) as loader:
            got = _all_batches(loader)
        for path, arr in pixels.items():
            want = np.asarray(fit_image(Image.fromarray(arr), 112, mode)).astype(np.float32)
            diff = np.abs(got[path] - want)
            if dali == "off":  # the fallback is fit_image itself
                assert diff.max() < 1e-3, (mode, path)
            else:  # DALI's resampler and crop rounding: close on a smooth image
                assert diff.mean() < 3.0 and np.median(diff) < 2.0, (mode, path, diff.mean())
            if mode == "pad" and "id00" in path:  # 96 wide: 8 black columns each side, in both backends
                assert got[path][:, :7].max() < 1.0 and got[path][:, -7:].max() < 1.0


def test_bin_decoding_follows_the_same_rule(tmp_path):
    from engine.eval.verification import decode_bin, load_bin

    rng = np.random.default_rng(1)
    bins = []
    for size in [(112, 112)] * 3 + [(96, 112)]:
        out = io.BytesIO()
        Image.fromarray(_smooth(rng, *size)).save(out, format="PNG")
        bins.append(out.getvalue())
    path = tmp_path / "mine.bin"
    path.write_bytes(pickle.dumps((bins, [True, False])))
    loaded, _ = load_bin(path)
    with pytest.raises(ValueError, match=r"mine\.bin: image 3 of 4: image is 96x112, expected 112x112"):
        decode_bin(loaded, source=path)
    padded = decode_bin(loaded, source=path, resize="pad")
    assert padded.shape == (4, 112, 112, 3) and (padded[3][:, :8] == 0).all()
    with Image.open(io.BytesIO(bins[0])) as im:
        assert np.array_equal(padded[0], np.asarray(im.convert("RGB")))


# -- the run: classes from the data, what it found, errors before any model is built --------------------------

def _cfg(tmp_path, data_dir, **head):
    from engine.config import schema as config

    return config.from_dict({
        "train_micro_batch_size_per_gpu": 2,
        "engine": {"model": {"name": "mbf", "embedding_size": 32}, "head": head,
                   "data": {"source": "folder", "path": str(data_dir), "dali": "off", "num_workers": 0},
                   "train": {"max_steps": 1, "output_dir": str(tmp_path / "out")}}})


def test_class_count_from_the_data_and_start_report(tmp_path, capsys):
    from engine.train import build

    _folder(tmp_path / "faces", [(112, 112)] * 3, [".pgm"] * 3)
    cfg = _cfg(tmp_path, tmp_path / "faces")
    assert cfg.engine.head.num_classes is None
    loader = build.build_data(cfg, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "6 images, 3 identity folders (engine.head.num_classes taken from the data); image sizes 112x112 in 6 " \
           "sampled; torch loader" in out
    resolved = build.with_data_classes(cfg, loader)
    assert resolved.engine.head.num_classes == 3 and cfg.engine.head.num_classes is None
    assert json.loads(json.dumps(resolved.to_dict()))["engine"]["head"]["num_classes"] == 3
    loader.close()
    with pytest.raises(ValueError, match=r"faces has 3 classes but engine.head.num_classes=5; set it to 3, or "
                                         r"leave it out .*allow_unused_classes=true"):
        build.build_data(_cfg(tmp_path, tmp_path / "faces", num_classes=5), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"faces has 3 classes but engine.head.num_classes=2; set it to 3"):
        build.build_data(_cfg(tmp_path, tmp_path / "faces", num_classes=2), torch.device("cpu"))
    # a larger head on purpose (a scale test): the classes without images are negatives only
    with build.build_data(_cfg(tmp_path, tmp_path / "faces", num_classes=5, allow_unused_classes=True),
                          torch.device("cpu")) as loader:
        assert loader.num_classes == 5 and int(next(loader)[1].max()) < 3


def test_wrong_size_stops_before_the_model_is_built(tmp_path, monkeypatch):
    from engine.train import build

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was built before the image sizes were checked")

    monkeypatch.setattr(build, "build_backbone", no_model)
    _folder(tmp_path / "faces", [(112, 112), (100, 120)], [".jpg", ".jpg"])
    with pytest.raises(ValueError, match=r"id01/0\.jpg: image is 100x120, expected 112x112"):
        build.build_trainer(_cfg(tmp_path, tmp_path / "faces"))


def test_config_keys():
    from engine.config import schema as config

    base = {"engine": {"head": {"num_classes": 4}, "data": {"resize": "squash"}}}
    with pytest.raises(config.ConfigError, match=r"engine.data.resize: expected one of \['center_crop', 'none', "
                                                  r"'pad', 'stretch'\], got 'squash'"):
        config.from_dict(base)
    with pytest.raises(config.ConfigError, match="engine.head.num_classes: required with engine.data.source "
                                                  "'synthetic'"):
        config.from_dict({"train_micro_batch_size_per_gpu": 2, "engine": {}})
