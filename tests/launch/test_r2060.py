"""r2060 (1.12 B parameters) through the real `deepspeed` launcher on 2 CPU ranks under ZeRO-3 with the recipe's
activation checkpointing: the flagship's memory against its bound. r2060 under FSDP2 with activation checkpointing
(layer3 in 64 segments), its memory against engine.plan within 20%, trains 2 steps in tests/launch/test_fit.py
(engine.plan --fit's choice at 6 GiB per rank), so the suite runs the real r2060 once per backend.

One optimizer step after the build (each step takes 1.5-2 minutes here). The peak comes in the first step:
its backward allocates the gradient partitions (shards), SGD without momentum keeps no optimizer state, and the
fp32 masters exist from the build; a second step gathers, recomputes and frees the same buffers again. That a
run keeps training after an optimizer step under ZeRO-3 and FSDP2, with this recipe's checkpointing and
precision, is checked on 2 steps by tests/distributed/test_recipes.py (r18 in r2060's place) and
tests/distributed/test_activation_checkpointing.py.
"""

import json
from pathlib import Path

import pytest

from tests.support import launching as L

ROOT = Path(__file__).resolve().parents[2]
STEPS = 1
# The recipe's step on synthetic data (no MS1MV3 here), without its checkpoints and exports (each would gather the
# 4.5 GB model on rank 0) or its lfw/cfp_fp/agedb_30 evaluation.
NO_DATASET_NO_SAVES = ["engine.data.source=synthetic", "engine.checkpoint.every=0", "engine.checkpoint.every_minutes=0",
                       "engine.checkpoint.export=false", "engine.eval.targets=[]"]


def _r2060_precision_cases():
    """bf16 as shipped where this CPU has native bf16; fp32 where it has not (bf16 would be 30-130x slower).

    One r2060 run per machine keeps the suite's time: the fp32 path differs only in autocast, which the
    small-model matrix (tests/distributed/test_activation_checkpointing.py) covers under ZeRO-3 and both checkpointings.
    """
    from engine.perf import hardware

    native = hardware.cpu_has_native_bf16()
    why = f"({hardware.cpu_description()})"
    return [
        pytest.param("bf16", marks=pytest.mark.skipif(
            not native, reason=f"no native bf16 on this CPU {why}: the recipe's bf16 is 30-130x slower here; "
                               f"the fp32 case runs instead")),
        pytest.param("fp32", marks=pytest.mark.skipif(
            native, reason=f"native bf16 on this CPU {why}: the recipe runs as shipped (bf16) instead")),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("precision", _r2060_precision_cases())
def test_r2060_zero3_checkpointing_on_cpu(tmp_path, precision):
    """r2060 (1.12 B parameters) under ZeRO-3 + DeepSpeed activation checkpointing, 2 CPU ranks, micro-batch 2
    (the final BatchNorm1d cannot train on one sample per rank), as shipped in bf16 (its recompute once
    failed under bf16 autocast) where the CPU has native bf16, else in fp32.

    SGD without momentum: per rank that is the fp32 parameter partition, DeepSpeed's fp32 master partition and
    the gradient partition (3 x 2.2 GB) plus bounded buffers (sub_group_size and reduce_bucket_size in the
    recipe): ~8.5 GB, so both ranks need ~17 GB free; the recipe's momentum would add 2.2 GB per rank, more
    than a 24 GB CI machine has beside them. No model.pt export (it would add the full 4.5 GB model on rank 0).
    """
    out = tmp_path / "r2060"
    sets = ["train_micro_batch_size_per_gpu=2", f"engine.train.max_steps={STEPS}", "engine.head.num_classes=1000",
            "engine.train.log_every=1", "engine.optim.momentum=0.0", *NO_DATASET_NO_SAVES]
    if precision == "fp32":
        sets.append("torch_autocast.enabled=false")
    L.run_deepspeed("ds_configs/r2060.json", out, *sets, timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["zero_stage"] == 3 and summary["backbone"] == "r2060"
    assert summary["precision"] == precision
    import math

    assert math.isfinite(summary["final_loss"])
    peaks = summary["peak_memory_bytes_per_rank"]
    assert len(peaks) == 2 and max(peaks) < 10 * 2 ** 30, peaks
