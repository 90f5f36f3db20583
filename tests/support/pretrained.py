"""Weights files the init_from tests load (tests/unit/test_init_from.py, tests/distributed/test_init_from.py): a
backbone state_dict as arcface_torch saves it, and an arcface_torch training checkpoint of another embedding size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

StateDict = Dict[str, torch.Tensor]


def write_init_files(tmp: Path, emb: int) -> Tuple[StateDict, StateDict]:
    """r18 state_dicts of embedding `emb` (seed 123) and 32 (seed 321), with non-trivial BatchNorm statistics (so
    an eval-mode comparison means something), written as tmp/ref.pth (the state_dict alone) and
    tmp/checkpoint_gpu_0.pt (arcface_torch's checkpoint: epoch, global_step, state_dict_backbone). Returns both."""
    import backbones

    torch.manual_seed(123)
    ref = backbones.build_backbone("r18", embedding_size=emb).state_dict()
    torch.manual_seed(321)
    wide = backbones.build_backbone("r18", embedding_size=32).state_dict()
    for sd in (ref, wide):
        for k, v in sd.items():
            if k.endswith("running_mean"):
                v.uniform_(-0.1, 0.1)
            elif k.endswith("running_var"):
                v.uniform_(0.5, 1.5)
    torch.save(ref, tmp / "ref.pth")
    torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": wide}, tmp / "checkpoint_gpu_0.pt")
    return ref, wide
