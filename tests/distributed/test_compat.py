"""DeepSpeed engine's private APIs the engine relies on (engine/runtime/compat.py), called on a real
DeepSpeed engine in a spawned process group against the installed version. (The ones that need
no process group: tests/unit/test_compat.py.)
"""

import pytest
import torch

from engine.runtime import compat
from engine.runtime.spawn import run_distributed


def _engine_apis(stage: int) -> dict:
    """A real DeepSpeed engine at `stage` on one CPU rank: every engine-level compat function works on it."""
    import deepspeed

    from engine.parallel.deepspeed_backend import deepspeed_config_for_engine
    from engine.runtime import dist

    device = dist.init()  # also on an existing group: keeps DeepSpeed from JIT-building its shm op
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = deepspeed_config_for_engine({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}}, 1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    out = {"loss_scale": compat.loss_scale(engine.optimizer), "overflow": compat.step_overflowed(engine.optimizer),
           "scaler": compat.loss_scaler_state(engine.optimizer)}
    x = torch.randn(2, 8, device=device)
    engine.backward(engine(x).square().sum())
    grads = list(compat.zero_local_grads(engine))
    out["num_local_grads"] = sum(g is not None for g in grads)
    out["local_grad_elems"] = sum(g.numel() for g in grads if g is not None)
    out["flat_partitions"] = len(compat.zero_flat_fp32_partitions(engine.optimizer))
    engine.step()
    compat.link_zero_optimizer_state(engine.optimizer)
    compat.refresh_fp32_params(engine.optimizer)
    if stage == 0:
        compat.disable_backward_allreduce(engine)
        out["allreduce"] = engine.enable_backward_allreduce
    engine.destroy()
    return out


def _precision_apis() -> dict:
    """The precision-related private APIs on real engines: torch_autocast float16's GradScaler (the engine's at
    ZeRO-0, the ZeRO optimizer's at stage 1, built here directly: engine.config refuses that combination), the
    ZeRO-0 bf16 optimizer's fp32 masters, and the reset of DeepSpeed's process-wide torch_autocast state."""
    import deepspeed
    from deepspeed.runtime import torch_autocast

    from engine.parallel.deepspeed_backend import deepspeed_config_for_engine

    def engine_for(stage: int, blocks: dict):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cfg = deepspeed_config_for_engine({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                                           **blocks}, 1)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)[0]

    out = {}
    fp16 = {"torch_autocast": {"enabled": True, "dtype": "float16"}}
    for stage in (0, 1):
        compat.reset_deepspeed_autocast_state()
        engine = engine_for(stage, fp16)
        scaler = compat.autocast_grad_scaler(engine)
        out[f"autocast_fp16_z{stage}"] = (type(scaler).__name__, float(scaler.get_scale()),
                                          compat.loss_scale(engine.optimizer))
        engine.destroy()
    out["autocast_state_set"] = torch_autocast.is_autocast_initialized()
    compat.reset_deepspeed_autocast_state()
    out["autocast_state_after_reset"] = torch_autocast.is_autocast_initialized()
    engine = engine_for(0, {})
    out["fp32_scaler"], out["fp32_masters"] = compat.autocast_grad_scaler(engine), compat.zero0_fp32_masters(
        engine.optimizer)
    engine.destroy()
    engine = engine_for(0, {"bf16": {"enabled": True}})
    masters = compat.zero0_fp32_masters(engine.optimizer)
    out["bf16_masters"] = sorted((str(p.dtype), str(masters[id(p)].dtype), masters[id(p)].shape == p.shape)
                                 for p in engine.module.parameters())
    engine.destroy()
    return out


def _all_stages() -> dict:
    return {**{stage: _engine_apis(stage) for stage in (0, 1, 2, 3)}, "precision": _precision_apis()}


@pytest.fixture(scope="module")
def engines():
    return run_distributed(_all_stages, 1, timeout_s=600)[0]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_private_apis(engines, stage):
    out = engines[stage]
    assert out["loss_scale"] == 1.0 and out["overflow"] is False and out["scaler"] == {}
    assert out["num_local_grads"] >= 1 and out["local_grad_elems"] == 8 * 8 + 8 + 8 * 4 + 4  # one rank: all
    assert out["flat_partitions"] == (1 if stage == 3 else 0)
    if stage == 0:
        assert out["allreduce"] is False


def test_precision_private_apis(engines):
    out = engines["precision"]
    assert out["autocast_fp16_z0"][:2] == ("GradScaler", 2.0 ** 16)
    assert out["autocast_fp16_z1"] == ("GradScaler", 2.0 ** 16, 2.0 ** 16)  # the ZeRO optimizer's, through loss_scale
    assert out["autocast_state_set"] is True and out["autocast_state_after_reset"] is False
    assert out["fp32_scaler"] is None and out["fp32_masters"] == {}
    assert out["bf16_masters"] == [("torch.bfloat16", "torch.float32", True)] * 4
