"""Activation checkpointing (engine.parallel): same outputs, gradients and BatchNorm statistics as without it.

Recomputation in backward repeats a training-mode forward; BatchNorm running statistics must still be
updated exactly once per step. (DeepSpeed's checkpointing, which needs a process group, and the
whole engine under autocast: tests/distributed/test_activation_checkpointing.py; the comparison both use:
tests/support/activation_checkpointing.py.)
"""
import copy

import pytest
import torch

import backbones
from engine.parallel import common as parallel
from tests.support.activation_checkpointing import assert_same_step

# One backbone of each family: checkpointing wraps a family's checkpoint units (its stages of blocks), and the
# larger members (r34-r2060, mbf_large, vit_s-vit_h) are the same classes with more or wider blocks. That every
# backbone's units are plain chains covering each of its blocks is checked per name, on the meta device, by
# tests/unit/test_backbones.py; r2060 runs checkpointed end to end in tests/launch/test_r2060.py.
NAMES = ["r18", "mbf", "vit_t"]


def test_names_cover_every_family():
    families = {type(backbones.build_backbone(n, device="meta")) for n in backbones.list_backbones()}
    assert {type(backbones.build_backbone(n, device="meta")) for n in NAMES} == families


def _pair(name: str, spec):
    torch.manual_seed(0)
    kw = {"drop_path_rate": 0.0, "mask_ratio": 0.0} if name.startswith("vit") else {}
    plain = backbones.build_backbone(name, embedding_size=32, **kw)
    ckpt = copy.deepcopy(plain)
    wrapped = parallel.apply_activation_checkpointing(ckpt, spec)
    return plain, ckpt, wrapped


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_equals_plain(name):
    plain, ckpt, wrapped = _pair(name, "all")
    assert wrapped == list(ckpt.checkpoint_units())
    x = torch.randn(2, 3, 112, 112)
    assert_same_step(plain, ckpt, x)
    # state_dict keys are untouched, so arcface_torch weights still load strictly
    assert list(ckpt.state_dict()) == list(plain.state_dict())


def test_segments_mapping_and_bn_counter():
    plain, ckpt, wrapped = _pair("r18", {"layer2": 2, "layer3": 1})
    assert wrapped == ["layer2", "layer3"]
    x = torch.randn(2, 3, 112, 112)
    for _ in range(2):
        assert_same_step(plain, ckpt, x)
    bn = ckpt.layer2[0].bn1
    assert int(bn.num_batches_tracked) == 2  # two steps, one update each


def test_eval_and_no_grad_do_not_checkpoint():
    plain, ckpt, _ = _pair("r18", "all")
    plain.eval(), ckpt.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain(x))


def test_unknown_stage_names_the_stages():
    model = backbones.build_backbone("r18", embedding_size=8)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['layer9'\].*stages are \['layer1', 'layer2', 'layer3', 'layer4'\]"):
        parallel.apply_activation_checkpointing(model, {"layer9": 2})


def test_forward_runs_without_autocast_weight_cache():
    """The DeepSpeed backend's backbone forward runs with autocast's weight-cast cache off (it only kept a bf16
    copy of every weight, ZeRO-3's released ones included, alive to the end of the forward), the region that
    entered autocast gets its setting back afterwards, and the outputs are those of a cached forward."""
    torch.manual_seed(0)
    model = backbones.build_backbone("r18", embedding_size=64).train()
    reference = copy.deepcopy(model)
    seen = []
    model.layer2.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_cache_enabled()))
    parallel.without_autocast_weight_cache(model)
    x = torch.randn(2, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        y = model(x)
        assert torch.is_autocast_cache_enabled(), "the region's own setting is restored after the forward"
        y_ref = reference(x)
    assert seen == [False]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError), torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            model(torch.randn(2, 5, 112, 112))  # wrong channels: the forward raises
        finally:
            assert torch.is_autocast_cache_enabled(), "restored when the forward raises"
