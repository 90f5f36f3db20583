"""Progress bars of the long command-line tools (engine.runtime.progress; dali_pipes.pack's own): drawn on a
terminal, silent on a file or pipe; and the model settings the tools read from a run's config.json
(engine.state.weights.model_settings: engine.embed, engine.export, engine.eval_ijb)."""
import io
import json
import sys

import pytest

from engine.runtime.progress import progress
from engine.state.weights import model_settings


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, shown", [(_Terminal, True), (io.StringIO, False)])
def test_progress_only_on_a_terminal(monkeypatch, stream, shown):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(progress(range(5), desc="embed", unit="img")) == list(range(5))
    assert ("embed: 100%" in err.getvalue()) == shown and ("5/5" in err.getvalue()) == shown
    err.truncate(0)
    monkeypatch.setenv("RANK", "1")  # under a launcher only rank 0 draws
    list(progress(range(5), desc="embed"))
    assert err.getvalue().strip("\x00") == ""


def test_pack_bar_on_a_terminal(monkeypatch, tmp_path):
    from PIL import Image

    from dali_pipes import pack

    for person in ("a", "b"):
        (tmp_path / "img" / person).mkdir(parents=True)
        Image.new("RGB", (112, 112)).save(tmp_path / "img" / person / "0.jpg")
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    pack.pack_folder(tmp_path / "img", tmp_path / "rec", workers=1)
    assert "pack: 100%" in err.getvalue() and "2/2" in err.getvalue()
    err.truncate(0)
    pack.pack_folder(tmp_path / "img", tmp_path / "rec2", workers=1, progress=False)  # --quiet
    assert err.getvalue().strip("\x00") == ""


def test_model_settings_from_the_runs_config(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--backbone: required for .*model.pt \(no run config.json beside it"):
        model_settings(tmp_path / "model.pt")
    assert model_settings(tmp_path / "model.pt", "r50") == ("r50", 512, "given (embedding size: the default 512)")
    config = {"engine": {"model": {"name": "mbf", "embedding_size": 128}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_settings(tmp_path / "model.pt")[:2] == ("mbf", 128)
    assert model_settings(tmp_path / "model.pt", "r18", 64) == ("r18", 64, "given")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json: not a run's config.json .* pass --backbone"):
        model_settings(tmp_path / "model.pt")


def test_export_reads_the_runs_config(tmp_path, capsys):
    """engine.export with neither --backbone nor --embedding-size: the run's config.json says mbf at 16."""
    import torch

    import backbones
    from engine.state import onnx_export

    pytest.importorskip("onnx")
    torch.save(backbones.build_backbone("mbf", embedding_size=16).state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"engine": {"model": {"name": "mbf", "embedding_size": 16}}}))
    assert onnx_export.main(["--model", str(tmp_path / "model.pt"), "--onnx", str(tmp_path / "m.onnx"),
                             "--exporter", "torchscript", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "backbone mbf, embedding size 16: from " in out and "config.json" in out
    assert onnx_export.graph_summary(tmp_path / "m.onnx")["outputs"]["embedding"][-1] == 16
