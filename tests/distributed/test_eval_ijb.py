"""IJB embedding split across ranks (engine.eval.ijb_eval.embed_faces on 2 or 3 spawned ranks, uneven slices):
every rank gathers the single-process embeddings, and a missing image on one rank's slice is named on every
rank. (The protocol against brute force in one process: tests/unit/test_eval_ijb.py.)
"""

from __future__ import annotations

import numpy as np
import torch

from engine.eval import ijb
from engine.eval import ijb_eval as eval_ijb
from engine.runtime.spawn import run_distributed
from tests.support.data import ijb_reference, make_ijb_dataset


class _Tiny(torch.nn.Module):
    """A fast stand-in backbone: average-pool to 14x14, one linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = torch.nn.Linear(3 * 14 * 14, 8)

    def forward(self, x):
        return self.fc(torch.nn.functional.avg_pool2d(x, 8).flatten(1))


def _embed_on_ranks(root: str, batch_size: int):
    """Per rank: the gathered embeddings, and the error a missing image on the last rank's slice gives."""
    import os
    from pathlib import Path

    meta = ijb.read_meta(root, "IJBC")
    emb = eval_ijb.embed_faces(_Tiny(), Path(root) / "loose_crop", meta, batch_size=batch_size,
                               device=torch.device("cpu"))
    meta.names[-1] = "missing.png"
    try:
        eval_ijb.embed_faces(_Tiny(), Path(root) / "loose_crop", meta, batch_size=batch_size,
                             device=torch.device("cpu"))
        error = None
    except ValueError as exc:
        error = str(exc)
    return emb, error, int(os.environ["RANK"])


def test_faces_split_across_ranks(tmp_path):
    data = make_ijb_dataset(tmp_path / "IJBC", seed=1)
    num = len(data["faces"])
    single = eval_ijb.embed_faces(_Tiny(), tmp_path / "IJBC" / "loose_crop", ijb.read_meta(tmp_path / "IJBC", "ijbc"),
                                  batch_size=5, device=torch.device("cpu"))
    np.testing.assert_allclose(single, ijb_reference(_Tiny(), data)["embeddings"], rtol=0, atol=1e-4)
    world = 3 if num % 3 else 2  # uneven slices: the last rank has fewer faces and an extra empty batch
    results = run_distributed(_embed_on_ranks, world, str(tmp_path / "IJBC"), 4, timeout_s=240)
    for emb, error, rank in results:
        assert emb.shape == (num, 8)
        np.testing.assert_allclose(emb, single, rtol=0, atol=1e-5)
        assert error is not None and "missing.png: IJB image not found" in error, (rank, error)
