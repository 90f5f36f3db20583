"""The verification training hook's configuration: a missing or corrupt .bin and bad `engine.eval.bins` entries
fail before the model is built, naming the file or entry; the demo placeholder resolves to the demo directory.
(The hook's results on 1 and 2 ranks against verify_bin: tests/distributed/test_eval_hook.py.)
"""

from pathlib import Path

import pytest

from tests.support.configs import eval_hook_config


# ---------------------------------------------------------------------------------------------- start-up


def test_missing_bin_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from engine.config import schema as config
    from engine.train import build

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was built before the .bin files were checked")

    monkeypatch.setattr(build, "build_backbone", no_model)
    raw = eval_hook_config()
    missing = tmp_path / "nowhere" / "lfw.bin"
    raw["engine"]["eval"]["bins"] = [str(missing)]
    raw["engine"]["train"]["output_dir"] = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"engine\.eval\.bins\[0\]: .*nowhere/lfw\.bin not found"):
        build.build_trainer(config.from_dict(raw))


def test_corrupt_image_in_bin_is_named(tmp_path, shared_data):
    import pickle

    from engine.eval.verification import load_bin
    from engine.train.hooks import VerificationHook

    bins, issame = load_bin(shared_data / "recordio_golden" / "pairs.bin")
    bins[33] = b"\xff\xd8 not a jpeg"
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((bins, issame)))
    with pytest.raises(ValueError, match=r"bad\.bin: cannot decode image 33 of 40"):
        VerificationHook([path], every=1, batch_size=4)


@pytest.mark.parametrize("entry, message", [
    ("data/{demo}/val.bin", "may only stand at the start"),
    ("", "expected the path of a .bin file"),
])
def test_bad_bins_entries(entry, message):
    from engine.config import schema as config

    with pytest.raises(config.ConfigError, match=rf"engine\.eval\.bins\[0\]: .*{message}"):
        config.from_dict({"engine": {"eval": {"bins": [entry]}}})
    with pytest.raises(config.ConfigError, match=r"engine\.eval\.every: expected >= 0"):
        config.from_dict({"engine": {"eval": {"every": -1}}})


def test_demo_placeholder_resolves_to_the_demo_directory(tmp_path, monkeypatch):
    from dali_pipes import make_demo
    from engine.train.hooks import resolve_bin_path

    real = make_demo.make_demo
    monkeypatch.setattr(make_demo, "make_demo", lambda out, **kw: real(
        out, identities=3, images_per_identity=2, eval_identities=3, eval_images_per_identity=2, eval_pairs=4,
        workers=1))
    # the demo source's own path wins ...
    got = resolve_bin_path("{demo}/val.bin", "demo", str(tmp_path / "mine"))
    assert got == tmp_path / "mine" / "val.bin" and got.is_file()
    # ... otherwise the default cache directory, generated on first use
    monkeypatch.setenv("ARCSCALE_CACHE", str(tmp_path / "cache"))
    got = resolve_bin_path("{demo}/val.bin", "synthetic", None)
    assert got == tmp_path / "cache" / "demo" / "val.bin" and got.is_file()
    assert resolve_bin_path("~/x/lfw.bin") == Path.home() / "x" / "lfw.bin"
