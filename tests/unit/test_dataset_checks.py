"""Broken labels and degenerate datasets are named, not trained on: a non-finite label names its
record (it was a bare OverflowError), a label beyond the dataset's declared class count is refused even when
the head has more classes (it trained silently), and a single-identity dataset is refused (it trained with a
loss of exactly 0.0). Loader-level cases for both backends; the same data through `python run.py`:
tests/launch/test_failures.py.
"""

import pytest

from dali_pipes.loader import build_loader, dali_available
from dali_pipes.source import RecordSource, SampleFetcher
from tests.support.data import jpeg, write_rec

BACKENDS = ["off", "on"] if dali_available() else ["off"]


@pytest.mark.parametrize("dali", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_label_names_its_record(tmp_path, dali, bad):
    root = write_rec(tmp_path / "rec", [0.0, 0.0, 0.0, 1.0, bad, 1.0, 1.0, 1.0])
    with build_loader("recordio", str(root), batch_size=8, dali=dali, num_workers=0, augment=[]) as loader:
        with pytest.raises(ValueError, match=rf"train\.rec: key 5: label {bad} is not a finite number"):
            next(loader)


def test_label_beyond_the_declared_classes_is_refused_with_a_bigger_head(tmp_path):
    """The header declares 2 classes; a record says 5. A head of 10 classes would train it as identity 5."""
    source = RecordSource(write_rec(tmp_path / "rec", [0.0, 1.0, 5.0, 1.0]))
    fetcher = SampleFetcher(source, num_classes=10, on_corrupt="error")
    fetcher.fetch([0, 1])  # in range
    with pytest.raises(ValueError, match=r"key 3: label 5 is outside \[0, 2\) \(the dataset declares 2 classes"):
        fetcher.fetch([2])
    source.close()


def test_single_class_datasets_are_refused(tmp_path):
    rec = write_rec(tmp_path / "rec", [0.0] * 4, num_classes=1)
    with pytest.raises(ValueError, match="has 1 class\\(es\\); face recognition training needs at least 2"):
        build_loader("recordio", str(rec), batch_size=2, dali="off", num_workers=0, augment=[])
    folder = tmp_path / "folder" / "only_person"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg(i))
    with pytest.raises(ValueError, match="has 1 class\\(es\\)"):
        build_loader("folder", str(tmp_path / "folder"), batch_size=2, dali="off", num_workers=0, augment=[])
