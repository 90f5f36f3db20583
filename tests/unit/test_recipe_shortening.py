"""Every recipe shortens with `--set engine.train.max_steps=N` alone: the shipped ones in ds_configs/ (which train
for epochs: max_steps wins) and the ones engine.convert_config writes from arcface_torch's configs, whose warm-up
(thousands of steps) does not fit a 2-step trial. The warm-up keeps its share of the run (rounded down) and a
one-line note says so and names the key; a file whose own warm-up does not fit its own run stays an error that
names the key to set.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, arcface_torch, length, load
from scripts.make_walkthrough_inputs import MS1MV3_R50_DATA, MS1MV3_R50_RUN, config_text

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "ds_configs").glob("*.json"))

GLINT360K_R50 = config_text({  # ms1mv3_r50.py's settings, glint360k's data, a few keys left out, no blank line
    **{key: value for key, value in {**MS1MV3_R50_RUN, **MS1MV3_R50_DATA}.items()
       if key not in ("resume", "output", "verbose", "dali")},
    "margin_list": "(1.0, 0.0, 0.4)", "sample_rate": "0.1", "weight_decay": "1e-4", "rec": '"/train_tmp/glint360k"',
    "num_classes": "360232", "num_image": "17091657", "warmup_epoch": "1", "val_targets": '["lfw"]'})


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_shortens_with_max_steps_alone(recipe):
    cfg = load(recipe, ["engine.train.max_steps=2"])
    run = length.run_length(cfg, 2)  # max_steps wins over a recipe's epochs; a warm-up in epochs keeps its share
    assert cfg.engine.train.max_steps == run.max_steps == 2 and run.warmup_steps < 2


def test_converted_recipe_shortens_with_max_steps_alone(tmp_path, capsys):
    src = tmp_path / "glint360k_r50.py"
    src.write_text(GLINT360K_R50)
    out = tmp_path / "glint360k_r50.json"
    out.write_text(json.dumps(arcface_torch.convert(src, world_size=8).config))
    full = load(out)
    steps, warmup = full.engine.train.max_steps, full.engine.optim.warmup_steps
    assert warmup == 17091657 // (128 * 8) and steps == 20 * warmup  # one epoch of twenty
    capsys.readouterr()

    short = load(out, ["engine.train.max_steps=2"])
    assert (short.engine.train.max_steps, short.engine.optim.warmup_steps) == (2, 0)
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "engine.optim.warmup_steps" in note, note
    assert f"{warmup} does not fit engine.train.max_steps=2: scaled with the run to 0" in note, note

    # a longer trial keeps the share: 1/20 of the run
    assert load(out, ["engine.train.max_steps=4000"]).engine.optim.warmup_steps == warmup * 4000 // steps == 200
    # a warm-up that still fits, or one set with the override, is the user's: unchanged
    assert load(out, [f"engine.train.max_steps={warmup + 1}"]).engine.optim.warmup_steps == warmup
    assert load(out, ["engine.train.max_steps=10", "engine.optim.warmup_steps=3"]).engine.optim.warmup_steps == 3


def test_a_warmup_that_does_not_fit_its_own_run_names_the_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"engine": {"train": {"max_steps": 50}, "optim": {"warmup_steps": 80}}}))
    with pytest.raises(ConfigError, match=r"engine.optim.warmup_steps: expected < engine.train.max_steps \(50\), "
                                          r"got 80; set engine.optim.warmup_steps \(e.g. --set "
                                          r"engine.optim.warmup_steps=5\)"):
        load(path)
    with pytest.raises(ConfigError, match=r"expected < engine.train.max_steps \(2\), got 9; set engine.optim"):
        load(path, ["engine.train.max_steps=2", "engine.optim.warmup_steps=9"])
