"""The tiny run engine.profile's tests profile (tests/unit, tests/distributed and tests/launch test_profile.py):
mbf (embedding 16), 11 classes, micro-batch 2, ZeRO-0, synthetic data, 1 warm-up and 2 profiled steps.
"""
from __future__ import annotations

MICRO, EMB, CLASSES, WORLD = 2, 16, 11, 2
WARMUP, STEPS = 1, 2


def tiny_profile_config(out_dir: str, **profile) -> dict:
    """The tiny run's raw config, writing to `out_dir`, with `profile` as its engine.profile section."""
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "engine": {"model": {"name": "mbf", "embedding_size": EMB},
                   "head": {"num_classes": CLASSES, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"source": "synthetic"},
                   "optim": {"name": "sgd", "lr": 0.01},
                   "train": {"max_steps": WARMUP + STEPS, "log_every": 1, "output_dir": out_dir, "seed": 1},
                   "checkpoint": {"export": False},
                   "profile": profile}}
