"""Dataset tools as commands: `python -m dali_pipes.inspect_rec` on the MXNet-written golden rec, and
`python -m dali_pipes.make_demo` (deterministic output, republished atomically).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dali_pipes import make_demo as demo_mod

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_golden(shared_data):
    golden = shared_data / "recordio_golden"
    proc = subprocess.run([sys.executable, "-m", "dali_pipes.inspect_rec", str(golden)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "records: 49 (header 1, images 40, identity records 8)" in out
    assert "header: key 0 flag=2 label=[41, 49]" in out
    assert "property: 8,112,112" in out
    assert "classes: 8 (images per class: min 5, mean 5.0, max 5" in out
    assert "112x112  40" in out
    assert "corrupt records: 0" in out


def test_make_demo_cli_and_republish(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dali_pipes.make_demo", "--out", str(out), "--identities", "3",
           "--images-per-identity", "2", "--eval-identities", "2", "--eval-pairs", "4", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and demo_mod.is_complete(out)
    first = (out / "train.rec").read_bytes()
    demo_mod.make_demo(out, identities=3, images_per_identity=3, eval_identities=2, eval_images_per_identity=2,
                       eval_pairs=4, workers=1)  # over an existing directory
    assert (out / "train.rec").read_bytes() != first and demo_mod.is_complete(out)
    with pytest.raises(ValueError, match="identities"):
        demo_mod.make_demo(tmp_path / "x", identities=0)
