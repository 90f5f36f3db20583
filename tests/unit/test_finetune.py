"""Fine-tuning settings without a process group: engine.model.freeze / freeze_bn_stats and
engine.optim.param_groups checked against the backbone's parameter names before launch (each mistake one line
naming the key and the pattern), and applied to a plain module (engine.parallel.common). The 2-rank behaviour
under ZeRO-0/3 and FSDP2 is tests/distributed/test_finetune.py's."""
import pytest
import torch

from engine.config import schema
from engine.config.files import ConfigError


def _cfg(model=None, optim=None):
    raw = {"train_micro_batch_size_per_gpu": 2,
           "engine": {"model": {"name": "r18", "embedding_size": 16, **(model or {})},
                      "head": {"num_classes": 4}, "optim": dict(optim or {})}}
    return schema.from_dict(raw)


@pytest.mark.parametrize("model, optim, message", [
    ({"freeze": ["conv1.*", "layer9.*"]}, None,
     r"^engine\.model\.freeze\[1\]: pattern 'layer9\.\*' matches no parameter of backbone 'r18'; did you mean "
     r"'layer\d\.\*'\?"),
    ({"freeze": ["*"]}, None, r"^engine\.model\.freeze: \['\*'\] freeze every parameter of backbone 'r18'"),
    ({"freeze": []}, {"param_groups": [{"match": ["fc.*"], "lr": 1}]},
     r"^engine\.optim\.param_groups\[0\]: unknown key 'lr'; did you mean 'lr_scale'\?"),
    (None, {"param_groups": [{"lr_scale": 2}]}, r"^engine\.optim\.param_groups\[0\]: 'match' .* is required"),
    (None, {"param_groups": [{"match": "fc.*"}]}, r"^engine\.optim\.param_groups\[0\]\.match: expected a non-empty"),
    (None, {"param_groups": [{"match": ["fc.*"], "lr_scale": 0}]}, r"param_groups\[0\]\.lr_scale: expected > 0"),
    (None, {"param_groups": [{"match": ["fc.*"], "weight_decay": -1}]}, r"\[0\]\.weight_decay: expected >= 0"),
    (None, {"param_groups": [{"match": ["fc.*", "fcc.*"]}]},
     r"^engine\.optim\.param_groups\[0\]\.match\[1\]: pattern 'fcc\.\*' matches no parameter"),
    ({"freeze": ["layer4.*"]}, {"param_groups": [{"match": ["layer4.*"]}]},
     r"^engine\.optim\.param_groups\[0\]: every parameter it matches is frozen"),
    (None, {"param_groups": [{"match": ["*"]}, {"match": ["fc.*"]}]},
     r"^engine\.optim\.param_groups\[1\]: .* taken by an earlier group"),
    ({"freeze_bn_stats": True}, None, r"^engine\.model\.freeze_bn_stats: keeps the BatchNorm statistics as loaded, "
                                      r"but nothing is loaded \(engine\.model\.init_from is not set\)"),
])
def test_mistakes_are_refused_naming_the_key(model, optim, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(model, optim)


def test_a_good_config_loads_and_joins_the_matrix(tmp_path):
    (tmp_path / "r18.pth").write_bytes(b"")  # the config checks that the file exists; the build reads it
    cfg = _cfg({"freeze": ["conv1.*", "bn1.*"], "freeze_bn_stats": True, "init_from": str(tmp_path / "r18.pth")},
               {"param_groups": [{"match": ["fc.*"], "lr_scale": 10, "weight_decay": 0}]})
    assert cfg.engine.model.freeze == ["conv1.*", "bn1.*"] and cfg.engine.optim.param_groups[0]["lr_scale"] == 10
    drawn = {s.key: s.draws for s in schema.documented_settings()}
    assert drawn["engine.model.freeze_bn_stats"] == (False, True)
    assert [] in drawn["engine.model.freeze"] and [] in drawn["engine.optim.param_groups"]
    for name in ("mbf", "r18", "vit_t"):  # the matrix's values fit every family it trains
        for freeze in drawn["engine.model.freeze"]:
            for groups in drawn["engine.optim.param_groups"]:
                raw = {"train_micro_batch_size_per_gpu": 2, "engine": {
                    "model": {"name": name, "embedding_size": 16, "freeze": freeze},
                    "head": {"num_classes": 4}, "optim": {"param_groups": groups}}}
                schema.from_dict(raw)


def test_apply_freezes_and_groups_take_the_first_match():
    import backbones
    from engine.parallel import common

    model = backbones.build_backbone("r18", embedding_size=16)
    frozen = common.apply_finetune(model, ["conv1.*", "layer1.*"], freeze_bn_stats=True)
    params = dict(model.named_parameters())
    assert frozen == [n for n in params if n.startswith(("conv1.", "layer1."))] and len(frozen) == 22
    assert not any(params[n].requires_grad for n in frozen)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 31 and not any(m.training for m in bns) and model.layer2.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # eval-mode BatchNorm
    assert params["conv1.weight"].grad is None and params["layer2.0.conv1.weight"].grad is not None

    groups = common.backbone_param_groups(model, 5e-4, [{"match": ["fc.*"], "lr_scale": 10.0, "weight_decay": 0.0},
                                                         {"match": ["*.bias"]}])
    by_id = {id(p): n for n, p in params.items()}
    names = [[by_id[id(p)] for p in g["params"]] for g in groups]
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(10.0, 0.0), (1.0, 5e-4), (1.0, 5e-4)]
    assert names[0] == ["fc.weight", "fc.bias"]  # fc.bias also matches group 1: the first group takes it
    assert names[1] == [n for n in params if n.endswith(".bias") and n not in frozen and n not in names[0]]
    everything = [n for n in params if params[n].requires_grad]
    assert sorted(sum(names, [])) == sorted(everything)  # each trained parameter in exactly one group
    assert common.backbone_param_groups(model, 5e-4)[0]["params"] == [params[n] for n in everything]
