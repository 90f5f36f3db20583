"""Every precision route against fp32 (README "Precision"), on a spawned rank.

Each route trains the same tiny run (MobileFaceNet at embedding 16, 11 classes, micro-batch 4, the same synthetic
batches, 20 steps) as fp32 under DeepSpeed ZeRO-0 does, and must stay within a stated tolerance of its losses and
weight updates. Under fp16 (torch_autocast float16 at ZeRO-0: DeepSpeed's GradScaler; FSDP2 fp16: its dynamic loss
scale) a gradient forced to inf must skip the backbone's and the head's step together and leave both exactly as
they were; the next step trains again. The failures the configuration matrix found have their tests here too:
DeepSpeed's bf16 block crashed at the first convolution (nothing cast the images); torch_autocast float16's
GradScaler was invisible to the head (it stepped with a gradient 65536x too large, also on skipped steps); the
fsdp backend did not clip when gradient_clipping was absent while DeepSpeed clips at its default 1.0 (fsdp_fp32
against the DeepSpeed run); a DeepSpeed engine's torch_autocast float16 leaked into the next engine of the process
(all routes run in one process, autocast_fp16 before bf16_block); and at ZeRO 1-3 on the CPU, full_state_dict
returned the live fp32 masters, not copies.

The fp16 routes start at a loss scale of 2**6 (set before the first step): at DeepSpeed's 2**16 (and even 2**10)
this model's first steps overflow and are skipped, which would make the trajectories incomparable; the skip
itself is what the forced-overflow test checks (and, with the scale as DeepSpeed sets it, the GradScaler test).
"""
import pytest
import torch

from engine.runtime.spawn import run_distributed

STEPS = 20
LR = 0.001
MICRO_BATCH = 4
AUTOCAST_BF16 = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
AUTOCAST_FP16 = {"torch_autocast": {"enabled": True, "dtype": "float16"}}
# route -> (backend, ZeRO stage, precision blocks); stages spread over the routes (each route's own tests cover
# the stages beside it: the bf16 block at every stage below)
ROUTES = {
    "fsdp_fp32": ("fsdp", 0, {}),
    "autocast_bf16": ("deepspeed", 1, AUTOCAST_BF16),
    "autocast_fp16": ("deepspeed", 0, AUTOCAST_FP16),
    "bf16_block": ("deepspeed", 2, {"bf16": {"enabled": True}}),
    "fsdp_bf16": ("fsdp", 0, {"bf16": {"enabled": True}}),
    "fsdp_fp16": ("fsdp", 0, {"fp16": {"enabled": True, "initial_scale_power": 6}}),
}
GPU_ROUTES = {"fp16_block": ("deepspeed", 0, {"fp16": {"enabled": True, "initial_scale_power": 6}})}
FP16_ROUTES = ("autocast_fp16", "fsdp_fp16")
# Relative to the fp32 run (DeepSpeed ZeRO-0): the largest difference of a step's loss, and of the 20 steps' weight
# update ||update - update_fp32|| / ||update_fp32|| of the backbone and of the head. Measured on a 2-core
# AVX512-BF16 CPU (2026-12-06): fsdp_fp32 loss 0.001, updates 0.016 / 0.0001 (not bitwise: the global norm of
# the default clipping is summed differently, and 20 steps amplify the last bit); bf16 routes loss <= 0.059,
# updates <= 0.36 / 0.11; fp16 routes loss <= 0.007, updates <= 0.12 / 0.017. A 16-bit forward flips some signs of
# MobileFaceNet's BatchNorm1d features at micro-batch 4, which then compound; a head stepped with a scaled gradient
# (65536x, or even 64x) or a skipped backbone step is far outside these.
LOSS_TOL = {"fp32": 0.005, "bf16": 0.15, "fp16": 0.02}
UPDATE_TOL = {"fp32": (0.05, 0.005), "bf16": (0.75, 0.3), "fp16": (0.3, 0.06)}  # (backbone, head)


