"""Broken labels and degenerate datasets are named, not trained on (issue 11): a non-finite label names its
record (it was a bare OverflowError), a label beyond the dataset's declared class count is refused even when
the head has more classes (it trained silently), and a single-identity dataset is refused (it trained with a
loss of exactly 0.0). Loader-level cases for both backends, and two runs through the CLI (`python run.py`).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from dali_pipes.loader import build_loader, dali_available
from dali_pipes.recordio import IRHeader, RecordIOWriter, pack
from dali_pipes.source import RecordSource, SampleFetcher
from tests.launching import ROOT, env

BACKENDS = ["off", "on"] if dali_available() else ["off"]


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _rec(root, labels, num_classes: int = 2):
    """An insightface rec (header record declaring `num_classes` identities) with one image per label."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            w.write_idx(key, pack(IRHeader(0, label, key, 0), _jpeg(key)))
        per = -(-n // num_classes)
        for c in range(num_classes):
            lo, hi = 1 + c * per, min(1 + (c + 1) * per, n + 1)
            w.write_idx(n + 1 + c, pack(IRHeader(2, [lo, hi], 0, 0), b""))
    return root


@pytest.mark.parametrize("dali", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_label_names_its_record(tmp_path, dali, bad):
    root = _rec(tmp_path / "rec", [0.0, 0.0, 0.0, 1.0, bad, 1.0, 1.0, 1.0])
    with build_loader("recordio", str(root), batch_size=8, dali=dali, num_workers=0, augment=[]) as loader:
        with pytest.raises(ValueError, match=rf"train\.rec: key 5: label {bad} is not a finite number"):
            next(loader)


def test_label_beyond_the_declared_classes_is_refused_with_a_bigger_head(tmp_path):
    """The header declares 2 classes; a record says 5. A head of 10 classes would train it as identity 5."""
    source = RecordSource(_rec(tmp_path / "rec", [0.0, 1.0, 5.0, 1.0]))
    fetcher = SampleFetcher(source, num_classes=10, on_corrupt="error")
    fetcher.fetch([0, 1])  # in range
    with pytest.raises(ValueError, match=r"key 3: label 5 is outside \[0, 2\) \(the dataset declares 2 classes"):
        fetcher.fetch([2])
    source.close()


def test_single_class_datasets_are_refused(tmp_path):
    rec = _rec(tmp_path / "rec", [0.0] * 4, num_classes=1)
    with pytest.raises(ValueError, match="has 1 class\\(es\\); face recognition training needs at least 2"):
        build_loader("recordio", str(rec), batch_size=2, dali="off", num_workers=0, augment=[])
    folder = tmp_path / "folder" / "only_person"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    with pytest.raises(ValueError, match="has 1 class\\(es\\)"):
        build_loader("folder", str(tmp_path / "folder"), batch_size=2, dali="off", num_workers=0, augment=[])


def _cli(tmp_path, name: str, data: dict) -> subprocess.CompletedProcess:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2,
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 2, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"num_workers": 0, "dali": "off", "augment": [], **data},
                   "train": {"max_steps": 4, "log_every": 1, "output_dir": str(tmp_path / f"{name}_out")}}}))
    return subprocess.run([sys.executable, "run.py", "--config", str(config)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def test_cli_names_a_non_finite_label_and_refuses_one_identity(tmp_path):
    rec = _rec(tmp_path / "rec", [0.0, 0.0, 0.0, 1.0, float("nan"), 1.0, 1.0, 1.0])
    proc = _cli(tmp_path, "nan_label", {"source": "recordio", "path": str(rec)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{rec / 'train.rec'}: key 5: label nan is not a finite number" in proc.stderr, proc.stderr[-3000:]
    assert "OverflowError" not in proc.stderr and "Traceback" not in proc.stderr
    folder = tmp_path / "one_id" / "person"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    proc = _cli(tmp_path, "one_id", {"source": "folder", "path": str(tmp_path / "one_id")})
    assert proc.returncode == 1 and "has 1 class(es)" in proc.stderr, proc.stderr[-3000:]
