"""Configs shared by the engine tests: a tiny r18 run that 1- and 2-rank tests train and compare, and the tiny mbf
run of the verification hook's tests (tests/unit and tests/distributed test_eval_hook.py)."""
from __future__ import annotations

from typing import Optional

MICRO_BATCH = 4
NUM_CLASSES = 11  # not divisible by 2: uneven head shards on 2 ranks


def tiny_r18_config(out_dir: str, world: int, stage: int, *, max_steps: int, optim: str = "sgd",
                    sample_rate: float = 1.0, dropout: float = 0.0, checkpoint: Optional[dict] = None) -> dict:
    """r18 (embedding 16), 11 classes, synthetic prototypes, ZeRO `stage`.

    The global batch is 8 on 1 or 2 ranks (gradient accumulation 2 // world), so runs on either world size
    take the same steps and can be compared.
    """
    raw = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 2 // world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "engine": {
            "model": {"name": "r18", "embedding_size": 16, "dropout": dropout},
            "head": {"num_classes": NUM_CLASSES, "sample_rate": sample_rate, "margin": [1.0, 0.5, 0.0],
                     "scale": 16.0},
            "data": {"source": "synthetic", "synthetic": "prototypes"},
            "optim": {"name": optim, "lr": 0.002 if optim == "sgd" else 0.001, "momentum": 0.9,
                      "weight_decay": 5e-4, "schedule": "poly"},
            "train": {"max_steps": max_steps, "output_dir": out_dir, "log_every": 1, "seed": 3},
        },
    }
    if checkpoint is not None:
        raw["engine"]["checkpoint"] = checkpoint
    return raw


def eval_hook_config() -> dict:
    """mbf (embedding 32), 8 classes, micro-batch 2, 2 steps, evaluated at the start and every 2 steps in batches
    of 7; a fresh dict each call (the tests add engine.eval.bins, the output_dir and the ZeRO stage)."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "engine": {"model": {"name": "mbf", "embedding_size": 32},
                   "head": {"num_classes": 8, "margin": [1.0, 0.0, 0.2], "scale": 16.0},
                   "optim": {"lr": 0.01},
                   "eval": {"every": 2, "batch_size": 7, "at_start": True},
                   "train": {"max_steps": 2, "log_every": 1}}}
