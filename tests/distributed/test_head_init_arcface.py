"""engine.head.init_from from arcface_torch's Partial FC shards (engine.state.pretrained.load_head_init).

arcface_torch's train_v2.py saves, with save_all_states, one ``checkpoint_gpu_<rank>.pt`` per GPU: a dict whose
``state_dict_softmax_fc["weight"]`` is that rank's contiguous block of class centres (PartialFC_V2's split:
num_classes // world, the first num_classes % world ranks one more). Sets of 2 and 3 such files (written here in
that layout, with the backbone, optimizer and scheduler state beside, as train_v2.py writes them) load on 1 and
on 2 ranks: every rank's head rows equal the same rows of the shards' concatenation, whichever file or folder
names the set. Errors (a missing rank, a split that is not arcface_torch's, another class count or embedding
size) name what is wrong.
"""
import types

import pytest
import torch

from engine.runtime.spawn import run_distributed

NUM_CLASSES, EMB = 11, 16


def _split(num_classes: int, world: int):
    return [num_classes // world + int(r < num_classes % world) for r in range(world)]


def _write_set(folder, num_shards: int, seed: int, prefix: str = "checkpoint_gpu_") -> torch.Tensor:
    """arcface_torch's files for one run on `num_shards` GPUs; returns the whole [NUM_CLASSES, EMB] table."""
    folder.mkdir(parents=True)
    table = torch.randn(NUM_CLASSES, EMB, generator=torch.Generator().manual_seed(seed))
    start = 0
    for rank, rows in enumerate(_split(NUM_CLASSES, num_shards)):
        fc = {"weight": table[start:start + rows].clone()}
        start += rows
        if prefix == "checkpoint_gpu_":
            saved = {"epoch": 2, "global_step": 40, "state_dict_backbone": {"fc.weight": torch.zeros(EMB, 8)},
                     "state_dict_softmax_fc": fc,
                     "state_optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                         "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": False,
                                                           "params": [0, 1]}]},
                     "state_lr_scheduler": {"last_epoch": 40, "base_lrs": [0.1, 0.1], "warmup_iters": 4}}
        else:  # the 2021-2022 layout: the head's own state_dict
            saved = fc
        torch.save(saved, folder / f"{prefix}{rank}.pt")
    return table


def _load(specs):
    import heads
    from engine.state import pretrained

    out = {}
    for name, spec in specs.items():
        head = heads.PartialFC(heads.CombinedMarginLoss(16.0, 1.0, 0.5, 0.0), EMB, NUM_CLASSES)
        pretrained.load_head_init(types.SimpleNamespace(head=head), spec)
        out[name] = (head.class_start, head.weight.detach().clone())
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arcface_heads")
    return tmp, {"two": _write_set(tmp / "two", 2, 1), "three": _write_set(tmp / "three", 3, 2),
                 "legacy": _write_set(tmp / "legacy", 2, 3, prefix="softmax_fc_gpu_")}


@pytest.mark.parametrize("world", [1, 2])
def test_shards_load_as_their_concatenation(sets, world):
    tmp, tables = sets
    specs = {"two": str(tmp / "two"), "three": str(tmp / "three" / "checkpoint_gpu_1.pt"),
             "legacy": str(tmp / "legacy" / "softmax_fc_gpu_0.pt")}
    results = run_distributed(_load, world, specs, timeout_s=300)
    for name, table in tables.items():
        rows = torch.cat([results[r][name][1] for r in range(world)])
        assert torch.equal(rows, table), name  # every rank's block, in rank order, is the whole table
        assert [results[r][name][0] for r in range(world)] == [0, 6][:world]


def test_mistakes_are_named(sets, tmp_path):
    import heads
    from engine.state import pretrained

    tmp, _ = sets

    def load(spec, num_classes=NUM_CLASSES, emb=EMB):
        head = heads.PartialFC(heads.CombinedMarginLoss(16.0, 1.0, 0.5, 0.0), emb, num_classes)
        pretrained.load_head_init(types.SimpleNamespace(head=head), str(spec))

    with pytest.raises(ValueError, match=r"has a head of 11 classes x 16; .* give 12 x 16"):
        load(tmp / "two", num_classes=12)
    with pytest.raises(ValueError, match=r"checkpoint_gpu_0.pt's class centres have embedding size 16; .* is 8"):
        load(tmp / "two", emb=8)
    _write_set(tmp_path / "gap", 3, 4)
    (tmp_path / "gap" / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(ValueError, match=r"of ranks \[0, 2\] but not of rank\(s\) \[1\]"):
        load(tmp_path / "gap" / "checkpoint_gpu_0.pt")
    _write_set(tmp_path / "odd", 2, 5)  # a 3-GPU file among a 2-GPU run's: not arcface_torch's split
    (tmp_path / "odd" / "checkpoint_gpu_1.pt").unlink()
    torch.save({"state_dict_softmax_fc": {"weight": torch.zeros(3, EMB)}}, tmp_path / "odd" / "checkpoint_gpu_1.pt")
    with pytest.raises(ValueError, match=r"holds 6 classes, but arcface_torch's split of 9 classes over 2 ranks"):
        load(tmp_path / "odd", num_classes=9)
    with pytest.raises(FileNotFoundError, match="is not an ArcScale checkpoint"):
        load(tmp_path)
