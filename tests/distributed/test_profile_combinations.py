"""engine.profile with settings the configuration matrix combined it with and it failed on (a spawned rank, 2 steps):
the memory census with an offloaded head (its gradient is a heads.RowGrad, not a tensor: AttributeError
'RowGrad' object has no attribute 'is_sparse'), and a config without engine.head.num_classes (the profiler planned
with the config as written, num_classes None: "num_classes: expected an integer >= world size"). Reference: the
head's own sizes (its sampled rows' gradient, fp32 [rows, E] plus the int64 index) and the data's class count.
"""
import json
from pathlib import Path

import pytest

from engine.runtime.spawn import run_distributed
from tests.support import config_matrix

EMB, MICRO = 16, 2


def _cfg(out_dir: str, **head_and_data) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 0},
            "engine": {"model": {"name": "mbf", "embedding_size": EMB},
                       "head": {"margin": [1.0, 0.5, 0.0], "scale": 16.0, **head_and_data.get("head", {})},
                       "data": {"num_workers": 0, **head_and_data.get("data", {})},
                       "optim": {"lr": 0.01},
                       "train": {"max_steps": 2, "log_every": 1, "output_dir": out_dir, "seed": 1},
                       "checkpoint": {"export": False}}}


def _profile(out_dir: str, raw: dict) -> dict:
    """As `python -m engine.profile --warmup 1 --steps 1` does: the Profiler made from the config as written
    (engine.train.build.run_job's make_timer), before the data fills in the class count."""
    from engine.config import schema as config
    from engine.perf.profiler import Profiler
    from engine.train.build import build_trainer

    cfg = config.from_dict(raw)
    trainer = build_trainer(cfg, timer=Profiler(cfg, start_step=1, num_steps=1))
    trainer.train()
    trainer.close()
    return json.loads((Path(out_dir) / "profile" / "profile.json").read_text())


def _both(root: str) -> dict:
    data = config_matrix.write_data(Path(root) / "data")
    offload = _cfg(f"{root}/offload", head={"num_classes": 11, "offload": "cpu"}, data={"source": "synthetic"})
    folder = _cfg(f"{root}/folder", data={"source": "folder", "path": str(data / "folder")})
    return {"offload": _profile(f"{root}/offload", offload), "folder": _profile(f"{root}/folder", folder)}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    return run_distributed(_both, 1, str(tmp_path_factory.mktemp("profiles")), timeout_s=600)[0]


def test_profile_census_counts_an_offloaded_head_s_rowgrad(profiles):
    rows = {r["name"]: r for r in profiles["offload"]["memory"]["per_rank"][0]["rows"]}
    sampled = rows["head sampled rows"]["measured_bytes"]
    # at least the step's RowGrad: every class of 11 on one rank at sample rate 1, fp32 rows + int64 index
    assert sampled >= 11 * EMB * 4 + 11 * 8


def test_profile_takes_num_classes_from_the_data(profiles):
    run = profiles["folder"]["run"]
    assert run["num_classes"] == 8  # config_matrix.write_data's folder: 8 identities
