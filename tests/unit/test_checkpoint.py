"""Checkpoints without a run: `keep` prunes only checkpoints older than the one saved (a resumed run's abandoned
later steps stay until overwritten), resume errors name the path, bad checkpoint settings name the key.
(Save, resume and fall back on spawned ranks: tests/distributed/test_checkpoint.py.)
"""

import pytest

from tests.support.configs import tiny_r18_config


def test_pruning_keeps_the_checkpoints_after_the_saved_step(tmp_path):
    """After a resume from an older checkpoint, saving step 4 with keep=1 prunes step 2 but not step 6 (a
    continuation that was abandoned: overwritten when the run gets there, never pruned in favour of it)."""
    from engine.state import checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "meta.json").write_text("{}")
    checkpoint._prune(tmp_path, 4, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]

STEPS = 4


def _config(out_dir, world, stage, optim="sgd", sample_rate=1.0, every=0, keep=2, resume=None, dropout=0.0):
    return tiny_r18_config(out_dir, world, stage, max_steps=STEPS, optim=optim, sample_rate=sample_rate,
                           dropout=dropout, checkpoint={"every": every, "keep": keep, "resume": resume})


def test_resume_errors_name_the_path(tmp_path):
    from engine.state import checkpoint

    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    (tmp_path / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)  # a crashed save is never resumed
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        checkpoint.resolve_resume(str(missing), tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("every", -1, "engine.checkpoint.every: expected >= 0"),
    ("keep", -2, "engine.checkpoint.keep: expected >= 0"),
    ("resume", "", "engine.checkpoint.resume"),
])
def test_checkpoint_config_errors(key, value, message):
    from engine.config import schema as config

    raw = _config("/tmp/x", 1, 0)
    raw["engine"]["checkpoint"][key] = value
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(raw)


def test_run_identity_check(tmp_path, capsys):
    """A checkpoint of another run is refused naming the key that differs; one that carries no identity (saved
    before checkpoints had one) is resumed with a warning that names it and what cannot be checked."""
    import types

    from engine.config import schema as config
    from engine.state import checkpoint, rundir

    cfg = config.from_dict(_config(str(tmp_path), 1, 0))
    trainer = types.SimpleNamespace(cfg=cfg, output_dir=tmp_path)
    run_id, keys = rundir.identity(cfg)
    checkpoint.check_identity(trainer, {"run_identity": run_id, "identity": keys}, "checkpoint A")
    assert capsys.readouterr().err == ""  # this run's own checkpoint: nothing to say
    raw = _config(str(tmp_path), 1, 0)
    raw["engine"]["train"]["seed"] = 99
    other_id, other_keys = rundir.identity(config.from_dict(raw))
    with pytest.raises(ValueError, match=r"checkpoint B belongs to another run .*engine\.train\.seed: 99 there"):
        checkpoint.check_identity(trainer, {"run_identity": other_id, "identity": other_keys}, "checkpoint B")
    checkpoint.check_identity(trainer, {"format": 1, "step": 2}, "checkpoint C")
    err = capsys.readouterr().err
    assert "warning: checkpoint C carries no run identity" in err, err
    assert "engine.data.source" in err and "engine.train.seed" in err and "engine.optim.name" in err, err


def test_overwrite_deletes_the_previous_runs_outputs_and_logs(tmp_path, capsys):
    """engine.checkpoint.overwrite=true clears the old run's checkpoints, metrics, model and every rank's log
    file (train.log and train_rank<r>.log), and leaves everything else in the directory alone."""
    from engine.config import schema as config
    from engine.state import rundir

    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    for name in ("metrics.jsonl", "model.pt", "train.log", "train_rank1.log", "train_rank12.log", "notes.txt"):
        (tmp_path / name).write_text("old")
    raw = _config(str(tmp_path), 1, 0)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        rundir._check_fresh_start(config.from_dict(raw), tmp_path)
    raw["engine"]["checkpoint"]["overwrite"] = True
    rundir._check_fresh_start(config.from_dict(raw), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "deleted the previous run's checkpoints/, metrics.jsonl, model.pt, train.log, train_rank1.log, " \
           "train_rank12.log in" in capsys.readouterr().out
