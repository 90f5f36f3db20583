"""backbones/: registry, arcface_torch state_dict manifests, forward/backward sweep, init, memory formats.

Fast on 2 CPU cores: manifests are checked on the meta device (r2060, 1.12 B parameters, is never
materialised); forward/backward runs once per model at batch 2. vit_l and vit_h have no manifest and are only
built and run on the meta device. Activation checkpointing is tested by the engine (tests of engine.parallel).
"""
from __future__ import annotations

import functools
import gzip
import json
import tokenize
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import backbones
from backbones.iresnet import IRESNET_LAYERS, IBasicBlock, IResNet
from backbones.mobilefacenet import DepthWise, MobileFaceNet
from backbones.vit import VIT_CONFIGS, Block, VisionTransformer

MANIFEST_NAMES = ["r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b"]
EXTRA_NAMES = ["vit_l", "vit_h"]  # derived from arcface_torch's get_model; no manifest
ALL_NAMES = MANIFEST_NAMES + EXTRA_NAMES
SWEEP_NAMES = [n for n in MANIFEST_NAMES if n != "r2060"]
BLOCK_TYPE = {IResNet: IBasicBlock, MobileFaceNet: DepthWise, VisionTransformer: Block}


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _manifest(shared_data: Path, name: str) -> dict:
    with gzip.open(shared_data / "arcface_torch_state_dicts" / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def _describe(model: nn.Module) -> list[list]:
    return [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in model.state_dict().items()]


@functools.lru_cache(maxsize=None)
def _meta_model(name: str) -> nn.Module:
    """Built once per name on the meta device (allocates nothing; r2060 takes seconds just to construct).

    Callers must not mutate it.
    """
    with torch.device("meta"):
        return backbones.build_backbone(name)


@pytest.fixture(scope="module", autouse=True)
def _drop_meta_models():
    yield
    _meta_model.cache_clear()  # r2060's ~21k module objects should not outlive this file


def _counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---- registry ----------------------------------------------------------------------------------------------------

def test_list_backbones_has_every_arcface_name_in_natural_order():
    names = backbones.list_backbones()
    assert sorted(names) == sorted(ALL_NAMES)
    assert names.index("r18") < names.index("r50") < names.index("r100") < names.index("r200") < names.index("r2060")


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        backbones.build_backbone("r101")
    for name in ALL_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name,kw,words", [
    ("r18", {"fp16": True}, ["fp16"]),
    ("r18", {"foo": 1, "num_features": 512}, ["foo", "num_features", "embedding_size"]),
    ("mbf", {"mask_ratio": 0.1}, ["mask_ratio"]),
    ("vit_t", {"using_checkpoint": True}, ["using_checkpoint"]),
])
def test_unknown_kwargs_are_rejected_by_name(name, kw, words):
    with pytest.raises(ValueError) as err:
        backbones.build_backbone(name, device="meta", **kw)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name,kw", [
    ("r50", {"layers": (1, 1, 1, 1)}),
    ("mbf", {"scale": 4}),
    ("vit_t", {"depth": 2}),
])
def test_architecture_is_fixed_by_the_name(name, kw):
    with pytest.raises(ValueError, match="fixed by the architecture"):
        backbones.build_backbone(name, device="meta", **kw)


@pytest.mark.parametrize("name,kw", [
    ("r18", {"dropout": 1.5}),
    ("r18", {"dropout": "0.1"}),
    ("mbf", {"dropout": 0.1}),  # arcface's MobileFaceNet has no dropout: nonzero is an error, not ignored
    ("vit_t", {"mask_ratio": -0.1}),
    ("r18", {"embedding_size": 0}),
])
def test_invalid_values_raise_value_error(name, kw):
    with pytest.raises(ValueError):
        backbones.build_backbone(name, device="meta", **kw)


