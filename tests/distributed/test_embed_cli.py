"""python -m engine.embed (engine.eval.embed_cli): the .npz's embeddings equal the model's own forward on the same
images (1e-5), in file-name order, on 1 rank and on 2 gloo ranks (each embedding its slice, gathered in order);
a rec packed from the same folders gives the same embeddings; backbone and embedding size come from the run's
config.json beside model.pt."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.eval.embed_cli import main
from engine.runtime.spawn import run_distributed

EMB = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import backbones
    from dali_pipes.make_demo import make_demo
    from dali_pipes.pack import pack_folder

    tmp = tmp_path_factory.mktemp("embed")
    faces = tmp / "faces"
    make_demo(faces, identities=3, images_per_identity=3, eval_identities=2, eval_images_per_identity=2,
              eval_pairs=2, workers=1, layout="folder")
    (faces / "val.bin").unlink()
    pack_folder(faces, tmp / "rec", workers=1, progress=False)
    mixed = tmp / "mixed"  # the same faces, plus a PNG deeper down and a hidden file that is skipped
    (mixed / "b" / "deep").mkdir(parents=True)
    for i, p in enumerate(sorted(faces.rglob("*.jpg"))):
        (mixed / ("a" if i % 2 else "b") / f"{i:02d}.jpg").parent.mkdir(exist_ok=True)
        (mixed / ("a" if i % 2 else "b") / f"{i:02d}.jpg").write_bytes(p.read_bytes())
    Image.new("RGB", (112, 112), (10, 200, 40)).save(mixed / "b" / "deep" / "x.png")
    (mixed / ".hidden.jpg").write_bytes(b"not an image")
    run = tmp / "run"
    run.mkdir()
    torch.manual_seed(5)
    torch.save(backbones.build_backbone("mbf", embedding_size=EMB).state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({"engine": {"model": {"name": "mbf", "embedding_size": EMB}}}))
    return tmp


def _reference(model_path, files):
    from dali_pipes.augment import decode_rgb
    from engine.state.weights import load_backbone

    model = load_backbone(model_path, "mbf", embedding_size=EMB)
    images = np.stack([decode_rgb(f.read_bytes()) for f in files])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return model(((x / 255) - 0.5) / 0.5).numpy()


def _main(args):
    return main(args)


def test_one_and_two_ranks_equal_the_models_forward(setup):
    tmp = setup
    model = str(tmp / "run" / "model.pt")
    files = sorted((p for p in (tmp / "mixed").rglob("*") if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.relative_to(tmp / "mixed").as_posix())
    want = _reference(model, files)
    assert main(["--model", model, "--images", str(tmp / "mixed"), "--out", str(tmp / "one.npz"),
                 "--batch-size", "4"]) == 0
    assert run_distributed(_main, 2, ["--model", model, "--images", str(tmp / "mixed"), "--out",
                                      str(tmp / "two.npz"), "--batch-size", "3"], timeout_s=300) == [0, 0]
    for name in ("one", "two"):
        got = np.load(tmp / f"{name}.npz")
        assert got["embeddings"].dtype == np.float32 and got["embeddings"].shape == (len(files), EMB)
        assert got["paths"].tolist() == [f.relative_to(tmp / "mixed").as_posix() for f in files]
        np.testing.assert_allclose(got["embeddings"], want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0)  # not normalised


def test_rec_gives_the_folders_embeddings(setup, capsys):
    tmp = setup
    model = str(tmp / "run" / "model.pt")
    files = sorted(p for p in (tmp / "faces").rglob("*.jpg"))  # pack's order: identity folders, then names
    assert main(["--model", model, "--rec", str(tmp / "rec"), "--out", str(tmp / "rec.npz")]) == 0
    assert "by mbf (embedding size 16; " in capsys.readouterr().out
    got = np.load(tmp / "rec.npz")
    np.testing.assert_allclose(got["embeddings"], _reference(model, files), rtol=1e-5, atol=1e-5)
    assert got["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and got["paths"][0] == "train.rec#1"


def test_errors_are_named(setup, tmp_path, capsys):
    tmp = setup
    torch.save(torch.load(tmp / "run" / "model.pt"), tmp_path / "bare.pt")  # no config.json beside it
    assert main(["--model", str(tmp_path / "bare.pt"), "--images", str(tmp / "mixed"),
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "--backbone: required for" in capsys.readouterr().err
    Image.new("RGB", (120, 90)).save(tmp_path / "wide.png")
    assert main(["--model", str(tmp / "run" / "model.pt"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "wide.png: image is 120x90, expected 112x112" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
