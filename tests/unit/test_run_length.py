"""The run's length (engine/config/length.py) against arcface_torch's arithmetic (``total_step = num_image //
total_batch_size * num_epoch``, ``warmup_step = num_image // total_batch_size * warmup_epoch``) and the documented
precedence: `max_steps` wins over `epochs`; a warm-up in epochs keeps its share of the epochs when `max_steps`
wins; neither key: 100 steps. What the config alone can refuse is refused in one line naming the key.
"""
from __future__ import annotations

import pytest

from engine.config import ConfigError, length
from engine.config.schema import from_dict
from engine.train.trainer import lr_factor

IMAGES = 5179510  # MS1MV3, as arcface_torch's configs state it
SYNTHETIC = {"source": "synthetic"}


def _cfg(train: dict, optim: dict = None, data: dict = None, micro: int = 128, accum: int = 1):
    return from_dict({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                      "engine": {"model": {"name": "mbf"}, "head": {"num_classes": 10},
                                 "data": data or {"source": "demo"}, "train": train, "optim": optim or {}}})


def test_epochs_become_steps_as_arcface_torch_counts_them():
    cfg = _cfg({"epochs": 20}, {"warmup_epochs": 2})
    run = length.run_length(cfg, world_size=8, num_images=IMAGES)
    per_epoch = IMAGES // (128 * 8)
    assert (run.steps_per_epoch, run.max_steps, run.warmup_steps) == (per_epoch, 20 * per_epoch, 2 * per_epoch)
    assert run.describe() == (f"run: {20 * per_epoch} optimizer steps (20 epochs x {per_epoch} steps (5,179,510 "
                              f"images // global batch 1024)), warm-up {2 * per_epoch} steps")
    # the global batch counts gradient accumulation; a fractional warm-up rounds down as int(epochs x steps)
    acc = length.run_length(_cfg({"epochs": 3}, {"warmup_epochs": 0.5}, micro=64, accum=2), 8, IMAGES)
    assert acc.max_steps == 3 * per_epoch and acc.warmup_steps == int(0.5 * per_epoch)


def test_max_steps_wins_over_epochs_and_the_warmup_keeps_its_share():
    cfg = _cfg({"epochs": 40, "max_steps": 1000}, {"warmup_epochs": 4})
    run = length.run_length(cfg, world_size=8, num_images=IMAGES)
    assert run.max_steps == 1000 and run.warmup_steps == 100 and run.max_steps_wins
    assert "engine.train.max_steps, which wins over engine.train.epochs; 40 epochs would be" in run.describe()
    # a warm-up in steps is the user's own, whatever the length
    assert length.run_length(_cfg({"epochs": 40, "max_steps": 1000}, {"warmup_steps": 7}), 8, IMAGES).warmup_steps == 7
    # neither key: 100 steps (the epoch's size, when the data has one, still marks the epoch ends)
    plain = length.run_length(_cfg({}), 8, IMAGES)
    assert (plain.max_steps, plain.steps_per_epoch) == (length.DEFAULT_MAX_STEPS, IMAGES // 1024)


def test_the_lr_schedule_decays_over_the_epochs():
    """poly decay ends at the last epoch's last step; the warm-up in epochs is linear from 0 (as PolyScheduler)."""
    run = length.run_length(_cfg({"epochs": 4}, {"warmup_epochs": 1}), 1, 128 * 10)
    assert (run.max_steps, run.warmup_steps) == (40, 10)
    factors = [lr_factor(s, max_steps=run.max_steps, warmup_steps=run.warmup_steps, schedule="poly", power=1.0)
               for s in range(run.max_steps)]
    assert factors[0] == 0 and factors[5] == 0.5 and factors[10] == 1.0
    assert factors[25] == pytest.approx(1 - 15 / 30) and factors[-1] == pytest.approx(1 / 30)


def test_synthetic_data_shaped_like_a_public_set_counts_its_epochs():
    cfg = _cfg({"epochs": 2}, data={"source": "synthetic", "path": "/train_tmp/glint360k"})
    run = length.run_length(cfg, world_size=8)
    assert run.num_images == 17091657 and run.max_steps == 2 * (17091657 // 1024)


@pytest.mark.parametrize("train, optim, data, message", [
    ({"epochs": 0}, {}, None, r"engine.train.epochs: expected >= 1"),
    ({"max_steps": 0}, {}, None, r"engine.train.max_steps: expected >= 1"),
    ({"epochs": 5}, {"warmup_epochs": 1, "warmup_steps": 10}, None,
     r"engine.optim.warmup_epochs: set beside engine.optim.warmup_steps"),
    ({"epochs": 5}, {"warmup_epochs": 5}, None, r"warmup_epochs: expected < engine.train.epochs \(5\)"),
    ({"epochs": 5}, {}, SYNTHETIC, r"engine.train.epochs: synthetic data has no size .*set engine.train.max_steps"),
    ({"max_steps": 50}, {"warmup_epochs": 1}, SYNTHETIC, r"engine.optim.warmup_epochs: synthetic data has no size"),
    ({}, {"warmup_steps": 100}, None, r"engine.optim.warmup_steps: expected < engine.train.max_steps \(100\)"),
])
def test_what_the_config_alone_refuses(train, optim, data, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(train, optim, data)


def test_what_only_the_data_can_refuse_names_the_key():
    with pytest.raises(ValueError, match=r"the dataset's 1000 images are fewer than one global batch \(1024"):
        length.run_length(_cfg({"epochs": 2}), 8, 1000)
    with pytest.raises(ValueError, match=r"engine.optim.warmup_epochs: a warm-up of 20 steps does not fit a run of "
                                         r"20 steps"):
        length.run_length(_cfg({"max_steps": 20}, {"warmup_epochs": 1}), 1, 128 * 20)


def test_shortening_a_recipe_by_epochs_keeps_the_warmup_share(tmp_path, capsys):
    """`--set engine.train.epochs=N` alone on vit_t (40 epochs, 4 of warm-up): the warm-up keeps its tenth."""
    from engine.config import load

    cfg = load("ds_configs/vit_t.json", ["engine.train.epochs=2"])
    assert cfg.engine.optim.warmup_epochs == pytest.approx(0.2)
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "scaled with the run to 0.2 (the file's 4 of 40 epochs)" in note, note
    assert load("ds_configs/vit_t.json", ["engine.train.epochs=10"]).engine.optim.warmup_epochs == 4
    assert load("ds_configs/vit_t.json", ["engine.train.epochs=2",
                                          "engine.optim.warmup_epochs=1"]).engine.optim.warmup_epochs == 1
