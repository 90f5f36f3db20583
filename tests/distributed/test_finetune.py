"""Fine-tuning on 2 gloo ranks: engine.model.freeze, engine.model.freeze_bn_stats and engine.optim.param_groups
under DeepSpeed ZeRO-0, ZeRO-3 and FSDP2.

1. Through build_trainer, 5 steps of the tiny r18 with its stem and layer1 frozen and every BatchNorm's
   statistics frozen: the frozen parameters and every BatchNorm buffer are bitwise what they were before the
   first step, every other trained parameter has changed (ZeRO-0 with DeepSpeed's reentrant activation
   checkpointing of every block, whose first trained segment then has an input without a gradient).
2. param_groups at the backend seam, 2 steps: the full weights equal a hand-built `torch.optim.SGD` over the
   same groups (each group's LR = the schedule's LR x its lr_scale, its own weight decay), stepped with the
   rank-averaged gradients of the same batches on one process.
"""
import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config

STEPS = 5
FREEZE = ["conv1.*", "bn1.*", "prelu.*", "layer1.*"]
BACKENDS = {"zero0": ("deepspeed", 0), "zero3": ("deepspeed", 3), "fsdp": ("fsdp", 0)}
# param_groups case: the stem frozen, the top with 10x LR and no decay, the remaining biases at half LR
GROUPS = [{"match": ["layer4.*", "fc.*", "features.*"], "lr_scale": 10.0, "weight_decay": 0.0},
          {"match": ["*.bias"], "lr_scale": 0.5}]
LR, WD, MOMENTUM, GROUP_STEPS, SEED = 0.01, 5e-4, 0.9, 2, 3


def _raw(out: str, backend: str, stage: int, **model) -> dict:
    raw = tiny_r18_config(out, 2, stage, max_steps=STEPS)
    raw["engine"]["train"]["backend"] = backend
    raw["engine"]["model"].update(model)
    raw["engine"]["checkpoint"] = {"export": False}
    return raw


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 112, 112, generator=g), torch.randn(4, 16, generator=g)


def _loss(emb, target):
    return ((emb.float() - target) ** 2).mean()


def _two_ranks(out: str) -> dict:
    from engine.config import schema
    from engine.train.build import build_backbone, build_trainer
    from engine.runtime import dist
    from engine.train.trainer import lr_factor, set_group_lrs

    dist.init()  # DeepSpeed's comm layer too (its activation checkpointing reads the world size from it)
    res = {}
    for case, (backend, stage) in BACKENDS.items():
        raw = _raw(f"{out}/{case}", backend, stage, freeze=FREEZE, freeze_bn_stats=True)
        if case == "zero0":
            raw["engine"]["model"]["checkpoint"] = "all"
            raw["activation_checkpointing"] = {}
        trainer = build_trainer(schema.from_dict(raw))
        before = trainer.backbone.full_state_dict()
        trainer.train()
        res[case] = dict(before=before, after=trainer.backbone.full_state_dict(),
                         requires_grad={n: p.requires_grad for n, p in trainer.backbone.module.named_parameters()})
        trainer.close()
    rank = torch.distributed.get_rank()
    for case, (backend, stage) in BACKENDS.items():
        raw = _raw(f"{out}/groups_{case}", backend, stage, freeze=["conv1.*"])
        raw["engine"]["optim"].update(lr=LR, weight_decay=WD, momentum=MOMENTUM, param_groups=GROUPS)
        raw["engine"]["train"]["max_steps"] = GROUP_STEPS
        cfg = schema.from_dict(raw)
        backbone = build_backbone(cfg, torch.device("cpu"))
        backbone.train()
        for step in range(GROUP_STEPS):
            factor = lr_factor(step, max_steps=GROUP_STEPS, warmup_steps=0, schedule="poly", power=2.0)
            set_group_lrs(backbone.param_groups, LR * factor)
            images, target = _batch(step, rank)
            backbone.backward(_loss(backbone(images), target), boundary=True)
            assert backbone.step()
        res[f"groups_{case}"] = backbone.full_state_dict()
        res[f"groups_{case}_lrs"] = sorted(g["lr"] for g in backbone.param_groups)
        backbone.close()
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_two_ranks, 2, str(tmp_path_factory.mktemp("finetune")), timeout_s=900)


def _frozen(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in FREEZE)


@pytest.mark.parametrize("case", sorted(BACKENDS))
def test_frozen_parameters_and_bn_statistics_unchanged(runs, case):
    for rank in (0, 1):
        got = runs[rank][case]
        before, after, trained = got["before"], got["after"], got["requires_grad"]
        frozen = [n for n in trained if _frozen(n)]
        assert len(frozen) == 25, frozen  # conv1, bn1 (2), prelu, layer1 (2 blocks of 9 and a downsample of 3)
        assert not any(trained[n] for n in frozen)
        changed = [n for n in frozen if not torch.equal(before[n], after[n])]
        assert not changed, f"{case}: frozen parameters changed: {changed}"
        stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert len(stats) == 3 * 31
        moved = [k for k in stats if not torch.equal(before[k], after[k])]
        assert not moved, f"{case}: BatchNorm statistics changed under freeze_bn_stats: {moved}"
        stuck = [n for n, t in trained.items() if t and torch.equal(before[n], after[n])]
        assert not stuck, f"{case}: trained parameters that did not change: {stuck}"


def _reference():
    """One process: the plain seeded build, the same frozen stem, a hand-built SGD over the same groups, the
    rank-averaged gradient of the two ranks' batches (each forward in train mode on its own batch, as a rank)."""
    import backbones

    torch.manual_seed(SEED)
    model = backbones.build_backbone("r18", embedding_size=16)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    for n in names:
        if n.startswith("conv1."):
            params[n].requires_grad_(False)
    trained = [n for n in names if params[n].requires_grad]
    top = [n for n in trained if n.split(".")[0] in ("layer4", "fc", "features")]
    biases = [n for n in trained if n not in top and n.endswith(".bias")]
    rest = [n for n in trained if n not in top and n not in biases]
    groups = [(top, 10.0, 0.0), (biases, 0.5, WD), (rest, 1.0, WD)]
    opt = torch.optim.SGD([{"params": [params[n] for n in ns], "weight_decay": wd} for ns, _, wd in groups],
                          lr=LR, momentum=MOMENTUM)
    from engine.train.trainer import lr_factor

    model.train()
    for step in range(GROUP_STEPS):
        factor = lr_factor(step, max_steps=GROUP_STEPS, warmup_steps=0, schedule="poly", power=2.0)
        for group, (_, scale, _) in zip(opt.param_groups, groups):
            group["lr"] = LR * factor * scale
        grads = {n: torch.zeros_like(params[n]) for n in trained}
        for rank in (0, 1):
            model.zero_grad(set_to_none=True)
            images, target = _batch(step, rank)
            _loss(model(images), target).backward()
            for n in trained:
                grads[n] += params[n].grad / 2
        for n in trained:
            params[n].grad = grads[n]
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}, [LR * 0.25 * s for s in (0.5, 1.0, 10.0)]


@pytest.mark.parametrize("case", sorted(BACKENDS))
def test_param_groups_equal_a_hand_built_optimizer(runs, case):
    want, lrs = _reference()
    for rank in (0, 1):
        got = runs[rank][f"groups_{case}"]
        assert runs[rank][f"groups_{case}_lrs"] == pytest.approx(lrs)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