def test_tunable_options_reach_the_module():
    r18 = backbones.build_backbone("r18", device="meta", dropout=0.25, embedding_size=128)
    assert r18.dropout.p == 0.25 and r18.fc.weight.shape == (128, 512 * 7 * 7) and r18.features.num_features == 128
    assert backbones.build_backbone("mbf", device="meta", dropout=0.0).features.layers[2].out_features == 512
    vit = backbones.build_backbone("vit_t", device="meta", mask_ratio=0.0, drop_path_rate=0.0, dropout=0.1)
    assert vit.mask_ratio == 0.0 and vit.pos_drop.p == 0.1
    assert all(isinstance(b.drop_path, nn.Identity) for b in vit.blocks)
    # per-name defaults from arcface_torch's get_model
    assert backbones.build_backbone("vit_t", device="meta").mask_ratio == 0.1
    assert backbones.build_backbone("vit_l", device="meta").mask_ratio == 0.05
    assert backbones.build_backbone("vit_h", device="meta").mask_ratio == 0.0


def test_iresnet_stage_sizes():
    assert IRESNET_LAYERS == {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
                              "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6), "r2060": (3, 128, 896, 3)}


def test_backbone_sources_are_pure_modules():
    """DESIGN.md 6: no autocast, no torch.distributed, no .cuda() and no module-level mutable state."""
    root = Path(backbones.__file__).parent
    for path in root.glob("*.py"):
        with path.open("rb") as f:  # code only: comments, docstrings and messages may name what is banned
            code = " ".join(tok.string for tok in tokenize.tokenize(f.readline)
                            if tok.type not in (tokenize.COMMENT, tokenize.STRING))
        code = code.replace(" . ", ".").replace(" (", "(")
        for banned in ("autocast", "torch.distributed", ".cuda(", "global ", "torch.cuda", "checkpoint_sequential"):
            assert banned not in code, f"{path.name} uses {banned!r}"


# ---- arcface_torch manifests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFEST_NAMES)
def test_state_dict_matches_arcface_torch_manifest(name, shared_data):
    manifest = _manifest(shared_data, name)
    assert manifest["arch"] == name and manifest["embedding_size"] == 512
    model = _meta_model(name)  # r2060 is 4.5 GB of fp32: never materialised
    assert all(t.is_meta for t in model.state_dict().values())
    got = _describe(model)
    assert [g[0] for g in got] == [m[0] for m in manifest["state_dict"]]  # keys, in order
    assert got == manifest["state_dict"]  # shapes and dtypes
    assert _counts(model) == (manifest["num_parameters"], manifest["num_trainable"])


def _vit_num_parameters(embed_dim: int, depth: int, embedding_size: int = 512, patches: int = 144) -> int:
    d = embed_dim
    block = 4 * d + 3 * d * d + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)  # 2 LN, qkv, proj, fc1, fc2
    head = patches * d * d + 2 * d + d * embedding_size + 2 * embedding_size  # linear, BN, linear, BN
    return patches * d + d + (3 * 81 * d + d) + depth * block + 2 * d + head  # pos, mask, patch, blocks, norm


@pytest.mark.parametrize("name", ["vit_t", "vit_s", "vit_b", *EXTRA_NAMES])
def test_vit_sizes_follow_arcface_configs(name, shared_data):
    cfg = VIT_CONFIGS[name]
    expected = _vit_num_parameters(cfg["embed_dim"], cfg["depth"])
    model = backbones.build_backbone(name, device="meta")
    assert _counts(model) == (expected, expected)
    if name in MANIFEST_NAMES:  # the formula itself is checked against arcface_torch
        assert _manifest(shared_data, name)["num_parameters"] == expected


@pytest.mark.parametrize("name", EXTRA_NAMES)
def test_large_vits_forward_on_meta(name):
    model = backbones.build_backbone(name, device="meta")
    x = torch.empty(2, 3, 112, 112, device="meta")
    assert model.train()(x).shape == (2, 512)
    assert model.eval()(x).shape == (2, 512)


