"""A config the planner's FSDP2 tests (tests/unit/test_plan.py, tests/launch/test_plan.py) plan: engine.train.backend
fsdp with its settings as arguments.
"""
from __future__ import annotations

from engine.config import schema as config


def fsdp_config(reshard: bool = True, hybrid: bool = False, offload: bool = False, precision: str = "fp32",
                optim: str = "sgd", momentum: float = 0.9, accum: int = 1, micro: int = 8, model: str = "r50",
                emb: int = 512, classes: int = 1000):
    """A checked config: `model` (embedding `emb`), a full-softmax head of `classes`, FSDP2 with
    reshard_after_forward `reshard`, `hybrid` and cpu_offload `offload`; precision "fp32" or "bf16" (autocast)."""
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config.from_dict({**ds, "engine": {
        "model": {"name": model, "embedding_size": emb},
        "head": {"num_classes": classes, "sample_rate": 1.0},
        "optim": {"name": optim, "momentum": momentum},
        "train": {"backend": "fsdp"},
        "fsdp": {"reshard_after_forward": reshard, "hybrid": hybrid, "cpu_offload": offload}}})