def _cfg(out_dir: str, backend: str = "deepspeed", stage: int = 0, blocks=None, steps: int = STEPS):
    from engine.config import schema as config

    return config.from_dict({
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "zero_optimization": {"stage": stage},
        **(blocks or {}),
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 11, "margin": [1.0, 0.5, 0.0], "scale": 16.0},
                   "data": {"source": "synthetic"},
                   "optim": {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"},
                   "train": {"max_steps": steps, "log_every": 1, "output_dir": out_dir, "seed": 4,
                             "backend": backend},
                   "checkpoint": {"export": False}}})


def _trainer(out_dir: str, backend: str, stage: int, blocks, steps: int = STEPS):
    from engine.runtime import compat
    from engine.train.build import build_trainer

    trainer = build_trainer(_cfg(out_dir, backend, stage, blocks, steps))
    trainer.backbone.train()
    trainer.head.train()
    scaler = compat.autocast_grad_scaler(trainer.backbone.engine) if backend == "deepspeed" else None
    if scaler is not None:  # GradScaler's public setter (after scale() created its state); see the docstring
        scaler.scale(torch.zeros((), device=trainer.device))
        scaler.update(new_scale=2.0 ** 6)
    return trainer


def _weights(trainer) -> dict:
    return {"backbone": {k: v for k, v in trainer.backbone.full_state_dict().items()
                         if "running_" not in k and "num_batches" not in k},
            "head": trainer.head.weight.detach().float().cpu().clone()}


def _train(out_dir: str, backend: str, stage: int, blocks) -> dict:
    trainer = _trainer(out_dir, backend, stage, blocks)
    start = _weights(trainer)
    losses = [float(trainer.train_step()) for _ in range(STEPS)]
    out = {"losses": losses, "start": start, "end": _weights(trainer), "skipped": trainer.head_step.num_skipped}
    trainer.close()
    return out


def _poison_next_boundary(trainer) -> None:
    """The next boundary micro-batch's backward carries inf into the first layer's gradients: an fp16 overflow
    (through an activation's gradient, so it reaches DeepSpeed's parameters and FSDP2's sharded ones alike)."""
    first = next(m for m in trainer.backbone.module.modules() if isinstance(m, torch.nn.Conv2d))

    def hook(module, args, output):
        output.register_hook(lambda g: g * float("inf"))
        handle.remove()

    handle = first.register_forward_hook(hook)


def _overflow(out_dir: str, backend: str, stage: int, blocks) -> dict:
    trainer = _trainer(out_dir, backend, stage, blocks, steps=4)
    trainer.train_step()
    before, scale_before = _weights(trainer), trainer.backbone.loss_scale()
    _poison_next_boundary(trainer)
    trainer.train_step()
    after, scale_after = _weights(trainer), trainer.backbone.loss_scale()
    trainer.train_step()
    later = _weights(trainer)
    out = {"before": before, "after": after, "later": later, "skipped": trainer.head_step.num_skipped,
           "nonfinite": trainer.num_nonfinite_skipped, "scales": (scale_before, scale_after)}
    trainer.close()
    return out


def _gradscaler_as_deepspeed_sets_it(out_dir: str) -> dict:
    """torch_autocast float16 at ZeRO-0 with DeepSpeed's GradScaler untouched (scale 2**16): the scale the head is
    unscaled with, and whether the head stepped, on each of the first steps."""
    from engine.runtime import compat
    from engine.train.build import build_trainer

    trainer = build_trainer(_cfg(out_dir, "deepspeed", 0, AUTOCAST_FP16, steps=4))
    trainer.backbone.train()
    trainer.head.train()
    scaler = compat.autocast_grad_scaler(trainer.backbone.engine)
    steps = []
    for i in range(4):
        if i == 2:  # then from a scale that does not overflow: applied steps, the head unscaled by 64
            scaler.update(new_scale=2.0 ** 6)
        head = trainer.head.weight.detach().clone()
        seen = trainer.backbone.loss_scale()
        truth = float(scaler.get_scale())
        skipped = trainer.head_step.num_skipped
        trainer.train_step()
        steps.append({"seen": seen, "truth": truth, "backbone_skipped": float(scaler.get_scale()) < truth,
                      "head_skipped": trainer.head_step.num_skipped > skipped,
                      "head_moved": not torch.equal(head, trainer.head.weight)})
    trainer.close()
    return {"steps": steps}


