"""python -m engine.convert_config: arcface_torch recipes become ArcScale configs that engine.config.load accepts.

The three recipe files are arcface_torch's own (ms1mv3_r50.py, glint360k_r100.py, wf42m_pfc03_40epoch_8gpu_vit_t.py)
with the changes named in each test; the first two are written with scripts/make_walkthrough_inputs.py's
config_text from the settings of ms1mv3_r50.py that script keeps (glint360k_r100.py as the values it changes).
Expected step counts are written as arcface_torch's train_v2.py computes them:
``num_image // (batch_size * world_size) * num_epoch``, divided by gradient_acc for optimizer steps.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from engine.config import arcface_torch as convert_config
from engine.config import schema as run_config
from scripts.make_walkthrough_inputs import MS1MV3_R50_COMMENT, MS1MV3_R50_DATA, MS1MV3_R50_RUN, config_text

MS1MV3_R50 = config_text(MS1MV3_R50_RUN, MS1MV3_R50_DATA, comment=MS1MV3_R50_COMMENT)

GLINT360K_R100 = config_text(
    {**MS1MV3_R50_RUN, "margin_list": "(1.0, 0.0, 0.4)", "network": '"r100"', "resume": "True", "sample_rate": "0.1",
     "weight_decay": "1e-4", "dali": "True", "gradient_acc": "2", "save_all_states": "True"},
    {**MS1MV3_R50_DATA, "rec": '"/train_tmp/glint360k"', "num_classes": "360232", "num_image": "17091657",
     "warmup_epoch": "1", "frobnicate": "3"})

WF42M_VIT_T = '''\
from easydict import EasyDict as edict
import os

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_t_dp005_mask0"
config.resume = False
config.output = "/runs/vit_t"
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 384
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = os.path.join("/train_tmp", "WebFace42M")
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
config.rec_val = pick_val_dir()
'''


def _write(tmp_path, name: str, text: str):
    path = tmp_path / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def _run(capsys, *argv) -> tuple:
    rc = convert_config.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_ms1mv3_r50_with_base_beside_it(tmp_path, capsys):
    src = _write(tmp_path, "ms1mv3_r50.py", MS1MV3_R50)
    # arcface_torch's base.py with two values changed: the converter must read it instead of its built-in copy.
    _write(tmp_path, "base.py", textwrap.dedent('''\
        from easydict import EasyDict as edict
        config = edict()
        config.margin_list = (1.0, 0.5, 0.0)
        config.network = "r50"
        config.resume = False
        config.save_all_states = False
        config.output = "ms1mv3_arcface_r50"
        config.embedding_size = 512
        config.sample_rate = 1
        config.interclass_filtering_threshold = 0
        config.fp16 = False
        config.batch_size = 128
        config.optimizer = "sgd"
        config.lr = 0.1
        config.momentum = 0.9
        config.weight_decay = 5e-4
        config.verbose = 2000
        config.frequent = 50
        config.dali = False
        config.gradient_acc = 1
        config.seed = 1234
        config.num_workers = 4
        config.using_wandb = False
        config.wandb_key = "XXXX"
        '''))
    out = tmp_path / "ds" / "ms1mv3_r50.json"
    rc, stdout, stderr = _run(capsys, src, "-o", out)
    assert rc == 0, stderr
    cfg = run_config.load(out)
    e = cfg.engine
    assert (e.model.name, e.model.embedding_size, e.model.dropout) == ("r50", 512, 0.0)
    assert (e.head.num_classes, e.head.sample_rate, e.head.margin, e.head.scale) == (93431, 1.0, [1.0, 0.5, 0.0], 64)
    assert cfg.micro_batch_size == 128 and cfg.gradient_accumulation_steps == 1
    assert cfg.deepspeed["gradient_clipping"] == 5.0
    assert cfg.precision == "bf16"  # fp16=True -> bf16 autocast (see the module docstring)
    assert (e.optim.name, e.optim.lr, e.optim.momentum, e.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert e.train.max_steps == 5179510 // (128 * 8) * 20 == 101160
    assert e.optim.warmup_steps == 0 and e.optim.schedule == "poly" and e.optim.poly_power == 1.0
    assert (e.data.source, e.data.path, e.data.dali, e.data.num_workers) == (
        "recordio", "/train_tmp/ms1m-retinaface-t1", "auto", 4)
    assert e.eval.bins == [f"/train_tmp/ms1m-retinaface-t1/{n}.bin" for n in ("lfw", "cfp_fp", "agedb_30")]
    assert e.eval.every == 2000 and e.train.log_every == 50 and e.train.seed == 1234
    assert e.train.output_dir == "work_dirs/ms1mv3_r50"  # output None: get_config's work_dirs/<name>
    assert e.checkpoint.every == 0 and e.checkpoint.resume == "auto"  # resume=False writes nothing: the default
    assert str(src.parent / "base.py") in stdout
    assert "not mapped: nothing" in stdout
    assert "poly with power 1" in stdout and "bf16" in stdout

    rc, _, stderr = _run(capsys, src, "-o", out)  # never overwrites silently
    assert rc == 2 and "--force" in stderr
    assert _run(capsys, src, "-o", out, "--force", "--world-size", "16")[0] == 0
    assert run_config.load(out).engine.train.max_steps == 5179510 // (128 * 16) * 20


def test_glint360k_r100_sample_rate_gradient_acc_and_unknown_key(tmp_path, capsys):
    src = _write(tmp_path, "glint360k_r100.py", GLINT360K_R100)
    out = tmp_path / "glint360k_r100.json"
    rc, stdout, stderr = _run(capsys, src, "-o", out, "--world-size", "4")
    assert rc == 0, stderr
    cfg = run_config.load(out)
    e = cfg.engine
    assert e.model.name == "r100" and e.head.sample_rate == 0.1 and e.head.margin == [1.0, 0.0, 0.4]
    assert e.head.num_classes == 360232 and e.optim.weight_decay == 1e-4
    assert cfg.micro_batch_size == 128 and cfg.gradient_accumulation_steps == 2
    micro_per_epoch = 17091657 // (128 * 4)  # arcface_torch's steps count micro-batches
    assert e.train.max_steps == micro_per_epoch * 20 // 2
    assert e.optim.warmup_steps == micro_per_epoch * 1 // 2
    assert e.eval.every == 1000 and e.train.log_every == 5  # verbose 2000 / frequent 10 micro-steps
    assert e.checkpoint.every == micro_per_epoch // 2 and e.checkpoint.resume == "auto"
    assert e.data.dali == "on"
    # The unknown key is reported with its line, and left out of the result.
    line = GLINT360K_R100.splitlines().index("config.frobnicate = 3") + 1
    assert f"frobnicate=3 (line {line}): not an arcface_torch key ArcScale knows" in stdout
    assert "frobnicate" not in out.read_text()
    assert "not mapped (1):" in stdout
    assert "gradient_acc: arcface_torch advances its LR schedule every micro-batch" in stdout
    assert "warm-up: arcface_torch's PolynomialLRWarmup runs its first step at the full LR" in stdout
    assert "arcface_torch's checkpoint_gpu_*.pt files are not read" in stdout

    # --precision fp16: DeepSpeed's loss scaling with GradScaler's growth interval (100).
    rc, _, stderr = _run(capsys, src, "-o", out, "--force", "--precision", "fp16", "--poly-power", "2")
    assert rc == 0, stderr
    cfg = run_config.load(out)
    assert cfg.precision == "fp16" and cfg.deepspeed["fp16"]["loss_scale_window"] == 100
    assert "torch_autocast" not in cfg.deepspeed and cfg.engine.optim.poly_power == 2.0


def test_vit_t_adamw_expressions_and_unevaluated_lines(tmp_path, capsys):
    src = _write(tmp_path, "wf42m_pfc03_40epoch_8gpu_vit_t.py", WF42M_VIT_T)
    out = tmp_path / "vit_t.json"
    rc, stdout, stderr = _run(capsys, src, "-o", out)
    assert rc == 0, stderr
    cfg = run_config.load(out)
    e = cfg.engine
    assert e.model.name == "vit_t" and cfg.micro_batch_size == 384
    assert (e.optim.name, e.optim.lr, e.optim.weight_decay) == ("adamw", 0.001, 0.1)
    assert e.optim.betas == [0.9, 0.999] and e.optim.eps == 1e-8  # torch AdamW's defaults, as train_v2 uses
    assert (e.head.sample_rate, e.head.margin, e.head.num_classes) == (0.3, [1.0, 0.0, 0.4], 2059906)
    micro_per_epoch = 42474557 // (384 * 8)
    assert e.train.max_steps == micro_per_epoch * 40
    assert e.optim.warmup_steps == micro_per_epoch * (40 // 10)  # config.num_epoch // 10, evaluated
    assert e.data.path == "/train_tmp/WebFace42M"  # os.path.join, evaluated
    assert e.eval.bins == [] and e.train.output_dir == "/runs/vit_t"
    line = WF42M_VIT_T.splitlines().index("config.rec_val = pick_val_dir()") + 1
    assert f"line {line}: rec_val not evaluated: pick_val_dir()" in stdout
    assert "drop_path_rate/mask_ratio" in stdout  # vit_t_dp005_mask0 -> vit_t: the difference is named


def test_never_runs_the_file_and_errors(tmp_path, capsys):
    marker = tmp_path / "ran"
    src = _write(tmp_path, "evil.py", MS1MV3_R50 + f"open({str(marker)!r}, 'w').write('x')\n"
                 f"config.lr = __import__('os').system('touch {marker}')\n")
    rc, stdout, stderr = _run(capsys, src, "-o", tmp_path / "evil.json")
    assert rc == 0, stderr
    assert not marker.exists()
    assert "not evaluated (the converter does not run code)" in stdout and "lr not evaluated" in stdout
    assert json.loads((tmp_path / "evil.json").read_text())["engine"]["optim"]["lr"] == 0.1

    missing = _write(tmp_path, "missing.py", MS1MV3_R50.replace("config.num_image = 5179510\n", ""))
    rc, _, stderr = _run(capsys, missing, "-o", tmp_path / "m.json")
    assert rc == 2 and "missing config.num_image" in stderr and not (tmp_path / "m.json").exists()

    net = _write(tmp_path, "net.py", MS1MV3_R50.replace('"r50"', '"mamba_x"'))
    rc, _, stderr = _run(capsys, net, "-o", tmp_path / "n.json")
    assert rc == 2 and "config.network: 'mamba_x' has no ArcScale backbone" in stderr

    # A value arcface_torch accepts but ArcScale's config refuses: nothing is written.
    bad = _write(tmp_path, "bad.py", MS1MV3_R50.replace("config.sample_rate = 1.0", "config.sample_rate = 1.5"))
    rc, _, stderr = _run(capsys, bad, "-o", tmp_path / "b.json")
    assert rc == 2 and "engine.head.sample_rate" in stderr and not (tmp_path / "b.json").exists()

    syntax = _write(tmp_path, "syntax.py", "config = edict()\nconfig.lr = (\n")
    with pytest.raises(ValueError, match=r"syntax.py:\d+: not valid Python"):
        convert_config.parse_config_file(syntax)
    with pytest.raises(ValueError, match="no `config = edict\\(\\)` found"):
        convert_config.parse_config_file(_write(tmp_path, "plain.py", "x = 1\n"))
    rc, _, stderr = _run(capsys, tmp_path / "nope.py", "-o", tmp_path / "x.json")
    assert rc == 2 and "nope.py not found" in stderr


def test_r2060_takes_the_recipes_zero_settings():
    """An r2060 recipe converts with ZeRO-3 as ds_configs/r2060.json sets it (read from the repository; the
    bare {"stage": 3} is only the fallback outside a checkout)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "ds_configs" / "r2060.json"
    zero = json.loads(recipe.read_text())["zero_optimization"]
    assert zero["stage"] == 3 and len(zero) > 1
    assert convert_config._r2060_zero() == zero


