"""engine.model.channels_last through the Trainer under DeepSpeed: it starts (DeepSpeed's parameter broadcast
used to fail on channels_last weights), the convolutions really run channels_last, the weights (and their
gradients) are NHWC at ZeRO-0, where DeepSpeed keeps the parameters as they are, and contiguous at ZeRO-1, where
they are views into DeepSpeed's flat buffer; training follows the contiguous run (reference) to fp32 tolerance."""
import os

import pytest
import torch

from engine.runtime.spawn import run_distributed


def _train(out_dir: str, channels_last: bool, stage: int) -> dict:
    from engine.config import schema as config
    from engine.train.build import build_trainer

    cfg = config.from_dict({
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "engine": {"model": {"name": "mbf", "embedding_size": 32, "channels_last": channels_last},
                   "head": {"num_classes": 10, "margin": [1.0, 0.0, 0.2], "scale": 16.0},
                   "data": {"source": "synthetic"},
                   "optim": {"lr": 0.01},
                   "train": {"max_steps": 2, "log_every": 1, "output_dir": out_dir, "seed": 1},
                   "checkpoint": {"export": True}}})
    trainer = build_trainer(cfg)
    formats = []
    conv = next(m for m in trainer.backbone.module.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
    trainer.train()
    state = trainer.state_dict()["backbone"]
    weight_layout = (conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous(),
                     conv.weight.grad is None or conv.weight.grad.stride() == conv.weight.stride())
    trainer.close()
    exported = torch.load(os.path.join(out_dir, "model.pt"), weights_only=True)
    return {"backbone": state, "channels_last_outputs": formats, "nhwc_weight_and_grad": weight_layout,
            "model_pt_contiguous": all(v.is_contiguous() for v in exported.values())}


@pytest.mark.parametrize("stage", [0, 1])
def test_channels_last_trains_like_contiguous(tmp_path, stage):
    (ref,) = run_distributed(_train, 1, str(tmp_path / "c"), False, stage, timeout_s=600)
    (got,) = run_distributed(_train, 1, str(tmp_path / "cl"), True, stage, timeout_s=600)
    assert got["channels_last_outputs"] and all(got["channels_last_outputs"])
    assert not any(ref["channels_last_outputs"])
    assert got["nhwc_weight_and_grad"] == ((True, True) if stage == 0 else (False, True))
    assert ref["nhwc_weight_and_grad"] == (False, True)
    assert got["model_pt_contiguous"]  # model.pt is NCHW, as arcface_torch writes it
    names = [k for k, v in ref["backbone"].items() if v.is_floating_point()]
    a = torch.cat([got["backbone"][k].double().flatten() for k in names])
    b = torch.cat([ref["backbone"][k].double().flatten() for k in names])
    assert ((a - b).norm() / b.norm()).item() < 1e-4