def _bf16_block_stages(out_dir: str) -> dict:
    out = {}
    for stage in (0, 1, 2, 3):
        trainer = _trainer(f"{out_dir}/z{stage}", "deepspeed", stage, {"bf16": {"enabled": True}}, steps=2)
        losses = [float(trainer.train_step())]
        snapshot = trainer.backbone.full_state_dict()
        kept = {k: v.clone() for k, v in snapshot.items()}
        losses.append(float(trainer.train_step()))
        module = trainer.backbone.module
        bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
        conv = next(p for p in module.parameters() if p.dim() == 4)
        full = trainer.backbone.full_state_dict()
        key = next(k for k, v in full.items() if v.dim() == 4)
        out[stage] = {"losses": losses, "param_dtype": str(conv.dtype), "bn_stats": str(bn.running_var.dtype),
                      "masters_exact": not torch.equal(full[key], full[key].bfloat16().float()),
                      "snapshot_kept": all(torch.equal(snapshot[k], kept[k]) for k in kept),
                      "trained": not torch.equal(full[key], kept[key])}
        trainer.close()
    return out


def _everything(out_dir: str, gpu: bool) -> dict:
    routes = {**ROUTES, **(GPU_ROUTES if gpu else {})}
    out = {"fp32": _train(f"{out_dir}/fp32", "deepspeed", 0, {})}
    for name, (backend, stage, blocks) in routes.items():
        out[name] = _train(f"{out_dir}/{name}", backend, stage, blocks)
    for name in FP16_ROUTES + (("fp16_block",) if gpu else ()):
        backend, stage, blocks = routes[name]
        out[f"overflow_{name}"] = _overflow(f"{out_dir}/overflow_{name}", backend, stage, blocks)
    if not gpu:
        out["gradscaler"] = _gradscaler_as_deepspeed_sets_it(f"{out_dir}/gradscaler")
        out["bf16_stages"] = _bf16_block_stages(f"{out_dir}/bf16_stages")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_everything, 1, str(tmp_path_factory.mktemp("precision")), False, timeout_s=900)[0]


def _update_error(route: dict, ref: dict, part: str) -> float:
    if part == "head":
        du, dr = route["end"]["head"] - route["start"]["head"], ref["end"]["head"] - ref["start"]["head"]
        return float((du - dr).norm() / dr.norm())
    num = sum(float(((route["end"][part][k] - route["start"][part][k]) - (ref["end"][part][k] - ref["start"][part][k]))
                    .square().sum()) for k in ref["end"][part])
    den = sum(float((ref["end"][part][k] - ref["start"][part][k]).square().sum()) for k in ref["end"][part])
    return (num / den) ** 0.5


def _precision(route: str) -> str:
    return next(p for p in ("fp32", "fp16", "bf16") if p in route)


@pytest.mark.parametrize("route", list(ROUTES))
def test_route_stays_within_tolerance_of_fp32(runs, route):
    """20 steps on the same data: every step's loss within LOSS_TOL of fp32's and the backbone's and head's weight
    updates within UPDATE_TOL (relative); all start from the same weights; no step skipped at scale 2**10."""
    ref, got = runs["fp32"], runs[route]
    assert torch.equal(ref["start"]["head"], got["start"]["head"])
    for key, a in ref["start"]["backbone"].items():
        # DeepSpeed's bf16 block makes its fp32 masters from the module it cast to bf16: they start rounded
        a = a.bfloat16().float() if route == "bf16_block" else a
        assert torch.equal(a, got["start"]["backbone"][key]), f"{route} starts from other weights ({key})"
    assert got["skipped"] == 0
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    tol = _precision(route)
    assert loss_err <= LOSS_TOL[tol], f"{route}: losses differ from fp32 by {loss_err:.4f} (relative)"
    for part, limit in zip(("backbone", "head"), UPDATE_TOL[tol]):
        err = _update_error(got, ref, part)
        assert err <= limit, f"{route}: {part} update differs from fp32's by {err:.4f} (relative)"