def test_wandb_keys_map_to_engine_train_wandb(tmp_path, capsys):
    """arcface_torch's W&B keys (base.py's, set as a recipe using W&B sets them) -> engine.train.wandb; the API
    key is never written into the config."""
    recipe = MS1MV3_R50 + textwrap.dedent('''\
        config.using_wandb = True
        config.wandb_key = "0123456789abcdef"
        config.wandb_entity = "my-team"
        config.wandb_project = "faces"
        config.suffix_run_name = "ft"
        config.notes = "r50 on ms1mv3"
        config.save_artifacts = True
        config.wandb_log_all = True
        config.wandb_resume = True
        ''')
    src = _write(tmp_path, "ms1mv3_r50.py", recipe)
    out = tmp_path / "ms1mv3_r50.json"
    rc, stdout, stderr = _run(capsys, src, "-o", out)
    assert rc == 0, stderr
    w = run_config.load(out).engine.train.wandb
    assert (w.enabled, w.mode, w.entity, w.project, w.notes, w.log_model) == (
        True, "online", "my-team", "faces", "r50 on ms1mv3", True)
    assert w.name == "ms1mv3_r50_ft"  # output_dir's name (work_dirs/ms1mv3_r50) and the suffix
    assert "0123456789abcdef" not in out.read_text() and "WANDB_API_KEY" in stdout
    assert "wandb_resume=True: a resumed ArcScale run starts a new W&B run" in stdout
    assert "wandb_log_all=True: ArcScale logs once, from rank 0" in stdout
    recipe = MS1MV3_R50 + "config.using_wandb = False\nconfig.wandb_project = 'faces'\n"
    src = _write(tmp_path, "ms1mv3_r50.py", recipe)
    assert _run(capsys, src, "-o", out, "--force")[0] == 0
    assert run_config.load(out).engine.train.wandb.enabled is False
