"""Starting from existing weights (engine/state/pretrained.py), the checks that need no process group:
the reference file has arcface_torch's layout (keys and shapes against ../shared/data/arcface_torch_state_dicts),
and errors (another embedding size under init_strict, a wrong architecture, a pickle that would run code, file
details, config checks) name what is wrong. (Loading into ZeRO-0/3 and FSDP2 on 2 ranks, resume versus
init_from, the head's class centres: tests/distributed/test_init_from.py.)
"""

import gzip
import json

import pytest
import torch

from tests.support.configs import tiny_r18_config
from tests.support.pretrained import write_init_files

EMB = 16  # the shared tiny config's embedding size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The reference state_dict (embedding 16, another seed than the run's) and one of embedding 32."""
    tmp = tmp_path_factory.mktemp("init_from")
    ref, wide = write_init_files(tmp, EMB)
    return tmp, ref, wide


def test_reference_file_has_arcface_torch_layout(files, shared_data):
    import backbones

    _, ref, _ = files
    with gzip.open(shared_data / "arcface_torch_state_dicts" / "r18.json.gz", "rt") as f:
        manifest = json.load(f)
    assert [k for k, _, _ in manifest["state_dict"]] == list(ref)
    meta = backbones.build_backbone("r18", embedding_size=512, device="meta").state_dict()
    assert [(k, list(v.shape)) for k, v in meta.items()] == [(k, s) for k, s, _ in manifest["state_dict"]]


# -- errors, in one process: the check runs before any model is built ----------------------------------------

def test_other_embedding_size_is_named_strictly(files):
    from engine.state import pretrained

    tmp, _, _ = files
    with pytest.raises(ValueError, match=r"does not fit backbone 'r18' with embedding_size 16: shape mismatch: "
                                         r"fc.bias \(file \[32\], model \[16\]\), fc.weight \(file \[32, 25088\], "
                                         r"model \[16, 25088\]\).*only the embedding head \(fc, features\) differs"
                                         r".*init_strict=false"):
        pretrained.plan_backbone_init(tmp / "checkpoint_gpu_0.pt", "r18", EMB)
    plan = pretrained.plan_backbone_init(tmp / "checkpoint_gpu_0.pt", "r18", EMB, strict=False)
    assert "fc.weight" in plan.skipped and "fc.weight" not in plan.state and len(plan.state) == 187 - 7


def test_wrong_architecture_is_named(tmp_path, files):
    import backbones
    from engine.state import pretrained

    tmp, _, _ = files
    torch.save(backbones.build_backbone("r34", embedding_size=EMB).state_dict(), tmp_path / "r34.pth")
    for strict in (True, False):  # init_strict false allows another head, never another body
        with pytest.raises(ValueError, match=r"unexpected in the file: layer1\.2\.bn1\.bias.*another architecture "
                                             r"than engine.model.name='r18'"):
            pretrained.plan_backbone_init(tmp_path / "r34.pth", "r18", EMB, strict=strict)
    with pytest.raises(ValueError, match=r"missing from the file: conv_sep.*unexpected in the file: bn1\.bias"):
        pretrained.plan_backbone_init(tmp / "ref.pth", "mbf", EMB)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_that_would_run_code_is_refused(tmp_path, files):
    from engine.state import pretrained

    _, ref, _ = files
    marker = tmp_path / "ran"
    torch.save({**ref, "extra": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a weights-only torch file"):
        pretrained.plan_backbone_init(tmp_path / "evil.pth", "r18", EMB)
    assert not marker.exists()


def test_file_details(tmp_path, files):
    from engine.state import pretrained

    _, ref, _ = files
    torch.save({f"module.{k}": v for k, v in ref.items()}, tmp_path / "ddp.pth")  # saved from the DDP wrapper
    plan = pretrained.plan_backbone_init(tmp_path / "ddp.pth", "r18", EMB)
    assert set(plan.state) == set(ref) and plan.notes
    bad = dict(ref)
    bad["layer2.0.conv1.weight"] = bad["layer2.0.conv1.weight"].clone().fill_(float("nan"))
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="tensor 'layer2.0.conv1.weight' holds inf or NaN"):
        pretrained.plan_backbone_init(tmp_path / "nan.pth", "r18", EMB)
    with pytest.raises(FileNotFoundError, match="engine.model.init_from: weights file .*nope.pth not found"):
        pretrained.plan_backbone_init(tmp_path / "nope.pth", "r18", EMB)


def test_embedding_head_keys_per_family():
    from engine.state import pretrained

    assert pretrained.embedding_head_keys("r50", 512) == {
        "fc.weight", "fc.bias", "features.weight", "features.bias", "features.running_mean",
        "features.running_var", "features.num_batches_tracked"}
    for name in ("mbf", "vit_t"):
        keys = pretrained.embedding_head_keys(name, 512)
        assert keys and all(k.startswith("feature") for k in keys), (name, keys)


def test_config_checks_the_files(tmp_path):
    from engine.config import schema as config

    raw = tiny_r18_config(str(tmp_path), 1, 0, max_steps=1)
    raw["engine"]["model"]["init_from"] = str(tmp_path / "missing.pth")
    with pytest.raises(config.ConfigError, match="engine.model.init_from: weights file .*missing.pth.* not found"):
        config.from_dict(raw)
    raw = tiny_r18_config(str(tmp_path), 1, 0, max_steps=1)
    raw["engine"]["head"]["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(config.ConfigError, match="engine.head.init_from: .*nowhere.* not found .*checkpoint_gpu_"):
        config.from_dict(raw)
