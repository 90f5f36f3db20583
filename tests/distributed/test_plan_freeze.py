"""engine.plan with engine.model.freeze: frozen parameters get no gradient, no optimizer state and no DeepSpeed fp32
partition, and a frozen stem saves no activations for the backward. Reference: the engine itself, one rank, r18 with
the stem and layer1 frozen (the usual fine-tune): after a step, the bytes of every `.grad` and of the optimizer's
state tensors (ZeRO-0), and of DeepSpeed's fp32 partitions (ZeRO-1); during a forward, the bytes autograd saves
for the backward (saved-tensor hooks on the trainer's own backbone). The planner's rows must match them."""
import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config

FREEZE = ["conv1.*", "bn1.*", "prelu.*", "layer1.*"]


def _measure(out_dir: str, stage: int, freeze: list) -> dict:
    from engine.config import schema as config
    from engine.perf import planner
    from engine.runtime import compat
    from engine.train.build import build_trainer

    raw = tiny_r18_config(out_dir, 1, stage, max_steps=1)
    raw["gradient_accumulation_steps"] = 1
    raw["engine"]["model"]["freeze"] = freeze
    cfg = config.from_dict(raw)
    trainer = build_trainer(cfg)
    module = trainer.backbone.module
    grads, step = [0], trainer.backbone.step

    def step_counting_grads():  # the gradients exist between the backward and the step
        grads[0] = sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
        return step()

    trainer.backbone.step = step_counting_grads
    trainer.train()
    inner = trainer.backbone.engine.optimizer
    inner = getattr(inner, "optimizer", inner)  # ZeRO wraps the client optimizer
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    zero = trainer.backbone.engine.optimizer
    flat = getattr(zero, "single_partition_of_fp32_groups", None) or []  # ZeRO-1/2's fp32 partitions (private)
    partitions = sum(t.numel() * t.element_size() for t in flat)

    saved, seen = [0], set()

    def pack(t):
        key = compat.storage_id(t)
        if key not in seen and not isinstance(t, torch.nn.Parameter) and key not in params:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    params = {compat.storage_id(p) for p in module.parameters()}
    micro = cfg.micro_batch_size
    images = torch.randn(micro, 3, 112, 112)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(images)
    plan = planner.plan(cfg, 1, device="cpu", mem_gb=8)
    rows = {r.name: r.bytes for r in plan.rows}
    trainer.close()
    return {"grads": grads[0], "state": state, "partitions": partitions, "saved_per_image": saved[0] / micro,
            "rows": rows, "planned_act_per_image": plan.backbone.act_elems * 4}


@pytest.mark.parametrize("stage", [0, 1])
def test_planner_counts_only_trained_parameters_and_saved_activations(tmp_path, stage):
    (frozen,) = run_distributed(_measure, 1, str(tmp_path / "f"), stage, FREEZE, timeout_s=300)
    (full,) = run_distributed(_measure, 1, str(tmp_path / "a"), stage, [], timeout_s=300)
    for got in (frozen, full):
        rows = got["rows"]
        if stage == 0:
            assert rows["backbone gradients"] == got["grads"]
            assert rows["backbone optimizer state"] == got["state"]
        else:  # DeepSpeed's fp32 copy of the trained parameters (and its gradient, 4 + 4 bytes each)
            assert rows["ZeRO fp32 partition + grad"] == 2 * got["partitions"]
            assert rows["backbone optimizer state"] == got["state"]
        # the planner's saved activations per image (measured on the meta device) against this real forward
        assert abs(got["planned_act_per_image"] / got["saved_per_image"] - 1) < 0.05, got
    trained = "grads" if stage == 0 else "partitions"  # ZeRO-1 keeps the gradients in its flat buffers
    assert frozen[trained] < full[trained] and frozen["saved_per_image"] < 0.8 * full["saved_per_image"]
