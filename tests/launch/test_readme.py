"""The README's commands work as written: every fenced `bash`/`sh`/`shell` and `python` block of README.md and
docs/*.md is run here, in document order, or carries a marker saying what it needs that this machine lacks.

Markers are HTML comments (invisible on GitHub) on the line before a block's opening fence:

    <!-- readme-test: skip gpu: why -->        not run: needs GPUs (kinds: gpu, dataset, suite, not-code)
    <!-- readme-test: set KEY=VALUE ... -->    run, with these --set overrides added to its training commands
    <!-- readme-test: unshortened: why -->     run exactly as written (what its check needs, e.g. the quick
                                               start's accuracy after its 80 steps)

Each block runs as one `bash -euo pipefail` script (python blocks: one `python` file) in a scratch copy of the
repository (symbolic links to the code, a copy of ds_configs/, empty outputs/), with the venv's `python`,
`deepspeed` and `torchrun` first on PATH, so what a block writes lands where the README says, relative to the
repository, and blocks see what earlier blocks wrote. The shortening, applied to every command that trains:

* `run.py` and `scripts/demo.sh`: `--set engine.train.max_steps=2 --set train_micro_batch_size_per_gpu=2`
  appended (the recipes' 128 images per rank are a GPU's batch; a CPU rank steps in seconds at 2), and
  `--set engine.eval.at_start=false` right after `--config FILE`, so a command that asks for the evaluation
  before the first step still gets it;
* `engine.profile`: `--steps 1 --warmup 1 --set train_micro_batch_size_per_gpu=2` appended, the same default;
* `deepspeed` / `torchrun` without a port get a free one (`--master_port` / `--master-port`), one per block, so
  a block's launchers meet each other and no other job;

then the block's own `set` overrides. A block that exits non-zero fails its test with its output. After the
walkthrough block, its products are checked as the README describes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from engine.runtime.dist import find_free_port
from tests.support.readme_blocks import (DOCUMENTS, NOT_LINKED, ROOT, RUNNABLE, Block, parse_blocks, shorten)

TIMEOUT_S = 1200  # a block; the quick start's 80 steps take ~4 minutes on 2 quiet cores

ALL_BLOCKS = [b for doc in DOCUMENTS for b in parse_blocks(doc)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.lang in RUNNABLE and b.skip is None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch copy of the repository: links to everything but what commands write (ds_configs/ is copied)."""
    stamp = ROOT / ".venv" / ".arcscale-installed"
    want = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    assert stamp.is_file() and stamp.read_text().strip() == want, (
        "run scripts/setup.sh first: .venv does not match setup.py, and scripts/demo.sh would reinstall the "
        "package from this test's scratch copy")
    work = tmp_path_factory.mktemp("readme")
    for name in _repository_entries():
        (work / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "ds_configs", work / "ds_configs")
    return work


def _repository_entries() -> List[str]:
    """The top-level names git tracks, and .venv: not what a command wrote into the checkout (a `my_faces/` there
    would be linked, and written through, by the block that makes one)."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {line.split("/", 1)[0] for line in tracked.splitlines() if line}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything there
        names = {p.name for p in ROOT.iterdir()}
    return sorted((names | {".venv"}) - NOT_LINKED)


def _env() -> Dict[str, str]:
    venv_bin = ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env["MASTER_PORT"] = str(find_free_port())  # scripts/demo.sh's port
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "ARCSCALE_TEST_FAULTS"):
        env.pop(name, None)
    return env


def run_block(block: Block, work: Path) -> str:
    if block.lang == "python":
        script = work / f".readme_block_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, script.name]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", shorten(block.code, block.sets, find_free_port(),
                                                          train=not block.unshortened)]
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"{block.name} failed (exit {proc.returncode}) as run by the test:\n"
                                  f"{cmd[-1]}\n--- output (last 6000 characters) ---\n{output[-6000:]}")
    return output


def test_every_block_is_run_or_marked():
    """Every runnable block is collected below; a skipped one says why; no block is in a language the test
    cannot judge while looking like a command (a `$ ` prompt in an unlabelled block)."""
    assert RUN_BLOCKS, "no README blocks found"
    for block in ALL_BLOCKS:
        if block.skip:
            assert block.lang in RUNNABLE, f"{block.name}: a skip marker on a ```{block.lang} block"
        if not block.lang:
            assert not any(line.startswith("$ ") for line in block.code.splitlines()), (
                f"{block.name}: a shell session in an unlabelled block: label it ```bash")


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.name for b in RUN_BLOCKS])
def test_readme_block(block, workdir):
    output = run_block(block, workdir)
    for needle, check in CHECKS.items():
        if needle in block.code:
            check(workdir, output)


# -- what a block must have made, beyond its exit status (keyed by its first command) ------------------------

def _check_walkthrough(work: Path, output: str) -> None:
    """The arcface_torch walkthrough: the recipe converted, fine-tuned from the .pth (loaded strictly, evaluated
    before and after), exported, evaluated on the IJB-C-shaped set."""
    import torch

    stand_ins = work / "arcface_torch"
    converted = json.loads((work / "ds_configs" / "ms1mv3_r18.json").read_text())
    assert converted["engine"]["model"]["name"] == "r18"
    assert converted["engine"]["eval"]["bins"] == [f"{stand_ins.name}/ms1m-retinaface-t1/lfw.bin"]
    run = work / "work_dirs" / "ms1mv3_r18_ft"
    assert re.search(r"engine\.model\.init_from: loaded \d+ tensors", output), output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["num_classes"] == 8
    lfw = summary["eval"]["lfw"]
    assert lfw["start"]["step"] == 0 and lfw["final"]["step"] == 2
    start = torch.load(stand_ins / "ms1mv3_arcface_r18" / "backbone.pth", weights_only=True)
    tuned = torch.load(run / "model.pt", weights_only=True)
    assert list(tuned) == list(start)  # arcface_torch's keys: its own tools load the result
    assert not torch.equal(tuned["fc.weight"], start["fc.weight"])  # fine-tuned
    import backbones
    from engine.eval.verification import verify_bin

    model = backbones.build_backbone("r18", embedding_size=512)
    model.load_state_dict(start)  # the step-0 evaluation was of arcface_torch's weights as they came
    assert verify_bin(model, stand_ins / "ms1m-retinaface-t1" / "lfw.bin", 16, "cpu")["acc_mean"] == pytest.approx(
        lfw["start"]["acc_mean"], abs=1e-9)
    assert (work / "r18.onnx").stat().st_size > 10_000_000
    record = json.loads((run / "ijbc" / "ijbc_roc.json").read_text())
    assert set(record["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert (run / "ijbc" / "ijbc_scores.npy").is_file() and (run / "ijbc" / "ijbc_roc.png").is_file()


def _check_own_data(work: Path, output: str) -> None:
    """Train on your own data: the folder's class count taken from the data, the pairs evaluated, model.pt."""
    for name in ("my_run", "my_run_rec"):
        out = work / "outputs" / name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["num_classes"] == 8 and summary["steps"] == 2, summary
        assert "val" in summary["eval"] and (out / "model.pt").is_file() and (out / "config.json").is_file()
    assert "engine.head.num_classes taken from the data" in output, output[-3000:]


