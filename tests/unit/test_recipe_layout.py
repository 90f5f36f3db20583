"""The shipped recipes name their real dataset layout and train as arcface_torch's configs do, with their own
backbone (the 2-rank runs, with small stand-ins for the big backbones: tests/distributed/test_recipes.py); and the
data folder checks (engine/config/dataset.py, dali_pipes/datasets.py): a missing folder or file is named in one
line with what belongs there, a verification set missing beside the data is skipped with a line naming it, a
synthetic throughput run takes the public set's class count and size.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dali_pipes import datasets
from engine.config import ConfigError, dataset, length, load
from tests.support.data import write_insightface_folder

ROOT = Path(__file__).resolve().parents[2]
STEP_RECIPES = {"quickstart.json", "10m_classes.json"}  # the demo data and a step count (README "Recipes")
RECIPES = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json") if p.name not in STEP_RECIPES)
GPUS = 8  # the world the recipes are written for (arcface_torch's configs: 8 GPUs)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_names_its_dataset_and_trains_for_epochs(recipe):
    raw = json.loads((ROOT / "ds_configs" / recipe).read_text())["engine"]
    cfg = load(ROOT / "ds_configs" / recipe)
    public = datasets.known(cfg.engine.data.path)
    assert cfg.engine.data.source == "recordio" and public is not None, cfg.engine.data.path
    assert "num_classes" not in raw["head"] and cfg.engine.head.num_classes is None  # the data's count
    assert cfg.engine.train.max_steps is None and cfg.engine.train.epochs >= 20
    assert cfg.engine.eval.targets == list(datasets.VERIFICATION_SETS) and cfg.engine.eval.every > 0
    c = cfg.engine.checkpoint
    assert c.resume == "auto" and c.every > 0 and c.every_minutes > 0 and c.keep > 0 and c.export
    run = length.run_length(cfg, GPUS, public.num_images)
    per_epoch = public.num_images // cfg.global_batch_size(GPUS)
    assert run.max_steps == cfg.engine.train.epochs * per_epoch
    assert run.warmup_steps == int(cfg.engine.optim.warmup_epochs * per_epoch)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_plans_with_its_own_backbone_and_its_datasets_classes(recipe):
    from engine.perf import planner

    cfg = load(ROOT / "ds_configs" / recipe)
    p = planner.plan(cfg, GPUS, mem_gb=80)
    assert p.num_classes == datasets.known(cfg.engine.data.path).num_classes and p.total_bytes > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_synthetic_override_is_a_throughput_run_shaped_like_the_set(recipe):
    cfg = load(ROOT / "ds_configs" / recipe, ["engine.data.source=synthetic"])
    public = datasets.known(cfg.engine.data.path)
    assert cfg.engine.head.num_classes == public.num_classes
    dataset.check_present(cfg)  # nothing to look for
    assert length.run_length(cfg, GPUS).num_images == public.num_images


def test_a_missing_folder_or_file_is_named_with_what_belongs_there(tmp_path):
    cfg = load(ROOT / "ds_configs" / "r50.json", [f"engine.data.path={tmp_path / 'ms1m-retinaface-t1'}"])
    with pytest.raises(ConfigError) as missing:
        dataset.check_present(cfg)
    assert str(missing.value) == (
        f"engine.data.path: {tmp_path / 'ms1m-retinaface-t1'} not found: expected MS1MV3 (ms1m-retinaface-t1), an "
        "insightface RecordIO folder with train.rec, train.idx, property and the verification sets lfw.bin, "
        "cfp_fp.bin, agedb_30.bin; for a throughput run without data: --set engine.data.source=synthetic")
    folder = write_insightface_folder(tmp_path / "ms1m-retinaface-t1")
    dataset.check_present(cfg)
    (folder / "train.idx").unlink()
    with pytest.raises(ConfigError, match=r"ms1m-retinaface-t1 lacks train.idx: expected MS1MV3"):
        dataset.check_present(cfg)
    # a folder that names no public set: the synthetic run then needs a class count
    other = load(ROOT / "ds_configs" / "r50.json", [f"engine.data.path={tmp_path / 'my_rec'}"])
    with pytest.raises(ConfigError, match=r"my_rec not found: expected an insightface RecordIO folder .*"
                                          r"--set engine.data.source=synthetic --set engine.head.num_classes=N$"):
        dataset.check_present(other)
    folder_source = load(ROOT / "ds_configs" / "r50.json", ["engine.data.source=folder",
                                                             f"engine.data.path={tmp_path / 'faces'}"])
    with pytest.raises(ConfigError, match=r"faces not found: expected a folder with one sub-folder of images per"):
        dataset.check_present(folder_source)


def test_targets_are_found_beside_the_data_and_a_missing_one_is_named(tmp_path, capsys):
    from engine.train.build import build_eval_hook

    folder = write_insightface_folder(tmp_path / "glint360k", targets=("lfw", "agedb_30"))
    cfg = load(ROOT / "ds_configs" / "vit_t.json", [f"engine.data.path={folder}"])
    assert dataset.resolve_targets(cfg) == ([folder / "lfw.bin", folder / "agedb_30.bin"], ["cfp_fp"])
    hook = build_eval_hook(cfg, logger=None)
    assert [s.name for s in hook.sets] == ["lfw", "agedb_30"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"engine.eval.targets: cfp_fp.bin not found in {folder}: cfp_fp is not " \
                                    "evaluated" in err, err
    # the path of a .rec file names its folder; targets are names, and need a folder to be looked up in
    rec = load(ROOT / "ds_configs" / "vit_t.json", [f"engine.data.path={folder / 'train.rec'}"])
    assert dataset.resolve_targets(rec)[0] == [folder / "lfw.bin", folder / "agedb_30.bin"]
    with pytest.raises(ConfigError, match=r"engine.eval.targets\[0\]: expected the name of a verification set"):
        load(ROOT / "ds_configs" / "vit_t.json", ['engine.eval.targets=["lfw.bin"]'])
    with pytest.raises(ConfigError, match=r"engine.eval.targets: \['lfw'\] are looked up beside the training data, "
                                          r"but engine.data.path is not set"):
        load(ROOT / "ds_configs" / "quickstart.json", ["engine.data.source=synthetic", 'engine.eval.targets=["lfw"]',
                                                        "engine.eval.bins=[]"])


def test_the_planner_reads_the_class_count_of_a_folder_that_is_there(tmp_path):
    from engine.perf import planner

    folder = write_insightface_folder(tmp_path / "my_rec", identities=6, per_identity=1)
    cfg = load(ROOT / "ds_configs" / "r18.json", [f"engine.data.path={folder}"])
    assert dataset.num_classes_hint(cfg) == 6 and planner.plan(cfg, 2, mem_gb=80).num_classes == 6
