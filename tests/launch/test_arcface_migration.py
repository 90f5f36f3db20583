"""README's "Coming from arcface_torch" walkthrough, command for command, on a CPU-sized stand-in (issue 13).

A user has arcface_torch's trained backbone (`backbone.pth`), its recipe (`configs/*.py`), its insightface
RecordIO data with a verification `.bin`, and an IJB-C folder. The README's commands convert the recipe,
fine-tune from the weights, export ONNX and compute IJB-C TAR@FAR; here each runs as its own process exactly as
there, with mbf at embedding 512 standing in for r50, 16 images of 4 identities, the recipe's 4 steps, and the
IJB-C-shaped set tests/support/ijb_data.py generates. What each command must have done is checked from its files.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.support.data import make_ijb_dataset

ROOT = Path(__file__).resolve().parents[2]

RECIPE = '''from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = False
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 4
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "{rec}"
config.num_classes = 4
config.num_image = 16
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = ["lfw"]
'''


def _face(rng: np.random.Generator, identity: np.ndarray) -> bytes:
    noise = rng.normal(0, 10, (112, 112, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(identity + noise, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=92)
    return out.getvalue()


def _arcface_torch_files(tmp: Path) -> None:
    """backbone.pth (arcface_torch's model layout), configs/ms1mv3_mbf.py, faces/ (to pack) and lfw.bin."""
    import backbones

    torch.manual_seed(5)
    torch.save(backbones.build_backbone("mbf", embedding_size=512).state_dict(), tmp / "backbone.pth")
    rng = np.random.default_rng(0)
    identities = [np.asarray(Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)).resize(
        (112, 112), Image.BILINEAR), np.float64) for _ in range(8)]
    for i in range(4):
        (tmp / "faces" / f"id{i}").mkdir(parents=True)
        for k in range(4):
            (tmp / "faces" / f"id{i}" / f"{k}.jpg").write_bytes(_face(rng, identities[i]))
    bins, issame = [], []
    for p in range(10):  # unseen identities 4..7: 5 genuine, 5 impostor pairs
        a, b = 4 + p % 4, 4 + (p % 4 if p < 5 else (p + 1) % 4)
        bins += [_face(rng, identities[a]), _face(rng, identities[b])]
        issame.append(a == b)
    (tmp / "lfw.bin").write_bytes(pickle.dumps((bins, issame), protocol=4))
    (tmp / "configs").mkdir()
    (tmp / "configs" / "ms1mv3_mbf.py").write_text(RECIPE.format(rec=tmp / "ms1mv3"))


def _run(*args) -> str:
    """One README command, from the repository's root as there."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_readme_walkthrough(tmp_path):
    t = tmp_path
    _arcface_torch_files(t)
    make_ijb_dataset(t / "IJBC")
    _run("-m", "dali_pipes.pack", "--images", t / "faces", "--out", t / "ms1mv3", "--quiet", "--workers", "1")
    (t / "ms1mv3" / "lfw.bin").write_bytes((t / "lfw.bin").read_bytes())

    # 1. the recipe
    log = _run("-m", "engine.convert_config", t / "configs" / "ms1mv3_mbf.py", "-o", t / "ms1mv3_mbf.json",
               "--world-size", "1")
    converted = json.loads((t / "ms1mv3_mbf.json").read_text())
    e = converted["engine"]
    assert (e["model"]["name"], e["train"]["max_steps"], e["optim"]["poly_power"]) == ("mbf", 4, 1.0), log
    assert e["eval"]["bins"] == [str(t / "ms1mv3" / "lfw.bin")]

    # 2. fine-tune from arcface_torch's weights
    out = t / "work_dirs" / "finetune"
    log = _run("run.py", "--config", t / "ms1mv3_mbf.json", "--set", f"engine.model.init_from={t / 'backbone.pth'}",
               "--set", "engine.optim.lr=0.01", "--set", f"engine.train.output_dir={out}",
               "--set", "engine.eval.at_start=true")
    assert "engine.model.init_from: loaded 333 tensors" in log, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_classes"] == 4
    lfw = summary["eval"]["lfw"]
    assert lfw["start"]["step"] == 0 and lfw["final"]["step"] == 4
    start = torch.load(t / "backbone.pth", weights_only=True)
    tuned = torch.load(out / "model.pt", weights_only=True)
    assert list(tuned) == list(start)  # arcface_torch's keys: its own tools load the result
    assert not torch.equal(tuned["features.layers.2.weight"], start["features.layers.2.weight"])
    # the untrained arcface_torch weights gave the step-0 evaluation: the same as verify_bin on them
    import backbones
    from engine.eval.verification import verify_bin

    model = backbones.build_backbone("mbf", embedding_size=512)
    model.load_state_dict(start)
    assert verify_bin(model, t / "lfw.bin", 16, "cpu")["acc_mean"] == lfw["start"]["acc_mean"]

    # 3. ONNX (the export checks itself against PyTorch with onnxruntime and fails otherwise)
    log = _run("-m", "engine.export", "--model", out / "model.pt", "--backbone", "mbf", "--embedding-size", "512",
               "--onnx", t / "mbf.onnx")
    assert (t / "mbf.onnx").stat().st_size > 1_000_000, log

    # 4. IJB-C
    log = _run("-m", "engine.eval_ijb", "--model", out / "model.pt", "--backbone", "mbf", "--root", t / "IJBC",
               "--target", "IJBC", "--output", t / "ijbc_out", "--workers", "0")
    record = json.loads((t / "ijbc_out" / "ijbc_roc.json").read_text())
    assert set(record["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}, log
    assert record["num_templates"] > 0 and "TAR %" in log