def _check_pairs_bin(work: Path, output: str) -> None:
    """The .bin written from one's own pairs reads back as insightface's format (engine.eval.verification)."""
    from engine.eval.verification import load_bin

    images, issame = load_bin(work / "my_pairs.bin")
    assert len(images) == 2 * len(issame) and issame == [True, False]


def _check_quickstart(work: Path, output: str) -> None:
    """The quick start as the README describes it: 2 ranks, global batch 32, all 80 steps, loss falling, held-out
    accuracy from near chance (about 0.7 untrained, see dali_pipes/make_demo.py) to above 0.9 at the end."""
    out = work / "outputs" / "quickstart"
    summary = json.loads((out / "summary.json").read_text())
    resolved = json.loads((out / "config.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32
    assert resolved["engine"]["data"]["source"] == "demo"
    assert summary["steps"] == resolved["engine"]["train"]["max_steps"] == 80
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses
    evals = [(r["step"], r["eval"]["val"]["acc_mean"]) for r in records if "eval" in r]
    assert evals[0][0] == 0 and evals[-1][0] == 80, evals
    assert evals[0][1] < 0.8 and evals[-1][1] > 0.9, evals
    val = summary["eval"]["val"]
    assert val["final"]["step"] == 80 and val["final"]["acc_mean"] == evals[-1][1]
    assert val["best"]["acc_mean"] == max(acc for _, acc in evals)
    assert "eval step 80 val: acc" in output and "samples/s" in output
    for name in ("config.json", "metrics.jsonl", "summary.json", "train.log", "model.pt"):  # as the README lists
        assert (out / name).is_file(), name


def _check_finetune(work: Path, output: str) -> None:
    """Fine-tune and evaluate on your own faces: the frozen stem's and layer1's parameters are the start's bit for
    bit, the embedding layers trained; the pairs evaluated before and after; the embeddings."""
    import numpy as np
    import torch

    start = torch.load(work / "r50_backbone.pth", weights_only=True)
    run = work / "outputs" / "my_finetune"
    tuned = torch.load(run / "model.pt", weights_only=True)
    kept = [k for k in start if k.startswith(("conv1.", "bn1.", "prelu.", "layer1.")) and k.endswith(("weight", "bias"))]
    assert kept and all(torch.equal(tuned[k], start[k]) for k in kept)
    assert not torch.equal(tuned["fc.weight"], start["fc.weight"])
    val = json.loads((run / "summary.json").read_text())["eval"]["my_ids_pairs"]
    assert val["start"]["step"] == 0 and val["final"]["step"] == 2 and val["num_pairs"] == 10
    npz = np.load(run / "my_ids.npz")
    assert npz["embeddings"].shape == (16, 512) and list(npz["paths"]) == sorted(npz["paths"])


CHECKS = {  # a command that only its block has -> what the block must have made
    "scripts/demo.sh": _check_quickstart,
    "scripts/make_walkthrough_inputs.py --out arcface_torch": _check_walkthrough,
    "make_demo --out my_faces --layout folder": _check_own_data,
    'Path("my_pairs.bin").write_bytes': _check_pairs_bin,
    "engine.make_bin --images my_ids": _check_finetune,
}
