"""Fine-tuning on 2 gloo ranks: engine.model.freeze, engine.model.freeze_bn_stats and engine.optim.param_groups
under DeepSpeed ZeRO-0, ZeRO-3 and FSDP2, at the backend seam (engine.train.build.build_backbone from a config).

Each backend trains the tiny r18 for 5 steps with its stem and layer1 frozen, every BatchNorm's statistics frozen
and two parameter groups (the top at 10x the LR without weight decay, the remaining biases at half the LR), on
each rank's own batches, the LR following the poly schedule (trainer.set_group_lrs). Then:

1. the frozen parameters and every BatchNorm buffer are bitwise what they were before the first step, and every
   other trained parameter has changed (ZeRO-0 with DeepSpeed's reentrant activation checkpointing of every
   block, whose first trained segment then has an input without a gradient);
2. the full weights equal a hand-built `torch.optim.SGD` over the same groups (each group's LR = the schedule's
   LR x its lr_scale, its own weight decay) on one process, stepped with the rank-averaged gradients of the same
   batches through the plain seeded build with the same parameters frozen and its BatchNorms in eval mode.
"""
import fnmatch

import pytest
import torch

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config

STEPS = 5
FREEZE = ["conv1.*", "bn1.*", "prelu.*", "layer1.*"]
BACKENDS = {"zero0": ("deepspeed", 0), "zero3": ("deepspeed", 3), "fsdp": ("fsdp", 0)}
# the top with 10x LR and no decay, the remaining (unfrozen) biases at half the LR, the rest at the base LR
GROUPS = [{"match": ["layer4.*", "fc.*", "features.*"], "lr_scale": 10.0, "weight_decay": 0.0},
          {"match": ["*.bias"], "lr_scale": 0.5}]
LR, WD, MOMENTUM, SEED = 0.01, 5e-4, 0.9, 3


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
    """Bounded (a squared error on an untrained network's growing embeddings diverges within a few steps)."""
    return 1.0 - torch.nn.functional.cosine_similarity(emb.float(), target).mean()


def _calibrated(path) -> None:
    """The plain seeded build with BatchNorm statistics of its own activations on random images (an untrained
    network's initial statistics, mean 0 and variance 1, let eval-mode activations grow layer after layer), as
    the weights every run starts from (engine.model.init_from)."""
    import backbones

    torch.manual_seed(SEED)
    model = backbones.build_backbone("r18", embedding_size=16)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(100 + i)))
    torch.save(model.state_dict(), path)


def _two_ranks(out: str, weights: str) -> dict:
    from engine.config import schema
    from engine.runtime import dist
    from engine.state import pretrained
    from engine.train.build import build_backbone
    from engine.train.trainer import lr_factor, set_group_lrs

    dist.init()  # DeepSpeed's comm layer too (its activation checkpointing reads the world size from it)
    rank = torch.distributed.get_rank()
    res = {}
    for case, (backend, stage) in BACKENDS.items():
        raw = _raw(f"{out}/{case}", backend, stage, freeze=FREEZE, freeze_bn_stats=True, init_from=weights)
        raw["engine"]["optim"].update(lr=LR, weight_decay=WD, momentum=MOMENTUM, param_groups=GROUPS)
        if case == "zero0":
            raw["engine"]["model"]["checkpoint"] = "all"
            raw["activation_checkpointing"] = {}
        backbone = build_backbone(schema.from_dict(raw), torch.device("cpu"))
        pretrained.load_backbone_init(backbone, pretrained.plan_backbone_init(weights, "r18", 16))
        before = backbone.full_state_dict()
        backbone.train()
        for step in range(STEPS):
            factor = lr_factor(step, max_steps=STEPS, warmup_steps=0, schedule="poly", power=2.0)
            set_group_lrs(backbone.param_groups, LR * factor)
            images, target = _batch(step, rank)
            backbone.backward(_loss(backbone(images), target), boundary=True)
            assert backbone.step(), (case, step)
        res[case] = dict(before=before, after=backbone.full_state_dict(),
                         lrs=sorted(g["lr"] for g in backbone.param_groups),
                         requires_grad={n: p.requires_grad for n, p in backbone.module.named_parameters()})
        backbone.close()
    return res


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune_weights") / "r18.pth"
    _calibrated(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights):
    return run_distributed(_two_ranks, 2, str(tmp_path_factory.mktemp("finetune")), str(weights), timeout_s=900)


def _frozen(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in FREEZE)


def _is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("case", sorted(BACKENDS))
def test_frozen_parameters_and_bn_statistics_unchanged(runs, weights, case):
    loaded = torch.load(weights, weights_only=True)
    for rank in (0, 1):
        got = runs[rank][case]
        before, after, trained = got["before"], got["after"], got["requires_grad"]
        assert all(torch.equal(before[k], loaded[k]) for k in loaded)  # as loaded
        frozen = [n for n in trained if _frozen(n)]
        assert len(frozen) == 25, frozen  # conv1, bn1 (2), prelu, layer1 (2 blocks of 9 and a downsample of 3)
        assert not any(trained[n] for n in frozen)
        changed = [n for n in frozen if not torch.equal(before[n], after[n])]
        assert not changed, f"{case}: frozen parameters changed: {changed}"
        stats = [k for k in before if _is_bn_stat(k)]
        assert len(stats) == 3 * 31
        moved = [k for k in stats if not torch.equal(before[k], after[k])]
        assert not moved, f"{case}: BatchNorm statistics changed under freeze_bn_stats: {moved}"
        stuck = [n for n, t in trained.items() if t and torch.equal(before[n], after[n])]
        assert not stuck, f"{case}: trained parameters that did not change: {stuck}"


def _reference(weights):
    """One process: the same weights with the same parameters frozen and the BatchNorms in eval mode, a
    hand-built SGD over the same groups, the rank-averaged gradient of the two ranks' batches."""
    import backbones
    from engine.train.trainer import lr_factor

    model = backbones.build_backbone("r18", embedding_size=16)
    model.load_state_dict(torch.load(weights, weights_only=True))
    params = dict(model.named_parameters())
    for n, p in params.items():
        if _frozen(n):
            p.requires_grad_(False)
    trained = [n for n, p in params.items() if p.requires_grad]
    top = [n for n in trained if n.split(".")[0] in ("layer4", "fc", "features")]
    biases = [n for n in trained if n not in top and n.endswith(".bias")]
    rest = [n for n in trained if n not in top and n not in biases]
    groups = [(top, 10.0, 0.0), (biases, 0.5, WD), (rest, 1.0, WD)]
    opt = torch.optim.SGD([{"params": [params[n] for n in ns], "weight_decay": wd} for ns, _, wd in groups],
                          lr=LR, momentum=MOMENTUM)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    for step in range(STEPS):
        factor = lr_factor(step, max_steps=STEPS, warmup_steps=0, schedule="poly", power=2.0)
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
    last = lr_factor(STEPS - 1, max_steps=STEPS, warmup_steps=0, schedule="poly", power=2.0)
    return {n: p.detach().clone() for n, p in params.items()}, [LR * last * s for s in (0.5, 1.0, 10.0)]


@pytest.fixture(scope="module")
def reference(weights):
    return _reference(weights)


@pytest.mark.parametrize("case", sorted(BACKENDS))
def test_param_groups_equal_a_hand_built_optimizer(runs, reference, case):
    want, lrs = reference
    for rank in (0, 1):
        got = runs[rank][case]
        assert got["lrs"] == pytest.approx(lrs)
        for name, value in want.items():
            torch.testing.assert_close(got["after"][name], value, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