# ---- forward / backward sweep ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_forward_backward_every_trainable_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    # Stochastic depth may drop a whole branch for both samples and legitimately zero its gradients.
    kw = {"drop_path_rate": 0.0} if name.startswith("vit") else {}
    model = backbones.build_backbone(name, **kw).train()
    y = model(_images())
    assert y.shape == (2, 512) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # A random projection: y.sum() would give zero gradients through the final BatchNorm.
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    problems = {}
    for key, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, key
        elif p.grad is None:
            problems[key] = "no gradient"
        elif not torch.isfinite(p.grad).all():
            problems[key] = "non-finite gradient"
        elif not p.grad.any():
            problems[key] = "all-zero gradient"
    assert not problems
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    assert frozen == (["features.weight"] if isinstance(model, IResNet) else [])


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_embedding_size_changes_output_width(name):
    model = backbones.build_backbone(name, embedding_size=128, device="meta")
    assert model.train()(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, 128)


# ---- init ------------------------------------------------------------------------------------------------------

def test_meta_build_skips_init_and_init_weights_defines_every_tensor():
    with torch.device("meta"):
        model = backbones.build_backbone("r18")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.features.weight.requires_grad
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert not model.features.weight.requires_grad
    # init_weights alone defines every tensor: poison a CPU build, re-init from the same seed, compare.
    other = backbones.build_backbone("r18", init=False)
    with torch.no_grad():
        for t in [*other.parameters(), *other.buffers()]:
            t.fill_(float("nan") if t.is_floating_point() else 7)
    torch.manual_seed(0)
    other.init_weights()
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.isfinite(model.train()(_images())).all()


def test_unmaterialised_parameters_are_detected():
    """Constructors skip init_weights() on meta and on ZeRO-3-partitioned parameters (duck-typed by ds_id)."""
    from backbones.registry import is_materialised

    assert not is_materialised(nn.Linear(2, 2, device="meta"))
    layer = nn.Linear(2, 2)
    assert is_materialised(layer)
    layer.weight.ds_id = 0  # what deepspeed.zero.Init attaches to a partitioned parameter
    assert not is_materialised(layer)


def _initialised(name: str, how: str) -> nn.Module:
    """Built with init_weights() by the constructor, or with init=False plus get_init_fn on every module
    (what deepspeed.zero.Init does, module by module, before partitioning)."""
    torch.manual_seed(0)
    if how == "init_weights":
        return backbones.build_backbone(name)
    model = backbones.build_backbone(name, init=False)
    init_module = backbones.get_init_fn(name)
    for m in model.modules():
        init_module(m)
    return model


@pytest.mark.parametrize("how", ["init_weights", "init_fn"])
@torch.no_grad()
def test_iresnet_init_follows_arcface(how):
    m = _initialised("r18", how)
    for conv in (m.conv1, m.layer3[0].conv1, m.layer4[1].conv2, m.layer2[0].downsample[0]):
        assert abs(conv.weight.std().item() - 0.1) < 0.01
    for bn in (m.bn1, m.layer1[0].bn3, m.layer4[0].downsample[1], m.bn2):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert torch.all(m.layer1[0].prelu.weight == 0.25) and torch.all(m.features.weight == 1)
    bound = 1 / (512 * 49) ** 0.5  # nn.Linear default (kaiming-uniform, a=sqrt(5))
    assert m.fc.weight.abs().max() <= bound and m.fc.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize("how", ["init_weights", "init_fn"])