@pytest.mark.parametrize("route", FP16_ROUTES)
def test_forced_fp16_overflow_skips_backbone_and_head_together(runs, route):
    out = runs[f"overflow_{route}"]
    assert out["skipped"] == 1 and out["nonfinite"] == 0, "an overflow is the loss scaler's skip, not the guard's"
    assert torch.equal(out["before"]["head"], out["after"]["head"]), f"{route}: the head stepped on the overflow"
    assert not torch.equal(out["after"]["head"], out["later"]["head"]), f"{route}: the head did not step after it"
    moved = [k for k in out["before"]["backbone"]
             if not torch.equal(out["before"]["backbone"][k], out["after"]["backbone"][k])]
    assert not moved, f"{route}: the backbone stepped on the overflow ({moved[:3]})"
    assert any(not torch.equal(out["after"]["backbone"][k], out["later"]["backbone"][k])
               for k in out["after"]["backbone"]), f"{route}: the backbone did not step after it"
    assert out["scales"][1] <= out["scales"][0]


def test_torch_autocast_fp16_gradscaler_is_the_head_s_loss_scale(runs):
    """DeepSpeed's own GradScaler (ZeRO-0, torch_autocast float16) as DeepSpeed sets it: the backbone reports its
    scale (65536 at first, not 1.0); its first steps overflow and it skips them (it lowers its scale), and the head
    skips them too; from scale 64 on it applies the steps, and so does the head."""
    steps = runs["gradscaler"]["steps"]
    assert steps[0]["seen"] == steps[0]["truth"] == 2.0 ** 16
    for s in steps:
        assert s["seen"] == s["truth"]
        assert s["head_skipped"] == s["backbone_skipped"] and s["head_moved"] == (not s["backbone_skipped"])
    assert steps[0]["backbone_skipped"] and not steps[2]["backbone_skipped"] and not steps[3]["backbone_skipped"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_bf16_block_trains_at_every_zero_stage(runs, stage):
    """DeepSpeed's `bf16: {enabled: true}` crashed at the first convolution (fp32 images, bf16 weights): the
    images are cast; BatchNorm keeps fp32 running statistics; checkpoints read the fp32 masters."""
    out = runs["bf16_stages"][stage]
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["param_dtype"] == "torch.bfloat16" and out["bn_stats"] == "torch.float32"
    assert out["masters_exact"], "full_state_dict returned the bf16-rounded weights, not the fp32 masters"
    assert out["trained"] and out["snapshot_kept"], "a full_state_dict taken earlier changed with training (it " \
                                                    "aliased the live masters)"


@pytest.mark.gpu
def test_deepspeed_fp16_block_within_tolerance_and_overflow_skips_together(tmp_path):
    runs_gpu = run_distributed(_everything, 1, str(tmp_path), True, timeout_s=900)[0]
    ref, got = runs_gpu["fp32"], runs_gpu["fp16_block"]
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert loss_err <= LOSS_TOL["fp16"]
    for part, limit in zip(("backbone", "head"), UPDATE_TOL["fp16"]):
        assert _update_error(got, ref, part) <= limit
    out = runs_gpu["overflow_fp16_block"]
    assert out["skipped"] == 1 and torch.equal(out["before"]["head"], out["after"]["head"])
    backbone = out["before"]["backbone"]
    assert all(torch.equal(backbone[k], out["after"]["backbone"][k]) for k in backbone)