@torch.no_grad()
def test_vit_and_mbf_init_follow_arcface(how):
    vit = _initialised("vit_t", how)
    blk = vit.blocks[3]
    for w in (blk.attn.qkv.weight, blk.mlp.fc1.weight, vit.feature[0].weight, vit.pos_embed):
        assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(blk.mlp.fc1.bias == 0) and torch.all(blk.attn.proj.bias == 0)
    assert torch.all(blk.norm1.weight == 1) and torch.all(vit.norm.bias == 0)
    assert 0.01 < vit.mask_token.std().item() < 0.03
    mbf = _initialised("mbf", how)
    conv = mbf.layers[3].layers[0].layers[0].layers[0]  # 1x1, 128 -> 128: kaiming fan_out std sqrt(2/128)
    assert abs(conv.weight.std().item() - (2 / 128) ** 0.5) < 0.01
    assert torch.all(mbf.layers[0].layers[2].weight == 0.25)
    linear = mbf.features.layers[2]  # 512 -> 512, kaiming fan_out
    assert abs(linear.weight.std().item() - (2 / 512) ** 0.5) < 0.005


def test_get_init_fn_unknown_name():
    with pytest.raises(ValueError, match="r18"):
        backbones.get_init_fn("resnet18")


# ---- structure contracts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_NAMES)
def test_checkpoint_units_are_sequential_stages_covering_every_block(name):
    model = _meta_model(name)
    units = model.checkpoint_units()
    assert isinstance(units, OrderedDict) and units
    for unit_name, unit in units.items():
        assert type(unit) is nn.Sequential, unit_name  # plain chain: safe to split into contiguous segments
        assert model.get_submodule(unit_name) is unit
    block_type = BLOCK_TYPE[type(model)]
    covered = [id(m) for unit in units.values() for m in unit.modules() if isinstance(m, block_type)]
    every = [id(m) for m in model.modules() if isinstance(m, block_type)]
    assert sorted(covered) == sorted(every) and len(set(covered)) == len(covered)
    if isinstance(model, IResNet):
        assert list(units) == ["layer1", "layer2", "layer3", "layer4"]
        assert tuple(len(u) for u in units.values()) == IRESNET_LAYERS[name]
    elif isinstance(model, VisionTransformer):
        assert list(units) == ["blocks"] and len(units["blocks"]) == VIT_CONFIGS[name]["depth"]
    else:
        assert list(units) == ["layers"]


@pytest.mark.parametrize("name", ["r18"])
def test_state_dict_round_trip_strict(name):
    torch.manual_seed(0)
    src = backbones.build_backbone(name).train()
    src(_images())  # move BN running statistics away from their init
    torch.manual_seed(1)
    dst = backbones.build_backbone(name)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (key, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), key
    x = _images(2, seed=3)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
@torch.no_grad()
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = backbones.build_backbone(name)
    x = _images()
    # Compare in eval mode: train-mode BatchNorm reduces in a memory-format-dependent order (1e-5 differences
    # after one layer). Calibrate the running statistics first (momentum 1) so that eval activations stay O(1).
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.momentum = 1.0
    model.train()(_images(4, seed=5))
    ref = model.eval()(x)
    model = model.to(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape == (2, 512)
    # fp32 convolutions accumulate in a memory-format-dependent order: ~1e-6 relative per conv, ~3e-6 at r18's
    # output, whose entries reach ~7. So atol 1e-5 applies relative to the output's scale. A layout bug (e.g. a
    # flatten in the wrong order) gives O(1) differences.
    scale = ref.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(out / scale, ref / scale, atol=1e-5, rtol=1e-5)


def test_vit_masking_only_in_training_and_honours_mask_ratio():
    model = backbones.build_backbone("vit_t", mask_ratio=0.05, device="meta")
    tokens = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: tokens.append(args[0].shape[1]))
    x = torch.empty(2, 3, 112, 112, device="meta")
    model.train()(x).sum().backward()
    assert model.mask_token.grad is not None
    model.eval()(x)
    assert tokens == [int(144 * 0.95), 144]
    model = backbones.build_backbone("vit_t", mask_ratio=0.0, device="meta").train()
    model(x).sum().backward()
    assert model.mask_token.grad is None  # unused without masking, as in arcface_torch
    assert model.pos_embed.grad is not None
